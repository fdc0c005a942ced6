#!/usr/bin/env bash
# Runs the integration tests against Tansu, an independent Kafka-protocol broker, instead of the
# embedded one: installs Tansu if missing, starts it on a free loopback port with sqlite storage,
# runs the tests with FERRY_TEST_BROKERS pointing at it, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tansu >/dev/null 2>&1; then
  echo "== installing tansu (about 15 minutes the first time; cached in ~/.cargo/bin)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== starting tansu on 127.0.0.1:$port (storage: sqlite in $work)"
(cd "$work" && exec tansu broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine "sqlite://tansu.db" >"$work/tansu.log" 2>&1) &
pid=$!
for _ in $(seq 1 100); do
  if (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then break; fi
  sleep 0.1
done
if ! (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
  echo "tansu did not start:"; cat "$work/tansu.log"; exit 1
fi

echo "== integration tests against tansu"
# Broker-facing tests only; unit tests and CLI tests do not touch a broker.
FERRY_TEST_BROKERS="127.0.0.1:$port" cargo nextest run --no-fail-fast \
  --test pipeline --test lifecycle --test rebalance --test grpc --test bounds --test readiness --test circuit --test admin --test traces --test contracts --test bench --test retry_topics --test bad_input --test security "$@" || { echo "== tansu log (tail)"; tail -50 "$work/tansu.log"; exit 1; }
