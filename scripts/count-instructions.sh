#!/usr/bin/env bash
# Counts the user-space instructions ferry's process executes per record, under valgrind's
# callgrind, during one throughput case of the bench (default: B3 HTTP `key`, 100 B values):
# unlike CPU time, a figure this shared machine's noise hardly moves. Two runs of different
# lengths, so that start-up and shutdown cancel out: (instructions(LONG) - instructions(SHORT))
# / (LONG - SHORT). Under callgrind ferry runs about fifty times slower, so the records arrive
# faster than it takes them, as at full speed, but its threads take turns on one core.
#   scripts/count-instructions.sh ["http key 100"] [SHORT] [LONG]
# With CALLGRIND_OUT=FILE it keeps the long run's profile there, for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
case="${1:-http key 100}"
short="${2:-2000}"
long="${3:-10000}"
cargo build --release --quiet
bench=$(cargo bench --bench pipeline --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*pipeline[^"]*\)".*/\1/p' | tail -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The bench runs the ferry it is given: a wrapper that puts `ferry run` under callgrind and
# leaves `ferry dev broker` as it is.
cat >"$out/ferry" <<EOF
#!/usr/bin/env bash
if [ "\$1" = run ]; then
  exec valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.\$\$" "$PWD/target/release/ferry" "\$@"
fi
exec "$PWD/target/release/ferry" "\$@"
EOF
chmod +x "$out/ferry"
instructions() {
  rm -f "$out"/callgrind.*
  "$bench" --ferry "$out/ferry" --only b3 --case "$case" --records "$1" --out "$out" >"$out/bench.log" 2>&1
  awk '/^(summary|totals):/ {print $2; exit}' "$out"/callgrind.*
}
a=$(instructions "$short")
b=$(instructions "$long")
if [ -n "${CALLGRIND_OUT:-}" ]; then cat "$out"/callgrind.* >"$CALLGRIND_OUT"; fi
echo "$case: $a instructions for $short records, $b for $long"
awk -v a="$a" -v b="$b" -v s="$short" -v l="$long" \
  'BEGIN {printf "  %.0f instructions per record (user space, ferry'"'"'s process, librdkafka included)\n", (b - a) / (l - s)}'
