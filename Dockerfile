# syntax=docker/dockerfile:1
# ferry's image: three stages (plan the dependencies, build, run). The dependency layer is cached
# apart from the source, so a code change rebuilds ferry, not librdkafka and OpenSSL.
# scripts/check-image.sh proves what can be proven without a Docker engine: the same build, and
# that the binary needs nothing the final image lacks.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The dependency graph alone, so the next stage's cache survives source changes.
FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
# librdkafka, OpenSSL and zlib are compiled here from source (rdkafka's ssl-vendored and
# libz-static features) and linked statically: the final image needs glibc and libgcc only.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin ferry
COPY . .
RUN cargo build --release --locked --bin ferry \
 && ./target/release/ferry --version

# glibc, libgcc and CA certificates, no shell, a nonroot user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ferry /usr/local/bin/ferry
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["run", "-c", "/etc/ferry/ferry.yaml"]
