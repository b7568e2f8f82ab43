//! `sluice logs FUNCTION`: a function's invocation logs from every worker, read from the logs
//! topic (`<prefix>logs`), as `sam logs` reads them from CloudWatch.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::kafka::KafkaSettings;
use sluice_core::logs::REQUEST_ID_HEADER;

use crate::kafka_cli::Brokers;
use crate::node::parse_duration;

/// Options of `sluice logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The function whose logs to print.
    function: String,
    #[command(flatten)]
    kafka: Brokers,
    /// The nodes' `--topic-prefix`: logs are read from `<prefix>logs`.
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "sluice.")]
    topic_prefix: String,
    /// Keep printing new invocations' logs as they arrive (Ctrl-C stops).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Start this long ago (e.g. 30s, 10m, 2h).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    since: Duration,
    /// Only the log of this invocation.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

/// Prints the logs.
///
/// # Errors
/// When Kafka cannot be read or the logs topic does not exist.
pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || read(&args))
        .await
        .context("logs task")?
}

fn read(args: &LogsArgs) -> anyhow::Result<()> {
    let topic = format!("{}logs", args.topic_prefix);
    let consumer: BaseConsumer = KafkaSettings::new(&args.kafka.brokers)
        .client_config()
        .set("group.id", "sluice-logs")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .context("create the consumer")?;
    let md = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .context("read the logs topic's metadata")?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        bail!(
            "topic {topic} does not exist: no worker with --topic-prefix {:?} has run a function \
             yet (pass the nodes' --topic-prefix)",
            args.topic_prefix
        );
    }
    let since_ms = SystemTime::now()
        .checked_sub(args.since)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut times = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &p in &partitions {
        times
            .add_partition_offset(&topic, p, Offset::Offset(since_ms))
            .context("offsets for times")?;
        let (_, high) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .context("read end offsets")?;
        ends.insert(p, high);
    }
    // The first offset at or after `since` in each partition (the end where none is).
    let starts = consumer
        .offsets_for_times(times, Duration::from_secs(10))
        .context("find where --since starts")?;
    let mut assignment = TopicPartitionList::new();
    let mut positions = HashMap::new();
    for e in starts.elements() {
        let start = match e.offset() {
            Offset::Offset(o) => o,
            _ => ends.get(&e.partition()).copied().unwrap_or(0),
        };
        positions.insert(e.partition(), start);
        assignment
            .add_partition_offset(&topic, e.partition(), Offset::Offset(start))
            .context("assign")?;
    }
    consumer.assign(&assignment).context("assign partitions")?;
    let mut shown = 0usize;
    crate::kafka_cli::read_records(&consumer, &ends, positions, args.follow, |m| {
        if m.key() != Some(args.function.as_bytes()) {
            return;
        }
        let request_id = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == REQUEST_ID_HEADER)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if args
            .request_id
            .as_ref()
            .is_some_and(|want| request_id.as_deref() != Some(want.as_str()))
        {
            return;
        }
        shown += 1;
        print!(
            "{}",
            String::from_utf8_lossy(m.payload().unwrap_or_default())
        );
    })?;
    eprintln!(
        "{shown} invocation log(s) of {} in {topic} since {} ago",
        args.function,
        humantime(args.since)
    );
    Ok(())
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 && s > 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
