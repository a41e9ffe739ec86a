#!/bin/sh
# Starts PostgreSQL 15 in the foreground. On first start (empty $PGDATA) it runs
# initdb as the postgres user, creates the $POSTGRES_USER role with password
# $POSTGRES_PASSWORD (scram-sha-256 over TCP from anywhere), the $POSTGRES_DB
# database owned by it, and runs /docker-entrypoint-initdb.d/*.sql in that
# database as that role (the image ships one creating the replicated `notes`
# table). Extra arguments after `postgres` are passed to the server.
set -eu

: "${PG_BIN:=/usr/lib/postgresql/15/bin}"
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=tidemark}"
: "${POSTGRES_DB:=tidemark}"
export PGDATA

log() { echo "postgres-entrypoint: $*" >&2; }

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
if [ $# -gt 0 ]; then shift; fi

if [ "$(id -u)" = 0 ]; then
    # Volumes and bind mounts may come in owned by root: fix, then drop to postgres.
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        log "POSTGRES_PASSWORD is not set; refusing to create a database without a password"
        exit 1
    fi
    log "initialising a new cluster in $PGDATA"
    "$PG_BIN/initdb" --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    {
        echo "listen_addresses = '*'"
        echo "password_encryption = 'scram-sha-256'"
        echo "unix_socket_directories = '/var/run/postgresql'"
    } >>"$PGDATA/postgresql.conf"
    # Local socket: trust (for `docker exec ... psql`); TCP: passwords only.
    cat >"$PGDATA/pg_hba.conf" <<'HBA'
local all all                trust
host  all all 0.0.0.0/0      scram-sha-256
host  all all ::/0           scram-sha-256
HBA
    # A temporary server on the Unix socket only, so health checks (TCP) stay
    # red until the initialisation is done.
    "$PG_BIN/pg_ctl" -D "$PGDATA" -w -t 60 -o "-c listen_addresses=''" start >/dev/null
    psql="psql -v ON_ERROR_STOP=1 -X -q -h /var/run/postgresql"
    $psql -U postgres -d postgres --set=u="$POSTGRES_USER" --set=p="$POSTGRES_PASSWORD" --set=db="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"u" LOGIN PASSWORD :'p';
CREATE DATABASE :"db" OWNER :"u";
SQL
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] || continue
        log "running $f in database $POSTGRES_DB"
        $psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f "$f"
    done
    "$PG_BIN/pg_ctl" -D "$PGDATA" -w -t 60 -m fast stop >/dev/null
    log "initialisation done"
fi

log "starting PostgreSQL"
exec "$PG_BIN/postgres" "$@"
