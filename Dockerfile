# syntax=docker/dockerfile:1
# ferry's image: build, then run. Cargo's registry and target directory are BuildKit cache mounts,
# so a code change rebuilds ferry, not librdkafka and OpenSSL. (Not cargo-chef: its dependency
# layer stubs out path dependencies, and vendor/rdkafka-sys, which builds librdkafka, is one.)
# scripts/check-image.sh proves what can be proven without a Docker engine: the same build, and
# that the binary needs nothing the final image lacks.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# librdkafka, OpenSSL and zlib are compiled here from source (rdkafka's ssl-vendored and
# libz-static features) and linked statically: the final image needs glibc and libgcc only.
# rdkafka-sys builds a copy of vendor/'s librdkafka made once per target directory: when vendor/
# changed since the cached one was built, it is built again.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    vendored=$(find vendor -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum) \
 && if [ "$vendored" != "$(cat target/vendored.sha256 2>/dev/null)" ]; then cargo clean --release -p rdkafka-sys; fi \
 && cargo build --release --locked --bin ferry \
 && echo "$vendored" > target/vendored.sha256 \
 && ./target/release/ferry --version \
 && cp target/release/ferry /usr/local/bin/ferry

# glibc, libgcc and CA certificates, no shell, a nonroot user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/ferry /usr/local/bin/ferry
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["run", "-c", "/etc/ferry/ferry.yaml"]
