//! Kafka tools: `sluice produce` (kcat-style), `sluice destinations tail`, `sluice redrive`.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sluice_core::events::EventProducer;
use sluice_core::kafka::KafkaSettings;
use sluice_destinations::{InvocationRecord, RedriveConfig, StreamFailureRecord};

/// Where the Kafka cluster is (shared by the Kafka tools).
#[derive(Debug, Clone, Args)]
pub struct Brokers {
    /// Kafka bootstrap servers.
    #[arg(
        short = 'b',
        long = "brokers",
        env = "SLUICE_KAFKA",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
}

/// Options of `sluice produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    kafka: Brokers,
    /// Topic to write to.
    #[arg(short = 't', long)]
    topic: String,
    /// Split each line at the first DELIM into key and value.
    #[arg(short = 'K', long = "key-delimiter", value_name = "DELIM")]
    key_delimiter: Option<String>,
    /// The key of every record (unless -K gives one per line).
    #[arg(short = 'k', long)]
    key: Option<String>,
    /// A header NAME=VALUE on every record (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Partition to write to (default: by key, or spread).
    #[arg(short = 'p', long)]
    partition: Option<i32>,
    /// Stop after COUNT records.
    #[arg(short = 'c', long)]
    count: Option<usize>,
    /// Read lines from this file instead of stdin.
    file: Option<String>,
}

pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let kafka = KafkaSettings::new(&args.kafka.brokers);
    let producer: FutureProducer = kafka
        .durable_producer_config()
        .create()
        .context("create the producer")?;
    {
        use rdkafka::producer::Producer;
        let client = producer.clone();
        let topic = args.topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await
        .context("metadata task")?
        .with_context(|| {
            format!(
                "read metadata of {} from {}",
                args.topic, args.kafka.brokers
            )
        })?;
        let partitions = md
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            bail!(
                "topic {:?} does not exist on {} (create it first)",
                args.topic,
                args.kafka.brokers
            );
        }
        if let Some(p) = args.partition {
            if p < 0 || usize::try_from(p).unwrap_or(usize::MAX) >= partitions {
                bail!(
                    "-p {p}: topic {} has partitions 0..={}",
                    args.topic,
                    partitions - 1
                );
            }
        }
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("-H takes NAME=VALUE, got {h:?}"))?;
        headers.push((k.to_owned(), v.to_owned()));
    }
    let reader: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("open {path}"))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut pending = futures::stream::FuturesUnordered::new();
    let (mut delivered, mut failed, mut sent) = (0usize, 0usize, 0usize);
    for line in reader.lines() {
        if args.count.is_some_and(|c| sent >= c) {
            break;
        }
        let line = line.context("read input")?;
        let (key, value) = match &args.key_delimiter {
            Some(d) => match line.split_once(d.as_str()) {
                Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
                None => (args.key.clone(), line),
            },
            None => (args.key.clone(), line),
        };
        let mut h = OwnedHeaders::new();
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let producer = producer.clone();
        let topic = args.topic.clone();
        let partition = args.partition;
        pending.push(async move {
            let mut record = FutureRecord::to(&topic).payload(&value).headers(h);
            if let Some(k) = &key {
                record = record.key(k);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        });
        sent += 1;
        while pending.len() >= 1000 {
            tally(
                futures::StreamExt::next(&mut pending).await,
                &mut delivered,
                &mut failed,
            );
        }
    }
    while let Some(r) = futures::StreamExt::next(&mut pending).await {
        tally(Some(r), &mut delivered, &mut failed);
    }
    eprintln!("{delivered} delivered, {failed} failed to {}", args.topic);
    if failed > 0 {
        bail!("{failed} of {sent} records were not delivered");
    }
    Ok(())
}

fn tally(r: Option<Result<(), rdkafka::error::KafkaError>>, ok: &mut usize, failed: &mut usize) {
    match r {
        Some(Ok(())) => *ok += 1,
        Some(Err(e)) => {
            *failed += 1;
            eprintln!("delivery failed: {e}");
        }
        None => {}
    }
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create a topic (nothing happens if it exists).
    Create {
        /// Topic name.
        name: String,
        /// Partitions (the shards of a stream mapping).
        #[arg(short = 'p', long, default_value_t = 1)]
        partitions: i32,
        #[command(flatten)]
        kafka: Brokers,
    },
}

pub async fn topics(cmd: TopicsCommand) -> anyhow::Result<()> {
    let TopicsCommand::Create {
        name,
        partitions,
        kafka,
    } = cmd;
    let brokers = kafka.brokers;
    let mut v = sluice_core::model::Violations::default();
    if partitions < 1 {
        bail!("--partitions must be at least 1, got {partitions}");
    }
    if name.parse::<sluice_core::model::KafkaTopicUri>().is_err()
        && format!("kafka://{name}")
            .parse::<sluice_core::model::KafkaTopicUri>()
            .is_err()
    {
        v.push("name", format!("must be a Kafka topic name, got {name:?}"));
        bail!("{v}");
    }
    let spec = sluice_core::kafka::TopicSpec {
        name: name.clone(),
        partitions,
        config: Vec::new(),
    };
    sluice_core::kafka::ensure_topic(&KafkaSettings::new(&brokers), &spec)
        .await
        .with_context(|| format!("create topic {name}"))?;
    eprintln!("topic {name} ready ({partitions} partition(s))");
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum DestinationsCommand {
    /// Print the records of a destination topic readably: condition, attempts, error, payload.
    Tail(TailArgs),
}

/// Options of `sluice destinations tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The destination, `kafka://<topic>`.
    destination: String,
    #[command(flatten)]
    kafka: Brokers,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Print raw JSON, one record per line.
    #[arg(long)]
    json: bool,
}

fn topic_of(uri: &str) -> anyhow::Result<String> {
    let parsed: sluice_core::model::KafkaTopicUri = uri
        .parse()
        .map_err(|e: sluice_core::model::Violations| anyhow::anyhow!("{e}"))?;
    Ok(parsed.topic)
}

/// Assigns every partition of `topic` from the beginning; returns the end offsets.
fn assign_all(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("read topic metadata")?;
    let t = md.topics().first().context("no such topic")?;
    if t.partitions().is_empty() {
        bail!("topic {topic} does not exist (no destination record was written yet?)");
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in t.partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .context("read end offsets")?;
        ends.insert(p.id(), high);
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .context("assign")?;
    }
    consumer.assign(&tpl).context("assign partitions")?;
    Ok(ends)
}

/// Polls `consumer` and hands each record to `each` until every partition reached its end in
/// `ends` (from `positions`, the next offset per partition), or for ever with `follow`.
pub(crate) fn read_records(
    consumer: &BaseConsumer,
    ends: &HashMap<i32, i64>,
    mut positions: HashMap<i32, i64>,
    follow: bool,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    loop {
        let done = ends
            .iter()
            .all(|(p, end)| positions.get(p).copied().unwrap_or(0) >= *end);
        if done && !follow {
            return Ok(());
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.context("read")?;
        positions.insert(m.partition(), m.offset() + 1);
        each(&m);
    }
}

pub async fn tail(cmd: DestinationsCommand) -> anyhow::Result<()> {
    let DestinationsCommand::Tail(args) = cmd;
    let topic = topic_of(&args.destination)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer: BaseConsumer = KafkaSettings::new(&args.kafka.brokers)
            .client_config()
            .set("group.id", "sluice-tail")
            .set("enable.auto.commit", "false")
            .create()
            .context("create the consumer")?;
        let ends = assign_all(&consumer, &topic)?;
        let mut shown = 0usize;
        read_records(&consumer, &ends, HashMap::new(), args.follow, |m| {
            let payload = m.payload().unwrap_or_default();
            shown += 1;
            if args.json {
                println!("{}", String::from_utf8_lossy(payload));
                return;
            }
            match serde_json::from_slice::<InvocationRecord>(payload) {
                Ok(r) => print_record(&r, m.partition(), m.offset()),
                Err(_) => match serde_json::from_slice::<StreamFailureRecord>(payload) {
                    Ok(r) => print_stream_failure(&r, m.partition(), m.offset()),
                    Err(_) => println!(
                        "[{}@{}] (not an invocation record) {}",
                        m.partition(),
                        m.offset(),
                        String::from_utf8_lossy(payload)
                    ),
                },
            }
        })?;
        eprintln!("{shown} record(s) in {topic}");
        Ok(())
    })
    .await
    .context("tail task")?
}

fn print_record(r: &InvocationRecord, partition: i32, offset: i64) {
    let c = &r.request_context;
    println!(
        "{}  {:?}  function={}  attempts={}  request={}  [{partition}@{offset}]",
        r.timestamp,
        c.condition,
        r.function_name().unwrap_or("?"),
        c.approximate_invoke_count,
        c.request_id
    );
    if let Some(rc) = &r.response_context {
        if let Some(fe) = &rc.function_error {
            let p = r.response_payload.clone().unwrap_or_default();
            let ty = p["errorType"].as_str().unwrap_or("");
            let msg = p["errorMessage"]
                .as_str()
                .map_or_else(|| p.to_string(), str::to_owned);
            println!("  error ({fe}): {ty} {msg}");
        } else if let Some(p) = &r.response_payload {
            println!("  response: {p}");
        }
    }
    println!("  payload: {}", r.request_payload);
}

/// Options of `sluice redrive`.
#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The failure destination, `kafka://<topic>`.
    destination: String,
    #[command(flatten)]
    kafka: Brokers,
    /// Prefix of Sluice's topics (the async queue is `<prefix>async`).
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "sluice.")]
    topic_prefix: String,
    /// Stop after this many records (the next run resumes after them).
    #[arg(long)]
    limit: Option<i64>,
    /// Start again from the oldest record, ignoring what earlier runs re-submitted (each run's
    /// events get request ids of their own, so the pollers run them again).
    #[arg(long)]
    from_beginning: bool,
}

pub async fn redrive(args: RedriveArgs) -> anyhow::Result<()> {
    let topic = topic_of(&args.destination)?;
    let kafka = KafkaSettings::new(&args.kafka.brokers);
    let events = EventProducer::new(&kafka).context("create the producer")?;
    let cfg = RedriveConfig {
        queue_topic: format!("{}async", args.topic_prefix),
        // Progress is the committed offsets of this group: an interrupted redrive resumes there.
        group: format!("{}redrive.{topic}", args.topic_prefix),
        destination_topic: topic.clone(),
        limit: args.limit,
        from_beginning: args.from_beginning,
    };
    eprintln!(
        "redriving {topic} to {} (progress kept in consumer group {})",
        cfg.queue_topic, cfg.group
    );
    let report = sluice_destinations::redrive(&kafka, &events, &cfg, |p| {
        eprint!("\r[{}] {}/{}", bar(p.done, p.total), p.done, p.total);
    })
    .await?;
    eprintln!();
    if report.stopped_at_limit {
        eprintln!(
            "stopped after {} record(s) (--limit); run again to continue",
            args.limit.unwrap_or_default()
        );
    }
    eprintln!(
        "run {}{}: {} re-submitted, {} skipped (not failure records), of {} in {topic}",
        report.run,
        if report.resumed { " (resumed)" } else { "" },
        report.redriven,
        report.skipped,
        report.total
    );
    Ok(())
}

fn print_stream_failure(r: &StreamFailureRecord, partition: i32, offset: i64) {
    let c = &r.request_context;
    for rec in r.records().unwrap_or_default() {
        println!(
            "{}  {}  function={}  attempts={}  record={}-{}@{}  [{partition}@{offset}]",
            r.timestamp,
            c.condition,
            r.function_name().unwrap_or("?"),
            c.approximate_invoke_count,
            rec.topic,
            rec.partition,
            rec.offset,
        );
        if let Some(msg) = r
            .response_payload
            .as_ref()
            .and_then(|p| p["errorMessage"].as_str())
        {
            println!("  error: {msg}");
        }
        if let Some(k) = &rec.key {
            println!("  key: {}", String::from_utf8_lossy(k));
        }
        println!("  value: {}", String::from_utf8_lossy(&rec.value));
    }
}

fn bar(done: i64, total: i64) -> String {
    let width = 30;
    let filled = if total > 0 {
        usize::try_from(done * width / total).unwrap_or(0).min(30)
    } else {
        30
    };
    format!("{}{}", "#".repeat(filled), ".".repeat(30 - filled))
}
