#!/usr/bin/env bash
# Sets up what is missing, starts the real services (tansu, Redis) on free loopback ports, runs the
# whole test suite against them, and stops them. Extra arguments go to `cargo test`.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_all
WORK="$(mktemp -d /tmp/sluice-test.XXXXXX)"
trap 'stop_services; rm -rf "$WORK"' EXIT
start_services "$WORK"
export SLUICE_TEST_KAFKA="$SLUICE_KAFKA" SLUICE_TEST_REDIS="$SLUICE_REDIS"
# The micro-VM's Linux boot test needs the guest kernel (built from Debian's source package once,
# about 5-10 minutes, then cached); it boots it on /dev/kvm (~30 s on PVM).
log "building (or reusing) the micro-VM guest kernel"
SLUICE_GUEST_KERNEL="$(scripts/build-guest-kernel.sh)"
export SLUICE_GUEST_KERNEL SLUICE_VMM_LINUX_BOOT=1
log "building every binary (the tests run the node, the agent and the test functions as processes)"
cargo build --workspace --bins --locked
log "running the test suite"
cargo test --workspace --locked "$@"
log "checking that the benchmarks compile"
cargo check --workspace --locked --benches
log "all tests passed"
