//! The worker manager's index of idle warm sandboxes, in Redis.
//!
//! One set per function revision, `<prefix>idle:<function>:<revision>`, of `<worker>/<sandbox>`
//! members. A worker adds a sandbox when it becomes idle and removes it when it is taken, evicted
//! or reaped; a caller claims one with an atomic `SPOP` that skips the sandboxes of workers whose
//! registration has expired. Claiming removes the member, so two callers never get the same
//! sandbox; and the worker's own pool, which hands out each sandbox to one invocation at a time,
//! stays the authority: a stale claim (the sandbox was reaped meanwhile) runs on another idle
//! sandbox of the function there, or boots one.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use sluice_workers::pool::Key;

/// How long an idle set outlives its last addition (sets of deleted functions go away).
const IDLE_SET_TTL: Duration = Duration::from_secs(3600);

/// Pops members until one belongs to a live worker. KEYS[1] = the idle set;
/// ARGV[1] = the worker key prefix.
const CLAIM: &str = r"
for _ = 1, 16 do
  local m = redis.call('SPOP', KEYS[1])
  if not m then return false end
  local worker = string.match(m, '^(.*)/%d+$')
  if worker and redis.call('EXISTS', ARGV[1] .. worker) == 1 then return m end
end
return false
";

/// A claimed idle sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The worker it lives on.
    pub worker: String,
    /// Its id on that worker.
    pub sandbox: u64,
}

/// The index.
#[derive(Clone)]
pub struct IdleIndex {
    redis: ConnectionManager,
    prefix: String,
    worker_key_prefix: String,
    claim: Script,
}

impl IdleIndex {
    /// The index under `prefix`; `worker_key_prefix` is the registry's
    /// ([`crate::registry::WorkerRegistry::worker_key_prefix`]).
    #[must_use]
    pub fn new(
        redis: ConnectionManager,
        prefix: impl Into<String>,
        worker_key_prefix: impl Into<String>,
    ) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            worker_key_prefix: worker_key_prefix.into(),
            claim: Script::new(CLAIM),
        }
    }

    fn set_key(&self, (function, revision): &Key) -> String {
        format!("{}idle:{function}:{revision}", self.prefix)
    }

    /// Claims an idle sandbox of `function` on a live worker, if there is one.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn claim(&self, function: &Key) -> Result<Option<Claim>, redis::RedisError> {
        let mut conn = self.redis.clone();
        let member: Option<String> = self
            .claim
            .key(self.set_key(function))
            .arg(&self.worker_key_prefix)
            .invoke_async(&mut conn)
            .await?;
        Ok(member.and_then(|m| parse_member(&m)))
    }

    /// Offers sandbox `sandbox` of `worker` for `function`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn announce(
        &self,
        worker: &str,
        function: &Key,
        sandbox: u64,
    ) -> Result<(), redis::RedisError> {
        self.announce_many(worker, &[(function.clone(), sandbox)])
            .await
    }

    /// Offers several sandboxes of `worker` in one round trip.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn announce_many(
        &self,
        worker: &str,
        sandboxes: &[(Key, u64)],
    ) -> Result<(), redis::RedisError> {
        if sandboxes.is_empty() {
            return Ok(());
        }
        let ttl_ms = u64::try_from(IDLE_SET_TTL.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for (function, sandbox) in sandboxes {
            let key = self.set_key(function);
            pipe.cmd("SADD")
                .arg(&key)
                .arg(format!("{worker}/{sandbox}"))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl_ms)
                .ignore();
        }
        let mut conn = self.redis.clone();
        pipe.query_async(&mut conn).await
    }

    /// Stops offering sandbox `sandbox` of `worker`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn withdraw(
        &self,
        worker: &str,
        function: &Key,
        sandbox: u64,
    ) -> Result<(), redis::RedisError> {
        let mut conn = self.redis.clone();
        let _removed: i64 = redis::cmd("SREM")
            .arg(self.set_key(function))
            .arg(format!("{worker}/{sandbox}"))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn parse_member(m: &str) -> Option<Claim> {
    let (worker, sandbox) = m.rsplit_once('/')?;
    Some(Claim {
        worker: worker.to_owned(),
        sandbox: sandbox.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_at_the_last_slash() {
        assert_eq!(
            parse_member("host/a-12/7"),
            Some(Claim {
                worker: "host/a-12".into(),
                sandbox: 7
            })
        );
        assert_eq!(parse_member("no-slash"), None);
        assert_eq!(parse_member("w/x"), None);
    }
}
