//! Stream event source mappings on Kafka: the tracker and the mapping pollers.
//!
//! The **tracker** (one per poller node) watches the configuration and runs one [`MappingPoller`]
//! per enabled mapping, restarting it when its configuration changes (an update applies live) and
//! stopping it when the mapping is disabled or deleted. It also moves mappings through Lambda's
//! states (`Creating`/`Enabling`/`Updating` → `Enabled`, `Disabling` → `Disabled`).
//!
//! A **mapping poller** consumes the mapping's topic in the mapping's consumer group. Partitions
//! are work units handed out by Redis leases (see `balance`); the group only stores offsets, so
//! Kafka's own tools show the lag. Records of one partition are routed to
//! `ParallelizationFactor` lanes by key hash, so records of one key stay in order; each lane builds
//! batches (BatchSize, batching window, 6 MiB), filters them, invokes the function synchronously
//! and handles the result: success; a partial-batch response (retry from the lowest failed
//! record); a function error (bisect, retry up to MaximumRetryAttempts or until the record is older
//! than MaximumRecordAgeInSeconds, then one failure record per record to the on-failure topic).
//! The committed offset is always the lowest unfinished record of the partition. A poller whose
//! lease is gone makes no further invoke or commit.

pub mod event;
mod lane;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use sluice_core::invoke::Invoker;
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::{
    EventSourceMappingConfig, EventSourceMappingState, MappingState, StartingPosition,
};
use sluice_core::store::{ConfigObject, ConfigStore, Expected, ObjectKey};
use sluice_destinations::DestinationWriter;
use sluice_leasing::Leaser;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::event::Rec;
use crate::async_poller::consume::{commit_finished, next_message, Tp, Trackers};
use crate::balance::Balancer;
use crate::filter::FilterSet;

/// Settings shared by every mapping poller of a node.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// This node's id (lease holder).
    pub node_id: String,
    /// Prefix of Redis keys.
    pub redis_prefix: String,
    /// TTL of partition leases.
    pub lease_ttl: Duration,
    /// `arn:aws:lambda:<region>:<account>:function:`.
    pub function_arn_prefix: String,
}

/// Runs the mappings of the fleet's share on this node.
#[derive(Clone)]
pub struct StreamTracker {
    cfg: Arc<StreamConfig>,
    kafka: KafkaSettings,
    store: ConfigStore,
    invoker: Arc<dyn Invoker>,
    destinations: DestinationWriter,
    redis: ConnectionManager,
}

struct Running {
    config: EventSourceMappingConfig,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl StreamTracker {
    /// A tracker; nothing runs until [`StreamTracker::run`].
    #[must_use]
    pub fn new(
        cfg: StreamConfig,
        kafka: KafkaSettings,
        store: ConfigStore,
        invoker: Arc<dyn Invoker>,
        destinations: DestinationWriter,
        redis: ConnectionManager,
    ) -> Self {
        Self {
            cfg: Arc::new(cfg),
            kafka,
            store,
            invoker,
            destinations,
            redis,
        }
    }

    /// Keeps this node's mapping pollers in line with the configuration until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut changes = self.store.changes();
        loop {
            let mappings = self.store.event_source_mappings();
            let wanted: HashMap<String, EventSourceMappingState> = mappings
                .iter()
                .filter(|m| m.object.config.enabled)
                .map(|m| (m.object.uuid.clone(), m.object.clone()))
                .collect();
            let stale: Vec<String> = running
                .iter()
                .filter(|(uuid, r)| wanted.get(*uuid).is_none_or(|m| m.config != r.config))
                .map(|(u, _)| u.clone())
                .collect();
            for uuid in stale {
                if let Some(r) = running.remove(&uuid) {
                    r.cancel.cancel();
                    let _ = r.handle.await;
                    tracing::info!(mapping = %uuid, "mapping poller stopped");
                }
            }
            for (uuid, m) in &wanted {
                if running.contains_key(uuid) {
                    continue;
                }
                let token = cancel.child_token();
                let poller = MappingPoller::new(self.clone(), m.clone());
                let t2 = token.clone();
                let handle = tokio::spawn(async move {
                    if let Err(e) = poller.run(t2).await {
                        tracing::error!(error = %e, "mapping poller failed");
                    }
                });
                tracing::info!(mapping = %uuid, topic = ?m.config.topics, function = %m.config.function_name, "mapping poller started");
                running.insert(
                    uuid.clone(),
                    Running {
                        config: m.config.clone(),
                        cancel: token,
                        handle,
                    },
                );
            }
            self.settle_states(&mappings).await;
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = changes.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        for (_, r) in running {
            r.cancel.cancel();
            let _ = r.handle.await;
        }
    }

    /// Moves transitional states on; a conflict means another node did it first.
    async fn settle_states(
        &self,
        mappings: &[sluice_core::store::Versioned<EventSourceMappingState>],
    ) {
        for m in mappings {
            let next = match m.object.state {
                MappingState::Creating | MappingState::Enabling | MappingState::Updating => {
                    MappingState::Enabled
                }
                MappingState::Disabling => MappingState::Disabled,
                _ => continue,
            };
            let mut obj = m.object.clone();
            obj.state = next;
            let key = ObjectKey::event_source_mapping(&obj.uuid);
            let _ = self
                .store
                .write(
                    &key,
                    Some(ConfigObject::EventSourceMapping(Box::new(obj))),
                    Expected::Revision(m.revision),
                )
                .await;
        }
    }
}

/// Why a mapping poller stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The consumer could not be created.
    #[error("create consumer for mapping {uuid}: {source}")]
    Consumer {
        /// The mapping.
        uuid: String,
        /// The cause.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The mapping's filters do not compile (validation should have caught it).
    #[error("mapping {uuid}: {message}")]
    Config {
        /// The mapping.
        uuid: String,
        /// What is wrong.
        message: String,
    },
}

/// Everything a lane needs about its mapping.
pub(crate) struct MappingCtx {
    pub(crate) uuid: String,
    pub(crate) config: EventSourceMappingConfig,
    pub(crate) filters: FilterSet,
    pub(crate) bootstrap: String,
    pub(crate) function_arn: String,
    pub(crate) invoker: Arc<dyn Invoker>,
    pub(crate) destinations: DestinationWriter,
    pub(crate) trackers: Arc<Mutex<Trackers>>,
}

impl MappingCtx {
    pub(crate) fn lease_valid(&self, tp: &Tp) -> bool {
        self.trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_partition
            .get(tp)
            .is_some_and(|o| o.lease.is_valid())
    }

    pub(crate) fn finish(&self, r: &Rec) {
        self.trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finish(&(r.topic.clone(), r.partition), r.offset, r.epoch);
    }
}

/// One mapping on this node.
struct MappingPoller {
    tracker: StreamTracker,
    mapping: EventSourceMappingState,
}

impl MappingPoller {
    fn new(tracker: StreamTracker, mapping: EventSourceMappingState) -> Self {
        Self { tracker, mapping }
    }

    fn kafka(&self) -> KafkaSettings {
        match self
            .mapping
            .config
            .self_managed_event_source
            .as_ref()
            .and_then(|s| s.endpoints.get("KAFKA_BOOTSTRAP_SERVERS"))
        {
            Some(servers) => KafkaSettings::new(servers.join(",")),
            None => self.tracker.kafka.clone(),
        }
    }

    /// For a new consumer group, writes the starting offsets (LATEST, AT_TIMESTAMP) as the
    /// group's commits, so that whichever node takes a partition starts at the same place.
    async fn seed_offsets(&self, consumer: &Arc<StreamConsumer>, topic: &str) {
        let position = self.mapping.config.starting_position;
        if position == Some(StartingPosition::TrimHorizon) {
            return;
        }
        let c = Arc::clone(consumer);
        let topic = topic.to_owned();
        let ts = self.mapping.config.starting_position_timestamp;
        let _ = tokio::task::spawn_blocking(move || -> Result<(), rdkafka::error::KafkaError> {
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let parts: Vec<i32> = md
                .topics()
                .first()
                .map(|t| t.partitions().iter().map(|p| p.id()).collect())
                .unwrap_or_default();
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition(&topic, *p);
            }
            let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
            let mut seed = TopicPartitionList::new();
            for el in committed.elements() {
                if matches!(el.offset(), Offset::Offset(_)) {
                    continue;
                }
                let offset = match (position, ts) {
                    (Some(StartingPosition::AtTimestamp), Some(ts)) => {
                        let mut q = TopicPartitionList::new();
                        q.add_partition_offset(
                            &topic,
                            el.partition(),
                            Offset::Offset((ts * 1000.0) as i64),
                        )?;
                        let found = c.offsets_for_times(q, Duration::from_secs(10))?;
                        match found
                            .find_partition(&topic, el.partition())
                            .map(|e| e.offset())
                        {
                            Some(Offset::Offset(o)) => o,
                            _ => {
                                c.fetch_watermarks(&topic, el.partition(), Duration::from_secs(10))?
                                    .1
                            }
                        }
                    }
                    _ => {
                        c.fetch_watermarks(&topic, el.partition(), Duration::from_secs(10))?
                            .1
                    }
                };
                seed.add_partition_offset(&topic, el.partition(), Offset::Offset(offset))?;
            }
            if seed.count() > 0 {
                c.commit(&seed, CommitMode::Sync)?;
            }
            Ok(())
        })
        .await;
    }

    async fn run(self, cancel: CancellationToken) -> Result<(), StreamError> {
        let cfg = &self.mapping.config;
        let uuid = self.mapping.uuid.clone();
        let topic = cfg.topics.first().cloned().unwrap_or_default();
        let group = cfg.consumer_group_id().unwrap_or(&uuid).to_owned();
        let kafka = self.kafka();
        let patterns: Vec<String> = cfg
            .filter_criteria
            .as_ref()
            .map(|f| f.filters.iter().map(|x| x.pattern.clone()).collect())
            .unwrap_or_default();
        let filters = FilterSet::compile(&patterns).map_err(|e| StreamError::Config {
            uuid: uuid.clone(),
            message: e.to_string(),
        })?;
        let consumer: StreamConsumer = kafka
            .client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .create()
            .map_err(|source| StreamError::Consumer {
                uuid: uuid.clone(),
                source,
            })?;
        let consumer = Arc::new(consumer);
        self.seed_offsets(&consumer, &topic).await;
        let trackers = Arc::new(Mutex::new(Trackers::default()));
        let t = &self.tracker;
        let leaser = Leaser::new(
            t.redis.clone(),
            t.cfg.redis_prefix.clone(),
            t.cfg.node_id.clone(),
            t.cfg.lease_ttl,
        )
        .map_err(|e| StreamError::Config {
            uuid: uuid.clone(),
            message: e.to_string(),
        })?;
        let balancer = Balancer {
            consumer: Arc::clone(&consumer),
            trackers: Arc::clone(&trackers),
            leaser,
            redis: t.redis.clone(),
            members_key: format!("{}pollers:esm:{uuid}", t.cfg.redis_prefix),
            unit_prefix: format!("esm:{uuid}:"),
            topics: vec![topic.clone()],
            holder: t.cfg.node_id.clone(),
            ttl: t.cfg.lease_ttl,
            units_cache: Arc::default(),
        };
        let ctx = Arc::new(MappingCtx {
            uuid: uuid.clone(),
            config: cfg.clone(),
            filters,
            bootstrap: kafka.bootstrap_servers.clone(),
            function_arn: format!("{}{}", t.cfg.function_arn_prefix, cfg.function_name),
            invoker: Arc::clone(&t.invoker),
            destinations: t.destinations.clone(),
            trackers: Arc::clone(&trackers),
        });
        let balance_task = tokio::spawn(balancer.clone().run(cancel.clone()));
        let seen_prefix = format!("{}esm-seen:{uuid}:", t.cfg.redis_prefix);
        let commit_task = tokio::spawn(commit_loop(
            Arc::clone(&consumer),
            Arc::clone(&trackers),
            uuid.clone(),
            cancel.clone(),
            (t.redis.clone(), seen_prefix.clone()),
        ));
        // Per owned partition (and ownership epoch): the highest offset any node finished before
        // this node took it, so that redelivered records are counted as duplicates.
        let mut seen_marks: HashMap<(Tp, u64), i64> = HashMap::new();
        let mut redis = t.redis.clone();
        let mut partitions: HashMap<Tp, mpsc::Sender<Rec>> = HashMap::new();
        let lanes = tokio_util::task::TaskTracker::new();
        loop {
            let Some(m) = next_message(&consumer, &cancel, &uuid).await else {
                break;
            };
            let tp: Tp = (m.topic().to_owned(), m.partition());
            let Some(epoch) = trackers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .start_record(&tp, m.offset())
            else {
                continue;
            };
            let mark = match seen_marks.get(&(tp.clone(), epoch)) {
                Some(m) => *m,
                None => {
                    let key = format!("{seen_prefix}{}/{}", tp.0, tp.1);
                    let m: i64 = redis::cmd("GET")
                        .arg(&key)
                        .query_async::<Option<i64>>(&mut redis)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(-1);
                    seen_marks.insert((tp.clone(), epoch), m);
                    m
                }
            };
            if m.offset() <= mark {
                metrics::counter!("sluice_stream_duplicates_total", "mapping" => uuid.clone())
                    .increment(1);
            }
            let rec = Rec {
                topic: tp.0.clone(),
                partition: tp.1,
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                timestamp_type: match m.timestamp() {
                    rdkafka::Timestamp::LogAppendTime(_) => "LOG_APPEND_TIME",
                    _ => "CREATE_TIME",
                },
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
                epoch,
            };
            drop(m);
            let sender = partitions.entry(tp.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(1024);
                lanes.spawn(lane::partition_worker(Arc::clone(&ctx), rx, cancel.clone()));
                tx
            });
            if sender.send(rec).await.is_err() {
                partitions.remove(&tp);
            }
        }
        drop(partitions);
        lanes.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), lanes.wait()).await;
        let _ = balance_task.await;
        commit_task.abort();
        balancer.release_all().await;
        Ok(())
    }
}

/// Commits the lowest unfinished offsets every 500 ms; every 5 s also publishes OffsetLag.
async fn commit_loop(
    consumer: Arc<StreamConsumer>,
    trackers: Arc<Mutex<Trackers>>,
    uuid: String,
    cancel: CancellationToken,
    (mut redis, seen_prefix): (ConnectionManager, String),
) {
    let mut ticks = 0u64;
    let mut published: HashMap<Tp, i64> = HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Err(e) = commit_finished(&consumer, &trackers, CommitMode::Async) {
            tracing::warn!(mapping = %uuid, error = %e, "offset commit failed; will retry");
        }
        // Publish how far this node got, for duplicate counting after a failover.
        let marks = trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .max_finished();
        for (tp, offset) in marks {
            if published.get(&tp) != Some(&offset) {
                let key = format!("{seen_prefix}{}/{}", tp.0, tp.1);
                let r: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(&key)
                    .arg(offset)
                    .arg("EX")
                    .arg(7 * 86_400)
                    .query_async(&mut redis)
                    .await;
                if r.is_ok() {
                    published.insert(tp, offset);
                }
            }
        }
        ticks += 1;
        if ticks % 10 == 0 {
            let c = Arc::clone(&consumer);
            let owned: Vec<Tp> = trackers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .by_partition
                .keys()
                .cloned()
                .collect();
            let uuid = uuid.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &owned {
                    tpl.add_partition(t, *p);
                }
                let Ok(committed) = c.committed_offsets(tpl, Duration::from_secs(5)) else { return };
                for el in committed.elements() {
                    let Ok((_, high)) = c.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(5)) else { continue };
                    let pos = match el.offset() {
                        Offset::Offset(o) => o,
                        _ => 0,
                    };
                    metrics::gauge!("sluice_offset_lag_records", "mapping" => uuid.clone(), "partition" => el.partition().to_string())
                        .set((high - pos).max(0) as f64);
                }
            })
            .await;
        }
    }
}
