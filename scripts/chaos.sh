#!/usr/bin/env bash
# The long chaos run: the harness of tests/chaos.rs at a size and fault
# count of your choice, on a broker and a PostgreSQL server of its own.
#
#   scripts/chaos.sh [RECORDS] [KILLS] [BROKER_RESTARTS] [PG_RESTARTS] [OUTAGES]
#
# Defaults: 1000000 records, 20 SIGKILLs, 3 broker restarts, 2 PostgreSQL
# restarts, 1 receiver outage. It prints a table (records, duplicates,
# faults, lost, doubled, regressed, unaccounted) and fails unless the last
# four are zero.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/idem/target}"
scripts/setup.sh
export IDEM_CHAOS_RECORDS="${1:-1000000}"
export IDEM_CHAOS_KILLS="${2:-20}"
export IDEM_CHAOS_BROKER_RESTARTS="${3:-3}"
export IDEM_CHAOS_PG_RESTARTS="${4:-2}"
export IDEM_CHAOS_OUTAGES="${5:-1}"
cargo test --release --features failpoints --test chaos -- --nocapture
