//! Harness for Sluice's integration tests: the real parts, started by the project's scripts or by
//! the harness itself.
//!
//! - [`redis`]: a private `redis-server` per test, on a free loopback port (restartable).
//! - [`kafka`]: the Kafka-compatible broker that `scripts/test.sh` starts (`SLUICE_TEST_KAFKA`),
//!   with per-test topic names.
//!
//! Nothing here is a mock: a test that cannot reach the real part fails with a message that says
//! how to start it; it is never skipped.
#![forbid(unsafe_code)]

pub mod functions;
pub mod kafka;
pub mod node;
pub mod redis;
