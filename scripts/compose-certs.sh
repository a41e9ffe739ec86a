#!/usr/bin/env bash
# Makes the certificates for mutual TLS in the docker-compose cluster
# (docker-compose.yml), in config/compose/certs/ (gitignored; never commit it):
#
#   ca.pem  ca.key           the cluster CA (`tidemark cert ca`); ca.key is
#                            never mounted into a container
#   node-{a,b,c}.pem/.key    one per node (`tidemark cert node`): common name =
#                            the node id from config/compose/node-X.toml,
#                            hosts = the service name, localhost, 127.0.0.1
#   ops.pem  ops.key         a client certificate for host-side
#                            `tidemark records/admin --ca-file ... --cert-file
#                            ... --key-file ...` (`tidemark cert client`:
#                            common name "ops", which the nodes' [access]
#                            make a writer and an operator)
#
# Permissions (see "Mutual TLS" in docs/COMPOSE.md): the directory is 0700, so
# no other host user can reach anything in it; the files a container reads
# (ca.pem, node-X.pem, node-X.key) are 0644, because the daemon runs as uid
# 10001 and docker-compose.yml bind-mounts them one file at a time (Docker
# resolves a bind-mount source as root, through the 0700 directory; inside the
# container the file keeps its 0644). ca.key and ops.key, used on the host
# only, stay 0600.
#
# Idempotent: keeps every certificate that exists and makes only what is
# missing. With openssl on PATH it also re-issues a node or ops certificate
# that is not signed by ca.pem, expires within 30 days, or (node) names another
# id than its config. A new CA re-issues all of them.
# Rotate everything: rm -rf config/compose/certs && scripts/compose-certs.sh,
# then restart the cluster (docker-compose up -d --force-recreate).
#
# Environment (optional):
#   TIDEMARK_BIN   the tidemark binary (default: docker/dist/tidemark, which
#                  scripts/build-images.sh stages, else `tidemark` on PATH)
#   CERTS_DIR      where to write (default: config/compose/certs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CERTS_DIR="${CERTS_DIR:-$ROOT/config/compose/certs}"
NODES=(node-a node-b node-c)
RENEW_SECONDS=$((30 * 86400))

info() { printf '    %s\n' "$*"; }
die() { printf 'compose-certs: error: %s\n' "$*" >&2; exit 1; }

if [ -n "${TIDEMARK_BIN:-}" ]; then
    BIN="$TIDEMARK_BIN"
elif [ -x "$ROOT/docker/dist/tidemark" ]; then
    BIN="$ROOT/docker/dist/tidemark"
elif command -v tidemark >/dev/null 2>&1; then
    BIN="$(command -v tidemark)"
else
    die "no tidemark binary: run scripts/build-images.sh (it stages docker/dist/tidemark), or set TIDEMARK_BIN"
fi
[ -x "$BIN" ] || die "$BIN is not executable"
HAVE_OPENSSL=0
command -v openssl >/dev/null 2>&1 && HAVE_OPENSSL=1

# node.id of config/compose/NAME.toml (the first `id = "..."` in [node]).
node_id() {
    local file="$ROOT/config/compose/$1.toml" id
    [ -f "$file" ] || die "$file is missing"
    id=$(awk -F'"' '/^\[node\]/ { s = 1; next } /^\[/ { s = 0 } s && $1 ~ /^id *= *$/ { print $2; exit }' "$file")
    [ -n "$id" ] || die "no node.id in $file"
    printf '%s\n' "$id"
}

# A bind mount of a missing file, with docker-compose's short volume syntax,
# makes an empty directory in its place: clear those.
clear_stray_dir() {
    if [ -d "$1" ]; then
        rmdir "$1" 2>/dev/null || die "$1 is a directory, expected a file: remove it"
        info "removed empty directory $1 (left by a bind mount of a missing file)"
    fi
}

have_pair() { # NAME: NAME.pem and NAME.key both exist and are not empty
    clear_stray_dir "$CERTS_DIR/$1.pem"
    clear_stray_dir "$CERTS_DIR/$1.key"
    [ -s "$CERTS_DIR/$1.pem" ] && [ -s "$CERTS_DIR/$1.key" ]
}

# Why the certificate NAME.pem must be re-issued ("" if it is fine). Needs openssl.
stale_reason() { # NAME [EXPECTED_CN]
    local pem="$CERTS_DIR/$1.pem" cn
    [ "$HAVE_OPENSSL" = 1 ] || return 0
    openssl verify -CAfile "$CERTS_DIR/ca.pem" "$pem" >/dev/null 2>&1 ||
        { echo "not signed by ca.pem (or unreadable)"; return 0; }
    openssl x509 -noout -checkend "$RENEW_SECONDS" -in "$pem" >/dev/null 2>&1 ||
        { echo "expires within 30 days"; return 0; }
    if [ -n "${2:-}" ]; then
        cn=$(openssl x509 -noout -subject -nameopt multiline -in "$pem" | awk -F' = ' '$1 ~ /commonName/ { print $2 }')
        [ "$cn" = "$2" ] || { echo "has common name '$cn', expected $2"; return 0; }
    fi
}

umask 077
mkdir -p "$CERTS_DIR"
chmod 0700 "$CERTS_DIR"

# --- the cluster CA ---------------------------------------------------------
new_ca=0
if have_pair ca; then
    info "keeping the cluster CA $CERTS_DIR/ca.pem"
    if [ "$HAVE_OPENSSL" = 1 ] && ! openssl x509 -noout -checkend "$RENEW_SECONDS" -in "$CERTS_DIR/ca.pem" >/dev/null 2>&1; then
        printf 'compose-certs: warning: %s expires within 30 days: rotate (rm -rf %s and run this again)\n' \
            "$CERTS_DIR/ca.pem" "$CERTS_DIR" >&2
    fi
else
    "$BIN" cert ca --dir "$CERTS_DIR" >/dev/null || die "tidemark cert ca failed"
    new_ca=1
    info "made the cluster CA $CERTS_DIR/ca.pem"
fi

# --- node and ops certificates ------------------------------------------------
issue() { # NAME ID HOST...
    local name=$1 id=$2
    shift 2
    local hosts=()
    for h in "$@"; do hosts+=(--host "$h"); done
    "$BIN" cert node --dir "$CERTS_DIR" --node-id "$id" --name "$name" "${hosts[@]}" >/dev/null ||
        die "tidemark cert node --name $name failed"
}

for name in "${NODES[@]}" ops; do
    if [ "$name" = ops ]; then expected=ops; else expected=$(node_id "$name"); fi
    reason=""
    if [ "$new_ca" = 1 ]; then
        reason="new CA"
    elif ! have_pair "$name"; then
        reason="missing"
    else
        reason=$(stale_reason "$name" "$expected")
    fi
    if [ -z "$reason" ]; then
        info "keeping $CERTS_DIR/$name.pem"
        continue
    fi
    if [ "$name" = ops ]; then
        # A client certificate named "ops": the nodes' [access] lists give it
        # the writer and operator roles.
        "$BIN" cert client --dir "$CERTS_DIR" --name ops >/dev/null ||
            die "tidemark cert client --name ops failed"
    else
        issue "$name" "$expected" "$name" localhost 127.0.0.1
    fi
    info "made $CERTS_DIR/$name.pem ($reason)"
done

# --- permissions ----------------------------------------------------------------
chmod 0700 "$CERTS_DIR"
chmod 0600 "$CERTS_DIR/ca.key" "$CERTS_DIR/ops.key"
chmod 0644 "$CERTS_DIR/ca.pem" "$CERTS_DIR/ops.pem"
for name in "${NODES[@]}"; do
    chmod 0644 "$CERTS_DIR/$name.pem" "$CERTS_DIR/$name.key"
done
info "certificates in $CERTS_DIR (directory 0700; node files 0644 for uid 10001; ca.key, ops.key 0600)"
