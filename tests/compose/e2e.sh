#!/usr/bin/env bash
# End-to-end test of the docker-compose deployment (docker-compose.yml).
#
# Brings the three-node cluster (node-a, node-b on SQLite; node-c on PostgreSQL;
# mutual TLS between them, certificates from scripts/compose-certs.sh) up under
# a unique compose project with free host ports, checks that the gRPC ports
# refuse clients without a certificate from the cluster CA (none, plaintext, or
# one from another CA) and serve the ops certificate (Admin status shows the
# mesh connected over https://), writes through the
# write API on every node, directly into node-a's SQLite file (host sqlite3 as
# uid 10001) and into PostgreSQL (psql via docker exec), then stops node-c and
# cuts node-a off the compose network while writes go on (including a
# concurrent update of one record on both sides of the partition, an update and
# a delete), restores both, and asserts convergence: every record reads the
# same on all three nodes (and as expected), the three databases hold the same
# rows, and every node's tidemark_peer_unacked_events is back to 0. Tears
# everything down (docker-compose down -v) whatever happens.
#
# Run as root (the SQLite write goes straight into the Docker volume):
#   tests/compose/e2e.sh
# Every host-side `tidemark records`/`tidemark admin` call presents
# config/compose/certs/ops.pem (the script runs scripts/compose-certs.sh, which
# keeps existing certificates).
# Environment:
#   SKIP_BUILD=1      do not run scripts/build-images.sh (images must exist)
#   TIDEMARK_BIN      the host tidemark binary (default: docker/dist/tidemark)
#   E2E_KEEP=1        leave the cluster running at the end (prints how to remove it)
#   E2E_TIMEOUT=120   seconds each wait may take
#
# Last line: "compose e2e: 1 passed, 0 failed" (or "0 passed, 1 failed", exit 1).
# "[ A ] && [ B ] || fail ...": fail exits, so this is the intended if-not.
# shellcheck disable=SC2015
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

TIMEOUT="${E2E_TIMEOUT:-120}"
PROJECT="tmcompose$(date +%s)$$"
BIN="${TIDEMARK_BIN:-$ROOT/docker/dist/tidemark}"
NODES=(node-a node-b node-c)
CERTS="$ROOT/config/compose/certs"
# The ops client certificate, for every host-side records/admin call.
TLS_ARGS=(--ca-file "$CERTS/ca.pem" --cert-file "$CERTS/ops.pem" --key-file "$CERTS/ops.key")
FOREIGN=""  # a throwaway CA and client certificate (not the cluster's)
RESULT=fail
STARTED=0
T0=$SECONDS

log() { printf '[e2e %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() { printf '[e2e %4ds] FAIL: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }

if command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=()
fi
dc() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ -z "$FOREIGN" ] || rm -rf "$FOREIGN"
    if [ "$STARTED" = 1 ]; then
        if [ "$RESULT" != pass ]; then
            log "failure: state and last log lines of project $PROJECT"
            dc ps
            dc logs --no-color --tail=40
        fi
        if [ "${E2E_KEEP:-0}" = 1 ]; then
            log "E2E_KEEP=1: left running; remove with: docker-compose -p $PROJECT down -v"
        else
            log "tearing down project $PROJECT"
            dc down -v --remove-orphans --timeout 20 >/dev/null 2>&1 ||
                log "warning: docker-compose down failed; remove with: docker-compose -p $PROJECT down -v"
        fi
    fi
    if [ "$RESULT" = pass ] && [ "$rc" = 0 ]; then
        echo "compose e2e: 1 passed, 0 failed"
        exit 0
    fi
    echo "compose e2e: 0 passed, 1 failed"
    exit 1
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || fail "run as root (writes into a Docker volume as uid 10001)"
[ ${#COMPOSE[@]} -gt 0 ] || fail "neither docker-compose nor 'docker compose' is available"
for tool in docker sqlite3 setpriv curl jq; do
    command -v "$tool" >/dev/null || fail "'$tool' is required"
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building images (scripts/build-images.sh; SKIP_BUILD=1 skips)"
    # The Prometheus image serves only the optional "monitoring" profile, which
    # this test does not start (its config is checked by tests/tests/operate.rs).
    SKIP_PROMETHEUS=1 "$ROOT/scripts/build-images.sh" || fail "scripts/build-images.sh failed"
fi
for image in "${TIDEMARK_IMAGE:-tidemark/tidemark:latest}" "${TIDEMARK_POSTGRES_IMAGE:-tidemark/postgres:15}" \
    "${TIDEMARK_DEBIAN_IMAGE:-tidemark/debian:bookworm}"; do
    docker image inspect "$image" >/dev/null 2>&1 ||
        fail "image $image is missing: run scripts/build-images.sh (nothing can be pulled)"
done
[ -x "$BIN" ] || fail "host binary $BIN is missing (scripts/build-images.sh stages it; or set TIDEMARK_BIN)"

# Certificates for mutual TLS (scripts/build-images.sh made them already unless
# SKIP_BUILD=1; existing ones are kept either way).
TIDEMARK_BIN="$BIN" "$ROOT/scripts/compose-certs.sh" >/dev/null || fail "scripts/compose-certs.sh failed"
for f in ca.pem ops.pem ops.key node-a.pem node-a.key node-b.pem node-b.key node-c.pem node-c.key; do
    [ -s "$CERTS/$f" ] || fail "$CERTS/$f is missing"
done
[ "$(stat -c %a "$CERTS")" = 700 ] || fail "$CERTS should be mode 0700, is $(stat -c %a "$CERTS")"

# Six free loopback ports, so the test never collides with a running cluster.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -A TAKEN=()
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 40000))
        if [ -z "${TAKEN[$p]:-}" ] && ! port_in_use "$p" &&
            ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
            TAKEN[$p]=1
            echo "$p"
            return
        fi
    done
    fail "no free port found"
}
declare -A GRPC=() METRICS=()
for n in "${NODES[@]}"; do
    GRPC[$n]=$(free_port)
    METRICS[$n]=$(free_port)
done
export NODE_A_GRPC_PORT=${GRPC[node-a]} NODE_B_GRPC_PORT=${GRPC[node-b]} NODE_C_GRPC_PORT=${GRPC[node-c]}
export NODE_A_METRICS_PORT=${METRICS[node-a]} NODE_B_METRICS_PORT=${METRICS[node-b]} NODE_C_METRICS_PORT=${METRICS[node-c]}
export TIDEMARK_PUBLISH_ADDR=127.0.0.1

# ---------------------------------------------------------------- helpers
cid() { dc ps -q "$1"; }

# wait_for DESCRIPTION COMMAND...: retries COMMAND every second for TIMEOUT s.
wait_for() {
    local what=$1
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "timed out after ${TIMEOUT}s waiting for $what"
        sleep 1
    done
}

healthy() { [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$(cid "$1")")" = healthy ]; }

# The write API and Admin of NODE, over mutual TLS with the ops certificate.
api() { "$BIN" records --addr "https://127.0.0.1:${GRPC[$1]}" "${TLS_ARGS[@]}" "${@:2}"; }
admin() { "$BIN" admin --addr "https://127.0.0.1:${GRPC[$1]}" "${TLS_ARGS[@]}" "${@:2}"; }

# refused DESCRIPTION COMMAND...: COMMAND must exit non-zero (within 30 s).
refused() {
    local what=$1 out rc=0
    shift
    out=$(timeout 30 "$@" 2>&1) || rc=$?
    [ "$rc" != 0 ] || fail "$what was accepted: $out"
    [ "$rc" != 124 ] || fail "$what hung (no answer within 30s) instead of being refused"
    log "refused as expected: $what (exit $rc: $(head -n 1 <<<"$out" | cut -c1-160))"
}

metrics() { curl -fsS --max-time 3 "http://127.0.0.1:${METRICS[$1]}/metrics"; }

# metric_values NODE NAME: "labels value" lines of one metric.
metric_values() { metrics "$1" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { print }'; }

# Every peer of NODE connected.
peers_connected() {
    local lines
    lines=$(metric_values "$1" tidemark_peer_connected) || return 1
    [ "$(grep -c . <<<"$lines")" = 2 ] && ! awk '$NF != 1 { bad = 1 } END { exit !bad }' <<<"$lines"
}

# Sum of tidemark_peer_unacked_events over NODE's peers.
unacked_sum() {
    local lines
    lines=$(metric_values "$1" tidemark_peer_unacked_events) || return 1
    [ "$(grep -c . <<<"$lines")" = 2 ] || return 1
    awk '{ s += $NF } END { printf "%d\n", s }' <<<"$lines"
}

all_synced() {
    local n
    for n in "${NODES[@]}"; do
        peers_connected "$n" || return 1
        [ "$(unacked_sum "$n")" = 0 ] || return 1
    done
}

sql_quote() { printf "'%s'" "${1//\'/\'\'}"; }

# Host sqlite3 as the daemon's user (uid/gid 10001), so any file it creates
# (-wal, -shm, journal) belongs to the daemon. uid 10001 may not traverse
# /var/lib/docker (0710 root:root) to the volume, so it keeps CAP_DAC_OVERRIDE
# (as an ambient capability) for the path; files it creates are still 10001's.
as_daemon_user() {
    setpriv --reuid=10001 --regid=10001 --clear-groups \
        --inh-caps=+dac_override --ambient-caps=+dac_override "$@"
}

# Direct SQL into node-a's SQLite file in its Docker volume.
sqlite_a() { as_daemon_user sqlite3 -bail -cmd ".timeout 10000" "$SQLITE_A" "$@"; }

# Direct SQL into node-c's PostgreSQL.
psql_c() {
    docker exec -i "$(cid postgres)" psql -X -q -v ON_ERROR_STOP=1 -At -U tidemark -d tidemark "$@"
}

# Expected final state: EXPECT[id] = title, "<deleted>", or "<any>" (a
# concurrent update: any winner, but the same everywhere).
declare -A EXPECT=()
IDS=()
new_id() { "$BIN" new-id; }

api_put() { # NODE ID TITLE
    api "$1" put notes "$2" "$(jq -cn --arg t "$3" '{title: $t}')" >/dev/null ||
        fail "records put on $1 failed"
}

record_new() { # ID TITLE
    IDS+=("$1")
    EXPECT[$1]=$2
}

# One tab-separated line per record on NODE: id, found, title, hlc, origin node.
snapshot() {
    local n=$1 id out
    for id in "${IDS[@]}"; do
        out=$(api "$n" get notes "$id" 2>/dev/null) || true
        [ -n "$out" ] || return 1
        jq -r --arg id "$id" '[$id, (.found|tostring), (.values.title // "-"), (.hlc|tostring), (.node_id // "-")] | join("\t")' <<<"$out" ||
            return 1
    done
}

converged() {
    local a b c
    a=$(snapshot node-a) && b=$(snapshot node-b) && c=$(snapshot node-c) || return 1
    [ "$a" = "$b" ] && [ "$b" = "$c" ]
}

# The rows of each database, as "id|title" sorted by id.
rows_sqlite() { # VOLUME_FILE
    as_daemon_user sqlite3 -readonly -cmd ".timeout 10000" "$1" "SELECT id || '|' || COALESCE(title, '') FROM notes ORDER BY id"
}
rows_postgres() { psql_c -c "SELECT id || '|' || COALESCE(title, '') FROM notes ORDER BY id"; }

# ---------------------------------------------------------------- up
log "project $PROJECT; ports: gRPC a/b/c ${GRPC[node-a]}/${GRPC[node-b]}/${GRPC[node-c]}, metrics ${METRICS[node-a]}/${METRICS[node-b]}/${METRICS[node-c]}"
STARTED=1
dc up -d || fail "docker-compose up failed"

init_cid=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=sqlite-init")
[ -n "$init_cid" ] && [ "$(docker inspect -f '{{.State.ExitCode}}' "$init_cid")" = 0 ] ||
    fail "sqlite-init did not complete successfully"

for s in postgres "${NODES[@]}"; do
    wait_for "$s to become healthy" healthy "$s"
    log "$s is healthy"
done
for n in "${NODES[@]}"; do
    wait_for "$n to connect to both peers" peers_connected "$n"
done
log "full mesh connected"

# ---------------------------------------------------------------- mutual TLS
log "mutual TLS: Admin status over https:// with the ops certificate"
for n in "${NODES[@]}"; do
    st=$(admin "$n" --json status) || fail "tidemark admin status on $n (ops certificate) failed"
    jq -e --arg name "$n" '.name == $name and (.peers | length) == 2 and
        all(.peers[]; .connected and (.address | startswith("https://")))' <<<"$st" >/dev/null ||
        fail "$n: Admin status does not show two connected https:// peers: $(jq -c '{name, peers: [.peers[] | {address, connected, last_error}]}' <<<"$st")"
done
log "every node reports both peers connected over https://"

FOREIGN=$(mktemp -d /tmp/tidemark-e2e-foreign.XXXXXX)
"$BIN" cert ca --dir "$FOREIGN" >/dev/null && "$BIN" cert node --dir "$FOREIGN" --name intruder --node-id "$(new_id)" >/dev/null ||
    fail "cannot make the foreign CA"
probe_id=$(new_id)
for n in "${NODES[@]}"; do
    url="https://127.0.0.1:${GRPC[$n]}"
    refused "$n: records get without a client certificate" \
        "$BIN" records --addr "$url" get notes "$probe_id"
    refused "$n: admin status without a client certificate" \
        "$BIN" admin --addr "$url" status
    refused "$n: records get in plaintext (http://)" \
        "$BIN" records --addr "http://127.0.0.1:${GRPC[$n]}" get notes "$probe_id"
    refused "$n: records put with a client certificate from another CA" \
        "$BIN" records --addr "$url" --ca-file "$CERTS/ca.pem" --cert-file "$FOREIGN/intruder.pem" \
        --key-file "$FOREIGN/intruder.key" put notes "$probe_id" '{"title":"intruder"}'
    # The TLS layer itself: the server must demand a client certificate (curl
    # trusts the cluster CA, so only the missing client certificate can fail it).
    refused "$n: TLS handshake without a client certificate (curl)" \
        curl -sS --max-time 10 --http2 --cacert "$CERTS/ca.pem" -o /dev/null "$url/"
    curl -sS --max-time 10 --http2 --cacert "$CERTS/ca.pem" --cert "$CERTS/ops.pem" --key "$CERTS/ops.key" \
        -o /dev/null "$url/" || fail "$n: TLS handshake with the ops certificate (curl) failed"
done
probe=$(api node-a get notes "$probe_id" 2>&1) || true
[ "$(jq -r .found <<<"$probe" 2>/dev/null)" = false ] ||
    fail "the put with another CA's certificate should not exist: $probe"
# The refusals happened on the servers' side too (README: "the node logs why").
for n in "${NODES[@]}"; do
    reasons=$(dc logs --no-color "$n" 2>/dev/null | grep -F 'tls accept error' | sed -n 's/.*error=//p' | sort | uniq -c | awk '{ $1 = $1 "x"; print }' | paste -sd ';' -)
    [ -n "$reasons" ] || fail "$n logged no 'tls accept error' for the refused clients"
    log "$n logged tls accept errors: $reasons"
done
log "the gRPC ports accept only certificates from the cluster CA"

NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(cid node-a)")
VOL_A=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "$(cid node-a)")
VOL_B=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "$(cid node-b)")
SQLITE_A="$(docker volume inspect -f '{{.Mountpoint}}' "$VOL_A")/node-a.db"
SQLITE_B="$(docker volume inspect -f '{{.Mountpoint}}' "$VOL_B")/node-b.db"
[ -f "$SQLITE_A" ] && [ -f "$SQLITE_B" ] || fail "SQLite files not found in volumes $VOL_A, $VOL_B"
owner=$(stat -c %u:%g "$SQLITE_A")
[ "$owner" = 10001:10001 ] || fail "$SQLITE_A is owned by $owner, expected 10001:10001"
log "network $NET; node-a database $SQLITE_A"

# ---------------------------------------------------------------- phase 1: healthy cluster
log "phase 1: writes through the API on every node, direct SQL on node-a (SQLite) and node-c (PostgreSQL)"
for n in "${NODES[@]}"; do
    for i in 1 2 3; do
        id=$(new_id)
        api_put "$n" "$id" "api $n #$i"
        record_new "$id" "api $n #$i"
    done
done
for i in 1 2; do
    id=$(new_id)
    sqlite_a "INSERT INTO notes (id, title) VALUES ('$id', 'sqlite node-a #$i')" ||
        fail "direct SQLite insert on node-a failed"
    record_new "$id" "sqlite node-a #$i"
done
for i in 1 2; do
    id=$(new_id)
    psql_c -c "INSERT INTO notes (id, title) VALUES ('$id', 'psql node-c #$i')" >/dev/null ||
        fail "direct PostgreSQL insert on node-c failed"
    record_new "$id" "psql node-c #$i"
done
wait_for "phase 1 to converge (all records equal on all nodes)" converged
wait_for "phase 1 acks (tidemark_peer_unacked_events = 0 everywhere)" all_synced
log "phase 1 converged: ${#IDS[@]} records on all three nodes"

# ---------------------------------------------------------------- phase 2: faults
CONFLICT_ID=${IDS[0]}   # written through node-a's API in phase 1
DELETE_ID=${IDS[3]}     # written through node-b's API
UPDATE_B_ID=${IDS[6]}   # written through node-c's API, updated on node-b
UPDATE_A_ID=${IDS[9]}   # written with sqlite3 on node-a, updated there
UPDATE_C_ID=${IDS[11]}  # written with psql on node-c, updated there

log "phase 2: stopping node-c, disconnecting node-a from $NET"
docker stop -t 20 "$(cid node-c)" >/dev/null || fail "docker stop node-c failed"
docker network disconnect "$NET" "$(cid node-a)" || fail "docker network disconnect node-a failed"

log "phase 2: writes during the faults"
# node-b (reachable, but alone): new records, an update, a delete, one side of a conflict.
for i in 1 2 3; do
    id=$(new_id)
    api_put node-b "$id" "api node-b partitioned #$i"
    record_new "$id" "api node-b partitioned #$i"
done
api_put node-b "$UPDATE_B_ID" "updated on node-b"
EXPECT[$UPDATE_B_ID]="updated on node-b"
api node-b delete notes "$DELETE_ID" >/dev/null || fail "records delete on node-b failed"
EXPECT[$DELETE_ID]="<deleted>"
api_put node-b "$CONFLICT_ID" "conflict: node-b side"
EXPECT[$CONFLICT_ID]="<any>"
# node-a (cut off the network; its published ports go with it): direct SQLite.
for i in 1 2; do
    id=$(new_id)
    sqlite_a "INSERT INTO notes (id, title) VALUES ('$id', 'sqlite node-a partitioned #$i')" ||
        fail "direct SQLite insert on partitioned node-a failed"
    record_new "$id" "sqlite node-a partitioned #$i"
done
sqlite_a "UPDATE notes SET title = 'updated on node-a' WHERE id = '$UPDATE_A_ID'" ||
    fail "direct SQLite update on node-a failed"
EXPECT[$UPDATE_A_ID]="updated on node-a"
sqlite_a "UPDATE notes SET title = 'conflict: node-a side' WHERE id = '$CONFLICT_ID'" ||
    fail "direct SQLite update on node-a failed"
# node-c is stopped: write into its database; the daemon captures it at restart.
for i in 1 2; do
    id=$(new_id)
    psql_c -c "INSERT INTO notes (id, title) VALUES ('$id', 'psql node-c while stopped #$i')" >/dev/null ||
        fail "direct PostgreSQL insert while node-c is stopped failed"
    record_new "$id" "psql node-c while stopped #$i"
done
psql_c -c "UPDATE notes SET title = 'updated in postgres' WHERE id = '$UPDATE_C_ID'" >/dev/null ||
    fail "direct PostgreSQL update failed"
EXPECT[$UPDATE_C_ID]="updated in postgres"

# node-b must see the lag towards both unreachable peers.
lagging() { local l; l=$(metric_values node-b tidemark_peer_unacked_events) && ! awk '$NF == 0 { z = 1 } END { exit !z }' <<<"$l"; }
wait_for "node-b to report unacked events for both unreachable peers" lagging
log "node-b reports lag: $(metric_values node-b tidemark_peer_unacked_events | tr '\n' ' ')"
sleep 2 # let partitioned node-a capture its direct writes

log "phase 2: restoring node-a's network and starting node-c"
docker network connect --alias node-a "$NET" "$(cid node-a)" || fail "docker network connect node-a failed"
docker start "$(cid node-c)" >/dev/null || fail "docker start node-c failed"
for n in node-a node-c; do
    wait_for "$n to become healthy again" healthy "$n"
done
wait_for "node-a's published metrics port to answer again" metrics node-a

# ---------------------------------------------------------------- convergence
log "waiting for convergence of ${#IDS[@]} records"
wait_for "all peers connected and tidemark_peer_unacked_events = 0 on every node" all_synced
wait_for "all records to read the same on node-a, node-b and node-c" converged

final=$(snapshot node-a) || fail "cannot read records from node-a"
for id in "${IDS[@]}"; do
    line=$(grep "^$id"$'\t' <<<"$final")
    found=$(cut -f2 <<<"$line")
    title=$(cut -f3 <<<"$line")
    case "${EXPECT[$id]}" in
    "<deleted>") [ "$found" = false ] || fail "$id should be deleted everywhere: $line" ;;
    "<any>")
        [ "$found" = true ] || fail "$id (concurrently updated) is missing: $line"
        case "$title" in
        "conflict: node-a side" | "conflict: node-b side") log "concurrent update of $id converged to \"$title\" on every node" ;;
        *) fail "$id: unexpected winner \"$title\"" ;;
        esac
        ;;
    *)
        [ "$found" = true ] && [ "$title" = "${EXPECT[$id]}" ] ||
            fail "$id: expected \"${EXPECT[$id]}\", nodes agree on: $line"
        ;;
    esac
done
log "all ${#IDS[@]} records read the same on every node, with the expected values"

# The databases themselves.
same_rows() {
    local a b c
    a=$(rows_sqlite "$SQLITE_A") && b=$(rows_sqlite "$SQLITE_B") && c=$(rows_postgres) || return 1
    [ "$a" = "$b" ] && [ "$b" = "$c" ]
}
wait_for "the three databases to hold the same rows" same_rows
rows=$(rows_postgres | grep -c .)
expected_rows=0
for id in "${IDS[@]}"; do [ "${EXPECT[$id]}" = "<deleted>" ] || expected_rows=$((expected_rows + 1)); done
[ "$rows" = "$expected_rows" ] || fail "the databases hold $rows rows, expected $expected_rows"
log "node-a.db, node-b.db and PostgreSQL hold the same $rows rows"

for f in "$SQLITE_A" "$SQLITE_B"; do
    others=$(find "$(dirname "$f")" -mindepth 1 \( ! -uid 10001 -o ! -gid 10001 \) -printf '%p %u:%g\n')
    [ -z "$others" ] || fail "files in a SQLite volume not owned by 10001:10001: $others"
done
log "SQLite volumes: every file owned by 10001:10001 ($(find "$(dirname "$SQLITE_A")" -mindepth 1 -printf '%f '))"

# Once more, after node-c drained what was written while it was down.
wait_for "tidemark_peer_unacked_events = 0 on every node after convergence" all_synced
for n in "${NODES[@]}"; do
    log "$n: unacked $(unacked_sum "$n"), $(metric_values "$n" tidemark_peer_unacked_events | tr '\n' ' ')"
done

RESULT=pass
log "passed in $((SECONDS - T0))s"
