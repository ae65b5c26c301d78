#!/usr/bin/env bash
# Installs every Debian and npm package Gyre needs. Idempotent: safe to re-run.
# Runs as root, or through sudo when not root. Nothing else is downloaded, ever:
# Bazel itself runs with downloads disabled (see .bazelrc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# Build system and toolchain.
pkgs=(
  bazel-bootstrap bazel-rules-java openjdk-17-jdk-headless
  build-essential g++ clang-14 libfuzzer-14-dev libclang-rt-14-dev
  # RPC, serialization, storage.
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev librocksdb-dev libzstd-dev zstd libssl-dev zlib1g-dev
  libsnappy-dev liblz4-dev libbz2-dev libgflags-dev libc-ares-dev libre2-dev
  # Tests and benchmarks.
  libgtest-dev libgmock-dev libbenchmark-dev
  # Small libraries we use instead of writing our own.
  nlohmann-json3-dev libsimdjson-dev libcli11-dev libspdlog-dev libfmt-dev
  libcpp-httplib-dev libxxhash-dev libutf8proc-dev libicu-dev
  # Unicode Character Database (DerivedAge.txt: the tokenizer emulates Hugging Face's Unicode 9
  # normalizer tables with it).
  unicode-data
  # Math and collectives.
  libopenblas-dev liblapacke-dev libgloo-dev
  # Sample corpus sources and helpers.
  python3 xz-utils gzip ca-certificates
  # TLS test certificates (tests/e2e/tls_test makes a self-signed one at test time).
  openssl
)
# Node.js + npm: some machines carry their own (nodesource) build, which conflicts with
# Debian's npm package; take Debian's only when no npm is on PATH.
if ! command -v npm >/dev/null 2>&1; then pkgs+=(nodejs npm); fi

stamp=/var/lib/gyre-setup.stamp
want="$(printf '%s\n' "${pkgs[@]}" | sha256sum | cut -c1-16)"
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

# npm packages (golden tokenizer references, GPT-2 vocabulary, sample corpus text) live in
# tools/node_modules, pinned by tools/package.json + package-lock.json.
if [ -f "$here/tools/package.json" ]; then
  if [ ! -d "$here/tools/node_modules" ] || [ "$here/tools/package.json" -nt "$here/tools/node_modules/.stamp" ]; then
    echo "setup: installing npm packages into tools/node_modules"
    (cd "$here/tools" && npm install --no-audit --no-fund --loglevel=error && touch node_modules/.stamp)
  else
    echo "setup: npm packages present"
  fi
fi
echo "$want" | $SUDO tee "$stamp" >/dev/null
echo "setup: done"
