# syntax=docker/dockerfile:1
#
# Both images of the Kubernetes deployment (docs/kubernetes.md), from this repository:
#
#   docker build --target agent -t sidecar-agent:0.1.0 .   # the node agent (DaemonSet)
#   docker build --target proxy -t sidecar-proxy:0.1.0 .   # the pod sidecar
#
# One builder stage makes one static `sidecar` binary (musl, the eBPF object embedded); the
# two runtime stages only differ in the user they run as. tests/src/manifests/dockerfile.rs
# checks this file against deploy/ (stage names, COPY sources, USER, the binary's path).

ARG RUST_VERSION=1.95

# ---- builder: the same steps as a developer's machine ----------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-trixie AS builder
# musl-tools: musl-gcc, for ring's C and assembly in a static binary.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
# The whole workspace: cargo resolves every member, and xtask builds the eBPF object.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY sidecar-common sidecar-common
COPY sidecar-ebpf sidecar-ebpf
COPY sidecar-user sidecar-user
COPY xtask xtask
COPY tests tests
# `cargo xtask build-ebpf` installs what the eBPF object needs exactly as on a developer's
# machine (nightly, its rust-src, a bpf-linker built against the nightly's LLVM) and builds
# it; the binary embeds it. Caches keep the registry and target/ between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
 && cargo xtask build-ebpf \
 && CC_x86_64_unknown_linux_musl=musl-gcc CC_aarch64_unknown_linux_musl=musl-gcc \
    cargo build --release --locked -p sidecar-user --bin sidecar --target "$target" \
 && install -D -m 0755 "target/$target/release/sidecar" /out/sidecar

# ---- agent: root with the capabilities the DaemonSet grants (deploy/agent.yaml) --------------
FROM gcr.io/distroless/static-debian13 AS agent
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
USER 0:0
ENTRYPOINT ["/usr/local/bin/sidecar", "agent"]

# ---- proxy: the pod sidecar, never root ------------------------------------------------------
FROM gcr.io/distroless/static-debian13:nonroot AS proxy
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
USER 65532:65532
EXPOSE 15000 15008
ENTRYPOINT ["/usr/local/bin/sidecar", "proxy"]
