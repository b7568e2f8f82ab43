#!/usr/bin/env bash
# The fault suite (tests/tests/faults.rs) as a soak: more records and more fault cycles than CI
# runs. Starts tansu and Redis like scripts/test.sh, runs the cases one at a time and prints each
# case's table row. Knobs (environment):
#   SLUICE_FAULT_SCALE   multiplies records and Event invokes (default here 5; CI runs 1)
#   SLUICE_FAULT_CYCLES  fault repetitions per case (default here 10; CI runs each case's own)
#   SLUICE_FAULT_KEEP=1  keeps each case's node logs under /tmp/fault<id>
# Extra arguments go to the test binary, e.g. `scripts/soak.sh t02` for one case.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
WORK="$(mktemp -d /tmp/sluice-soak.XXXXXX)"
trap 'stop_services; rm -rf "$WORK"' EXIT
start_services "$WORK"
export SLUICE_TEST_KAFKA="$SLUICE_KAFKA" SLUICE_TEST_REDIS="$SLUICE_REDIS"
export SLUICE_FAULT_SCALE="${SLUICE_FAULT_SCALE:-5}" SLUICE_FAULT_CYCLES="${SLUICE_FAULT_CYCLES:-10}"
log "building the node, the agent and the test functions"
cargo build --workspace --bins --locked
log "fault suite: scale $SLUICE_FAULT_SCALE, $SLUICE_FAULT_CYCLES cycles"
cargo test -p sluice-tests --locked --test faults -- --include-ignored --test-threads 1 --nocapture "$@" 2>&1 \
  | tee "$WORK/soak.log" | grep -E '^(\| |T[0-9]+ ran|test |failures|thread)' || true
grep -E '^\| T[0-9]+' "$WORK/soak.log" | sort -u > "$WORK/rows"
log "figures"
echo '| case | acked | lost | duplicates / bound | dest dups | failed | inversions | stalled | backwards | peak conc. (per partition) |'
cat "$WORK/rows"
! grep -q '^test result: FAILED' "$WORK/soak.log"
