#!/usr/bin/env bash
# Sluice's main job, end to end on this machine: set up what is missing, build Sluice, run
# `sluice dev` (which starts tansu and Redis), create a function and list it, then stop everything.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
log "building sluice"
cargo build --locked -p sluice
SLUICE="$ROOT/target/debug/sluice"
WORK="$(mktemp -d /tmp/sluice-demo.XXXXXX)"
KPORT="$(free_port)"; RPORT="$(free_port)"; APORT="$(free_port)"
export SLUICE_ENDPOINT="http://127.0.0.1:$APORT"
log "sluice dev (Kafka 127.0.0.1:$KPORT, Redis 127.0.0.1:$RPORT, API 127.0.0.1:$APORT, data $WORK)"
"$SLUICE" dev --kafka "127.0.0.1:$KPORT" --redis "127.0.0.1:$RPORT" --api "127.0.0.1:$APORT" \
  --data-dir "$WORK" >"$WORK/sluice.log" 2>&1 &
DEV=$!
cleanup() { kill -INT "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
wait_port "$APORT" "sluice dev" "$DEV" "$WORK/sluice.log"

log "sluice functions create --name echo --code examples/echo --memory 256"
"$SLUICE" functions create --name echo --code examples/echo --memory 256 --env GREETING=hello
log "sluice functions list"
"$SLUICE" functions list
log "metrics (excerpt)"
curl -sS "$SLUICE_ENDPOINT/metrics" | grep -E '^sluice_(config_functions|node_info)' || true
log "stopping sluice dev (Ctrl-C): it stops the broker and Redis it started"
kill -INT "$DEV"; wait "$DEV" || true
tail -n 5 "$WORK/sluice.log"
trap 'rm -rf "$WORK"' EXIT
log "done"
