#!/usr/bin/env bash
# Runs the benchmarks (release builds). `scripts/bench.sh` runs all; `scripts/bench.sh sandbox`,
# `scripts/bench.sh leasing` or `scripts/bench.sh ingest` one of them (ingest starts its own
# tansu and Redis).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
cargo build --release --locked -p sluice -p sluice-agent -p sluice-testfns
want="${1:-all}"
if [ "$want" = all ] || [ "$want" = ingest ]; then
  WORK="$(mktemp -d /tmp/sluice-bench.XXXXXX)"
  trap 'stop_services; rm -rf "$WORK"' EXIT
  start_services "$WORK"
  cargo bench --locked -p sluice --bench async_ingest
fi
if [ "$want" = all ] || [ "$want" = leasing ]; then cargo bench --locked -p sluice-leasing --bench leasing; fi
if [ "$want" = all ] || [ "$want" = sandbox ]; then cargo bench --locked -p sluice-workers --bench sandbox; fi
