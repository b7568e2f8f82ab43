//! Redrive: failed events and records read back from an on-failure destination and submitted
//! again.
//!
//! - An async invocation record ([`InvocationRecord`]) goes back to the async queue as a new
//!   event with the original payload byte for byte, under the request id
//!   `redrive-<run>-<original request id>`: unique per run, so the pollers (which skip a request
//!   id they ran) run it again on every redrive, and stable within a run, so a record submitted
//!   twice by an interrupted run is run once.
//! - A stream failure record ([`StreamFailureRecord`]) puts its Kafka record back on the record's
//!   own topic (same key and value), where the mapping reads it again.
//!
//! Progress is the committed offsets of a consumer group per destination
//! (`<prefix>redrive.<topic>`), each commit carrying the run's id in its metadata: an interrupted
//! run resumes where it stopped, under its own id; `from_beginning` starts a new run from the
//! oldest record. A record is committed only after what it re-submits is in Kafka, so a crash
//! repeats at most one record.
//!
//! Threading: the consumer is a blocking `BaseConsumer` driven from the blocking pool; the
//! produces are async.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_core::events::{AsyncEvent, EventProducer};
use sluice_core::kafka::KafkaSettings;

use crate::record::InvocationRecord;
use crate::stream_record::StreamFailureRecord;

/// The commit metadata that names the run a redrive's progress belongs to.
const RUN_METADATA_PREFIX: &str = "sluice-redrive-run=";

/// What to redrive.
#[derive(Debug, Clone)]
pub struct RedriveConfig {
    /// The on-failure destination topic to read.
    pub destination_topic: String,
    /// The async queue to submit async events to (`<prefix>async`).
    pub queue_topic: String,
    /// The consumer group that keeps the progress (`<prefix>redrive.<topic>`).
    pub group: String,
    /// Stop after this many records (a later run resumes after them).
    pub limit: Option<i64>,
    /// Start a new run from the oldest record, ignoring earlier runs' progress.
    pub from_beginning: bool,
}

/// Where a redrive stands, reported after each record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedriveProgress {
    /// Records handled so far in this run.
    pub done: i64,
    /// Records there were to handle when the run started.
    pub total: i64,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveReport {
    /// The run's id (part of every re-submitted request id).
    pub run: String,
    /// Whether it continued an interrupted run.
    pub resumed: bool,
    /// Records there were to handle.
    pub total: i64,
    /// Records re-submitted.
    pub redriven: i64,
    /// Records that are neither kind of failure record (left alone).
    pub skipped: i64,
    /// Whether it stopped at `limit` with records left.
    pub stopped_at_limit: bool,
}

/// Why a redrive stopped.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// A client could not be created.
    #[error("create a Kafka client: {0}")]
    CreateClient(#[source] KafkaError),
    /// The destination topic does not exist.
    #[error("topic {0} does not exist")]
    NoSuchTopic(String),
    /// The async queue does not exist.
    #[error(
        "the async queue {0} does not exist: is a Sluice node with the poller role running on this \
         cluster with the same --topic-prefix?"
    )]
    NoQueue(String),
    /// Reading metadata, offsets or records failed.
    #[error("{what}: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The cause.
        #[source]
        source: KafkaError,
    },
    /// Re-submitting a record failed (nothing after it was committed).
    #[error("re-submit record {partition}@{offset}: {source}")]
    Submit {
        /// The destination partition.
        partition: i32,
        /// The record's offset there.
        offset: i64,
        /// The cause.
        #[source]
        source: KafkaError,
    },
    /// Recording progress failed (the record may be re-submitted by the next run).
    #[error("record redrive progress: {0}")]
    Commit(#[source] KafkaError),
    /// The blocking task failed.
    #[error("redrive task failed: {0}")]
    Task(String),
}

struct Start {
    consumer: BaseConsumer,
    ends: HashMap<i32, i64>,
    starts: HashMap<i32, i64>,
    total: i64,
    resumed_run: Option<String>,
}

fn set_up(kafka: &KafkaSettings, cfg: &RedriveConfig) -> Result<Start, RedriveError> {
    let topic = &cfg.destination_topic;
    let read = |what| move |source| RedriveError::Read { what, source };
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(RedriveError::CreateClient)?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(read("read topic metadata"))?;
    let parts: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if parts.is_empty() {
        return Err(RedriveError::NoSuchTopic(topic.clone()));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(read("read redrive progress"))?;
    let mut assign = TopicPartitionList::new();
    let (mut ends, mut starts, mut total, mut resumed_run) =
        (HashMap::new(), HashMap::new(), 0i64, None);
    for el in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, el.partition(), Duration::from_secs(10))
            .map_err(read("read end offsets"))?;
        let start = match el.offset() {
            Offset::Offset(o) if !cfg.from_beginning => o.max(low),
            _ => low,
        };
        // An unfinished run is resumed under its own id, so that the one record it may
        // re-submit twice (re-submitted, not yet committed) is deduplicated by the pollers.
        if start < high && !cfg.from_beginning {
            if let Some(run) = el.metadata().strip_prefix(RUN_METADATA_PREFIX) {
                if !run.is_empty() {
                    resumed_run = Some(run.to_owned());
                }
            }
        }
        total += (high - start).max(0);
        ends.insert(el.partition(), high);
        starts.insert(el.partition(), start);
        assign
            .add_partition_offset(topic, el.partition(), Offset::Offset(start))
            .map_err(read("assign"))?;
    }
    consumer.assign(&assign).map_err(read("assign"))?;
    let queue_md = consumer
        .fetch_metadata(Some(&cfg.queue_topic), Duration::from_secs(10))
        .map_err(read("read queue metadata"))?;
    if queue_md
        .topics()
        .first()
        .is_none_or(|t| t.partitions().is_empty())
    {
        return Err(RedriveError::NoQueue(cfg.queue_topic.clone()));
    }
    Ok(Start {
        consumer,
        ends,
        starts,
        total,
        resumed_run,
    })
}

/// Redrives `cfg.destination_topic` through `events` (its producer writes the async queue and
/// the stream records' topics), calling `progress` after each record.
///
/// # Errors
/// [`RedriveError`]; what was committed before it stays done.
pub async fn redrive(
    kafka: &KafkaSettings,
    events: &EventProducer,
    cfg: &RedriveConfig,
    mut progress: impl FnMut(RedriveProgress),
) -> Result<RedriveReport, RedriveError> {
    let start = {
        let (kafka, cfg) = (kafka.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || set_up(&kafka, &cfg))
            .await
            .map_err(|e| RedriveError::Task(e.to_string()))??
    };
    let resumed = start.resumed_run.is_some();
    let run = start
        .resumed_run
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    let mut report = RedriveReport {
        run: run.clone(),
        resumed,
        total: start.total,
        redriven: 0,
        skipped: 0,
        stopped_at_limit: false,
    };
    let topic = cfg.destination_topic.clone();
    let ends = start.ends;
    let mut positions = start.starts;
    let consumer = Arc::new(start.consumer);
    let mut done = 0i64;
    loop {
        if ends
            .iter()
            .all(|(p, end)| positions.get(p).copied().unwrap_or(-1) >= *end)
        {
            break;
        }
        if cfg.limit.is_some_and(|l| done >= l) {
            report.stopped_at_limit = true;
            break;
        }
        let c = Arc::clone(&consumer);
        let polled = tokio::task::spawn_blocking(move || {
            c.poll(Duration::from_millis(500)).map(|r| {
                r.map(|m| {
                    (
                        m.partition(),
                        m.offset(),
                        m.payload().unwrap_or_default().to_vec(),
                    )
                })
            })
        })
        .await
        .map_err(|e| RedriveError::Task(e.to_string()))?;
        let Some(polled) = polled else { continue };
        let (partition, offset, payload) = polled.map_err(|source| RedriveError::Read {
            what: "read a record",
            source,
        })?;
        let submit = |source| RedriveError::Submit {
            partition,
            offset,
            source,
        };
        if let Ok(r) = serde_json::from_slice::<InvocationRecord>(&payload) {
            let function = r.function_name().unwrap_or_default().to_owned();
            let request_id = format!("redrive-{run}-{}", r.request_context.request_id);
            let event = AsyncEvent::new(&function, &request_id, r.request_bytes());
            events
                .send(&cfg.queue_topic, &event)
                .await
                .map_err(submit)?;
            report.redriven += 1;
        } else if let Some(recs) = serde_json::from_slice::<StreamFailureRecord>(&payload)
            .ok()
            .and_then(|r| r.records())
            .filter(|r| !r.is_empty())
        {
            // The record goes back to its topic, where the mapping reads it again.
            for r in recs {
                let mut record = FutureRecord::to(&r.topic).payload(&r.value);
                if let Some(k) = &r.key {
                    record = record.key(k);
                }
                events
                    .producer()
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| submit(e))?;
            }
            report.redriven += 1;
        } else {
            report.skipped += 1;
        }
        // Commit after the re-submit is in Kafka: a crash repeats at most this one record.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
            .map_err(RedriveError::Commit)?;
        if let Some(mut el) = tpl.find_partition(&topic, partition) {
            el.set_metadata(format!("{RUN_METADATA_PREFIX}{run}"));
        }
        let c = Arc::clone(&consumer);
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| RedriveError::Task(e.to_string()))?
            .map_err(RedriveError::Commit)?;
        positions.insert(partition, offset + 1);
        done += 1;
        progress(RedriveProgress {
            done,
            total: report.total,
        });
    }
    Ok(report)
}
