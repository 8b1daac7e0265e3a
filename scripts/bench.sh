#!/usr/bin/env bash
# idem's benchmark: one machine, one real Apache Kafka broker and one
# PostgreSQL server that it starts itself on 127.0.0.1, the real `idem run`
# binary with every guarantee on (synced RocksDB writes, durable sinks,
# offsets committed last).
#
#   scripts/bench.sh [MODE] [OPTIONS]
#
# Modes:
#   throughput (default)  produce the workload (2,000,000 JSON records of
#                         about 200 bytes, 10% redeliveries, 8 partitions);
#                         read it with a bare consumer (the limit), then with
#                         idem into SQLite, PostgreSQL and a Kafka topic; then
#                         the batch latency at a steady paced input rate
#   steady                the steady paced run alone
#   scale                 idem into SQLite over new keys with 1,000,000 and
#                         with 20,000,000 keys already in the dedup window;
#                         the largest also with metrics.dedup_scan_secs = 0,
#                         to show what the periodic scan of the store costs
#   all                   both
#
# Options:
#   --records N        workload size for the throughput runs (2000000)
#   --scale-records N  workload size for each scale run (1000000)
#   --scale-keys LIST  keys prefilled, comma-separated (1000000,20000000)
#   --rate N           the steady input rate, records/s (20000)
#   --steady-secs N    how long the steady input lasts (30)
#   --dir DIR          working directory (a new one under /tmp)
#   --keep             keep DIR (databases, dedup stores, logs) at the end;
#                      without it only DIR/results.jsonl stays
#   --idem PATH        measure this idem binary instead of building one
#                      (to compare two builds)
#   --before PATH      also measure the SQLite run with this idem binary
#                      (an earlier build), on the same workload and broker,
#                      labelled "sqlite-before"
#
# Prints a table; the results are also in DIR/results.jsonl, and
# `bench report DIR/results.jsonl` prints the table again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/idem/target}"

mode=throughput
records=2000000
scale_records=1000000
scale_keys=1000000,20000000
rate=20000
steady_secs=30
dir=""
keep=0
idem=""
before=""
while [ $# -gt 0 ]; do
  case "$1" in
    throughput | steady | scale | all) mode="$1" ;;
    --records) records="$2"; shift ;;
    --scale-records) scale_records="$2"; shift ;;
    --scale-keys) scale_keys="$2"; shift ;;
    --rate) rate="$2"; shift ;;
    --steady-secs) steady_secs="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --keep) keep=1 ;;
    --idem) idem="$2"; shift ;;
    --before) before="$2"; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

echo "== building idem and the benchmark tool (release, no failpoints)"
if [ -z "$idem" ]; then
  cargo build --release --quiet
  idem="$CARGO_TARGET_DIR/release/idem"
fi
cargo build --release --quiet --example bench
bench="$CARGO_TARGET_DIR/release/examples/bench"

dir="${dir:-$(mktemp -d /tmp/idem-bench.XXXXXX)}"
mkdir -p "$dir"
results="$dir/results.jsonl"
: >"$results"
cleanup() {
  scripts/kafka.sh stop "$dir/kafka" || true
  scripts/postgres.sh stop "$dir/pg" || true
  if [ "$keep" = 0 ]; then
    find "$dir" -mindepth 1 -maxdepth 1 ! -name results.jsonl -exec rm -rf {} +
    echo "figures kept in $results"
  else
    echo "kept $dir"
  fi
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
pg_url=""
if [ "$mode" = throughput ] || [ "$mode" = all ]; then
  echo "== starting Apache Kafka and PostgreSQL on 127.0.0.1 (in $dir)"
else
  echo "== starting Apache Kafka on 127.0.0.1 (in $dir)"
fi
bootstrap=$(scripts/kafka.sh start "$dir/kafka")
if [ "$mode" = throughput ] || [ "$mode" = all ]; then
  pg_url=$(scripts/postgres.sh start "$dir/pg")
fi
"$bench" topics --bootstrap "$bootstrap" bench.dlq:1

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Writes the config of one run to $dir/$label/idem.toml, from a fresh group,
# dedup directory and metrics port; $3 is the sink section, $4 extra lines
# for [metrics]. Sets $group and $port for `measure`.
write_config() {
  local label="$1" topic="$2" sink="$3" metrics_extra="${4:-}"
  local run="$dir/$label"
  mkdir -p "$run"
  port=$(free_port)
  group="bench-$label-$RANDOM$RANDOM"
  cat >"$run/idem.toml" <<TOML
# Every guarantee on, as shipped: synced RocksDB writes, a durable sink,
# offsets committed last. Batch settings are idem's defaults.
[kafka]
bootstrap_servers = "$bootstrap"
group_id = "$group"

[[topics]]
name = "$topic"
key = { from = "header", name = "Idempotency-Key" }

[dedup]
path = "$run/dedup"
window = "7d"

$sink

[dead_letter]
topic = "bench.dlq"

[metrics]
listen = "127.0.0.1:$port"
$metrics_extra
TOML
}

sqlite_sink() {
  cat <<TOML
[sink]
kind = "sqlite"
path = "$dir/$1/orders.db"

[sink.table]
name = "orders"
mode = "upsert"
key_column = "id"
version_column = "ver"
columns = { id = "/id", ver = "/ver", qty = "/qty", status = "/status", amount = "/amount" }
TOML
}

# Runs idem with $dir/$label/idem.toml and appends its figures to results.
measure() {
  local label="$1" topic="$2"
  shift 2
  echo "== idem: $label"
  "$bench" measure --idem "$idem" --config "$dir/$label/idem.toml" \
    --bootstrap "$bootstrap" --topic "$topic" --group "$group" \
    --metrics "127.0.0.1:$port" --dedup "$dir/$label/dedup" \
    --log "$dir/$label/idem.log" --label "$label" --out "$results" "$@"
}

throughput() {
  echo "== producing $records records into bench.in (8 partitions)"
  "$bench" topics --bootstrap "$bootstrap" bench.in:8 bench.out:8
  "$bench" produce --bootstrap "$bootstrap" --topic bench.in --records "$records" --seed 1

  echo "== bare consumer"
  "$bench" bare --bootstrap "$bootstrap" --topic bench.in --label bare --out "$results"

  write_config sqlite bench.in "$(sqlite_sink sqlite)"
  measure sqlite bench.in

  echo "== the SQLite sink alone, no Kafka (its ceiling)"
  "$bench" sink-limit --records "$records" --seed 1 --dir "$dir/sink-limit" \
    --label sqlite-sink-only --out "$results"
  rm -rf "$dir/sink-limit"

  if [ -n "$before" ]; then
    write_config sqlite-before bench.in "$(sqlite_sink sqlite-before)"
    local current="$idem"
    idem="$before"
    measure sqlite-before bench.in
    idem="$current"
  fi

  write_config postgres bench.in "[sink]
kind = \"postgres\"
url = \"$pg_url\"

[sink.table]
name = \"orders_$RANDOM\"
mode = \"upsert\"
key_column = \"id\"
version_column = \"ver\"
columns = { id = \"/id\", ver = \"/ver\", qty = \"/qty\", status = \"/status\", amount = \"/amount\" }"
  measure postgres bench.in

  write_config kafka bench.in "[sink]
kind = \"kafka\"
topic = \"bench.out\"
key_from = \"/id\""
  measure kafka bench.in
  steady
}

steady() {
  if [ "$mode" = steady ]; then
    # Alone, the broker would still be compiling its hot paths during the
    # paced run (its JIT took half a core): warm it up first.
    echo "== warming the broker up: 1,000,000 records produced and read twice"
    "$bench" topics --bootstrap "$bootstrap" bench.warm:8
    "$bench" produce --bootstrap "$bootstrap" --topic bench.warm --records 1000000 --seed 9
    for _ in 1 2; do
      "$bench" bare --bootstrap "$bootstrap" --topic bench.warm --label warm-up --out "$dir/warm-up.jsonl"
    done
  fi
  echo "== steady input: $rate records/s for $steady_secs s"
  "$bench" topics --bootstrap "$bootstrap" bench.steady:8
  write_config steady bench.steady "$(sqlite_sink steady)"
  measure steady bench.steady --rate "$rate" --records $((rate * steady_secs)) --seed 2
}

scale() {
  echo "== producing $scale_records records into bench.scale (8 partitions)"
  "$bench" topics --bootstrap "$bootstrap" bench.scale:8
  "$bench" produce --bootstrap "$bootstrap" --topic bench.scale --records "$scale_records" --seed 3
  local keys largest=0 label
  for keys in ${scale_keys//,/ }; do
    [ "$keys" -gt "$largest" ] && largest=$keys
  done
  for keys in ${scale_keys//,/ }; do
    echo "== prefilling a dedup store with $keys keys"
    "$bench" prefill --dedup "$dir/prefill-$keys" --topic bench.scale --keys "$keys"
    label="keys-$keys"
    write_config "$label" bench.scale "$(sqlite_sink "$label")"
    cp -r "$dir/prefill-$keys" "$dir/$label/dedup"
    measure "$label" bench.scale
    if [ "$keys" = "$largest" ]; then
      label="keys-$keys-noscan"
      write_config "$label" bench.scale "$(sqlite_sink "$label")" "dedup_scan_secs = 0"
      cp -r "$dir/prefill-$keys" "$dir/$label/dedup"
      measure "$label" bench.scale
    fi
    rm -rf "$dir/prefill-$keys"
  done
}

started=$SECONDS
case "$mode" in
  throughput) throughput ;;
  steady) steady ;;
  scale) scale ;;
  all) throughput; scale ;;
esac

echo
echo "== results ($((SECONDS - started)) s; Apache Kafka 4.1.1 and idem on the same $(nproc) cores)"
"$bench" report "$results"
