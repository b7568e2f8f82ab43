#!/usr/bin/env bash
# Sluice's main job, end to end on this machine: set up what is missing, build Sluice, run
# `sluice dev` (which starts tansu and Redis), create a function (a shell custom runtime, run
# unmodified in a jailed sandbox), invoke it synchronously and with events, show the success and
# failure records, redrive the failures; then map a Kafka topic to a function and watch a poison
# record land in the failure topic; then stop everything.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
log "building sluice"
cargo build --locked -p sluice -p sluice-agent -p sluice-testfns
SLUICE="$ROOT/target/debug/sluice"
WORK="$(mktemp -d /tmp/sluice-demo.XXXXXX)"
KPORT="$(free_port)"; RPORT="$(free_port)"; APORT="$(free_port)"
export SLUICE_ENDPOINT="http://127.0.0.1:$APORT" SLUICE_KAFKA="127.0.0.1:$KPORT"
log "sluice dev (Kafka 127.0.0.1:$KPORT, Redis 127.0.0.1:$RPORT, API 127.0.0.1:$APORT, data $WORK)"
"$SLUICE" dev --kafka "127.0.0.1:$KPORT" --redis "127.0.0.1:$RPORT" --api "127.0.0.1:$APORT" \
  --data-dir "$WORK" --code-path-root "$WORK" --async-retry-delays 1s,2s >"$WORK/sluice.log" 2>&1 &
DEV=$!
cleanup() { kill -INT "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
wait_port "$APORT" "sluice dev" "$DEV" "$WORK/sluice.log"

run() { printf '\033[36m$ sluice %s\033[0m\n' "$*" >&2; "$SLUICE" "$@"; }
run functions create --name echo --code examples/echo --memory 256 --env GREETING=hello >/dev/null
run functions list
run functions put-event-invoke-config echo --max-retries 1 \
  --on-success kafka://echo-succeeded --on-failure kafka://echo-failed >/dev/null
log "a synchronous invoke, then one that fails"
run invoke echo --payload '{"hello":"world"}'
run invoke echo --payload '{"please":"fail"}' || true
log "events: 202 once Kafka has them; the pollers run them, retry failures, write records"
run invoke echo --event --payload '{"order":1}'
run invoke echo --event --payload '{"order":2}'
run invoke echo --event --payload '{"order":3,"please":"fail"}'
for _ in $(seq 1 60); do
  ok=$("$SLUICE" destinations tail kafka://echo-succeeded --json 2>/dev/null | wc -l || true)
  bad=$("$SLUICE" destinations tail kafka://echo-failed --json 2>/dev/null | wc -l || true)
  [ "$ok" -ge 2 ] && [ "$bad" -ge 1 ] && break
  sleep 0.5
done
run destinations tail kafka://echo-succeeded
run destinations tail kafka://echo-failed
log "redrive the failed events (they fail again here, and come back as new failure records)"
run redrive kafka://echo-failed

log "a stream mapping: a Kafka topic (3 partitions) consumed by a lambda_runtime function"
BUNDLE="$WORK/consumer"; mkdir -p "$BUNDLE"; cp target/debug/fn-stream "$BUNDLE/bootstrap"; chmod 755 "$WORK" "$BUNDLE"
run functions create --name consumer --code "$BUNDLE" >/dev/null
run topics create orders --partitions 3
cat >"$WORK/mapping.yaml" <<YAML
FunctionName: consumer
Topics: [orders]
StartingPosition: TRIM_HORIZON
BatchSize: 10
MaximumBatchingWindowInSeconds: 1
BisectBatchOnFunctionError: true
MaximumRetryAttempts: 1
DestinationConfig:
  OnFailure:
    Destination: kafka://orders-failed
YAML
run mappings create "$WORK/mapping.yaml" | grep -E '"(UUID|State)"'
for i in $(seq 1 20); do echo "order-$i:{\"order\":$i}"; done >"$WORK/orders.txt"
echo 'order-13:{"order":13,"poison":true}' >>"$WORK/orders.txt"
run produce -t orders -K : "$WORK/orders.txt"
for _ in $(seq 1 60); do
  [ "$("$SLUICE" destinations tail kafka://orders-failed --json 2>/dev/null | wc -l || true)" -ge 1 ] && break
  sleep 0.5
done
log "the poison record was isolated (bisection) and landed in the failure topic; the others ran"
run destinations tail kafka://orders-failed
run mappings list --function consumer | grep -E '"(State|BatchSize|LastProcessingResult)"' 
log "metrics (excerpt)"
curl -sS "$SLUICE_ENDPOINT/metrics" | grep -E '^sluice_(invocations_total|errors_total|async_events_received_total|async_events_dropped_total|config_functions)' || true
log "stopping sluice dev (Ctrl-C): it stops the broker and Redis it started"
kill -INT "$DEV"; wait "$DEV" || true
trap 'rm -rf "$WORK"' EXIT
log "done"
