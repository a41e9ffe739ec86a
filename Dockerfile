# The Tidemark runtime image: a static `tidemark` binary in an empty root.
#
# Nothing here is pulled from a registry: `scratch` is built into Docker, and the
# binary is built on the host first. Use scripts/build-images.sh, which builds
# the binary (RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
# --target x86_64-unknown-linux-gnu -p tidemark), stages it in docker/dist/ and
# then runs:   docker build -t tidemark/tidemark:latest .
#
# No `# syntax=` line and no build stage on purpose: either would need a registry.
ARG BASE=scratch
FROM ${BASE}

# The binary, relative to the build context (the repository root; .dockerignore
# sends only docker/dist/).
ARG BINARY=docker/dist/tidemark

LABEL io.tidemark.image="runtime" \
      org.opencontainers.image.title="tidemark" \
      org.opencontainers.image.description="Tidemark change-data-capture replication daemon (static binary, FROM scratch)"

COPY ${BINARY} /tidemark
# /tmp (mode 1777, for SQLite's temporary files), then /data: where SQLite nodes
# keep their database (mount a volume here), owned by the runtime user so that a
# fresh named volume inherits that ownership. Both are empty directories staged
# by scripts/build-images.sh.
COPY docker/dist/rootfs/ /
COPY --chown=10001:10001 docker/dist/datadir /data

USER 10001:10001
WORKDIR /data

# 7070: gRPC (peers, Records write API, Admin); 9464: /metrics, /healthz, /readyz.
EXPOSE 7070 9464

# No curl in the image: the binary checks its own /readyz. This assumes
# server.metrics_listen_addr listens on port 9464 (e.g. 0.0.0.0:9464).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/tidemark", "healthcheck", "--addr", "127.0.0.1:9464"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/tidemark"]
CMD ["run", "--config", "/config/node.toml"]
