#!/usr/bin/env bash
# Runs the benchmarks (release builds). `scripts/bench.sh` runs all; `scripts/bench.sh sandbox`,
# `scripts/bench.sh leasing`, `ingest`, `stream` or `fleet` one of them (ingest, stream and fleet
# start their own tansu and Redis).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
ensure_apt bwrap bubblewrap
cargo build --release --locked -p sluice -p sluice-agent -p sluice-testfns
want="${1:-all}"
if [ "$want" = all ] || [ "$want" = ingest ] || [ "$want" = stream ] || [ "$want" = fleet ]; then
  WORK="$(mktemp -d /tmp/sluice-bench.XXXXXX)"
  trap 'stop_services; rm -rf "$WORK"' EXIT
  start_services "$WORK"
  for pair in ingest:async_ingest stream:stream fleet:fleet; do
    if [ "$want" = all ] || [ "$want" = "${pair%%:*}" ]; then
      cargo bench --locked -p sluice --bench "${pair#*:}"
    fi
  done
fi
if [ "$want" = all ] || [ "$want" = leasing ]; then cargo bench --locked -p sluice-leasing --bench leasing; fi
if [ "$want" = all ] || [ "$want" = sandbox ]; then cargo bench --locked -p sluice-workers --bench sandbox; fi
