#!/usr/bin/env bash
# The session hot path's cost in instructions, not seconds: runs crates/hotpath (one new
# connection per message: greeting, EHLO, pipelined MAIL FROM with SIZE, RCPT and DATA, a 4 KiB
# dot-stuffed message, QUIT; the Received header and the stored content) under callgrind with
# 200 and with 1200 messages, and takes the difference over 1000 messages as the instructions
# per message (start-up and exit cancel out). Fails when that is above the committed baseline
# (scripts/callgrind-baseline.txt) times the threshold. Callgrind counts instructions
# exactly: two runs of the same build give the same figure, whatever the machine's load.
#
#   scripts/callgrind-guard.sh                    check against the baseline
#   scripts/callgrind-guard.sh --update-baseline  write the figure measured now as the baseline
#
# Environment:
#   CALLGRIND_GUARD_THRESHOLD=R  fail above baseline × R (default 1.25)
#   CARGO_TARGET_DIR             where the release build goes (as for cargo); the callgrind
#                                files are kept in its callgrind-guard/ directory
#   ESTAFETA_NO_SKIP             set (CI): a missing valgrind fails instead of skipping
#
# Exits 0 when within the limit (or skipped: no valgrind), 1 above it or on an error.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

baseline_file=scripts/callgrind-baseline.txt
threshold=${CALLGRIND_GUARD_THRESHOLD:-1.25}
small=200
large=1200
update=
case "${1:-}" in
'') ;;
--update-baseline) update=1 ;;
*)
    echo "usage: $0 [--update-baseline]" >&2
    exit 2
    ;;
esac
if ! [[ "$threshold" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "callgrind-guard: CALLGRIND_GUARD_THRESHOLD must be a number such as 1.25, not '$threshold'" >&2
    exit 2
fi

if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_annotate >/dev/null 2>&1; then
    if [ -n "${ESTAFETA_NO_SKIP+set}" ]; then
        echo "callgrind-guard: FAILED: valgrind (with callgrind_annotate) is not installed" \
            "(apt-get install valgrind), and ESTAFETA_NO_SKIP forbids skipping" >&2
        exit 1
    fi
    echo "CALLGRIND GUARD SKIPPED: valgrind is not installed (apt-get install valgrind)"
    exit 0
fi

start=$(date +%s)
cargo build --release --locked --quiet -p estafeta-hotpath
target=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target/release/estafeta-hotpath"
out="$target/callgrind-guard"
mkdir -p "$out"
built=$(date +%s)

# Total Ir of one run of N messages; the callgrind file stays in $out for inspection.
run() {
    local n=$1 file="$out/callgrind.out.$1"
    rm -f "$file"
    if ! valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" "$n" \
        >"$out/run.$n.log" 2>&1; then
        echo "callgrind-guard: FAILED: estafeta-hotpath $n under callgrind:" >&2
        cat "$out/run.$n.log" >&2
        exit 1
    fi
    local ir
    ir=$(sed -n 's/^summary: *\([0-9][0-9]*\).*/\1/p; T; q' "$file")
    [ -n "$ir" ] || ir=$(sed -n 's/^totals: *\([0-9][0-9]*\).*/\1/p; T; q' "$file")
    if [ -z "$ir" ]; then
        echo "callgrind-guard: FAILED: no summary/totals line in $file" >&2
        exit 1
    fi
    echo "$ir"
}
ir_small=$(run "$small")
ir_large=$(run "$large")
ran=$(date +%s)
messages=$((large - small))
per_message=$(((ir_large - ir_small + messages / 2) / messages))

# The 10 functions with the most instructions of their own (inlined code counted in the
# function it was inlined into) per message: the same difference, function by function.
self_costs() {
    callgrind_annotate --threshold=100 --auto=no --show-percs=no "$1" |
        awk '/^ *[0-9][0-9,]* +[^ ]/ && !/PROGRAM TOTALS/ {
            ir = $1; gsub(",", "", ir)
            fn = $0; sub(/^ *[0-9,]+ +/, "", fn); sub(/ \[[^]]*\]$/, "", fn)
            i = index(fn, ":"); if (i > 0) fn = substr(fn, i + 1)
            cost[fn] += ir
        }
        END { for (f in cost) printf "%d\t%s\n", cost[f], f }'
}
echo "top 10 functions by own instructions per message (callgrind, $large minus $small messages):"
join -t "$(printf '\t')" -a 2 -e 0 -o 0,1.2,2.2 \
    <(self_costs "$out/callgrind.out.$small" | awk -F '\t' '{print $2 "\t" $1}' | LC_ALL=C sort -t "$(printf '\t')" -k1,1) \
    <(self_costs "$out/callgrind.out.$large" | awk -F '\t' '{print $2 "\t" $1}' | LC_ALL=C sort -t "$(printf '\t')" -k1,1) |
    awk -F '\t' -v m="$messages" -v total="$per_message" '{
        d = ($3 - $2) / m
        if (d > 0) printf "%10.0f  %5.1f%%  %s\n", d, 100 * d / total, $1
    }' | LC_ALL=C sort -rn | awk 'NR <= 10'

if [ -n "$update" ]; then
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=
    [ -z "$(git status --porcelain -- crates/proto crates/hotpath 2>/dev/null)" ] ||
        dirty=" plus uncommitted changes to crates/proto or crates/hotpath"
    {
        echo "# instructions per message (callgrind Ir, (Ir($large) - Ir($small)) / $messages of crates/hotpath), measured by scripts/callgrind-guard.sh --update-baseline at $commit$dirty; $(rustc --version | cut -d' ' -f1-2), $(valgrind --version), release profile"
        echo "$per_message"
    } >"$baseline_file"
    echo "instructions per message: $per_message (written to $baseline_file)"
    exit 0
fi

if [ ! -f "$baseline_file" ]; then
    echo "callgrind-guard: FAILED: no $baseline_file (scripts/callgrind-guard.sh --update-baseline writes it)" >&2
    exit 1
fi
baseline=$(awk '!/^[[:space:]]*#/ && match($0, /[0-9]+/) { print substr($0, RSTART, RLENGTH); exit }' "$baseline_file")
if [ -z "$baseline" ]; then
    echo "callgrind-guard: FAILED: no number in $baseline_file" >&2
    exit 1
fi
limit=$(awk -v b="$baseline" -v r="$threshold" 'BEGIN { printf "%d", b * r }')
echo "instructions per message: $per_message (baseline $baseline, limit $limit)"
echo "callgrind-guard: Ir($small) = $ir_small, Ir($large) = $ir_large; build $((built - start)) s, runs $((ran - built)) s"
if [ "$per_message" -gt "$limit" ]; then
    echo "callgrind-guard: FAILED: $per_message instructions per message is more than $threshold × the baseline $baseline." >&2
    echo "  The callgrind files are in $out (callgrind_annotate $out/callgrind.out.$large)." >&2
    echo "  If the cost is intended, run scripts/callgrind-guard.sh --update-baseline and commit $baseline_file." >&2
    exit 1
fi
if awk -v x="$per_message" -v b="$baseline" -v r="$threshold" 'BEGIN { exit !(x * r < b) }'; then
    echo "callgrind-guard: note: well under the baseline; scripts/callgrind-guard.sh --update-baseline would tighten it"
fi
echo "callgrind-guard: passed"
