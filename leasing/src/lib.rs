//! Sluice's coordination state in Redis: the **leasing service** and the **counting service**.
//!
//! # What it owns
//!
//! - [`Leaser`] / [`Lease`]: exclusive, expiring leases with fencing tokens, which give each
//!   work unit (a mapping's topic partition, say) to exactly one poller. A holder learns it lost
//!   a lease before the TTL could let another take it, and writes it makes through
//!   [`Leaser::fenced_set`] are refused once a newer holder exists.
//! - [`ConcurrencyCounter`] / [`Slot`]: per-function reserved concurrency and the account's
//!   unreserved pool, as slots that expire. Over the limit is a [`CountError::Throttled`] with
//!   Lambda's reason, returned at once.
//!
//! Everything here can be rebuilt: if Redis is flushed or restarted, holders see their leases
//! lost and acquire them again (with larger tokens: the fence counters are re-seeded from the
//! Redis clock), and slots of vanished holders expire. Every check-and-set is a Lua script run
//! with `EVALSHA`; after a restart or `SCRIPT FLUSH` the `NOSCRIPT` reply makes the client load
//! the script and retry, which callers never see.
//!
//! Keys live under a caller-given prefix, with hash tags (`{prefix:lease:NAME}`,
//! `{prefix:concurrency}`) so that each script's keys share a Redis Cluster slot.
//!
//! # Threading model
//!
//! Async, on the caller's tokio runtime, over one multiplexed
//! [`redis::aio::ConnectionManager`] that reconnects after Redis restarts (see [`connect`]).
//! Each [`Lease`] owns one spawned renew task, stopped when the lease is released, dropped or
//! lost; nothing else runs in the background. Time is measured on tokio's monotonic clock, so
//! the lease logic is tested with paused time.
#![forbid(unsafe_code)]

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub mod counting;
pub mod error;
pub mod lease;

pub use counting::{unreserved_limit, ConcurrencyCounter, FunctionLimit, Slot, ThrottleReason};
pub use error::{ConnectError, CountError, LeaseError};
pub use lease::{Lease, Leaser, LostReason};

/// How a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// It was still held and is now free.
    Released,
    /// It was no longer held by the caller (expired, flushed, or taken over); nothing changed.
    NotHeld,
}

/// Per-command response timeout of [`connect`]'s connection: short, so that a stalled Redis
/// shows up as retryable errors well within a lease TTL.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of each connection attempt.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnect backoff bounds.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
const RECONNECT_RETRIES: usize = 8;

/// Opens the multiplexed, self-reconnecting connection that [`Leaser`] and
/// [`ConcurrencyCounter`] share, with timeouts suited to leases: commands time out after 1 s and
/// reconnection backs off from 50 ms to 1 s.
///
/// # Errors
///
/// [`ConnectError::OpenClient`] for a malformed URL, [`ConnectError::Connect`] when the first
/// connection fails.
pub async fn connect(redis_url: &str) -> Result<ConnectionManager, ConnectError> {
    let client =
        redis::Client::open(redis_url).map_err(|source| ConnectError::OpenClient { source })?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_number_of_retries(RECONNECT_RETRIES);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|source| ConnectError::Connect { source })
}
