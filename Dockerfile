# syntax=docker/dockerfile:1
#
# keyhole's container image: one static-ish binary (it needs only glibc and libgcc_s;
# TLS is rustls with ring) on a distroless base, running as an unprivileged user.
#
#   docker build -t keyhole .
#   docker run --rm keyhole --help
#
# As a sidecar. keyhole listens on 127.0.0.1 unless told otherwise, which is what you
# want where the containers of a task share one network namespace: an ECS/Fargate task
# in awsvpc mode, a Cloud Run service with sidecars, a Kubernetes pod. The app then
# connects to 127.0.0.1:<port>, and nothing outside the task can reach keyhole.
#
#   keyhole --port 5432 --ca-file /certs/rds-global-bundle.pem \
#     'postgres://mydb.abc123.eu-west-1.rds.amazonaws.com:5432'
#
# When the app runs in a network namespace of its own (ECS bridge mode, docker compose,
# `docker run -p`, another host), keyhole must listen on all interfaces to be reachable:
# `--address 0.0.0.0` (or KEYHOLE_ADDRESS=0.0.0.0). Then anything that can route to
# that port can use the database through keyhole, so keep the port on a private
# network and off any load balancer.
#
# No port is EXPOSEd: you choose the ports (--port, one per target), and EXPOSE would
# only document a guess. Configuration comes from flags, KEYHOLE_* variables or a TOML
# file (--config); there is no default command, so a container configured entirely by
# KEYHOLE_TARGETS and friends needs no arguments.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# --- skeleton: Cargo.toml and Cargo.lock with dummy sources ------------------------
# Every .rs file becomes a one-line stub, so src/main.rs, src/lib.rs and any target
# the manifest names exist, and nothing else is kept. The result changes only when
# Cargo.toml, Cargo.lock or the cargo/toolchain settings change or a .rs file is added
# or removed, so the dependency layer below is rebuilt only then, not on every edit
# of the sources. (The stub says "{ }" with a space: find would replace a "{}".)
FROM ${RUST_IMAGE} AS skeleton
WORKDIR /src
COPY . .
RUN find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name '*.rs' \
      ! -path './.cargo/config.toml' ! -name 'rust-toolchain*' -delete \
 && find . -type f -name '*.rs' -exec sh -c 'echo "fn main() { }" > "$1"' sh {} \; \
 && find . -depth -type d -empty -delete

# --- build ----------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src

# 1. Dependencies, compiled against the stubs: a cached layer. Then forget what was
#    built from the stubs themselves, so that step 2 rebuilds keyhole whatever the
#    timestamps of the real files are.
COPY --from=skeleton /src/ ./
RUN cargo build --release --locked \
 && rm -rf target/release/keyhole target/release/keyhole.d target/release/libkeyhole.* \
      target/release/deps/keyhole-* target/release/deps/libkeyhole-* \
      target/release/.fingerprint/keyhole-* target/release/build/keyhole-*

# 2. keyhole itself, from the real sources; the check makes sure the binary is the
#    real one (a stub prints no version).
COPY . .
RUN cargo build --release --locked \
 && ./target/release/keyhole --version | grep -q '^keyhole ' \
 && install -D -m 0755 target/release/keyhole /out/keyhole

# --- runtime ----------------------------------------------------------------------
# glibc, libgcc and the system CA bundle (for targets that name no --ca-file);
# no shell, no package manager. The :nonroot tag's user is uid/gid 65532.
FROM ${RUNTIME_IMAGE}

ARG RUNTIME_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="keyhole" \
      org.opencontainers.image.description="A secure database connection proxy: plain Postgres on localhost, verified TLS to the server." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"

COPY --from=build /out/keyhole /usr/local/bin/keyhole

# Numeric, so that runtimes enforcing runAsNonRoot can check it without /etc/passwd.
USER 65532:65532

# keyhole drains and exits on SIGTERM (see --max-sigterm-delay), which is what ECS,
# Cloud Run and Kubernetes send when they stop a container.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/keyhole"]
