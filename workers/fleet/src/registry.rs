//! The worker registry in Redis: every worker node publishes its address, backend, memory budget
//! and free capacity with a heartbeat. A worker that stops heartbeating expires with its key and
//! is dropped from the listing, so its sandboxes are no longer offered.
//!
//! Keys: `<prefix>worker:<id>` (JSON [`WorkerInfo`], expires after the TTL) and `<prefix>workers`
//! (a sorted set of ids, scored by when each last heartbeat runs out; a listing removes the ids
//! whose key has expired).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// What a worker publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    /// The node id.
    pub id: String,
    /// Where its worker API listens (`host:port`).
    pub addr: String,
    /// Its sandbox backend (`jail`, `kvm`).
    pub backend: String,
    /// Memory all its sandboxes may use, MiB.
    pub budget_mb: u64,
    /// MiB held by its sandboxes and boots in progress.
    pub used_mb: u64,
    /// MiB held by idle on-demand sandboxes it would evict for a new one.
    pub reclaimable_mb: u64,
    /// Sandboxes running an invocation.
    pub busy: u64,
    /// Idle sandboxes.
    pub idle: u64,
    /// Provisioned sandboxes booted, per `function@revision`.
    pub provisioned: BTreeMap<String, u32>,
    /// When it published this (Unix ms).
    pub heartbeat_ms: u64,
}

impl WorkerInfo {
    /// MiB not held by any sandbox.
    #[must_use]
    pub fn free_mb(&self) -> u64 {
        self.budget_mb.saturating_sub(self.used_mb)
    }

    /// MiB a new sandbox could get: free, plus idle on-demand sandboxes it would evict.
    #[must_use]
    pub fn room_mb(&self) -> u64 {
        self.free_mb() + self.reclaimable_mb
    }

    /// The key of `function` at `revision` in [`WorkerInfo::provisioned`].
    #[must_use]
    pub fn provisioned_key(function: &str, revision: u64) -> String {
        format!("{function}@{revision}")
    }
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis did not answer or refused.
    #[error("worker registry in Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A worker record could not be encoded.
    #[error("encode worker record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The registry.
#[derive(Clone)]
pub struct WorkerRegistry {
    redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl WorkerRegistry {
    /// A registry under key prefix `prefix`; a worker that does not heartbeat within `ttl` is
    /// dropped.
    #[must_use]
    pub fn new(redis: ConnectionManager, prefix: impl Into<String>, ttl: Duration) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            ttl,
        }
    }

    /// The TTL of a registration.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Prefix of the per-worker keys (`<prefix>worker:`), which the idle index checks.
    #[must_use]
    pub fn worker_key_prefix(&self) -> String {
        format!("{}worker:", self.prefix)
    }

    fn set_key(&self) -> String {
        format!("{}workers", self.prefix)
    }

    /// Publishes `info` for the next TTL.
    ///
    /// # Errors
    /// [`RegistryError`] when Redis fails.
    pub async fn heartbeat(&self, info: &WorkerInfo) -> Result<(), RegistryError> {
        let body = serde_json::to_string(info)?;
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.redis.clone();
        let () = redis::pipe()
            .cmd("SET")
            .arg(format!("{}{}", self.worker_key_prefix(), info.id))
            .arg(body)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(self.set_key())
            .arg(info.heartbeat_ms + ttl_ms)
            .arg(&info.id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Removes worker `id` now (a clean shutdown).
    ///
    /// # Errors
    /// [`RegistryError`] when Redis fails.
    pub async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let mut conn = self.redis.clone();
        let () = redis::pipe()
            .cmd("DEL")
            .arg(format!("{}{id}", self.worker_key_prefix()))
            .ignore()
            .cmd("ZREM")
            .arg(self.set_key())
            .arg(id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The live workers, sorted by id. Workers whose registration expired are dropped from the
    /// set as a side effect.
    ///
    /// # Errors
    /// [`RegistryError`] when Redis fails.
    pub async fn list(&self) -> Result<Vec<WorkerInfo>, RegistryError> {
        let mut conn = self.redis.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.set_key())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}{id}", self.worker_key_prefix()))
            .collect();
        let bodies: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut dead = Vec::new();
        for (id, body) in ids.into_iter().zip(bodies) {
            match body.map(|b| serde_json::from_str::<WorkerInfo>(&b)) {
                Some(Ok(info)) => out.push(info),
                Some(Err(e)) => {
                    tracing::warn!(worker = %id, error = %e, "unreadable worker record; skipped");
                }
                None => dead.push(id),
            }
        }
        if !dead.is_empty() {
            tracing::info!(workers = ?dead, "workers stopped heartbeating; dropped");
            let _: Result<i64, _> = redis::cmd("ZREM")
                .arg(self.set_key())
                .arg(&dead)
                .query_async(&mut conn)
                .await;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
