#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time and fails if any
# of them finds a crash, a panic, a timeout or a leak.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60
#   IDEM_FUZZ_TARGETS="fingerprint config_parse" scripts/fuzz.sh 600
#
# Targets: decode_record (a record under each key source), key_extraction
# (JSON pointer keys), fingerprint (canonical form of accepted payloads),
# config_parse (Config::parse and what check-config prints). Needs the
# nightly toolchain (libFuzzer and AddressSanitizer) and cargo-fuzz, which
# it installs from crates.io when missing. The fuzz crate builds in
# fuzz/target; its first build compiles RocksDB and librdkafka again (15
# minutes and more on two cores). Everything runs at nice 19.
#
# RocksDB's C++ code is not instrumented either way, so a RocksDB built
# before for the same librocksdb-sys version can be linked instead:
#   ROCKSDB_LIB_DIR=$(dirname "$(ls "$CARGO_TARGET_DIR"/release/build/librocksdb-sys-*/out/librocksdb.a)") \
#   ROCKSDB_STATIC=1 scripts/fuzz.sh
#
# The corpus grows in fuzz/corpus/<target> (not checked in), starting from
# fuzz/seeds/<target>; a crashing input is saved in fuzz/artifacts/<target>
# and reproduced with: cargo +nightly fuzz run <target> <that file>
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

secs="${1:-60}"
case "$secs" in
  ''|*[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac
read -r -a targets <<<"${IDEM_FUZZ_TARGETS:-decode_record key_extraction fingerprint config_parse}"

rustup toolchain list | grep -q '^nightly' || {
  echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
  exit 1
}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd fuzz
echo "== building the fuzz targets (nice 19)"
nice -n 19 cargo +nightly fuzz build

mkdir -p logs
declare -A dict=(
  [decode_record]=dicts/json.dict
  [key_extraction]=dicts/json.dict
  [fingerprint]=dicts/json.dict
  [config_parse]=dicts/config.dict
)
failed=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  echo "== fuzzing $t for $secs s"
  set +e
  # -timeout: one input taking 10 s counts as a hang; -rss_limit_mb: a
  # bounded memory budget on a shared machine.
  nice -n 19 cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=65536 \
    -dict="${dict[$t]}" -print_final_stats=1 >"logs/$t.log" 2>&1
  status=$?
  set -e
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "logs/$t.log" | tail -n1)
  if [ "$status" -eq 0 ]; then
    result="ok"
  else
    result="FAILED (exit $status; see fuzz/logs/$t.log and fuzz/artifacts/$t)"
    failed=$((failed + 1))
    grep -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|SUMMARY' "logs/$t.log" | head -n 5 >&2 || true
  fi
  summary+=("$(printf '%-16s %6ss %12s runs  %s' "$t" "$secs" "${runs:-?}" "$result")")
done

echo
printf '%s\n' "${summary[@]}"
echo "$(( ${#targets[@]} - failed )) passed, $failed failed"
[ "$failed" -eq 0 ]
