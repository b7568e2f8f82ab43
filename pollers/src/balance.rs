//! Hands the partitions of a set of topics out to the pollers of the fleet with Redis leases, and
//! keeps this node's consumer assigned to exactly the partitions it holds.
//!
//! Every node registers itself in a members set with a heartbeat; each aims for its fair share
//! (`ceil(partitions / members)`), takes free partitions up to it, and gives back one partition per
//! round while it holds more. A node that dies stops renewing: its leases expire after the TTL and
//! the others take its partitions over, from the last committed offsets. The Kafka consumer group
//! only stores offsets (no group membership), so failover does not depend on the broker expiring
//! dead members.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use sluice_leasing::Leaser;
use tokio_util::sync::CancellationToken;

use crate::runtime::{commit_blocking, Tp, Trackers, RELEASE_DEADLINE};

/// Longest a voluntary hand-over waits for the partition's running records to finish before it
/// commits and releases the lease (past it, the unfinished ones run again on the next owner).
const HANDOVER_DRAIN: Duration = Duration::from_secs(10);
/// The same wait at shutdown, after the consume loop's own drain (5 s): together with the final
/// commit and the releases it stays inside the node's 10 s for the pollers' tasks.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// The last partition list, and when it was read.
pub(crate) type UnitsCache = (std::time::Instant, Vec<Tp>);

/// Settings of a balancer.
#[derive(Clone)]
pub(crate) struct Balancer {
    pub(crate) consumer: Arc<StreamConsumer>,
    pub(crate) trackers: Arc<Mutex<Trackers>>,
    pub(crate) leaser: Leaser,
    pub(crate) redis: ConnectionManager,
    /// Redis key of the members set.
    pub(crate) members_key: String,
    /// Lease names are `<unit_prefix><topic>/<partition>`.
    pub(crate) unit_prefix: String,
    pub(crate) topics: Vec<String>,
    pub(crate) holder: String,
    pub(crate) ttl: Duration,
    /// The last partition list and when it was read.
    pub(crate) units_cache: Arc<Mutex<Option<UnitsCache>>>,
}

impl Balancer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Trackers> {
        self.trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn one(tp: &Tp, offset: Offset) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(&tp.0, tp.1, offset);
        tpl
    }

    fn unassign(&self, tp: &Tp) {
        if let Err(e) = self
            .consumer
            .incremental_unassign(&Self::one(tp, Offset::Invalid))
        {
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "unassign failed");
        }
    }

    /// The partitions of the topics (empty for topics that do not exist yet).
    async fn units(&self) -> Vec<Tp> {
        // Partitions rarely change: refresh the list every 30 s.
        if let Some((at, units)) = self
            .units_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            if at.elapsed() < Duration::from_secs(30) && !units.is_empty() {
                return units.clone();
            }
        }
        let fresh = self.fetch_units().await;
        *self
            .units_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), fresh.clone()));
        fresh
    }

    async fn fetch_units(&self) -> Vec<Tp> {
        let consumer = Arc::clone(&self.consumer);
        let topics = self.topics.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for t in &topics {
                if let Ok(md) = consumer.fetch_metadata(Some(t), Duration::from_secs(5)) {
                    for topic in md.topics() {
                        out.extend(topic.partitions().iter().map(|p| (t.clone(), p.id())));
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// The group's committed offset of `tp`, if it has one.
    async fn committed(&self, tp: &Tp) -> Option<i64> {
        let consumer = Arc::clone(&self.consumer);
        let tpl = Self::one(tp, Offset::Invalid);
        let tp = tp.clone();
        tokio::task::spawn_blocking(move || {
            let c = consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .ok()?;
            match c.find_partition(&tp.0, tp.1)?.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn members(&self) -> usize {
        let mut conn = self.redis.clone();
        let now = sluice_core::time::unix_ms();
        let expiry = now + u64::try_from(self.ttl.as_millis() * 3).unwrap_or(u64::MAX);
        let result: redis::RedisResult<(i64, i64, usize)> = redis::pipe()
            .atomic()
            .zadd(&self.members_key, &self.holder, expiry)
            .zrembyscore(&self.members_key, "-inf", now)
            .zcard(&self.members_key)
            .query_async(&mut conn)
            .await;
        match result {
            Ok((_, _, n)) => n.max(1),
            Err(e) => {
                tracing::warn!(error = %e, "could not refresh pollers membership");
                1
            }
        }
    }

    /// One round: drop lost leases, then move towards the fair share.
    pub(crate) async fn tick(&self) {
        let lost: Vec<Tp> = self
            .lock()
            .by_partition
            .iter()
            .filter(|(_, o)| !o.lease.is_valid())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in lost {
            self.lock().disown(&tp);
            self.unassign(&tp);
            metrics::counter!("sluice_poller_partitions_lost_total").increment(1);
            tracing::warn!(topic = %tp.0, partition = tp.1, "lease lost; stopped consuming the partition");
        }
        let members = self.members().await;
        let mut units = self.units().await;
        if units.is_empty() {
            return;
        }
        let target = units.len().div_ceil(members);
        let owned = self.lock().by_partition.len();
        if owned < target {
            units.shuffle(&mut rand::rng());
            let mut owned = owned;
            for tp in units {
                if owned >= target {
                    break;
                }
                if self.lock().by_partition.contains_key(&tp) {
                    continue;
                }
                match self
                    .leaser
                    .acquire(&format!("{}{}/{}", self.unit_prefix, tp.0, tp.1))
                    .await
                {
                    Ok(Some(lease)) => {
                        let committed = self.committed(&tp).await;
                        self.lock().own(tp.clone(), lease, committed);
                        if let Err(e) = self
                            .consumer
                            .incremental_assign(&Self::one(&tp, Offset::Stored))
                        {
                            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "assign failed");
                            let lease = self.lock().disown(&tp);
                            if let Some(lease) = lease {
                                let _ = lease.release().await;
                            }
                            continue;
                        }
                        // A partition paused under an earlier ownership starts flowing again.
                        let _ = self.consumer.resume(&Self::one(&tp, Offset::Invalid));
                        owned += 1;
                        tracing::info!(topic = %tp.0, partition = tp.1, "took partition");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "lease acquire failed"),
                }
            }
        } else if owned > target {
            let victim = self.lock().by_partition.keys().next().cloned();
            if let Some(tp) = victim {
                self.give_back(&tp, HANDOVER_DRAIN).await;
            }
        }
        metrics::gauge!("sluice_poller_partitions_owned", "topic" => self.topics.first().cloned().unwrap_or_default())
            .set(self.lock().by_partition.len() as f64);
    }

    /// Commits what is done of `tp`, stops consuming it and releases its lease.
    async fn give_back(&self, tp: &Tp, drain: Duration) {
        // Stop fetching `tp` and let what already runs finish while the lease is still ours:
        // giving the partition away now would let its next owner run those records again
        // (possibly at the same moment), since their completion would never be committed.
        let _ = self.consumer.pause(&Self::one(tp, Offset::Invalid));
        let started = std::time::Instant::now();
        while self.trackers_in_flight(tp) > 0 && started.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.trackers_in_flight(tp);
        if left > 0 {
            metrics::counter!("sluice_poller_handover_unfinished_total").increment(left as u64);
            tracing::warn!(topic = %tp.0, partition = tp.1, unfinished = left,
                "handing a partition over with records still running; its next owner runs them again");
        }
        // On the blocking pool: a broker outage must not freeze the runtime (API, renewals).
        if let Err(e) = commit_blocking(&self.consumer, &self.trackers, Some(tp)).await {
            tracing::warn!(error = %e, "commit before handing a partition over failed");
        }
        let lease = self.lock().disown(tp);
        self.unassign(tp);
        if let Some(lease) = lease {
            // Past the deadline the lease simply expires at its TTL.
            let _ = tokio::time::timeout(RELEASE_DEADLINE, lease.release()).await;
        }
        tracing::info!(topic = %tp.0, partition = tp.1, "handed partition over");
    }

    fn trackers_in_flight(&self, tp: &Tp) -> usize {
        self.lock().in_flight(tp)
    }

    /// Rounds every TTL/3 until `cancel`.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let period = self.ttl / 3;
        loop {
            self.tick().await;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    /// Commits, unassigns and releases every partition, and leaves the members set (shutdown,
    /// after the consume loop has drained).
    pub(crate) async fn release_all(&self) {
        let all: Vec<Tp> = self.lock().by_partition.keys().cloned().collect();
        // One commit for all, then the releases side by side: a step each within its deadline.
        if let Err(e) = commit_blocking(&self.consumer, &self.trackers, None).await {
            tracing::warn!(error = %e, "commit before releasing the partitions failed");
        }
        // The consume loop has drained already: what still runs gets a short last chance.
        futures::future::join_all(all.iter().map(|tp| self.give_back(tp, SHUTDOWN_DRAIN))).await;
        let mut conn = self.redis.clone();
        let _: redis::RedisResult<i64> = redis::cmd("ZREM")
            .arg(&self.members_key)
            .arg(&self.holder)
            .query_async(&mut conn)
            .await;
    }
}
