#!/usr/bin/env bash
# Runs the benchmarks (release builds). `scripts/bench.sh` runs all; `scripts/bench.sh sandbox`,
# `scripts/bench.sh leasing`, `ingest` or `stream` one of them (ingest and stream start their
# own tansu and Redis).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
ensure_apt bwrap bubblewrap
cargo build --release --locked -p sluice -p sluice-agent -p sluice-testfns
want="${1:-all}"
if [ "$want" = all ] || [ "$want" = ingest ] || [ "$want" = stream ]; then
  WORK="$(mktemp -d /tmp/sluice-bench.XXXXXX)"
  trap 'stop_services; rm -rf "$WORK"' EXIT
  start_services "$WORK"
  if [ "$want" != stream ]; then cargo bench --locked -p sluice --bench async_ingest; fi
  if [ "$want" != ingest ]; then cargo bench --locked -p sluice --bench stream; fi
fi
if [ "$want" = all ] || [ "$want" = leasing ]; then cargo bench --locked -p sluice-leasing --bench leasing; fi
if [ "$want" = all ] || [ "$want" = sandbox ]; then cargo bench --locked -p sluice-workers --bench sandbox; fi
