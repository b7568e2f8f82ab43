//! Isolation of the pollers on the real broker and Redis (issue 12): a stuck partition never
//! holds back another, a slow function never takes every async slot, a hot function's retries
//! spread over the nodes, and a panic while handling an event fails it like a function error.
//!
//! The pollers run in this process with a scripted invoker in place of the worker pool, so the
//! tests can hold a function stuck and see which node ran what.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sluice_core::events::{AsyncEvent, EventProducer};
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked, Invoker};
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::{
    parse, EventInvokeConfig, EventSourceMappingConfig, EventSourceMappingState, Format,
    FunctionConfig, MappingState,
};
use sluice_core::store::{ConfigObject, ConfigStore, ConfigStoreConfig, Expected, ObjectKey};
use sluice_destinations::DestinationWriter;
use sluice_pollers::async_poller::{AsyncPoller, AsyncPollerConfig};
use sluice_pollers::stream::{StreamConfig, StreamTracker};
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};
use sluice_tests::redis::RedisServer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const ARN: &str = "arn:aws:lambda:us-east-1:000000000000:function:";

/// Each test creates a dozen topics and runs whole pollers: one at a time, so a shared test
/// broker is not overloaded into produce timeouts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the scripted invoker does for a function.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Succeeds.
    Ok,
    /// Waits until the gate opens, then succeeds.
    Gated,
    /// Fails the first attempt of each request, succeeds after.
    FailOnce,
    /// Panics.
    Panic,
    /// Fails batches holding a `{"poison":true}` record (stream events).
    Poison,
}

/// One invocation as the invoker saw it.
#[derive(Debug, Clone)]
struct Call {
    /// The node whose invoker ran it.
    node: &'static str,
    function: String,
    request_id: String,
    /// `(partition, offset)` of each record, for stream batches.
    records: Vec<(i32, i64)>,
    ok: bool,
    /// When it ended.
    at: std::time::Instant,
}

#[derive(Clone)]
struct Scripted {
    node: &'static str,
    scripts: Arc<HashMap<String, Script>>,
    calls: Arc<Mutex<Vec<Call>>>,
    gate: Arc<Semaphore>,
    /// Invocations begun (gated ones are recorded as calls only when they end).
    started: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scripted {
    fn new(scripts: &[(&str, Script)]) -> Self {
        Self::on("node-a", scripts)
    }

    /// The invoker of node `node`.
    fn on(node: &'static str, scripts: &[(&str, Script)]) -> Self {
        Self {
            node,
            scripts: Arc::new(scripts.iter().map(|(f, s)| ((*f).to_owned(), *s)).collect()),
            calls: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            started: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn open_gate(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

fn stream_records(payload: &[u8]) -> (Vec<(i32, i64)>, bool) {
    let event: Value = serde_json::from_slice(payload).expect("event JSON");
    let mut out = Vec::new();
    let mut poison = false;
    for recs in event["records"].as_object().expect("records").values() {
        for r in recs.as_array().expect("list") {
            let value = B64.decode(r["value"].as_str().unwrap_or("")).expect("b64");
            if serde_json::from_slice::<Value>(&value).is_ok_and(|v| v["poison"] == json!(true)) {
                poison = true;
            }
            out.push((
                i32::try_from(r["partition"].as_i64().expect("partition")).expect("i32"),
                r["offset"].as_i64().expect("offset"),
            ));
        }
    }
    (out, poison)
}

#[async_trait]
impl Invoker for Scripted {
    async fn invoke(&self, req: InvokeRequest) -> Result<Invoked, InvokeError> {
        let script = self
            .scripts
            .get(&req.function)
            .copied()
            .unwrap_or(Script::Ok);
        let mut records = Vec::new();
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ok = match script {
            Script::Ok => true,
            Script::Gated => {
                let _permit = self.gate.acquire().await.expect("gate");
                true
            }
            Script::FailOnce => self
                .calls
                .lock()
                .expect("lock")
                .iter()
                .any(|c| c.request_id == req.request_id),
            Script::Panic => panic!("the scripted invoker panics for {}", req.function),
            Script::Poison => {
                let (recs, poison) = stream_records(&req.payload);
                records = recs;
                !poison
            }
        };
        self.calls.lock().expect("lock").push(Call {
            node: self.node,
            function: req.function.clone(),
            request_id: req.request_id.clone(),
            records,
            ok,
            at: std::time::Instant::now(),
        });
        let result = if ok {
            FunctionResult::Ok(b"{}".to_vec())
        } else {
            FunctionResult::Err {
                error_type: "Scripted".into(),
                payload: br#"{"errorMessage":"scripted failure"}"#.to_vec(),
            }
        };
        Ok(Invoked {
            result,
            duration: Duration::from_millis(1),
            cold_start: false,
            init_duration: None,
            log: Vec::new(),
        })
    }
}

/// A private Redis, a configuration store on its own topic, and the functions.
struct Env {
    store: ConfigStore,
    kafka: KafkaSettings,
    redis: RedisServer,
    prefix: String,
    cancel: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn env(functions: &[&str]) -> Env {
    let redis = RedisServer::start();
    let conn = redis.connect().await;
    let kafka = KafkaSettings::new(bootstrap());
    let mut cfg = ConfigStoreConfig::new("isolation-test");
    cfg.topic = unique_name("cfg");
    let cancel = CancellationToken::new();
    let store = ConfigStore::open(&kafka, cfg, Some(conn), cancel.clone())
        .await
        .expect("store");
    for f in functions {
        store
            .write(
                &ObjectKey::function(f),
                Some(ConfigObject::Function(FunctionConfig::from_path(
                    *f, "/srv/f",
                ))),
                Expected::Absent,
            )
            .await
            .expect("function");
    }
    Env {
        store,
        kafka,
        redis,
        prefix: unique_name("iso"),
        cancel,
    }
}

impl Env {
    fn async_config(&self) -> AsyncPollerConfig {
        AsyncPollerConfig {
            retry_delays: vec![Duration::from_secs(1), Duration::from_secs(2)],
            throttle_backoff_min: Duration::from_millis(200),
            throttle_backoff_max: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(3),
            redis_prefix: format!("{}:", self.prefix),
            ..AsyncPollerConfig::new(&format!("{}.", self.prefix), ARN)
        }
    }

    /// Creates the async queue and delay topics of `cfg`.
    async fn async_topics(&self, cfg: &AsyncPollerConfig) {
        let events = EventProducer::new(&self.kafka).expect("producer");
        let destinations = DestinationWriter::new(self.kafka.clone(), events.producer().clone(), 1);
        AsyncPoller::new(
            cfg.clone(),
            self.kafka.clone(),
            self.store.clone(),
            Arc::new(Scripted::new(&[])),
            events,
            destinations,
            self.redis.connect().await,
            "topics".into(),
        )
        .ensure_topics()
        .await
        .expect("topics");
    }

    /// Starts an async poller for node `node` with `cfg`.
    async fn async_poller(&self, node: &str, cfg: AsyncPollerConfig, invoker: &Scripted) {
        let events = EventProducer::new(&self.kafka).expect("producer");
        let destinations = DestinationWriter::new(self.kafka.clone(), events.producer().clone(), 1);
        let poller = AsyncPoller::new(
            cfg,
            self.kafka.clone(),
            self.store.clone(),
            Arc::new(invoker.clone()),
            events,
            destinations,
            self.redis.connect().await,
            node.to_owned(),
        );
        poller.ensure_topics().await.expect("topics");
        let cancel = self.cancel.child_token();
        tokio::spawn(async move { poller.run(cancel).await.expect("async poller") });
    }

    /// Writes `n` events of `function` to the queue, spread over `partitions` partitions (keyed
    /// by request id, as the front end keys them).
    async fn enqueue(&self, cfg: &AsyncPollerConfig, function: &str, n: usize) -> Vec<String> {
        let events = EventProducer::new(&self.kafka).expect("producer");
        let mut ids = Vec::new();
        for i in 0..n {
            let id = unique_name("req");
            let event = AsyncEvent::new(function, &id, format!("{{\"i\":{i}}}").into_bytes());
            // EventProducer keys by function; spread explicitly over the partitions.
            let partition = i32::try_from(i).expect("i32") % cfg.queue_partitions;
            send_to(&events, &cfg.queue_topic, &event, partition).await;
            ids.push(id);
        }
        ids
    }

    async fn put_invoke_config(&self, function: &str, config: Value) {
        let c: EventInvokeConfig = parse(&config.to_string(), Format::Json).expect("valid");
        self.store
            .write(
                &ObjectKey::event_invoke_config(function),
                Some(ConfigObject::EventInvokeConfig(c)),
                Expected::Absent,
            )
            .await
            .expect("event invoke config");
    }
}

/// Writes `event` as the front end does, to `partition`.
async fn send_to(events: &EventProducer, topic: &str, event: &AsyncEvent, partition: i32) {
    let headers = event.headers();
    let record = FutureRecord::to(topic)
        .key(&event.request_id)
        .payload(&event.payload)
        .headers(headers)
        .partition(partition);
    events
        .producer()
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_function_does_not_take_every_async_slot() {
    let _serial = SERIAL.lock().await;
    let env = env(&["slow", "fast"]).await;
    let invoker = Scripted::new(&[("slow", Script::Gated), ("fast", Script::Ok)]);
    let cfg = AsyncPollerConfig {
        max_in_flight: 8,
        fair_reserve: 2,
        ..env.async_config()
    };
    env.async_poller("node-a", cfg.clone(), &invoker).await;
    let slow = env.enqueue(&cfg, "slow", 40).await;
    // Let the slow function's events take what they can before the fast ones arrive.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fast = env.enqueue(&cfg, "fast", 5).await;
    let fast_set: HashSet<String> = fast.iter().cloned().collect();
    wait_for(
        "the fast function's events while the slow one holds its slots",
        Duration::from_secs(60),
        || {
            invoker
                .calls()
                .iter()
                .filter(|c| c.function == "fast" && fast_set.contains(&c.request_id))
                .count()
                >= fast.len()
        },
    )
    .await;
    assert!(
        invoker.calls().iter().all(|c| c.function != "slow"),
        "the slow function was still stuck while the fast one ran"
    );
    invoker.open_gate();
    let slow_set: HashSet<String> = slow.iter().cloned().collect();
    wait_for(
        "every slow event, deferred ones included",
        Duration::from_secs(120),
        || {
            let done: HashSet<String> = invoker
                .calls()
                .into_iter()
                .filter(|c| c.function == "slow")
                .map(|c| c.request_id)
                .collect();
            slow_set.is_subset(&done)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_functions_retries_spread_over_every_node() {
    let _serial = SERIAL.lock().await;
    let env = env(&["hot"]).await;
    let a = Scripted::on("node-a", &[("hot", Script::FailOnce)]);
    // One call log for both, so either invoker knows a request's earlier attempt.
    let b = Scripted {
        node: "node-b",
        ..a.clone()
    };
    let cfg = env.async_config();
    env.async_poller("node-a", cfg.clone(), &a).await;
    env.async_poller("node-b", cfg.clone(), &b).await;
    // Let the two nodes split the queue and delay partitions between them.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ids = env.enqueue(&cfg, "hot", 64).await;
    let want: HashSet<String> = ids.iter().cloned().collect();
    wait_for(
        "every event's second attempt",
        Duration::from_secs(120),
        || {
            let ok: HashSet<String> = a
                .calls()
                .iter()
                .filter(|c| c.ok)
                .map(|c| c.request_id.clone())
                .collect();
            want.is_subset(&ok)
        },
    )
    .await;
    let calls = a.calls();
    let firsts: HashSet<&str> = calls.iter().filter(|c| !c.ok).map(|c| c.node).collect();
    let retries: HashSet<&str> = calls.iter().filter(|c| c.ok).map(|c| c.node).collect();
    assert_eq!(
        firsts.len(),
        2,
        "first attempts ran on both nodes: {firsts:?}"
    );
    assert_eq!(
        retries.len(),
        2,
        "a hot function's retries ran on one node only: {retries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_while_handling_an_event_fails_it_like_a_function_error() {
    let _serial = SERIAL.lock().await;
    let env = env(&["boom"]).await;
    let failed = unique_name("boom-failed");
    create_topic(&failed, 1).await.expect("topic");
    env.put_invoke_config(
        "boom",
        json!({
            "MaximumRetryAttempts": 1,
            "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } },
        }),
    )
    .await;
    let invoker = Scripted::new(&[("boom", Script::Panic)]);
    let cfg = env.async_config();
    env.async_poller("node-a", cfg.clone(), &invoker).await;
    let ids = env.enqueue(&cfg, "boom", 1).await;
    let records = read_until(&failed, Duration::from_secs(60), |r| !r.is_empty()).await;
    assert_eq!(records.len(), 1, "one on-failure record for the event");
    let record: Value = serde_json::from_slice(&records[0].1).expect("record JSON");
    assert_eq!(record["requestContext"]["requestId"], json!(ids[0]));
    assert_eq!(
        record["requestContext"]["condition"],
        json!("RetriesExhausted")
    );
    assert_eq!(
        record["requestContext"]["approximateInvokeCount"],
        json!(2),
        "the panicking attempt and its one retry"
    );
}

impl Env {
    /// Starts a stream tracker for node `node` (its own cancel token, returned with its task).
    async fn stream_tracker(
        &self,
        node: &str,
        invoker: &Scripted,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let producer: FutureProducer = self
            .kafka
            .durable_producer_config()
            .create()
            .expect("producer");
        let tracker = StreamTracker::new(
            StreamConfig {
                node_id: node.into(),
                redis_prefix: format!("{}:", self.prefix),
                lease_ttl: Duration::from_secs(3),
                function_arn_prefix: ARN.into(),
            },
            self.kafka.clone(),
            self.store.clone(),
            Arc::new(invoker.clone()),
            DestinationWriter::new(self.kafka.clone(), producer, 1),
            self.redis.connect().await,
        );
        let cancel = self.cancel.child_token();
        let handle = tokio::spawn(tracker.run(cancel.clone()));
        (cancel, handle)
    }

    /// Creates a mapping of `function` on `topic` (TRIM_HORIZON); returns its uuid and group.
    async fn map(&self, function: &str, topic: &str) -> (String, String) {
        let config: EventSourceMappingConfig = parse(
            &json!({
                "FunctionName": function,
                "Topics": [topic],
                "StartingPosition": "TRIM_HORIZON",
                "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } },
            })
            .to_string(),
            Format::Json,
        )
        .expect("valid mapping");
        let uuid = unique_name("esm");
        let group = config.consumer_group_id().unwrap_or(&uuid).to_owned();
        self.store
            .write(
                &ObjectKey::event_source_mapping(&uuid),
                Some(ConfigObject::EventSourceMapping(Box::new(
                    EventSourceMappingState {
                        uuid: uuid.clone(),
                        config,
                        state: MappingState::Creating,
                        state_transition_reason: "USER_INITIATED".into(),
                        last_modified: 0.0,
                        last_processing_result: String::new(),
                    },
                ))),
                Expected::Absent,
            )
            .await
            .expect("mapping");
        (uuid, group)
    }

    /// The lease keys of mapping `uuid` held in Redis.
    async fn mapping_leases(&self, uuid: &str) -> Vec<String> {
        let mut conn = self.redis.connect().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*lease:esm:{uuid}:*"))
            .query_async(&mut conn)
            .await
            .expect("keys");
        keys.into_iter()
            .filter(|k| !k.ends_with(":fence"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_hands_partitions_back_within_the_nodes_deadline() {
    let _serial = SERIAL.lock().await;
    let env = env(&["f"]).await;
    let invoker = Scripted::new(&[("f", Script::Gated)]);
    let (cancel, handle) = env.stream_tracker("node-a", &invoker).await;
    let topic = unique_name("drain");
    create_topic(&topic, 1).await.expect("topic");
    produce(&topic, 0, 5, false).await;
    let (uuid, _) = env.map("f", &topic).await;
    wait_for("the batch to be in flight", Duration::from_secs(60), || {
        invoker.started.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(
        env.mapping_leases(&uuid).await.len(),
        1,
        "the partition is leased"
    );
    // The function never returns: shutdown must still hand the partition back (commit what is
    // done, release the lease) within the node's 10 s for all its tasks.
    let stopping = tokio::time::Instant::now();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the tracker stops within the node's shutdown deadline")
        .expect("tracker task");
    assert!(
        env.mapping_leases(&uuid).await.is_empty(),
        "the lease is released, not left to expire"
    );
    eprintln!("stopped and released in {:?}", stopping.elapsed());
    invoker.open_gate();
}

/// Produces `n` records to `partition`, the first one poison when `poison`.
async fn produce(topic: &str, partition: i32, n: usize, poison: bool) {
    let producer: FutureProducer = KafkaSettings::new(bootstrap())
        .durable_producer_config()
        .create()
        .expect("producer");
    let mut sends = Vec::new();
    for i in 0..n {
        let value = json!({ "i": i, "poison": poison && i == 0 }).to_string();
        let key = format!("k{i}");
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .partition(partition);
        sends.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queue a record"),
        );
    }
    for s in sends {
        s.await.expect("delivery").expect("produce");
    }
}

/// The group's committed offset of `topic`/`partition`.
async fn committed(group: &str, topic: &str, partition: i32) -> Option<i64> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        match got.find_partition(&topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    })
    .await
    .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_record_on_one_partition_does_not_hold_back_another() {
    let _serial = SERIAL.lock().await;
    let env = env(&["f"]).await;
    let invoker = Scripted::new(&[("f", Script::Poison)]);
    let producer: FutureProducer = env
        .kafka
        .durable_producer_config()
        .create()
        .expect("producer");
    let tracker = StreamTracker::new(
        StreamConfig {
            node_id: "node-a".into(),
            redis_prefix: format!("{}:", env.prefix),
            lease_ttl: Duration::from_secs(3),
            function_arn_prefix: ARN.into(),
        },
        env.kafka.clone(),
        env.store.clone(),
        Arc::new(invoker.clone()),
        DestinationWriter::new(env.kafka.clone(), producer, 1),
        env.redis.connect().await,
    );
    tokio::spawn(tracker.run(env.cancel.child_token()));
    let topic = unique_name("poison");
    create_topic(&topic, 2).await.expect("topic");
    // Partition 0: a poison record first, then more than every buffer of the partition holds.
    produce(&topic, 0, 3000, true).await;
    // Default retries (-1: until the record expires), no bisection: partition 0 is stuck.
    let config: EventSourceMappingConfig = parse(
        &json!({
            "FunctionName": "f",
            "Topics": [topic],
            "StartingPosition": "TRIM_HORIZON",
            "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } },
        })
        .to_string(),
        Format::Json,
    )
    .expect("valid mapping");
    let uuid = unique_name("esm");
    let group = config.consumer_group_id().unwrap_or(&uuid).to_owned();
    env.store
        .write(
            &ObjectKey::event_source_mapping(&uuid),
            Some(ConfigObject::EventSourceMapping(Box::new(
                EventSourceMappingState {
                    uuid: uuid.clone(),
                    config,
                    state: MappingState::Creating,
                    state_transition_reason: "USER_INITIATED".into(),
                    last_modified: 0.0,
                    last_processing_result: String::new(),
                },
            ))),
            Expected::Absent,
        )
        .await
        .expect("mapping");
    wait_for(
        "the poison batch to be retried",
        Duration::from_secs(60),
        || {
            invoker
                .calls()
                .iter()
                .filter(|c| !c.ok && c.records.first().is_some_and(|r| r.0 == 0))
                .count()
                >= 3
        },
    )
    .await;
    // Give the poller time to fetch partition 0's backlog, then write partition 1.
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce(&topic, 1, 300, false).await;
    wait_for(
        "every record of partition 1 while partition 0 is stuck",
        Duration::from_secs(90),
        || {
            let seen: HashSet<i64> = invoker
                .calls()
                .iter()
                .filter(|c| c.ok)
                .flat_map(|c| c.records.clone())
                .filter(|(p, _)| *p == 1)
                .map(|(_, o)| o)
                .collect();
            seen.len() >= 300
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c1 = committed(&group, &topic, 1).await;
        if c1 == Some(300) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partition 1's commit is {c1:?}, want 300"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        committed(&group, &topic, 0).await.unwrap_or(0),
        0,
        "partition 0 stays at its poison record"
    );
    // The failing batch backs off (doubling) instead of being re-invoked at once.
    let tries: Vec<std::time::Instant> = invoker
        .calls()
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.at)
        .take(5)
        .collect();
    assert_eq!(tries.len(), 5, "the poison batch is retried");
    let (first, fourth) = (tries[1] - tries[0], tries[4] - tries[3]);
    assert!(
        fourth >= first * 3,
        "retries of a failing batch back off: first gap {first:?}, fourth {fourth:?}"
    );
}

/// A TCP proxy to Redis that the test can cut: every connection through it is dropped and new
/// ones are refused, as a network partition would.
struct CuttableProxy {
    port: u16,
    cut: CancellationToken,
}

impl CuttableProxy {
    async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = CancellationToken::new();
        let c = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = c.cancelled() => return,
                    a = listener.accept() => a.expect("accept"),
                };
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        () = c.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// Runs an async poller for node `node` on a runtime of its own (one thread), so the test can
/// freeze that node whole, as a stop-the-world pause (GC, SIGSTOP, a stalled VM) would, while its
/// librdkafka threads keep prefetching. Returns the runtime's handle.
fn poller_on_own_runtime(
    env: &Env,
    node: &'static str,
    cfg: AsyncPollerConfig,
    invoker: &Scripted,
    redis_url: String,
) -> tokio::runtime::Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    let (kafka, store, url, invoker, cancel) = (
        env.kafka.clone(),
        env.store.clone(),
        redis_url,
        invoker.clone(),
        env.cancel.child_token(),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tx.send(rt.handle().clone()).expect("handle");
        rt.block_on(async move {
            let client = redis::Client::open(url).expect("redis url");
            let conn = redis::aio::ConnectionManager::new(client)
                .await
                .expect("redis");
            let events = EventProducer::new(&kafka).expect("producer");
            let destinations = DestinationWriter::new(kafka.clone(), events.producer().clone(), 1);
            let poller = AsyncPoller::new(
                cfg,
                kafka,
                store,
                Arc::new(invoker),
                events,
                destinations,
                conn,
                node.to_owned(),
            );
            poller.run(cancel).await.expect("async poller");
        });
    });
    rx.recv().expect("runtime handle")
}

/// Every partition's committed offset of the queue group.
async fn committed_all(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect()
    })
    .await
    .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poller_paused_past_its_lease_does_nothing_for_what_it_lost() {
    let _serial = SERIAL.lock().await;
    let env = env(&["f"]).await;
    let zombie = Scripted::on("node-a", &[("f", Script::Ok)]);
    let cfg = env.async_config();
    env.async_topics(&cfg).await;
    let warm_up = env.enqueue(&cfg, "f", 8).await;
    let proxy = CuttableProxy::start(env.redis.port()).await;
    let a = poller_on_own_runtime(&env, "node-a", cfg.clone(), &zombie, proxy.url());
    let warm: HashSet<String> = warm_up.iter().cloned().collect();
    wait_for(
        "node-a to run the first events",
        Duration::from_secs(60),
        || {
            let seen: HashSet<String> = zombie.calls().into_iter().map(|c| c.request_id).collect();
            warm.is_subset(&seen)
        },
    )
    .await;
    let before = committed_all(&cfg.group_id, &cfg.queue_topic, cfg.queue_partitions).await;
    // Freeze node-a past its lease TTL, and cut it off Redis for good (so it can never take a
    // partition again); its consumer keeps prefetching what arrives meanwhile.
    a.spawn(async { std::thread::sleep(Duration::from_secs(5)) });
    proxy.cut.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ids = env.enqueue(&cfg, "f", 16).await;
    // node-b takes the partitions once node-a's leases expire.
    let heir = Scripted::on("node-b", &[("f", Script::Ok)]);
    env.async_poller("node-b", cfg.clone(), &heir).await;
    let mut last = before.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let now = committed_all(&cfg.group_id, &cfg.queue_topic, cfg.queue_partitions).await;
        for (p, (was, is)) in last.iter().zip(&now).enumerate() {
            assert!(
                is.unwrap_or(-1) >= was.unwrap_or(-1),
                "partition {p}'s committed offset moved backwards: {was:?} -> {is:?}"
            );
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let late: HashSet<String> = ids.iter().cloned().collect();
    let zombie_calls: Vec<String> = zombie
        .calls()
        .into_iter()
        .map(|c| c.request_id)
        .filter(|id| late.contains(id))
        .collect();
    assert!(
        zombie_calls.is_empty(),
        "node-a invoked {} events it had prefetched before its pause, after losing the partitions",
        zombie_calls.len()
    );
    wait_for("node-b to run every event", Duration::from_secs(60), || {
        let seen: HashSet<String> = heir.calls().into_iter().map(|c| c.request_id).collect();
        late.is_subset(&seen)
    })
    .await;
}
