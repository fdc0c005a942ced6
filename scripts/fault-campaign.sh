#!/usr/bin/env bash
# The fault campaign (tests/campaign.rs): 100 000 records through two ferry processes on the
# embedded broker, then 10 000 on Tansu with sqlite storage, with SIGKILLs, broker restarts, a graceful handover and a faulty
# service; prints the figures quoted in the README ("Guarantees, measured").
# FERRY_CAMPAIGN_RECORDS changes the number of records.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tansu >/dev/null 2>&1; then
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi
# One campaign at a time: each loads the machine on its own.
FERRY_CAMPAIGN_RECORDS="${FERRY_CAMPAIGN_RECORDS:-100000}" \
FERRY_CAMPAIGN_TANSU_RECORDS="${FERRY_CAMPAIGN_TANSU_RECORDS:-10000}" \
  cargo nextest run --test campaign --run-ignored only --no-capture --test-threads 1 "$@" 2>&1 \
  | grep --line-buffered -E '^(campaign|fault campaign|read )|^ +(PASS|FAIL|TIMEOUT) |panicked|Summary'
