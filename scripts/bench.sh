#!/usr/bin/env bash
# Runs the benchmarks (release builds). `scripts/bench.sh` runs all; `scripts/bench.sh sandbox`
# or `scripts/bench.sh leasing` one of them.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
cargo build --release --locked -p sluice-agent -p sluice-testfns
want="${1:-all}"
if [ "$want" = all ] || [ "$want" = leasing ]; then cargo bench --locked -p sluice-leasing --bench leasing; fi
if [ "$want" = all ] || [ "$want" = sandbox ]; then cargo bench --locked -p sluice-workers --bench sandbox; fi
