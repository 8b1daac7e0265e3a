#!/usr/bin/env bash
# idem's test command: installs what a fresh machine lacks, starts a real
# Apache Kafka broker on 127.0.0.1, runs every suite against it, and prints
# how many tests ran.
#
#   scripts/test.sh              all suites
#   scripts/test.sh -- c2        extra arguments go to the test harness
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# One build directory outside the checkout, shared by every clone on this
# machine, and one profile (release) for tests, demo and benchmarks, so that
# RocksDB and librdkafka are compiled once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/idem/target}"

scripts/setup.sh

echo "== building (release profile, failpoints on for the crash tests)"
cargo test --release --features failpoints --no-run 2>&1 | grep -v '^\s*Executable' || true
cargo build --release --features failpoints

broker_dir=$(mktemp -d /tmp/idem-kafka.XXXXXX)
pg_dir=$(mktemp -d /tmp/idem-pg.XXXXXX)
cleanup() {
  scripts/kafka.sh stop "$broker_dir" || true
  scripts/postgres.sh stop "$pg_dir" || true
  rm -rf "$broker_dir" "$pg_dir"
}
trap cleanup EXIT
echo "== starting Apache Kafka on 127.0.0.1"
IDEM_KAFKA_BOOTSTRAP=$(scripts/kafka.sh start "$broker_dir")
export IDEM_KAFKA_BOOTSTRAP
# The same broker's SCRAM-SHA-256 listener, for tests/security.rs.
IDEM_KAFKA_SASL_BOOTSTRAP=$(cat "$broker_dir/sasl_bootstrap")
IDEM_KAFKA_SASL_USER=$(cat "$broker_dir/sasl_user")
IDEM_KAFKA_SASL_PASSWORD=$(cat "$broker_dir/sasl_password")
export IDEM_KAFKA_SASL_BOOTSTRAP IDEM_KAFKA_SASL_USER IDEM_KAFKA_SASL_PASSWORD
echo "   broker at $IDEM_KAFKA_BOOTSTRAP (SASL/SCRAM at $IDEM_KAFKA_SASL_BOOTSTRAP)"
echo "== starting PostgreSQL on 127.0.0.1"
IDEM_PG_URL=$(scripts/postgres.sh start "$pg_dir")
export IDEM_PG_URL
echo "   server at $IDEM_PG_URL"

log=$(mktemp /tmp/idem-test.XXXXXX.log)
echo "== running the suites (log: $log)"
set +e
[ "${1:-}" = "--" ] && shift
cargo test --release --features failpoints --no-fail-fast -- "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Count what ran: every harness prints one "test result" line. Every
# integration suite but cli.rs runs against the real broker; postgres.rs
# also against the real PostgreSQL server.
passed=0; failed=0; broker=0; postgres=0
current=""
while IFS= read -r line; do
  case "$line" in
    *"Running tests/postgres.rs"*|*"Running tests/chaos.rs"*) current=postgres ;;
    *"Running tests/pipeline.rs"*|*"Running tests/http.rs"*|*"Running tests/files.rs"*|*"Running tests/crash.rs"*|*"Running tests/operations.rs"*|*"Running tests/observability.rs"*|*"Running tests/kafka_sink.rs"*|*"Running tests/scale_out.rs"*|*"Running tests/hostile.rs"*|*"Running tests/security.rs"*|*"Running tests/outage.rs"*) current=broker ;;
    *"Running "*) current=other ;;
    "test result:"*)
      p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
      f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
      passed=$((passed + p)); failed=$((failed + f))
      case "$current" in
        broker) broker=$((broker + p + f)) ;;
        postgres) broker=$((broker + p + f)); postgres=$((postgres + p + f)) ;;
      esac
      ;;
  esac
done <"$log"
echo
echo "tests run against the real Kafka broker ($IDEM_KAFKA_BOOTSTRAP): $broker"
echo "tests run against the real PostgreSQL server: $postgres"
echo "$passed passed, $failed failed"
if { [ "$broker" -eq 0 ] || [ "$postgres" -eq 0 ]; } && [ "$status" -eq 0 ]; then
  echo "no real-broker or no real-PostgreSQL test ran; that is a failure" >&2
  exit 1
fi
exit "$status"
