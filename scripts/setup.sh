#!/usr/bin/env bash
# Installs what building and testing idem needs on a Debian machine, and
# resolves the Kafka broker jars. Safe to run again: it only adds what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# libclang: RocksDB's bindings; cmake and the curl, SASL and OpenSSL
# headers: librdkafka's vendored build; Java 17 and Maven: the test broker;
# python3: the tests' SQLite lock holder; prometheus (with promtool): the
# dashboard test; postgresql: the PostgreSQL sink's tests.
for pkg in libclang-dev clang cmake make g++ pkg-config libcurl4-openssl-dev libsasl2-dev \
    libssl-dev zlib1g-dev maven openjdk-17-jre-headless python3 prometheus postgresql; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: missing packages: ${need[*]}; install them with apt-get (as root)" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo is required (rustup.rs)" >&2; exit 1; }
scripts/kafka.sh fetch
