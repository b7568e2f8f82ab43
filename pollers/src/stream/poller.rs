//! A mapping poller: the mapping's partitions on the consumer runtime, each with its per-key
//! lanes (see `lane`), plus the duplicate marks and the OffsetLag metric.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use sluice_core::invoke::Invoker;
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::{EventSourceMappingConfig, EventSourceMappingState, StartingPosition};
use sluice_destinations::DestinationWriter;
use sluice_leasing::Leaser;
use tokio_util::sync::CancellationToken;

use super::event::Rec;
use super::lane;
use super::tracker::StreamTracker;
use crate::balance::Balancer;
use crate::filter::FilterSet;
use crate::runtime::{self, Tp, Trackers};

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

/// A lane's I/O on the real parts (see [`lane::LaneIo`]): the mapping, the invoker, the
/// on-failure destination and the runtime's trackers.
pub(crate) struct MappingCtx {
    pub(crate) lane: lane::LaneSettings,
    pub(crate) function_arn: String,
    pub(crate) invoker: Arc<dyn Invoker>,
    pub(crate) destinations: DestinationWriter,
    pub(crate) trackers: Arc<Mutex<Trackers>>,
}

/// One mapping on this node.
pub(super) struct MappingPoller {
    tracker: StreamTracker,
    mapping: EventSourceMappingState,
}

impl MappingPoller {
    pub(super) fn new(tracker: StreamTracker, mapping: EventSourceMappingState) -> Self {
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

    pub(super) async fn run(self, cancel: CancellationToken) -> Result<(), StreamError> {
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
            // librdkafka's prefetch, over every partition: the rest waits in Kafka.
            .set("queued.max.messages.kbytes", "16384")
            .create()
            .map_err(|source| StreamError::Consumer {
                uuid: uuid.clone(),
                source,
            })?;
        let consumer = Arc::new(consumer);
        self.seed_offsets(&consumer, &topic).await;
        let trackers = Arc::new(Mutex::new(Trackers::new(
            &uuid,
            Some(Arc::clone(&consumer)),
            partition_budget(cfg),
            self.tracker.commit_refresh,
        )));
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
            lane: lane::LaneSettings {
                uuid: uuid.clone(),
                config: cfg.clone(),
                filters,
                bootstrap: kafka.bootstrap_servers.clone(),
            },
            function_arn: format!("{}{}", t.cfg.function_arn_prefix, cfg.function_name),
            invoker: Arc::clone(&t.invoker),
            destinations: t.destinations.clone(),
            trackers: Arc::clone(&trackers),
        });
        // Leases are renewed by their own tasks until released: balancing stops after intake.
        let balancing = CancellationToken::new();
        let balance_task = tokio::spawn(balancer.clone().run(balancing.clone()));
        let seen_prefix = format!("{}esm-seen:{uuid}:", t.cfg.redis_prefix);
        let marks_task = tokio::spawn(marks_and_lag(
            Arc::clone(&consumer),
            Arc::clone(&trackers),
            uuid.clone(),
            cancel.clone(),
            (t.redis.clone(), seen_prefix.clone()),
        ));
        let channel = partition_budget(cfg).records;
        let redis = t.redis.clone();
        runtime::run(
            consumer,
            trackers,
            runtime::RunConfig {
                name: uuid.clone(),
                commit_every: Duration::from_millis(500),
                drain: DRAIN,
                channel,
                kafka: kafka.clone(),
            },
            cancel.clone(),
            rec_of,
            move |part, rx| {
                let ctx = Arc::clone(&ctx);
                let cancel = cancel.clone();
                let seen_key = format!("{seen_prefix}{}/{}", part.tp.0, part.tp.1);
                let redis = redis.clone();
                async move {
                    // The highest offset any node finished before this node took the partition:
                    // records at or below it are redeliveries, counted as duplicates.
                    let mut redis = redis;
                    let mark: i64 = redis::cmd("GET")
                        .arg(&seen_key)
                        .query_async::<Option<i64>>(&mut redis)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(-1);
                    lane::partition_worker(ctx, rx, mark, cancel).await;
                }
            },
        )
        .await;
        balancing.cancel();
        let _ = balance_task.await;
        marks_task.abort();
        balancer.release_all().await;
        Ok(())
    }
}

/// Shutdown: how long lanes may take to finish or hand back their batches (the node allows all
/// its tasks 10 s; the commit and the lease releases follow, each with a shorter deadline).
const DRAIN: Duration = Duration::from_secs(5);

/// A partition's budget between fetch and finish: enough for every lane to have a batch in flight
/// and the next one filling (at least 8192, so a healthy partition of small records is rarely
/// paused: a pause drops librdkafka's prefetch, which is fetched again), bounded by bytes so that
/// 1 MB records × ParallelizationFactor 10 stay within about 66 MiB per partition.
fn partition_budget(cfg: &EventSourceMappingConfig) -> runtime::Budget {
    let lanes = usize::try_from(cfg.parallelization_factor)
        .unwrap_or(1)
        .max(1);
    let batch = usize::try_from(cfg.batch_size).unwrap_or(100).max(1);
    runtime::Budget {
        records: (2 * batch * lanes).clamp(8192, 100_000),
        bytes: (lanes + 1) * super::event::MAX_BATCH_BYTES,
    }
}

/// The owned record of `m`, fetched under ownership `epoch`.
fn rec_of(m: &rdkafka::message::BorrowedMessage<'_>, epoch: u64) -> Rec {
    Rec {
        topic: m.topic().to_owned(),
        partition: m.partition(),
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
    }
}

/// Every 500 ms publishes how far this node got (for duplicate counting after a failover); every
/// 5 s also OffsetLag. Commits are the runtime's.
async fn marks_and_lag(
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
        // Publish how far this node got, for duplicate counting after a failover.
        let marks = runtime::lock(&trackers).max_finished();
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
            let owned: Vec<Tp> = runtime::lock(&trackers)
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
