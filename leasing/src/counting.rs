//! The counting service: cluster-wide concurrency limits as slots that expire.
//!
//! A slot is a member of Redis sorted sets scored by its expiry (milliseconds of the Redis
//! clock). Every slot is in its function's set and the account set; a slot of a function without
//! reserved concurrency is also in the shared unreserved pool. The limit is checked against the
//! function's own set when it has reserved concurrency (Lambda's `ReservedConcurrentExecutions`),
//! against the pool otherwise. Acquire prunes expired members first, so a holder that crashed
//! frees its slot after the slot TTL with no reaper process.
//!
//! All keys of one prefix share the hash tag `{prefix:concurrency}`: a check-and-add touches the
//! pool, the function's set and the account set in one script, so on Redis Cluster they must
//! live in one slot. Counting is small and hot; one shard serves it.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use metrics::{counter, gauge};
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};

use crate::error::CountError;
use crate::ReleaseOutcome;

/// Shortest slot TTL accepted.
pub const MIN_SLOT_TTL: Duration = Duration::from_millis(100);
/// Longest function name accepted; names become part of Redis keys.
const MAX_NAME_LEN: usize = 256;

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/count_acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/count_renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/count_release.lua")));
static IN_USE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/count_in_use.lua")));

/// The concurrency limit a function counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionLimit {
    /// The function has reserved concurrency (`ReservedConcurrentExecutions`): it counts against
    /// its own limit only. `Reserved(0)` throttles every invocation, as in Lambda.
    Reserved(u32),
    /// No reservation: the function shares the unreserved pool with every other such function.
    Unreserved {
        /// Limit of the pool: the account limit minus all reservations (see
        /// [`unreserved_limit`]).
        unreserved_limit: u32,
    },
}

/// The unreserved pool's limit: the account limit minus the sum of all reservations, never
/// negative.
pub fn unreserved_limit(account_limit: u32, reservations: impl IntoIterator<Item = u32>) -> u32 {
    let reserved = reservations
        .into_iter()
        .fold(0_u32, |sum, r| sum.saturating_add(r));
    account_limit.saturating_sub(reserved)
}

/// Which limit throttled an invocation, with Lambda's names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    /// The function's reserved concurrency is in use.
    ReservedFunctionConcurrentInvocationLimitExceeded,
    /// The unreserved pool (account concurrency) is in use.
    ConcurrentInvocationLimitExceeded,
}

impl ThrottleReason {
    /// Lambda's name, as sent in the `Reason` of a `TooManyRequestsException`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReservedFunctionConcurrentInvocationLimitExceeded => {
                "ReservedFunctionConcurrentInvocationLimitExceeded"
            }
            Self::ConcurrentInvocationLimitExceeded => "ConcurrentInvocationLimitExceeded",
        }
    }
}

impl std::fmt::Display for ThrottleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn validate_function(function: &str) -> Result<(), CountError> {
    let reason = if function.is_empty() {
        "must not be empty"
    } else if function.len() > MAX_NAME_LEN {
        "must be at most 256 bytes"
    } else if function.contains(['{', '}']) {
        "must not contain '{' or '}' (they would change the Redis Cluster hash tag)"
    } else {
        return Ok(());
    };
    Err(CountError::InvalidName {
        function: function.to_owned(),
        reason,
    })
}

/// Takes and gives back concurrency slots under one key prefix. Cheap to clone; clones share
/// the connection.
#[derive(Clone)]
pub struct ConcurrencyCounter {
    inner: Arc<CounterInner>,
}

struct CounterInner {
    conn: ConnectionManager,
    prefix: String,
    slot_ttl: Duration,
    slot_ttl_ms: u64,
}

impl std::fmt::Debug for ConcurrencyCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyCounter")
            .field("prefix", &self.inner.prefix)
            .field("slot_ttl", &self.inner.slot_ttl)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyCounter {
    /// A counter with keys under `prefix` whose slots expire `slot_ttl` after they were taken
    /// or last renewed.
    ///
    /// # Errors
    ///
    /// [`CountError::InvalidConfig`] when `slot_ttl` is under [`MIN_SLOT_TTL`] or not a whole
    /// number of milliseconds, or the prefix contains a brace.
    pub fn new(
        conn: ConnectionManager,
        prefix: impl Into<String>,
        slot_ttl: Duration,
    ) -> Result<Self, CountError> {
        let prefix = prefix.into();
        if slot_ttl < MIN_SLOT_TTL {
            return Err(CountError::InvalidConfig(format!(
                "slot_ttl must be at least {MIN_SLOT_TTL:?}, got {slot_ttl:?}"
            )));
        }
        if slot_ttl.subsec_nanos() % 1_000_000 != 0 {
            return Err(CountError::InvalidConfig(format!(
                "slot_ttl must be a whole number of milliseconds, got {slot_ttl:?}"
            )));
        }
        if prefix.contains(['{', '}']) {
            return Err(CountError::InvalidConfig(format!(
                "key prefix must not contain '{{' or '}}', got {prefix:?}"
            )));
        }
        let slot_ttl_ms = u64::try_from(slot_ttl.as_millis()).map_err(|_| {
            CountError::InvalidConfig(format!("slot_ttl is too large, got {slot_ttl:?}"))
        })?;
        Ok(Self {
            inner: Arc::new(CounterInner {
                conn,
                prefix,
                slot_ttl,
                slot_ttl_ms,
            }),
        })
    }

    /// The slot TTL: a slot that is not renewed within it frees itself.
    pub fn slot_ttl(&self) -> Duration {
        self.inner.slot_ttl
    }

    fn function_key(&self, function: &str) -> String {
        format!("{{{}:concurrency}}:function:{function}", self.inner.prefix)
    }

    fn unreserved_key(&self) -> String {
        format!("{{{}:concurrency}}:unreserved", self.inner.prefix)
    }

    fn account_key(&self) -> String {
        format!("{{{}:concurrency}}:account", self.inner.prefix)
    }

    /// Takes a slot for one invocation of `function`, or fails at once when its limit is in use;
    /// never waits.
    ///
    /// # Errors
    ///
    /// [`CountError::Throttled`] over the limit (with Lambda's reason),
    /// [`CountError::InvalidName`] for an unusable name, [`CountError::AcquireSlot`] when Redis
    /// fails.
    pub async fn acquire(&self, function: &str, limit: FunctionLimit) -> Result<Slot, CountError> {
        validate_function(function)?;
        let function_key = self.function_key(function);
        let (limit_key, max, reason) = match limit {
            FunctionLimit::Reserved(reserved) => (
                function_key.clone(),
                reserved,
                ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
            ),
            FunctionLimit::Unreserved { unreserved_limit } => (
                self.unreserved_key(),
                unreserved_limit,
                ThrottleReason::ConcurrentInvocationLimitExceeded,
            ),
        };
        if max == 0 {
            return Err(throttled(function, reason, max));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let mut conn = self.inner.conn.clone();
        let reply: Vec<i64> = ACQUIRE
            .key(&limit_key)
            .key(&function_key)
            .key(self.account_key())
            .arg(&id)
            .arg(max)
            .arg(self.inner.slot_ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| CountError::AcquireSlot {
                function: function.to_owned(),
                source,
            })?;
        let &[acquired, value, function_in_use, account_in_use, pruned] = reply.as_slice() else {
            return Err(CountError::AcquireSlot {
                function: function.to_owned(),
                source: unexpected_reply("acquire script returned a malformed reply"),
            });
        };
        if pruned > 0 {
            // Slots that expired instead of being released: crashed or stuck holders.
            counter!("sluice_slots_expired_total").increment(pruned.unsigned_abs());
        }
        record_in_use(function, function_in_use, account_in_use);
        if acquired != 1 {
            return Err(throttled(function, reason, max));
        }
        Ok(Slot {
            counter: self.clone(),
            function: function.to_owned(),
            id,
            limit_key,
            expires_at_ms: value.unsigned_abs(),
        })
    }

    async fn count(&self, key: String, scope: &str) -> Result<u64, CountError> {
        let mut conn = self.inner.conn.clone();
        let n: u64 = IN_USE
            .key(key)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| CountError::CountSlots {
                scope: scope.to_owned(),
                source,
            })?;
        Ok(n)
    }

    /// Unexpired slots of `function` (reserved or not).
    ///
    /// # Errors
    ///
    /// [`CountError::CountSlots`] when Redis fails.
    pub async fn in_use(&self, function: &str) -> Result<u64, CountError> {
        validate_function(function)?;
        self.count(self.function_key(function), function).await
    }

    /// Unexpired slots of functions without reserved concurrency, together.
    ///
    /// # Errors
    ///
    /// [`CountError::CountSlots`] when Redis fails.
    pub async fn unreserved_in_use(&self) -> Result<u64, CountError> {
        self.count(self.unreserved_key(), "unreserved").await
    }

    /// Unexpired slots of the whole account (Lambda's `ConcurrentExecutions` without a
    /// dimension); also sets the `sluice_account_concurrent_executions` gauge.
    ///
    /// # Errors
    ///
    /// [`CountError::CountSlots`] when Redis fails.
    pub async fn account_in_use(&self) -> Result<u64, CountError> {
        let n = self.count(self.account_key(), "account").await?;
        gauge!("sluice_account_concurrent_executions").set(n as f64);
        Ok(n)
    }
}

fn throttled(function: &str, reason: ThrottleReason, limit: u32) -> CountError {
    counter!(
        "sluice_throttles_total",
        "function" => function.to_owned(),
        "reason" => reason.as_str()
    )
    .increment(1);
    CountError::Throttled {
        function: function.to_owned(),
        reason,
        limit,
    }
}

fn record_in_use(function: &str, function_in_use: i64, account_in_use: i64) {
    gauge!("sluice_concurrent_executions", "function" => function.to_owned())
        .set(function_in_use as f64);
    gauge!("sluice_account_concurrent_executions").set(account_in_use as f64);
}

fn unexpected_reply(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

/// One unit of concurrency, held for one invocation. Give it back with [`Slot::release`]; renew
/// it with [`Slot::renew`] more often than the slot TTL while the invocation runs.
///
/// Dropping a `Slot` without releasing it keeps the capacity taken until the slot TTL passes,
/// as for a holder that crashed.
#[derive(Debug)]
#[must_use = "a slot that is dropped stays taken until its TTL passes; release it"]
pub struct Slot {
    counter: ConcurrencyCounter,
    function: String,
    id: String,
    limit_key: String,
    expires_at_ms: u64,
}

impl Slot {
    /// The function this slot was taken for.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The slot's id (its member in the sorted sets).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the slot expires unless renewed, in milliseconds since the epoch on the Redis clock.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    /// Pushes the expiry back by the slot TTL.
    ///
    /// # Errors
    ///
    /// [`CountError::SlotExpired`] when the slot had already expired (its capacity may have been
    /// handed out again), [`CountError::RenewSlot`] when Redis fails.
    pub async fn renew(&mut self) -> Result<(), CountError> {
        let counter = &self.counter;
        let mut conn = counter.inner.conn.clone();
        let expires: i64 = RENEW
            .key(&self.limit_key)
            .key(counter.function_key(&self.function))
            .key(counter.account_key())
            .arg(&self.id)
            .arg(counter.inner.slot_ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| CountError::RenewSlot {
                function: self.function.clone(),
                source,
            })?;
        if expires <= 0 {
            return Err(CountError::SlotExpired {
                function: self.function.clone(),
                slot: self.id.clone(),
            });
        }
        self.expires_at_ms = expires.unsigned_abs();
        Ok(())
    }

    /// Gives the slot back.
    ///
    /// Returns [`ReleaseOutcome::NotHeld`] when the slot had already expired.
    ///
    /// # Errors
    ///
    /// [`CountError::ReleaseSlot`] when Redis fails; the slot then frees itself after its TTL.
    pub async fn release(self) -> Result<ReleaseOutcome, CountError> {
        let counter = &self.counter;
        let mut conn = counter.inner.conn.clone();
        let reply: Vec<i64> = RELEASE
            .key(&self.limit_key)
            .key(counter.function_key(&self.function))
            .key(counter.account_key())
            .arg(&self.id)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| CountError::ReleaseSlot {
                function: self.function.clone(),
                source,
            })?;
        let &[held, function_in_use, account_in_use] = reply.as_slice() else {
            return Err(CountError::ReleaseSlot {
                function: self.function.clone(),
                source: unexpected_reply("release script returned a malformed reply"),
            });
        };
        record_in_use(&self.function, function_in_use, account_in_use);
        if held == 1 {
            Ok(ReleaseOutcome::Released)
        } else {
            tracing::debug!(function = %self.function, slot = %self.id, "slot had expired before release");
            Ok(ReleaseOutcome::NotHeld)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter whose connection is never opened: enough for paths that must not touch Redis.
    fn offline_counter() -> ConcurrencyCounter {
        let client = redis::Client::open("redis://127.0.0.1:1/").expect("valid URL");
        let conn = ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .expect("lazy connection manager needs no server");
        ConcurrencyCounter::new(conn, "unit", Duration::from_secs(1)).expect("valid config")
    }

    #[test]
    fn unreserved_limit_subtracts_reservations_without_going_negative() {
        assert_eq!(unreserved_limit(1000, [100, 50]), 850);
        assert_eq!(unreserved_limit(10, [8, 8]), 0);
        assert_eq!(unreserved_limit(10, [u32::MAX, 1]), 0);
        assert_eq!(unreserved_limit(10, []), 10);
    }

    #[test]
    fn throttle_reasons_use_lambda_names() {
        assert_eq!(
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded.to_string(),
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        );
        assert_eq!(
            ThrottleReason::ConcurrentInvocationLimitExceeded.to_string(),
            "ConcurrentInvocationLimitExceeded"
        );
    }

    #[tokio::test]
    async fn keys_share_one_hash_tag_per_prefix() {
        let counter = offline_counter();
        for key in [
            counter.function_key("f"),
            counter.unreserved_key(),
            counter.account_key(),
        ] {
            assert!(key.starts_with("{unit:concurrency}:"), "{key}");
        }
    }

    #[tokio::test]
    async fn zero_limits_throttle_without_reaching_redis() {
        let counter = offline_counter();
        let reserved = counter.acquire("f", FunctionLimit::Reserved(0)).await;
        assert!(matches!(
            reserved,
            Err(CountError::Throttled {
                reason: ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
                limit: 0,
                ..
            })
        ));
        let pool = counter
            .acquire(
                "f",
                FunctionLimit::Unreserved {
                    unreserved_limit: 0,
                },
            )
            .await;
        assert!(matches!(
            pool,
            Err(CountError::Throttled {
                reason: ThrottleReason::ConcurrentInvocationLimitExceeded,
                ..
            })
        ));
    }

    #[test]
    fn invalid_settings_name_the_broken_bound() {
        let client = redis::Client::open("redis://127.0.0.1:1/").expect("valid URL");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let conn = ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .expect("lazy connection manager needs no server");
        let err = ConcurrencyCounter::new(conn.clone(), "p", Duration::from_millis(10))
            .expect_err("too short");
        assert!(
            err.to_string().contains("slot_ttl must be at least"),
            "{err}"
        );
        let err = ConcurrencyCounter::new(conn, "p{x}", Duration::from_secs(1))
            .expect_err("brace in prefix");
        assert!(err.to_string().contains("key prefix"), "{err}");
    }
}
