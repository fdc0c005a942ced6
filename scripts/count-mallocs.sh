#!/usr/bin/env bash
# Counts the heap allocations (glibc malloc calls) and context switches of ferry's process per
# record, during one throughput case of the bench (default: B3 HTTP `key`, 100 B values): a
# figure that, unlike time, does not move with the machine's noise. Needs root and `perf` (a
# uprobe on malloc; it slows ferry several times over, so the run's own rate means nothing).
#   scripts/count-mallocs.sh ["http key 100"] [RECORDS]
set -euo pipefail
cd "$(dirname "$0")/.."
case="${1:-http key 100}"
records="${2:-50000}"
cargo build --release --quiet
libc=$(ldd target/release/ferry | awk '/libc.so/ {print $3}')
bench=$(cargo bench --bench pipeline --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*pipeline[^"]*\)".*/\1/p' | tail -1)
perf probe -q -d probe_libc:malloc 2>/dev/null || true
perf probe -q -x "$libc" malloc
out=$(mktemp -d)
trap 'perf probe -q -d probe_libc:malloc 2>/dev/null || true; rm -rf "$out"' EXIT
"$bench" --only b3 --case "$case" --records "$records" --out "$out" >"$out/bench.log" 2>&1 &
bench_pid=$!
# The ferry process the bench starts for the case (it runs B0 and B1 first).
pid=""
while kill -0 "$bench_pid" 2>/dev/null; do
  pid=$(pgrep -f "ferry run -c" | head -1 || true)
  if [ -n "$pid" ] && sleep 0.05 && [ -d "/proc/$pid" ]; then break; fi
  sleep 0.05
done
perf stat -e probe_libc:malloc,context-switches -p "$pid" -o "$out/stat.txt" &
stat_pid=$!
wait "$bench_pid"
kill -INT "$stat_pid" 2>/dev/null || true
wait "$stat_pid" 2>/dev/null || true
echo "$case, $records records:"
awk -v n="$records" '/probe_libc|context-switches/ {gsub(",", "", $1); printf "  %-18s %.1f per record\n", $2, $1 / n}' "$out/stat.txt"
