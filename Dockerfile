# syntax=docker/dockerfile:1
#
# opsgate image: a static-ish Rust binary on distroless (glibc + libgcc, no
# shell, no package manager), running as the distroless "nonroot" user.
#
#   docker build -t opsgate .
#   docker run --rm -p 8080:8080 --add-host=host.docker.internal:host-gateway \
#       opsgate --upstream http://host.docker.internal:3000
#
# (--add-host is needed on Linux only: Docker Desktop defines host.docker.internal.
# The app on the host must listen on an address the container can reach, not
# only 127.0.0.1.)
#
# Mount your config directory at /etc/opsgate (a Kubernetes ConfigMap or a
# bind mount); the image ships config/minimal.toml there as a default that
# proxies to 127.0.0.1:3000, the sidecar case.

# ---- build ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry cache only speeds up rebuilds; the build itself is exactly
# `cargo build --release --locked` in a clean checkout, with the link order of
# build.rs and the optimization profile of .cargo/config.toml.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked \
    && install -D -m 0755 target/release/opsgate /out/opsgate

# ---- runtime ----
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="opsgate" \
      org.opencontainers.image.description="Sidecar reverse proxy: maintenance mode, circuit breakers, retries, dependency health checks and Prometheus metrics for any app" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/opsgate /usr/local/bin/opsgate
COPY config/minimal.toml /etc/opsgate/opsgate.toml
# 65532 is distroless's "nonroot"; numeric so runAsNonRoot can verify it.
USER 65532:65532
# 8080: proxy, /_health/* and /metrics. 9901: admin API (listens on loopback
# by default; set admin.listen and admin.token to expose it).
EXPOSE 8080 9901
# No curl in the image: opsgate probes itself (exit 0 on 2xx/3xx).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/opsgate", "probe", "http://127.0.0.1:8080/_health/live"]
# SIGTERM starts the graceful shutdown (shutdown_delay, then drain_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/opsgate", "run", "--config", "/etc/opsgate/opsgate.toml"]
