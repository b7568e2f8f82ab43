//! Errors of the leasing crate: one enum per module ([`ConnectError`] for [`crate::connect`],
//! [`LeaseError`] for [`crate::lease`], [`CountError`] for [`crate::counting`]).
//!
//! Every enum says through `is_retryable()` whether trying the same call again can help, so that
//! callers choose between a backoff-and-retry and giving up without parsing messages.

use redis::{RedisError, RetryMethod};

use crate::counting::ThrottleReason;
use crate::lease::LostReason;

/// Whether a Redis failure is worth retrying: connection losses, timeouts, a server that is
/// loading or failing over are; a script error or a wrong reply type is not.
fn redis_retryable(err: &RedisError) -> bool {
    err.is_timeout() || !matches!(err.retry_method(), RetryMethod::NoRetry)
}

/// Failure to open the connection that leases and slots share.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The Redis URL could not be parsed. The URL is left out of the message because it may
    /// carry a password.
    #[error("open Redis client: invalid Redis URL")]
    OpenClient {
        /// Why the URL was refused.
        #[source]
        source: RedisError,
    },
    /// The first connection to Redis failed.
    #[error("connect to Redis")]
    Connect {
        /// The connection failure.
        #[source]
        source: RedisError,
    },
}

impl ConnectError {
    /// Whether connecting again later can succeed (the server may come up); a malformed URL
    /// never will.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::OpenClient { .. } => false,
            Self::Connect { source } => redis_retryable(source) || source.is_connection_refusal(),
        }
    }
}

/// Failure of a lease operation.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The [`crate::Leaser`] settings break a bound; the message names it.
    #[error("invalid leaser configuration: {0}")]
    InvalidConfig(String),
    /// A lease name that cannot be used as (part of) a Redis key.
    #[error("invalid lease name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The acquire script failed.
    #[error("acquire lease {name}")]
    AcquireLease {
        /// Lease name.
        name: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// An explicit renewal ([`crate::Lease::renew_now`]) failed to reach Redis.
    #[error("renew lease {name}")]
    RenewLease {
        /// Lease name.
        name: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// The lease is lost: it expired, was flushed, or another holder took it.
    #[error("lease {name} is lost ({reason})")]
    Lost {
        /// Lease name.
        name: String,
        /// How it was lost.
        reason: LostReason,
    },
    /// The release script failed; the lease will expire after its TTL anyway.
    #[error("release lease {name}")]
    ReleaseLease {
        /// Lease name.
        name: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// Checking whether a fencing token is current failed.
    #[error("check token {token} of lease {name}")]
    CheckToken {
        /// Lease name.
        name: String,
        /// The token that was checked.
        token: u64,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// A fenced write failed to reach Redis (it may or may not have been applied).
    #[error("fenced write of {key} under lease {name}")]
    FencedWrite {
        /// Lease name.
        name: String,
        /// Key that was to be written.
        key: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// A fenced write was refused: `token` is no longer the lease's current token, so a newer
    /// holder may be writing.
    #[error("write of {key} fenced: token {token} is no longer current for lease {name}")]
    Fenced {
        /// Lease name.
        name: String,
        /// Key that was not written.
        key: String,
        /// The stale token.
        token: u64,
    },
}

impl LeaseError {
    /// Whether the same call can succeed later. A lost lease or a fenced write cannot: the
    /// holder must acquire the lease again (and get a new token) first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::InvalidConfig(_)
            | Self::InvalidName { .. }
            | Self::Lost { .. }
            | Self::Fenced { .. } => false,
            Self::AcquireLease { source, .. }
            | Self::RenewLease { source, .. }
            | Self::ReleaseLease { source, .. }
            | Self::CheckToken { source, .. }
            | Self::FencedWrite { source, .. } => redis_retryable(source),
        }
    }
}

/// Failure of a concurrency-counting operation.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    /// The [`crate::ConcurrencyCounter`] settings break a bound; the message names it.
    #[error("invalid concurrency counter configuration: {0}")]
    InvalidConfig(String),
    /// A function name that cannot be used as (part of) a Redis key.
    #[error("invalid function name {function:?}: {reason}")]
    InvalidName {
        /// The refused name.
        function: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The limit is reached: the invocation is throttled (Lambda's `TooManyRequestsException`).
    #[error("function {function} throttled: {reason} (limit {limit})")]
    Throttled {
        /// Function name.
        function: String,
        /// Which limit was hit, with Lambda's name for it.
        reason: ThrottleReason,
        /// The limit that was reached.
        limit: u32,
    },
    /// The acquire script failed.
    #[error("acquire concurrency slot of {function}")]
    AcquireSlot {
        /// Function name.
        function: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// The renew script failed to reach Redis.
    #[error("renew concurrency slot of {function}")]
    RenewSlot {
        /// Function name.
        function: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// The slot expired before it was renewed; its capacity may be in use by someone else.
    #[error("concurrency slot {slot} of {function} expired before it was renewed")]
    SlotExpired {
        /// Function name.
        function: String,
        /// Slot id.
        slot: String,
    },
    /// The release script failed; the slot frees itself after its TTL anyway.
    #[error("release concurrency slot of {function}")]
    ReleaseSlot {
        /// Function name.
        function: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
    /// Counting the slots in use failed.
    #[error("count concurrency slots of {scope}")]
    CountSlots {
        /// A function name, or `account`.
        scope: String,
        /// The Redis failure.
        #[source]
        source: RedisError,
    },
}

impl CountError {
    /// Whether the same call can succeed later. A throttle can (after a backoff: that is how
    /// Lambda retries throttled asynchronous events); an expired slot cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Throttled { .. } => true,
            Self::InvalidConfig(_) | Self::InvalidName { .. } | Self::SlotExpired { .. } => false,
            Self::AcquireSlot { source, .. }
            | Self::RenewSlot { source, .. }
            | Self::ReleaseSlot { source, .. }
            | Self::CountSlots { source, .. } => redis_retryable(source),
        }
    }

    /// The throttle reason when this error is a throttle.
    pub fn throttle_reason(&self) -> Option<ThrottleReason> {
        match self {
            Self::Throttled { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ErrorKind;

    #[test]
    fn io_failures_are_retryable_and_script_errors_are_not() {
        let io = RedisError::from((ErrorKind::Io, "connection dropped"));
        let script = RedisError::from((ErrorKind::UnexpectedReturnType, "bad reply"));
        let acquire = |source| LeaseError::AcquireLease {
            name: "unit".into(),
            source,
        };
        assert!(acquire(io).is_retryable());
        assert!(!acquire(script).is_retryable());
    }

    #[test]
    fn lost_and_fenced_are_final_and_throttles_are_retryable() {
        let lost = LeaseError::Lost {
            name: "unit".into(),
            reason: LostReason::Taken,
        };
        let fenced = LeaseError::Fenced {
            name: "unit".into(),
            key: "k".into(),
            token: 7,
        };
        let throttled = CountError::Throttled {
            function: "f".into(),
            reason: ThrottleReason::ConcurrentInvocationLimitExceeded,
            limit: 10,
        };
        assert!(!lost.is_retryable());
        assert!(!fenced.is_retryable());
        assert!(throttled.is_retryable());
        assert_eq!(
            throttled.throttle_reason(),
            Some(ThrottleReason::ConcurrentInvocationLimitExceeded)
        );
    }
}
