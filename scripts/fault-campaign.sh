#!/usr/bin/env bash
# The fault campaign (tests/campaign.rs): 100 000 records through two ferry processes against
# Tansu with sqlite storage, with SIGKILLs, broker restarts, a graceful handover and a faulty
# service; prints the figures quoted in the README ("Guarantees, measured").
# FERRY_CAMPAIGN_RECORDS changes the number of records.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tansu >/dev/null 2>&1; then
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi
FERRY_CAMPAIGN_RECORDS="${FERRY_CAMPAIGN_RECORDS:-100000}" \
  cargo nextest run --test campaign --run-ignored only --no-capture "$@" 2>&1 \
  | grep -E '^(campaign:|fault campaign:)|PASS|FAIL|panicked|Summary'
