//! Harness for Sluice's integration tests: the real parts, started by the project's scripts or by
//! the harness itself.
//!
//! - [`redis`]: a private `redis-server` per test, on a free loopback port (restartable).
//! - [`kafka`]: the Kafka-compatible broker that `scripts/test.sh` starts (`SLUICE_TEST_KAFKA`),
//!   with per-test topic names.
//! - [`broker`]: a private tansu per test, for tests that freeze, kill or restart the broker.
//!
//! Nothing here is a mock: a test that cannot reach the real part fails with a message that says
//! how to start it; it is never skipped.
#![forbid(unsafe_code)]

pub mod broker;
pub mod fault;
pub mod functions;
pub mod kafka;
pub mod node;
pub mod redis;

/// A loopback port that was free a moment ago: bind port 0, read the port, release it.
///
/// # Panics
/// When no loopback port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// The `p`-th quantile (0.0–1.0, nearest rank) of `samples`, sorting them; `None` when empty.
/// Shared by the benchmarks so that every figure is computed the same way.
pub fn percentile<T: Copy + Ord>(samples: &mut [T], p: f64) -> Option<T> {
    samples.sort_unstable();
    let last = samples.len().checked_sub(1)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
    Some(samples[i.min(last)])
}
