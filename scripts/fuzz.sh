#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ in turn and prints one summary line per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 600)
#
# Environment:
#   FUZZ_RUNS=N        stop each target after N executions instead of after a time
#   FUZZ_TARGETS="a b" only these targets (default: all of `cargo fuzz list`)
#   FUZZ_SCRATCH=DIR   where new inputs go, DIR/<target> (default fuzz/target/corpus, kept
#                      between runs; never the tracked fuzz/corpus, which is only read)
#   FUZZ_ARGS="..."    more libFuzzer options, e.g. "-max_len=8192"
#   FUZZ_NICE=N        niceness of the builds and runs (default 10)
#   FUZZ_SANITIZER=S   cargo fuzz's --sanitizer: address (default) or none. Without AddressSanitizer
#                      the slow targets run 5 to 15 times faster (Rust's own checks stay: a panic,
#                      an out-of-bounds index, a failed assertion); long runs use none.
#
# Needs a nightly toolchain and cargo-fuzz; without them it says it skipped and exits 0.
# Exits 1 when a target fails (a panic, a failed check, a timeout or running out of memory):
# the input is in fuzz/artifacts/<target>/ and the log in fuzz/target/fuzz-logs/<target>.log.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
seconds=${1:-600}
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac

if ! command -v rustup >/dev/null 2>&1 || ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: SKIPPED: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)"
    exit 0
fi

nice=(nice -n "${FUZZ_NICE:-10}")
scratch=${FUZZ_SCRATCH:-$fuzz/target/corpus}
logs="$fuzz/target/fuzz-logs"
if [ -n "${FUZZ_RUNS:-}" ]; then
    limit=("-runs=$FUZZ_RUNS")
    what="$FUZZ_RUNS runs"
else
    limit=("-max_total_time=$seconds")
    what="$seconds s"
fi
# shellcheck disable=SC2206 # FUZZ_ARGS is a list of options
extra=(${FUZZ_ARGS:-})

cd "$fuzz" || exit 1
if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
echo "fuzz: building ${#targets[@]} targets ($(cargo +nightly --version))"
# --locked: fuzz/Cargo.lock is tracked and must be up to date.
"${nice[@]}" cargo +nightly fetch --locked --quiet || exit 1
sanitizer=(--sanitizer "${FUZZ_SANITIZER:-address}")
"${nice[@]}" cargo +nightly fuzz build "${sanitizer[@]}" || exit 1
mkdir -p "$logs"

summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    log="$logs/$t.log"
    echo "fuzz: $t: running for $what (log: $log)"
    start=$(date +%s)
    "${nice[@]}" cargo +nightly fuzz run "${sanitizer[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
        "${limit[@]}" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
    corp=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -n 's/.* corp: \([0-9]*\).*/\1/p')
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        result="FAILED (exit $rc; see $log and fuzz/artifacts/$t/)"
        failed=1
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -n 5 | sed 's/^/    /'
    fi
    summary+=("$(printf 'fuzz: %-14s %10s runs %6s s %8s exec/s  cov %5s  corpus %5s  %s' \
        "$t" "${runs:-?}" "$secs" "${rate:-?}" "${cov:-?}" "${corp:-?}" "$result")")
    echo "${summary[-1]}"
done

echo "fuzz: summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
