//! One fault case's world: a private redis-server, the broker (the shared test broker, or a
//! private tansu when the case kills the broker), `n` [`FaultNode`]s, the fault function, and
//! the calls a case makes on them (create the function and mapping, produce and invoke while
//! writing the ledger, read the destinations and logs back into it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sluice_core::kafka::KafkaSettings;
use sluice_destinations::StreamFailureRecord;

use super::function::{read_invocations, FaultFunction};
use super::ledger::{Ledger, RecordId, Source};
use super::node::FaultNode;
use crate::broker::Broker;
use crate::kafka::{create_topic_at, unique_name};
use crate::redis::RedisServer;

/// The function's name in every case.
pub const FUNCTION: &str = "fault";

/// How many Event invokes are in flight at once.
const IN_FLIGHT: usize = 32;
/// How many records are in flight at once (the order of one key's records is kept by the
/// idempotent producer).
const PRODUCE_IN_FLIGHT: usize = 256;

/// What a case runs on.
pub struct Cluster {
    /// The broker's bootstrap address.
    pub kafka: String,
    /// The private broker (a case that kills it may take it).
    pub broker: Option<Broker>,
    /// The private Redis.
    pub redis: RedisServer,
    /// The nodes, `n0`, `n1`, …
    pub nodes: Vec<FaultNode>,
    /// Topic and key prefix of the nodes.
    pub prefix: String,
    /// Logs and node directories.
    pub dir: PathBuf,
    function: FaultFunction,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts Redis, the broker and `nodes` nodes with `flags`.
    ///
    /// # Panics
    /// When a part does not start.
    #[must_use]
    pub fn start(nodes: usize, flags: &[&str]) -> Self {
        let broker = Broker::start();
        let kafka = broker.bootstrap();
        let broker = Some(broker);
        let redis = RedisServer::start();
        let prefix = unique_name("fault").replace('-', "");
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).expect("create the case's directory");
        let nodes = (0..nodes)
            .map(|i| FaultNode::start(&kafka, &redis.url(), &prefix, &format!("n{i}"), &dir, flags))
            .collect();
        Self {
            kafka,
            broker,
            redis,
            nodes,
            prefix,
            dir,
            function: FaultFunction::new(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.nodes[0].endpoint)
    }

    async fn call(&self, req: reqwest::RequestBuilder, want: u16, what: &str) -> Value {
        let r = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, want, "{what}: {body}");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// Creates the fault function; each invocation takes `sleep_ms` (so faults find batches in
    /// flight).
    pub async fn create_function(&self, sleep_ms: u64) {
        let body = json!({
            "FunctionName": FUNCTION, "Code": { "Path": self.function.path() }, "Timeout": 30,
            "Environment": { "Variables": {
                "FAULT_SLEEP_MS": sleep_ms.to_string(), "LC_ALL": "C", "PERL_BADLANG": "0",
            } },
        });
        self.call(
            self.http
                .post(self.url("/2015-03-31/functions"))
                .json(&body),
            201,
            "create the function",
        )
        .await;
    }

    /// Sets the function's async retries and destinations; the `(on-success, on-failure)`
    /// topics.
    pub async fn event_destinations(&self, retries: u32) -> (String, String) {
        let ok = format!("{}-ok", self.prefix);
        let failed = format!("{}-failed", self.prefix);
        let body = json!({
            "MaximumRetryAttempts": retries,
            "DestinationConfig": {
                "OnSuccess": { "Destination": format!("kafka://{ok}") },
                "OnFailure": { "Destination": format!("kafka://{failed}") },
            },
        });
        let path = format!("/2019-09-25/functions/{FUNCTION}/event-invoke-config");
        self.call(
            self.http.put(self.url(&path)).json(&body),
            200,
            "event-invoke-config",
        )
        .await;
        (ok, failed)
    }

    /// Creates `topic` with `partitions` and a mapping of it to the function with `extra`
    /// settings (BatchSize…) and an on-failure topic; `(mapping UUID = its group, failure
    /// topic)`.
    pub async fn create_mapping(
        &self,
        topic: &str,
        partitions: i32,
        extra: Value,
    ) -> (String, String) {
        create_topic_at(&self.kafka, topic, partitions)
            .await
            .expect("create the mapped topic");
        let failed = format!("{topic}-failed");
        let mut body = json!({
            "FunctionName": FUNCTION, "Topics": [topic], "StartingPosition": "TRIM_HORIZON",
            "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } },
        });
        if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
        let m = self
            .call(
                self.http
                    .post(self.url("/2015-03-31/event-source-mappings/"))
                    .json(&body),
                202,
                "create the mapping",
            )
            .await;
        let uuid = m["UUID"].as_str().expect("mapping UUID").to_owned();
        (uuid, failed)
    }

    /// Produces `ids` to `topic` keyed by their keys, `poison` deciding which ones the function
    /// fails on; notes each acknowledged record (with its partition and offset) in `ledger`.
    /// Returns how many were not acknowledged.
    pub async fn produce(
        &self,
        topic: &str,
        ids: Vec<RecordId>,
        poison: impl Fn(&RecordId) -> bool,
        ledger: &mut Ledger,
    ) -> usize {
        produce_to(&self.kafka, topic, ids, poison, ledger).await
    }

    /// [`Cluster::produce`] on a task of its own, so that a case's faults land while records
    /// are coming in; the task returns its ledger and how many were not acknowledged.
    pub fn produce_in_background(
        &self,
        topic: &str,
        ids: Vec<RecordId>,
        poison: impl Fn(&RecordId) -> bool + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<(Ledger, usize)> {
        let (kafka, topic) = (self.kafka.clone(), topic.to_owned());
        tokio::spawn(async move {
            let mut ledger = Ledger::new();
            let refused = produce_to(&kafka, &topic, ids, poison, &mut ledger).await;
            (ledger, refused)
        })
    }

    /// Invokes the function with an Event per id (`{"fault": "KEY SEQ"}`), through the nodes in
    /// turn; notes every 202 in `ledger`. Returns how many got no 202.
    pub async fn events(&self, ids: Vec<RecordId>, ledger: &mut Ledger) -> usize {
        let endpoints: Vec<String> = self.nodes.iter().map(|n| n.endpoint.clone()).collect();
        let http = &self.http;
        let endpoints = &endpoints;
        let got: Vec<(RecordId, bool)> = stream::iter(ids.into_iter().enumerate())
            .map(|(i, id)| async move {
                let url = format!(
                    "{}/2015-03-31/functions/{FUNCTION}/invocations",
                    endpoints[i % endpoints.len()]
                );
                let body = json!({ "fault": id.value(false) }).to_string();
                let ok = http
                    .post(url)
                    .header("X-Amz-Invocation-Type", "Event")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                (id, ok)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut refused = 0;
        for (id, ok) in got {
            if ok {
                ledger.acked(id, Source::Async, None);
            } else {
                refused += 1;
            }
        }
        refused
    }

    /// Every record of `topic` up to its end now (empty if it does not exist).
    pub async fn read_topic(&self, topic: &str) -> Vec<Vec<u8>> {
        let (kafka, topic) = (self.kafka.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || read_to_end(&kafka, &topic))
            .await
            .expect("read task")
    }

    /// Reads the nodes' logs and the destination topics into `ledger`: `async_topics` are the
    /// `(on-success, on-failure)` topics of the Event invokes, `stream_failed` the mappings'
    /// failure topics.
    pub async fn collect(
        &self,
        ledger: &mut Ledger,
        async_topics: Option<&(String, String)>,
        stream_failed: &[&str],
    ) {
        // SLUICE_FAULT_DROP_EVERY=N forgets every N-th invocation: the checker's self-check (a
        // case must then fail with records lost).
        let drop_every: usize = std::env::var("SLUICE_FAULT_DROP_EVERY")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        for (i, inv) in read_invocations(&self.logs()).into_iter().enumerate() {
            if drop_every == 0 || (i + 1) % drop_every != 0 {
                ledger.invoked(inv);
            }
        }
        if let Some((ok, failed)) = async_topics {
            for raw in self.read_topic(ok).await {
                if let Some(id) = event_id(&raw) {
                    ledger.on_success(&id);
                }
            }
            for raw in self.read_topic(failed).await {
                if let Some(id) = event_id(&raw) {
                    ledger.on_failure(&id);
                }
            }
        }
        for topic in stream_failed {
            for raw in self.read_topic(topic).await {
                let Ok(rec) = serde_json::from_slice::<StreamFailureRecord>(&raw) else {
                    ledger.unknown += 1;
                    continue;
                };
                for r in rec.records().unwrap_or_default() {
                    match RecordId::parse(&String::from_utf8_lossy(&r.value)) {
                        Some(id) => ledger.on_failure(&id),
                        None => ledger.unknown += 1,
                    }
                }
            }
        }
    }

    /// Waits until every node holds its share of each of `topics` (`partitions` each), so that
    /// a case starts without the hand-overs of nodes joining; `false` after `timeout`.
    pub async fn settle(&self, topics: &[(&str, usize)], timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let even = topics.iter().all(|(topic, partitions)| {
                let share = partitions / self.nodes.len();
                let held: Vec<usize> = self
                    .nodes
                    .iter()
                    .map(|n| n.partitions_held(topic))
                    .collect();
                held.iter().sum::<usize>() == *partitions && held.iter().all(|h| *h >= share)
            });
            if even {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// The async queue topic of the nodes.
    #[must_use]
    pub fn async_topic(&self) -> String {
        format!("{}.async", self.prefix)
    }

    /// `(node index, log file)` of every node.
    #[must_use]
    pub fn logs(&self) -> Vec<(usize, PathBuf)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.log().to_path_buf()))
            .collect()
    }

    /// Waits until `group` has committed `end` on every partition of `topic`; how long it took,
    /// or `None` after `timeout`.
    pub async fn wait_drained(
        &self,
        group: &str,
        topic: &str,
        end: &BTreeMap<i32, i64>,
        timeout: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        let partitions = i32::try_from(end.len()).expect("partition count");
        while started.elapsed() < timeout {
            let now = super::offsets::committed(&self.kafka, group, topic, partitions).await;
            if end.iter().all(|(p, e)| now.get(p).is_some_and(|c| c >= e)) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    }

    /// Waits until each of `ledger`'s acknowledged Event invokes has a destination record in
    /// `topics`, re-reading them; `false` after `timeout`.
    pub async fn wait_events(
        &self,
        ledger: &Ledger,
        topics: &(String, String),
        timeout: Duration,
    ) -> bool {
        let want: std::collections::BTreeSet<&RecordId> = ledger
            .entries
            .iter()
            .filter(|(_, e)| e.source == Source::Async && e.acked.is_some())
            .map(|(id, _)| id)
            .collect();
        let started = Instant::now();
        while started.elapsed() < timeout {
            let mut done = std::collections::BTreeSet::new();
            for topic in [&topics.0, &topics.1] {
                done.extend(
                    self.read_topic(topic)
                        .await
                        .iter()
                        .filter_map(|r| event_id(r)),
                );
            }
            if want.iter().all(|id| done.contains(*id)) {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        if std::env::var_os("SLUICE_FAULT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("fault case logs kept in {}", self.dir.display());
        }
    }
}

/// See [`Cluster::produce`].
async fn produce_to(
    kafka: &str,
    topic: &str,
    ids: Vec<RecordId>,
    poison: impl Fn(&RecordId) -> bool,
    ledger: &mut Ledger,
) -> usize {
    let producer: FutureProducer = KafkaSettings::new(kafka.to_owned())
        .durable_producer_config()
        .create()
        .expect("producer");
    let producer = &producer;
    let acks: Vec<(RecordId, Option<(i32, i64)>)> = stream::iter(ids)
        .map(|id| {
            let value = id.value(poison(&id));
            async move {
                let sent = producer
                    .send(
                        FutureRecord::to(topic).key(&id.key).payload(&value),
                        Duration::from_secs(60),
                    )
                    .await;
                (id, sent.ok().map(|d| (d.partition, d.offset)))
            }
        })
        .buffered(PRODUCE_IN_FLIGHT)
        .collect()
        .await;
    let mut refused = 0;
    for (id, at) in acks {
        match at {
            Some(at) => ledger.acked(id, Source::Stream, Some(at)),
            None => refused += 1,
        }
    }
    refused
}

/// The id in an async destination record (`requestPayload.fault`).
fn event_id(raw: &[u8]) -> Option<RecordId> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    RecordId::parse(v["requestPayload"]["fault"].as_str()?)
}

fn read_to_end(kafka: &str, topic: &str) -> Vec<Vec<u8>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", unique_name("fault-reader"))
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer");
    let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return Vec::new();
    };
    let parts: Vec<i32> = md
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        let Ok((low, high)) = c.fetch_watermarks(topic, p, Duration::from_secs(10)) else {
            continue;
        };
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("assign");
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if ends.get(&m.partition()).is_some_and(|e| m.offset() < *e) {
                out.push(m.payload().unwrap_or_default().to_vec());
            }
            if ends
                .get(&m.partition())
                .is_some_and(|e| m.offset() + 1 >= *e)
            {
                ends.remove(&m.partition());
            }
        }
    }
    out
}
