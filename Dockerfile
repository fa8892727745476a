# syntax=docker/dockerfile:1
#
# The shardlease worker image.
#
#   docker build -t ghcr.io/shardlease/shardlease-worker:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
# The build context is the repository root. .dockerignore is an allow-list: only Cargo.toml,
# Cargo.lock, crates/, migrations/ (embedded at compile time), examples/ and the top-level
# README/LICENSE files (for include_str! docs) reach the builder, so `COPY . .` copies exactly those
# and does not fail when an optional directory such as examples/ is absent.

# Rust toolchain: any 1.x at least the workspace's rust-version. The builder and the runtime
# image are both Debian 12 (bookworm), so the binary's glibc matches.
ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

COPY . .

# Cargo's registry, git checkouts and target directory live in BuildKit cache mounts, so a rebuild
# after a source change recompiles only the workspace crates, not the dependencies. The binary is
# copied out of the target cache, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p shardlease-worker \
 && install -D -m 0755 target/release/shardlease-worker /out/shardlease-worker

# Runtime: glibc, libgcc and CA certificates; no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="shardlease-worker" \
      org.opencontainers.image.description="Claims a jump-consistent-hash slice of public.work_items through PostgreSQL leases and ticks it every second." \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

COPY --from=builder /out/shardlease-worker /usr/local/bin/shardlease-worker

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# /healthz, /readyz and /metrics (SHARDLEASE_HTTP_ADDR, default 0.0.0.0:8080).
EXPOSE 8080

ENTRYPOINT ["/usr/local/bin/shardlease-worker"]
CMD ["run"]
