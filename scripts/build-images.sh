#!/usr/bin/env bash
# Builds every image the docker-compose cluster uses, without pulling anything
# from an image registry:
#
#   1. tidemark/debian:bookworm   a Debian base with postgresql-15 and sqlite3,
#                                 made with debootstrap + `docker import`
#                                 (skipped when the image already exists)
#   2. docker/dist/tidemark       the static (glibc, crt-static) release binary,
#                                 built on the host with cargo
#   3. tidemark/tidemark:latest   FROM scratch + that binary (./Dockerfile)
#   4. tidemark/postgres:15       FROM tidemark/debian:bookworm (docker/postgres/)
#   5. config/compose/certs/      the cluster CA and node/ops certificates for
#                                 mutual TLS (scripts/compose-certs.sh; keeps
#                                 the ones that exist)
#   6. tidemark/prometheus:latest FROM tidemark/debian:bookworm + Debian's
#                                 `prometheus` package (docker/prometheus/), for
#                                 the optional "monitoring" compose profile
#
# Then `docker-compose up -d` needs no build and no pull.
#
# Environment (all optional):
#   CARGO_TARGET_DIR       where cargo builds the static binary
#                          (default: target/static in the repository)
#   TIDEMARK_BINARY        use this prebuilt static x86_64 tidemark binary
#                          instead of running cargo (e.g. one built in CI)
#   DEBIAN_MIRROR          debootstrap mirror (default http://deb.debian.org/debian)
#   DEBIAN_BASE_FROM       on a machine WITH a registry and without debootstrap:
#                          an image to derive the Debian base from instead, e.g.
#                          debian:bookworm-slim (packages then come from apt-get)
#   REBUILD_BASE=1         rebuild the Debian base even if it exists
#   SKIP_PROMETHEUS=1      do not build the Prometheus image (step 6)
#   TIDEMARK_IMAGE, TIDEMARK_POSTGRES_IMAGE, TIDEMARK_DEBIAN_IMAGE,
#   TIDEMARK_PROMETHEUS_IMAGE
#                          image names (defaults above; docker-compose.yml reads
#                          them too)
#   DOCKER                 the docker client (default: docker)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
DEBIAN_IMAGE="${TIDEMARK_DEBIAN_IMAGE:-tidemark/debian:bookworm}"
TIDEMARK_IMAGE="${TIDEMARK_IMAGE:-tidemark/tidemark:latest}"
POSTGRES_IMAGE="${TIDEMARK_POSTGRES_IMAGE:-tidemark/postgres:15}"
PROMETHEUS_IMAGE="${TIDEMARK_PROMETHEUS_IMAGE:-tidemark/prometheus:latest}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_PACKAGES="postgresql-15,postgresql-client-15,sqlite3,ca-certificates"
TARGET_TRIPLE="x86_64-unknown-linux-gnu"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/static}"

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

command -v "$DOCKER" >/dev/null || die "'$DOCKER' not found: install Docker"
"$DOCKER" info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running? are you allowed to use it?)"
[ "$(uname -m)" = x86_64 ] || die "this script builds an $TARGET_TRIPLE binary; this machine is $(uname -m)"

# --- 1. Debian base -----------------------------------------------------------
build_debian_base() {
    if [ -n "${DEBIAN_BASE_FROM:-}" ]; then
        step "Debian base $DEBIAN_IMAGE from $DEBIAN_BASE_FROM (uses a registry)"
        local pkgs="${DEBIAN_PACKAGES//,/ }"
        printf 'FROM %s\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s && rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15/main /etc/postgresql/15/main\n' \
            "$DEBIAN_BASE_FROM" "$pkgs" | "$DOCKER" build -t "$DEBIAN_IMAGE" -
        return
    fi
    step "Debian base $DEBIAN_IMAGE with debootstrap (packages: $DEBIAN_PACKAGES)"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root (run as root, or build the base once with sudo)"
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap (or set DEBIAN_BASE_FROM=debian:bookworm-slim on a machine with a registry)"
    local dir
    dir="$(mktemp -d /var/tmp/tidemark-debootstrap.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" EXIT
    info "debootstrap into $dir (a few minutes; log: $dir.log)"
    if ! debootstrap --variant=minbase --include="$DEBIAN_PACKAGES" bookworm "$dir" "$DEBIAN_MIRROR" >"$dir.log" 2>&1; then
        tail -n 30 "$dir.log" >&2
        die "debootstrap failed (full log: $dir.log)"
    fi
    rm -f "$dir.log"
    # Slim it: package caches and lists, docs, and the cluster the postgresql
    # package creates at install (the postgres image makes its own in a volume).
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* \
        "$dir"/var/lib/postgresql/15/main "$dir"/etc/postgresql/15/main \
        "$dir"/var/log/*.log "$dir"/var/log/apt/* "$dir"/tmp/*
    info "importing into Docker as $DEBIAN_IMAGE"
    tar -C "$dir" --numeric-owner -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$dir"
    trap - EXIT
}

if image_exists "$DEBIAN_IMAGE" && [ "${REBUILD_BASE:-0}" != 1 ]; then
    step "Debian base $DEBIAN_IMAGE already exists (REBUILD_BASE=1 rebuilds it)"
else
    build_debian_base
fi

# --- 2. static tidemark binary --------------------------------------------------
if [ -n "${TIDEMARK_BINARY:-}" ]; then
    step "static tidemark binary: using TIDEMARK_BINARY=$TIDEMARK_BINARY (no cargo build)"
    BIN="$TIDEMARK_BINARY"
else
    step "static tidemark binary (cargo build --release, target dir $CARGO_TARGET_DIR)"
    command -v cargo >/dev/null || die "cargo not found: install Rust (see rust-toolchain.toml)"
    (
        cd "$ROOT"
        # --target keeps build scripts and proc-macros dynamic; only the tidemark
        # binary is linked statically against glibc.
        RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --target "$TARGET_TRIPLE" -p tidemark
    ) || die "cargo build failed"
    BIN="$CARGO_TARGET_DIR/$TARGET_TRIPLE/release/tidemark"
fi
[ -x "$BIN" ] || die "expected binary $BIN is missing"
# A static(-pie) binary lists no shared libraries ("statically linked").
if ldd "$BIN" 2>&1 | grep -q '=>'; then
    die "$BIN is dynamically linked; it would not run in a scratch image"
fi
mkdir -p "$ROOT/docker/dist"
cp -f "$BIN" "$ROOT/docker/dist/tidemark.new"
mv -f "$ROOT/docker/dist/tidemark.new" "$ROOT/docker/dist/tidemark"
# Empty directories the scratch image needs (/tmp for SQLite's temporary files,
# /data for its databases); git keeps no empty directories, so they are made here.
rm -rf "$ROOT/docker/dist/rootfs" "$ROOT/docker/dist/datadir"
mkdir -p "$ROOT/docker/dist/rootfs/tmp" "$ROOT/docker/dist/datadir"
chmod 1777 "$ROOT/docker/dist/rootfs/tmp"
chmod 0755 "$ROOT/docker/dist/rootfs" "$ROOT/docker/dist/datadir"
info "$("$ROOT/docker/dist/tidemark" --version) -> docker/dist/tidemark"

# --- 3. tidemark image ----------------------------------------------------------
step "image $TIDEMARK_IMAGE (FROM scratch)"
"$DOCKER" build -t "$TIDEMARK_IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
# The image this replaced (if any) is left untagged: remove such leftovers, and
# only those (dangling images carrying this Dockerfile's label).
"$DOCKER" image prune -f --filter "label=io.tidemark.image=runtime" >/dev/null || true

# --- 4. postgres image ----------------------------------------------------------
step "image $POSTGRES_IMAGE (FROM $DEBIAN_IMAGE)"
"$DOCKER" build -t "$POSTGRES_IMAGE" --build-arg "BASE=$DEBIAN_IMAGE" "$ROOT/docker/postgres"

# --- 5. certificates for mutual TLS ----------------------------------------------
step "certificates for mutual TLS (scripts/compose-certs.sh)"
TIDEMARK_BIN="$ROOT/docker/dist/tidemark" "$ROOT/scripts/compose-certs.sh" ||
    die "scripts/compose-certs.sh failed"

# --- 6. prometheus image --------------------------------------------------------
if [ "${SKIP_PROMETHEUS:-0}" = 1 ]; then
    step "image $PROMETHEUS_IMAGE skipped (SKIP_PROMETHEUS=1)"
else
    # apt-get inside the build fetches Debian's prometheus package from the
    # mirror the base image was made from (no image registry involved).
    step "image $PROMETHEUS_IMAGE (FROM $DEBIAN_IMAGE, Debian's prometheus package)"
    "$DOCKER" build -t "$PROMETHEUS_IMAGE" --build-arg "BASE=$DEBIAN_IMAGE" "$ROOT/docker/prometheus"
    # As for the runtime image: remove the untagged image this one replaced.
    "$DOCKER" image prune -f --filter "label=io.tidemark.image=prometheus" >/dev/null || true
fi

step "done"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' |
    grep -F -e "${TIDEMARK_IMAGE%:*}:" -e "${POSTGRES_IMAGE%:*}:" -e "${DEBIAN_IMAGE%:*}:" \
        -e "${PROMETHEUS_IMAGE%:*}:" | sed 's/^/    /' || true
info "start the cluster with: docker-compose up -d   (see docs/COMPOSE.md)"
info "with Prometheus:        docker-compose --profile monitoring up -d"
