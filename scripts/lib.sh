# Shared by the project's scripts: install what is missing, start services on free loopback
# ports, wait until they answer, stop them on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
TANSU_VERSION=0.6.0

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_apt() { # ensure_apt <command> <package>
  if ! command -v "$1" >/dev/null 2>&1; then
    log "installing $2 (apt-get)"
    if ! apt-get install -y "$2" >/dev/null 2>&1; then
      apt-get update >/dev/null && apt-get install -y "$2" >/dev/null
    fi
  fi
}

ensure_tansu() {
  if command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return
  fi
  log "installing tansu $TANSU_VERSION (cargo install; 15-25 minutes, once)"
  cargo install "tansu@$TANSU_VERSION" --locked --features dynostore,libsql
}

ensure_boto3() {
  if ! python3 -c 'import boto3' >/dev/null 2>&1; then
    log "installing boto3 (the AWS SDK for Python, for the SDK compatibility test)"
    python3 -m pip install --quiet boto3
  fi
}

ensure_all() {
  ensure_boto3
  ensure_apt redis-server redis-server
  ensure_apt redis-benchmark redis-tools
  ensure_apt cmake cmake
  ensure_tansu
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # wait_port <port> <name> <pid> <log>
  for _ in $(seq 1 600); do
    if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then
      log "$2 exited before it answered:"; tail -n 20 "$4" >&2; return 1
    fi
    sleep 0.1
  done
  log "$2 did not answer on port $1 within 60 s"; tail -n 20 "$4" >&2; return 1
}

SERVICE_PIDS=()
stop_services() {
  for pid in "${SERVICE_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${SERVICE_PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
}

# start_services <dir>: starts redis-server and tansu on free ports under <dir>;
# exports SLUICE_KAFKA and SLUICE_REDIS.
start_services() {
  local dir="$1"; mkdir -p "$dir/redis" "$dir/kafka"
  local rport kport
  rport="$(free_port)"
  redis-server --bind 127.0.0.1 --port "$rport" --save "" --appendonly no --dir "$dir/redis" \
    >"$dir/redis.log" 2>&1 &
  SERVICE_PIDS+=($!)
  wait_port "$rport" redis-server "$!" "$dir/redis.log"
  kport="$(free_port)"
  (cd "$dir/kafka" && exec tansu broker --storage-engine sqlite://tansu.db \
     --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport") \
    >"$dir/tansu.log" 2>&1 &
  SERVICE_PIDS+=($!)
  wait_port "$kport" tansu "$!" "$dir/tansu.log"
  export SLUICE_KAFKA="127.0.0.1:$kport" SLUICE_REDIS="redis://127.0.0.1:$rport"
  log "redis on 127.0.0.1:$rport, tansu on 127.0.0.1:$kport (logs in $dir)"
}
