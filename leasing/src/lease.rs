//! Leases with fencing tokens: the leasing service that gives each work unit to one poller.
//!
//! A lease is a Redis hash `{prefix:lease:NAME}` holding the holder id and the fencing token,
//! with a TTL. Acquire, renew, release and the fenced write are Lua scripts, so each check-and-set
//! is atomic. Tokens come from a per-lease counter `{prefix:lease:NAME}:fence` that is seeded from
//! the Redis clock (microseconds) whenever that clock is ahead of it, so a token is larger than
//! every token issued before it even after the counter was flushed or lost in a restart.
//!
//! The holder's view of validity is local and conservative: a lease is valid until
//! `sent + ttl × SAFETY_FACTOR`, where `sent` is the monotonic instant at which the last
//! successful renewal was *sent*. Redis started the TTL no earlier than that, so the holder stops
//! trusting the lease while the key still exists in Redis, before anyone else can take it. A
//! background task renews every `ttl / RENEW_DIVISOR` and fires [`Lease::lost`] as soon as a
//! renewal says the lease is gone or taken, or the local deadline passes without a renewal.

use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use metrics::counter;
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::error::LeaseError;
use crate::ReleaseOutcome;

/// Fraction of the TTL for which a holder trusts its lease after sending a successful renewal.
/// The remaining 20 % absorb clock-rate differences between this host and Redis and the time a
/// caller needs between checking [`Lease::is_valid`] and acting.
pub const SAFETY_FACTOR: f64 = 0.8;
/// The renew task renews every `ttl / RENEW_DIVISOR`, so two renewals can fail before the local
/// deadline.
pub const RENEW_DIVISOR: u32 = 3;
/// Shortest lease TTL accepted: below it the renew interval is shorter than a Redis round trip
/// under load.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(30);
/// After a failed renewal, retry after `ttl / RETRY_DIVISOR` (well before the local deadline).
const RETRY_DIVISOR: u32 = 10;
/// Longest lease name accepted; names become part of Redis keys.
const MAX_NAME_LEN: usize = 512;

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lease_acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lease_renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lease_release.lua")));
static CHECK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lease_check.lua")));
static FENCED_SET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lease_fenced_set.lua")));

/// How a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// The local deadline passed without a successful renewal (Redis slow or unreachable). The
    /// key may still exist in Redis for up to `ttl × (1 − SAFETY_FACTOR)`.
    Expired,
    /// A renewal found no lease at all: it expired in Redis, or Redis was flushed or restarted.
    Missing,
    /// A renewal found another holder, or a newer token of the same holder.
    Taken,
}

impl LostReason {
    /// A short, stable name (used as a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Missing => "missing",
            Self::Taken => "taken",
        }
    }
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validity of a lease after a renewal sent at `sent`.
fn local_deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.mul_f64(SAFETY_FACTOR)
}

fn renew_interval(ttl: Duration) -> Duration {
    ttl / RENEW_DIVISOR
}

fn retry_interval(ttl: Duration) -> Duration {
    ttl / RETRY_DIVISOR
}

fn validate_name(name: &str) -> Result<(), LeaseError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_LEN {
        "must be at most 512 bytes"
    } else if name.contains(['{', '}']) {
        "must not contain '{' or '}' (they would change the Redis Cluster hash tag)"
    } else {
        return Ok(());
    };
    Err(LeaseError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Hands out leases under one holder id and key prefix. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Leaser {
    inner: Arc<LeaserInner>,
}

struct LeaserInner {
    conn: ConnectionManager,
    prefix: String,
    holder: String,
    ttl: Duration,
    ttl_ms: u64,
}

impl std::fmt::Debug for Leaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaser")
            .field("prefix", &self.inner.prefix)
            .field("holder", &self.inner.holder)
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl Leaser {
    /// A leaser for `holder` (unique per process, e.g. node id + a UUID), with keys under
    /// `prefix` and leases that expire `ttl` after their last renewal.
    ///
    /// # Errors
    ///
    /// [`LeaseError::InvalidConfig`] when `ttl` is under [`MIN_LEASE_TTL`] or not a whole number
    /// of milliseconds, the prefix contains a brace, or the holder id is empty.
    pub fn new(
        conn: ConnectionManager,
        prefix: impl Into<String>,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Result<Self, LeaseError> {
        let prefix = prefix.into();
        let holder = holder.into();
        if ttl < MIN_LEASE_TTL {
            return Err(LeaseError::InvalidConfig(format!(
                "lease_ttl must be at least {MIN_LEASE_TTL:?}, got {ttl:?}"
            )));
        }
        if ttl.subsec_nanos() % 1_000_000 != 0 {
            return Err(LeaseError::InvalidConfig(format!(
                "lease_ttl must be a whole number of milliseconds, got {ttl:?}"
            )));
        }
        if prefix.contains(['{', '}']) {
            return Err(LeaseError::InvalidConfig(format!(
                "key prefix must not contain '{{' or '}}', got {prefix:?}"
            )));
        }
        if holder.is_empty() {
            return Err(LeaseError::InvalidConfig(
                "holder id must not be empty".to_owned(),
            ));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).map_err(|_| {
            LeaseError::InvalidConfig(format!("lease_ttl is too large, got {ttl:?}"))
        })?;
        Ok(Self {
            inner: Arc::new(LeaserInner {
                conn,
                prefix,
                holder,
                ttl,
                ttl_ms,
            }),
        })
    }

    /// This leaser's holder id.
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The Redis key of lease `name`. Its hash tag is the whole key, so on Redis Cluster a key
    /// written with [`Leaser::fenced_set`] must be `format!("{lease_key}:…")`, in the same slot.
    pub fn lease_key(&self, name: &str) -> String {
        format!("{{{}:lease:{name}}}", self.inner.prefix)
    }

    fn fence_key(&self, name: &str) -> String {
        format!("{}:fence", self.lease_key(name))
    }

    /// Tries once to acquire lease `name`; never waits for it.
    ///
    /// Returns `Ok(None)` when another holder has it. On success the returned [`Lease`] carries
    /// a fencing token larger than any token issued for `name` before, and a task (on the
    /// current tokio runtime) renews it until it is released, dropped or lost. Acquiring a lease
    /// this holder already has issues a new token and makes the older [`Lease`] lost.
    ///
    /// # Errors
    ///
    /// [`LeaseError::InvalidName`] for an unusable name, [`LeaseError::AcquireLease`] when Redis
    /// fails (retryable when the connection is the cause).
    pub async fn acquire(&self, name: &str) -> Result<Option<Lease>, LeaseError> {
        validate_name(name)?;
        let mut conn = self.inner.conn.clone();
        let sent = Instant::now();
        let (acquired, value): (i64, i64) = ACQUIRE
            .key(self.lease_key(name))
            .key(self.fence_key(name))
            .arg(&self.inner.holder)
            .arg(self.inner.ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| LeaseError::AcquireLease {
                name: name.to_owned(),
                source,
            })?;
        if acquired != 1 {
            tracing::debug!(
                lease = name,
                pttl_ms = value,
                "lease held by another holder"
            );
            return Ok(None);
        }
        let token = u64::try_from(value).map_err(|_| LeaseError::AcquireLease {
            name: name.to_owned(),
            source: RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "negative fencing token",
            )),
        })?;
        counter!("sluice_leases_acquired_total").increment(1);
        tracing::debug!(lease = name, token, "lease acquired");
        Ok(Some(Lease::start(
            self.clone(),
            name.to_owned(),
            token,
            local_deadline(sent, self.inner.ttl),
        )))
    }

    /// One renewal of `name` under `token`.
    async fn renew_once(&self, name: &str, token: u64) -> Result<RenewReply, RedisError> {
        let mut conn = self.inner.conn.clone();
        let reply: i64 = RENEW
            .key(self.lease_key(name))
            .arg(&self.inner.holder)
            .arg(token)
            .arg(self.inner.ttl_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(RenewReply::from_script(reply))
    }

    /// Whether `token` is still the current token of lease `name` (false when the lease expired
    /// or moved on). A read: the answer can be stale by the time the caller acts on it; use
    /// [`Leaser::fenced_set`] for a write that must not outlive the lease.
    ///
    /// # Errors
    ///
    /// [`LeaseError::CheckToken`] when Redis fails.
    pub async fn check_token(&self, name: &str, token: u64) -> Result<bool, LeaseError> {
        validate_name(name)?;
        let mut conn = self.inner.conn.clone();
        let current: i64 = CHECK
            .key(self.lease_key(name))
            .arg(token)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| LeaseError::CheckToken {
                name: name.to_owned(),
                token,
                source,
            })?;
        Ok(current == 1)
    }

    /// `SET key value`, atomically with a check that `token` is the current token of lease
    /// `name`. On Redis Cluster, `key` must share the lease's hash tag (see
    /// [`Leaser::lease_key`]).
    ///
    /// # Errors
    ///
    /// [`LeaseError::Fenced`] when the token is stale (nothing was written),
    /// [`LeaseError::FencedWrite`] when Redis fails.
    pub async fn fenced_set(
        &self,
        key: &str,
        value: &[u8],
        name: &str,
        token: u64,
    ) -> Result<(), LeaseError> {
        validate_name(name)?;
        let mut conn = self.inner.conn.clone();
        let written: i64 = FENCED_SET
            .key(self.lease_key(name))
            .key(key)
            .arg(token)
            .arg(value)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| LeaseError::FencedWrite {
                name: name.to_owned(),
                key: key.to_owned(),
                source,
            })?;
        if written == 1 {
            Ok(())
        } else {
            counter!("sluice_fenced_writes_total").increment(1);
            Err(LeaseError::Fenced {
                name: name.to_owned(),
                key: key.to_owned(),
                token,
            })
        }
    }
}

/// What a renewal found in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewReply {
    Renewed,
    Missing,
    Taken,
}

impl RenewReply {
    fn from_script(reply: i64) -> Self {
        match reply {
            1 => Self::Renewed,
            0 => Self::Missing,
            _ => Self::Taken,
        }
    }
}

/// State shared by a [`Lease`] and its renew task.
#[derive(Debug)]
struct LeaseShared {
    /// Local validity deadline; only ever moves forward.
    deadline: Mutex<Instant>,
    /// Cancelled once, when the lease is lost.
    lost: CancellationToken,
    reason: OnceLock<LostReason>,
}

impl LeaseShared {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline: Mutex::new(deadline),
            lost: CancellationToken::new(),
            reason: OnceLock::new(),
        }
    }

    fn deadline(&self) -> Instant {
        // A poisoned lock still holds a valid Instant (it is written with a single store).
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the deadline forward; renewals can complete out of order.
    fn extend(&self, deadline: Instant) {
        let mut current = self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if deadline > *current {
            *current = deadline;
        }
    }

    /// Records the first reason and fires `lost`; later calls change nothing.
    fn mark_lost(&self, reason: LostReason) -> bool {
        if self.reason.set(reason).is_err() {
            return false;
        }
        self.lost.cancel();
        counter!("sluice_leases_lost_total", "reason" => reason.as_str()).increment(1);
        true
    }

    fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < self.deadline()
    }
}

/// A held lease (the *Acquired* state). It ends by [`Lease::release`] (*Released*), or by being
/// lost (*Lost*: [`Lease::lost`] fires and [`Lease::is_valid`] turns false).
///
/// Dropping a `Lease` stops its renewals without releasing it: the lease then expires after its
/// TTL, as it would for a holder that crashed.
#[derive(Debug)]
pub struct Lease {
    leaser: Leaser,
    name: String,
    token: u64,
    shared: Arc<LeaseShared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    fn start(leaser: Leaser, name: String, token: u64, deadline: Instant) -> Self {
        let shared = Arc::new(LeaseShared::new(deadline));
        let stop = CancellationToken::new();
        let renew = {
            let leaser = leaser.clone();
            let name = name.clone();
            move || {
                let leaser = leaser.clone();
                let name = name.clone();
                async move { leaser.renew_once(&name, token).await }
            }
        };
        let task = tokio::spawn(renew_loop(
            Arc::clone(&shared),
            stop.clone(),
            name.clone(),
            leaser.ttl(),
            renew,
        ));
        Self {
            leaser,
            name,
            token,
            shared,
            stop,
            task: Some(task),
        }
    }

    /// The lease name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token: larger than every token issued for this name before. Pass it along
    /// with writes that a newer holder must be able to fence off.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether the holder may still act under this lease: not lost, and before the local
    /// deadline (`ttl × SAFETY_FACTOR` after the last successful renewal was sent). Check it
    /// right before each action the lease protects.
    pub fn is_valid(&self) -> bool {
        self.shared.is_valid()
    }

    /// The local deadline, on the monotonic clock, past which the lease is no longer trusted
    /// unless renewed.
    pub fn deadline(&self) -> Instant {
        self.shared.deadline()
    }

    /// Why the lease was lost, or `None` while it is held.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.shared.reason.get().copied()
    }

    /// Resolves when the lease is lost, with the reason. Never resolves for a lease that is
    /// released first. The future owns what it needs, so it can move into another task.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            shared.lost.cancelled().await;
            shared.reason.get().copied().unwrap_or(LostReason::Expired)
        }
    }

    /// A token cancelled when the lease is lost, for `select!` in other tasks. Cancelling it
    /// yourself does not affect the lease.
    pub fn lost_token(&self) -> CancellationToken {
        self.shared.lost.child_token()
    }

    /// Renews now rather than at the next tick, e.g. right before committing work done under
    /// the lease.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Lost`] when the lease is lost (it is then marked lost),
    /// [`LeaseError::RenewLease`] when Redis fails (the lease stays valid until its deadline).
    pub async fn renew_now(&self) -> Result<(), LeaseError> {
        if let Some(reason) = self.lost_reason() {
            return Err(self.lost_error(reason));
        }
        let sent = Instant::now();
        let reply = self
            .leaser
            .renew_once(&self.name, self.token)
            .await
            .map_err(|source| LeaseError::RenewLease {
                name: self.name.clone(),
                source,
            })?;
        let reason = match reply {
            RenewReply::Renewed => {
                self.shared.extend(local_deadline(sent, self.leaser.ttl()));
                // A renewal that arrives after the deadline does not resurrect the lease:
                // `is_valid` may already have been false, and the holder may have stopped.
                if self.shared.lost.is_cancelled() {
                    return Err(self.lost_error(self.lost_reason().unwrap_or(LostReason::Expired)));
                }
                return Ok(());
            }
            RenewReply::Missing => LostReason::Missing,
            RenewReply::Taken => LostReason::Taken,
        };
        if self.shared.mark_lost(reason) {
            tracing::warn!(lease = %self.name, token = self.token, %reason, "lease lost");
        }
        Err(self.lost_error(reason))
    }

    fn lost_error(&self, reason: LostReason) -> LeaseError {
        LeaseError::Lost {
            name: self.name.clone(),
            reason,
        }
    }

    /// Stops renewing and deletes the lease if it is still this holder's under this token,
    /// so another holder can take it at once. Works on a lost lease too (the key may outlive
    /// the local deadline).
    ///
    /// # Errors
    ///
    /// [`LeaseError::ReleaseLease`] when Redis fails; the lease then expires after its TTL.
    pub async fn release(mut self) -> Result<ReleaseOutcome, LeaseError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // The task only ends by returning; a panic in it is a bug worth surfacing in logs
            // but not a reason to keep the lease.
            if let Err(err) = task.await {
                tracing::error!(lease = %self.name, %err, "lease renew task failed");
            }
        }
        let mut conn = self.leaser.inner.conn.clone();
        let released: i64 = RELEASE
            .key(self.leaser.lease_key(&self.name))
            .arg(self.leaser.holder())
            .arg(self.token)
            .invoke_async(&mut conn)
            .await
            .map_err(|source| LeaseError::ReleaseLease {
                name: self.name.clone(),
                source,
            })?;
        if released == 1 {
            counter!("sluice_leases_released_total").increment(1);
            tracing::debug!(lease = %self.name, token = self.token, "lease released");
            Ok(ReleaseOutcome::Released)
        } else {
            Ok(ReleaseOutcome::NotHeld)
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The renew task of one lease: renews every `ttl / RENEW_DIVISOR` until `stop`, and marks the
/// lease lost when a renewal finds it gone or taken, or when the local deadline passes first.
/// Generic over the renewal so that its timing is unit-tested without Redis.
async fn renew_loop<F, Fut>(
    shared: Arc<LeaseShared>,
    stop: CancellationToken,
    name: String,
    ttl: Duration,
    mut renew: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<RenewReply, RedisError>>,
{
    let interval = renew_interval(ttl);
    let validity = ttl.mul_f64(SAFETY_FACTOR);
    // The acquire was sent at `deadline - validity`; the first renewal is due one interval later.
    let mut next = shared
        .deadline()
        .checked_sub(validity)
        .map_or_else(Instant::now, |sent| sent + interval);
    loop {
        let wake = next.min(shared.deadline());
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = shared.lost.cancelled() => return,
            () = sleep_until(wake) => {}
        }
        let deadline = shared.deadline();
        if Instant::now() >= deadline {
            if shared.mark_lost(LostReason::Expired) {
                tracing::warn!(lease = %name, reason = "expired", "lease lost: no renewal before the local deadline");
            }
            return;
        }
        let sent = Instant::now();
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            result = timeout_at(deadline, renew()) => result,
        };
        let reason = match result {
            Ok(Ok(RenewReply::Renewed)) => {
                shared.extend(sent + validity);
                next = sent + interval;
                continue;
            }
            Ok(Ok(RenewReply::Missing)) => LostReason::Missing,
            Ok(Ok(RenewReply::Taken)) => LostReason::Taken,
            Ok(Err(err)) => {
                counter!("sluice_lease_renew_errors_total").increment(1);
                tracing::warn!(lease = %name, %err, "lease renewal failed, retrying");
                next = Instant::now() + retry_interval(ttl);
                continue;
            }
            // Timed out at the deadline that was current when the renewal started; an explicit
            // renewal may have moved it since.
            Err(_elapsed) => continue,
        };
        if shared.mark_lost(reason) {
            tracing::warn!(lease = %name, %reason, "lease lost");
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TTL: Duration = Duration::from_millis(3000);

    fn io_error() -> RedisError {
        RedisError::from((redis::ErrorKind::Io, "connection refused"))
    }

    /// Runs the renew loop with a fake renewal; returns the shared state, the stop token, the
    /// number of renewals made, and the acquire instant.
    fn spawn_loop<F, Fut>(
        mut reply: F,
    ) -> (
        Arc<LeaseShared>,
        CancellationToken,
        Arc<AtomicUsize>,
        Instant,
    )
    where
        F: FnMut(usize) -> Fut + Send + 'static,
        Fut: Future<Output = Result<RenewReply, RedisError>> + Send + 'static,
    {
        let acquired = Instant::now();
        let shared = Arc::new(LeaseShared::new(local_deadline(acquired, TTL)));
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        tokio::spawn(renew_loop(
            Arc::clone(&shared),
            stop.clone(),
            "unit".to_owned(),
            TTL,
            move || reply(counted.fetch_add(1, Ordering::SeqCst)),
        ));
        (shared, stop, calls, acquired)
    }

    #[test]
    fn local_deadline_is_a_safe_fraction_of_ttl() {
        let sent = Instant::now();
        assert_eq!(
            local_deadline(sent, TTL) - sent,
            Duration::from_millis(2400)
        );
        assert_eq!(renew_interval(TTL), Duration::from_millis(1000));
        assert!(2 * renew_interval(TTL) < TTL.mul_f64(SAFETY_FACTOR));
    }

    #[test]
    fn names_that_break_hash_tags_are_refused() {
        assert!(validate_name("mapping-1/orders/3").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a{b}").is_err());
        assert!(validate_name(&"x".repeat(513)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn successful_renewals_keep_the_lease_valid() {
        let (shared, stop, calls, _) = spawn_loop(|_| async { Ok(RenewReply::Renewed) });
        tokio::time::sleep(TTL * 10 + Duration::from_millis(500)).await;
        assert!(shared.is_valid());
        assert!(shared.reason.get().is_none());
        // One renewal per interval: 30 in ten TTLs.
        assert_eq!(calls.load(Ordering::SeqCst), 30);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewals_lose_the_lease_at_the_local_deadline() {
        let (shared, _stop, calls, acquired) = spawn_loop(|_| async { Err(io_error()) });
        shared.lost.cancelled().await;
        assert_eq!(Instant::now() - acquired, Duration::from_millis(2400));
        assert_eq!(shared.reason.get(), Some(&LostReason::Expired));
        assert!(!shared.is_valid());
        // First renewal at ttl/3 (1000 ms), then retries every ttl/10: 1300, 1600, 1900, 2200.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_counts_from_when_the_last_good_renewal_was_sent() {
        // Renewals take 200 ms; the second one and all later ones fail.
        let (shared, _stop, _, acquired) = spawn_loop(|n| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if n == 0 {
                Ok(RenewReply::Renewed)
            } else {
                Err(io_error())
            }
        });
        shared.lost.cancelled().await;
        // The good renewal was sent at 1000 ms (not answered at 1200 ms): lost at 1000 + 2400.
        assert_eq!(Instant::now() - acquired, Duration::from_millis(3400));
        assert_eq!(shared.reason.get(), Some(&LostReason::Expired));
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_renewal_is_cut_at_the_deadline() {
        let (shared, _stop, _, acquired) =
            spawn_loop(|_| std::future::pending::<Result<RenewReply, RedisError>>());
        shared.lost.cancelled().await;
        assert_eq!(Instant::now() - acquired, Duration::from_millis(2400));
        assert_eq!(shared.reason.get(), Some(&LostReason::Expired));
    }

    #[tokio::test(start_paused = true)]
    async fn taken_or_missing_reply_loses_the_lease_at_once() {
        for (reply, reason) in [
            (RenewReply::Taken, LostReason::Taken),
            (RenewReply::Missing, LostReason::Missing),
        ] {
            let (shared, _stop, _, acquired) =
                spawn_loop(
                    move |n| async move { Ok(if n == 0 { RenewReply::Renewed } else { reply }) },
                );
            shared.lost.cancelled().await;
            assert_eq!(Instant::now() - acquired, Duration::from_millis(2000));
            assert_eq!(shared.reason.get(), Some(&reason));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_renewals_without_marking_lost() {
        let (shared, stop, calls, _) = spawn_loop(|_| async { Ok(RenewReply::Renewed) });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.cancel();
        tokio::time::sleep(TTL * 3).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(shared.reason.get().is_none());
        // No renewals, so the local deadline has passed: the holder must not act on it.
        assert!(!shared.is_valid());
    }
}
