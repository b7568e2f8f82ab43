//! Stream event source mappings on the real broker and Redis.
//!
//! The first tests run the mapping pollers in this process with a recording invoker in place of
//! the worker pool, which lets them observe every batch (order per key, bisection, partial
//! batches); the last ones run a real `sluice node` with jailed sandboxes end to end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked, Invoker};
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::{
    parse, EventSourceMappingConfig, EventSourceMappingState, Format, FunctionConfig, MappingState,
};
use sluice_core::store::{ConfigObject, ConfigStore, ConfigStoreConfig, Expected, ObjectKey};
use sluice_destinations::DestinationWriter;
use sluice_pollers::stream::{StreamConfig, StreamTracker};
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;
use tokio_util::sync::CancellationToken;

/// Records every batch; fails batches holding a poison record; reports `partial` records.
/// One invocation as the recorder saw it: `(key, offset, value)` per record.
type Batch = Vec<(String, i64, Value)>;

#[derive(Default, Clone)]
struct Recorder {
    batches: Arc<Mutex<Vec<Batch>>>,
}

#[async_trait]
impl Invoker for Recorder {
    async fn invoke(&self, req: InvokeRequest) -> Result<Invoked, InvokeError> {
        let event: Value = serde_json::from_slice(&req.payload).expect("event JSON");
        let mut batch = Vec::new();
        let mut failures = Vec::new();
        let mut poison = false;
        let mut panic_now = false;
        for (tp, recs) in event["records"].as_object().expect("records") {
            for r in recs.as_array().expect("list") {
                let key =
                    String::from_utf8(B64.decode(r["key"].as_str().unwrap_or("")).expect("b64"))
                        .expect("utf8");
                let value: Value = serde_json::from_slice(
                    &B64.decode(r["value"].as_str().expect("value"))
                        .expect("b64"),
                )
                .expect("json");
                if value["poison"] == json!(true) {
                    poison = true;
                }
                if value["panic"] == json!(true) {
                    panic_now = true;
                }
                if value["partial"] == json!(true) {
                    failures.push(json!({ "itemIdentifier": { "topic-partition": tp, "offset": r["offset"] } }));
                }
                batch.push((key, r["offset"].as_i64().expect("offset"), value));
            }
        }
        self.batches.lock().expect("lock").push(batch);
        assert!(!panic_now, "the recorder panics on a record asking it to");
        let result = if poison {
            FunctionResult::Err {
                error_type: "Poison".into(),
                payload: br#"{"errorMessage":"poison"}"#.to_vec(),
            }
        } else {
            FunctionResult::Ok(
                json!({ "batchItemFailures": failures })
                    .to_string()
                    .into_bytes(),
            )
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

struct InProcess {
    store: ConfigStore,
    recorder: Recorder,
    cancel: CancellationToken,
    _redis: RedisServer,
}

async fn in_process() -> InProcess {
    let redis = RedisServer::start();
    let conn = redis.connect().await;
    let kafka = KafkaSettings::new(bootstrap());
    let mut cfg = ConfigStoreConfig::new("streams-test");
    cfg.topic = unique_name("cfg");
    let cancel = CancellationToken::new();
    let store = ConfigStore::open(&kafka, cfg, Some(conn.clone()), cancel.clone())
        .await
        .expect("store");
    store
        .write(
            &ObjectKey::function("f"),
            Some(ConfigObject::Function(FunctionConfig::from_path(
                "f", "/srv/f",
            ))),
            Expected::Absent,
        )
        .await
        .expect("function");
    let recorder = Recorder::default();
    let producer: FutureProducer = kafka.durable_producer_config().create().expect("producer");
    let tracker = StreamTracker::new(
        StreamConfig {
            node_id: "node-a".into(),
            redis_prefix: "st:".into(),
            lease_ttl: Duration::from_secs(3),
            function_arn_prefix: "arn:aws:lambda:us-east-1:000000000000:function:".into(),
        },
        kafka.clone(),
        store.clone(),
        Arc::new(recorder.clone()),
        DestinationWriter::new(kafka, producer, 1),
        conn,
    );
    tokio::spawn(tracker.run(cancel.clone()));
    InProcess {
        store,
        recorder,
        cancel,
        _redis: redis,
    }
}

impl InProcess {
    async fn map(&self, config: Value) -> String {
        let config: EventSourceMappingConfig =
            parse(&config.to_string(), Format::Json).expect("valid mapping");
        let uuid = unique_name("esm");
        let state = EventSourceMappingState {
            uuid: uuid.clone(),
            config,
            state: MappingState::Creating,
            state_transition_reason: "USER_INITIATED".into(),
            last_modified: 0.0,
            last_processing_result: String::new(),
        };
        self.store
            .write(
                &ObjectKey::event_source_mapping(&uuid),
                Some(ConfigObject::EventSourceMapping(Box::new(state))),
                Expected::Absent,
            )
            .await
            .expect("mapping");
        uuid
    }

    /// Changes a mapping's configuration (retrying if the tracker moved its state meanwhile).
    async fn change(&self, uuid: &str, f: impl Fn(&mut EventSourceMappingConfig)) {
        for _ in 0..10 {
            let m = self
                .store
                .event_source_mappings()
                .into_iter()
                .find(|m| m.object.uuid == uuid)
                .expect("mapping");
            let mut next = m.object.clone();
            f(&mut next.config);
            let written = self
                .store
                .write(
                    &ObjectKey::event_source_mapping(uuid),
                    Some(ConfigObject::EventSourceMapping(Box::new(next))),
                    Expected::Revision(m.revision),
                )
                .await;
            if written.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not change mapping {uuid}");
    }

    fn seen(&self) -> Vec<Vec<(String, i64, Value)>> {
        self.recorder.batches.lock().expect("lock").clone()
    }

    async fn wait_offsets(&self, want: usize, timeout: Duration) -> Vec<Vec<(String, i64, Value)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let seen = self.seen();
            let distinct: std::collections::HashSet<i64> =
                seen.iter().flatten().map(|(_, o, _)| *o).collect();
            if distinct.len() >= want || tokio::time::Instant::now() > deadline {
                return seen;
            }
            if std::env::var_os("SLUICE_TEST_PROGRESS").is_some() {
                eprintln!(
                    "{} distinct offsets, {} batches",
                    distinct.len(),
                    seen.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Produces `records` to partition 0 in the order given (the idempotent producer keeps the
/// order of records in flight to one partition).
async fn produce(topic: &str, records: &[(String, Value)]) {
    let producer: FutureProducer = KafkaSettings::new(bootstrap())
        .durable_producer_config()
        .create()
        .expect("producer");
    let sends: Vec<_> = records
        .iter()
        .map(|(k, v)| {
            let value = v.to_string();
            let record = FutureRecord::to(topic)
                .key(k.as_str())
                .payload(&value)
                .partition(0);
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queue a record")
        })
        .collect();
    for s in sends {
        s.await.expect("delivery").expect("produce");
    }
}

#[tokio::test]
async fn parallelization_keeps_per_key_order() {
    let p = in_process().await;
    let topic = unique_name("orders");
    create_topic(&topic, 1).await.expect("topic");
    let recs: Vec<(String, Value)> = (0..10_000)
        .map(|i| (format!("key-{}", i % 50), json!({ "i": i })))
        .collect();
    produce(&topic, &recs).await;
    p.map(json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 50,
                  "MaximumBatchingWindowInSeconds": 0, "ParallelizationFactor": 4 }))
        .await;
    let seen = p.wait_offsets(10_000, Duration::from_secs(120)).await;
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut count = 0;
    for batch in &seen {
        for (key, offset, _) in batch {
            if let Some(prev) = last.insert(key.clone(), *offset) {
                assert!(*offset > prev, "key {key}: offset {offset} after {prev}");
            }
            count += 1;
        }
    }
    assert_eq!(count, 10_000, "every record exactly once");
    assert!(seen.iter().all(|b| b.len() <= 50));
}

/// A panic while invoking (here: in the invoker) fails the batch like a function error: bisection
/// isolates the record that causes it, it reaches the on-failure destination, and its neighbours
/// run and are committed (before, the lane died and the partition's commit point stayed put).
#[tokio::test]
async fn a_panic_while_invoking_a_batch_fails_it_like_a_function_error() {
    let p = in_process().await;
    let topic = unique_name("panic");
    let failed = unique_name("panic-failed");
    create_topic(&topic, 1).await.expect("topic");
    let mut recs: Vec<(String, Value)> = (0..8)
        .map(|i| (format!("k{i}"), json!({ "i": i })))
        .collect();
    recs[3].1 = json!({ "i": 3, "panic": true });
    produce(&topic, &recs).await;
    p.map(json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 8,
                  "MaximumBatchingWindowInSeconds": 1, "BisectBatchOnFunctionError": true, "MaximumRetryAttempts": 0,
                  "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } } }))
        .await;
    let fails = read_until(&failed, Duration::from_secs(60), |r| !r.is_empty()).await;
    assert_eq!(fails.len(), 1, "only the panicking record fails");
    assert_eq!(fails[0].0, "k3");
    let seen = p.wait_offsets(8, Duration::from_secs(20)).await;
    let ok: std::collections::HashSet<i64> = seen
        .iter()
        .filter(|b| !b.iter().any(|(_, _, v)| v["panic"] == true))
        .flatten()
        .map(|(_, o, _)| *o)
        .collect();
    assert_eq!(ok.len(), 7, "every neighbour ran: {seen:?}");
}

#[tokio::test]
async fn bisection_isolates_a_poison_record_and_partial_batches_resume_at_the_failure() {
    let p = in_process().await;
    let topic = unique_name("bisect");
    let failed = unique_name("bisect-failed");
    create_topic(&topic, 1).await.expect("topic");
    let mut recs: Vec<(String, Value)> = (0..16)
        .map(|i| (format!("k{i}"), json!({ "i": i })))
        .collect();
    recs[5].1 = json!({ "i": 5, "poison": true });
    produce(&topic, &recs).await;
    p.map(json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 16,
                  "MaximumBatchingWindowInSeconds": 1, "BisectBatchOnFunctionError": true, "MaximumRetryAttempts": 1,
                  "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } } }))
        .await;
    let fails = read_until(&failed, Duration::from_secs(60), |r| !r.is_empty()).await;
    assert_eq!(fails.len(), 1, "only the poison record fails");
    let f: Value = serde_json::from_slice(&fails[0].1).expect("json");
    assert_eq!(
        fails[0].0, "k5",
        "the failure record keeps the original key"
    );
    assert_eq!(f["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(f["KafkaBatchInfo"]["recordInfo"]["offset"], "5");
    let value = B64
        .decode(
            f["payload"]["records"][format!("{topic}-0")][0]["value"]
                .as_str()
                .expect("value"),
        )
        .expect("b64");
    assert_eq!(
        serde_json::from_slice::<Value>(&value).expect("json")["poison"],
        true
    );
    // Every neighbour was processed (in a batch that succeeded).
    let seen = p.wait_offsets(16, Duration::from_secs(10)).await;
    let ok: std::collections::HashSet<i64> = seen
        .iter()
        .filter(|b| !b.iter().any(|(_, _, v)| v["poison"] == true))
        .flatten()
        .map(|(_, o, _)| *o)
        .collect();
    assert_eq!(ok.len(), 15, "{seen:?}");

    // Partial batch: records before the failed one are done; the retry starts at it.
    let topic2 = unique_name("partial");
    create_topic(&topic2, 1).await.expect("topic");
    let mut recs: Vec<(String, Value)> = (0..6)
        .map(|i| (format!("p{i}"), json!({ "i": i })))
        .collect();
    recs[3].1 = json!({ "i": 3, "partial": true });
    produce(&topic2, &recs).await;
    let before = p.seen().len();
    p.map(json!({ "FunctionName": "f", "Topics": [topic2], "StartingPosition": "TRIM_HORIZON", "BatchSize": 10,
                  "MaximumBatchingWindowInSeconds": 1, "FunctionResponseTypes": ["ReportBatchItemFailures"], "MaximumRetryAttempts": 1 }))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let batches: Vec<Vec<i64>> = p.seen()[before..]
        .iter()
        .filter(|b| b.iter().any(|(k, _, _)| k.starts_with('p')))
        .map(|b| b.iter().map(|(_, o, _)| *o).collect())
        .collect();
    assert_eq!(
        batches.first(),
        Some(&vec![0, 1, 2, 3, 4, 5]),
        "{batches:?}"
    );
    assert_eq!(
        batches.get(1),
        Some(&vec![3, 4, 5]),
        "the retry starts at the lowest failed record: {batches:?}"
    );
    assert_eq!(
        batches.len(),
        2,
        "one retry (MaximumRetryAttempts 1), then the record is given up: {batches:?}"
    );
}

#[tokio::test]
async fn filters_skip_records_and_disable_pauses() {
    let p = in_process().await;
    let topic = unique_name("filtered");
    create_topic(&topic, 1).await.expect("topic");
    let recs: Vec<(String, Value)> = (0..20)
        .map(|i| {
            (
                format!("k{i}"),
                json!({ "kind": if i % 2 == 0 { "order" } else { "noise" }, "i": i }),
            )
        })
        .collect();
    produce(&topic, &recs).await;
    let uuid = p
        .map(json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "MaximumBatchingWindowInSeconds": 1,
                     "FilterCriteria": { "Filters": [ { "Pattern": "{\"value\":{\"kind\":[\"order\"]}}" } ] } }))
        .await;
    let seen = p.wait_offsets(10, Duration::from_secs(30)).await;
    let offsets: Vec<i64> = seen.iter().flatten().map(|(_, o, _)| *o).collect();
    assert_eq!(
        offsets,
        (0..20).step_by(2).collect::<Vec<i64>>(),
        "only matching records are invoked"
    );

    // Disable: new records wait; enable: they are processed from the checkpoint.
    p.change(&uuid, |c| c.enabled = false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce(
        &topic,
        &[("late".into(), json!({ "kind": "order", "late": true }))],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        p.seen().iter().flatten().count(),
        10,
        "a disabled mapping does not poll"
    );
    p.change(&uuid, |c| c.enabled = true).await;
    let seen = p.wait_offsets(11, Duration::from_secs(30)).await;
    let all: Vec<i64> = seen.iter().flatten().map(|(_, o, _)| *o).collect();
    assert_eq!(
        all.len(),
        11,
        "resumed from the checkpoint without repeats: {all:?}"
    );
    assert_eq!(all.last(), Some(&20));
}

#[tokio::test]
async fn an_update_of_batch_size_applies_live() {
    let p = in_process().await;
    let topic = unique_name("resize");
    create_topic(&topic, 1).await.expect("topic");
    let first: Vec<(String, Value)> = (0..40)
        .map(|i| (format!("k{i}"), json!({ "i": i })))
        .collect();
    produce(&topic, &first).await;
    let uuid = p
        .map(json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 20,
                     "MaximumBatchingWindowInSeconds": 1 }))
        .await;
    let seen = p.wait_offsets(40, Duration::from_secs(30)).await;
    assert!(
        seen.iter().any(|b| b.len() > 3),
        "batches of up to 20 before the update: {:?}",
        seen.iter().map(Vec::len).collect::<Vec<_>>()
    );
    p.change(&uuid, |c| c.batch_size = 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = p.seen().len();
    let second: Vec<(String, Value)> = (40..70)
        .map(|i| (format!("k{i}"), json!({ "i": i })))
        .collect();
    produce(&topic, &second).await;
    let seen = p.wait_offsets(70, Duration::from_secs(30)).await;
    let after: Vec<usize> = seen[before..].iter().map(Vec::len).collect();
    assert!(
        !after.is_empty() && after.iter().all(|n| *n <= 3),
        "batches after the update: {after:?}"
    );
    let distinct: std::collections::HashSet<i64> =
        seen.iter().flatten().map(|(_, o, _)| *o).collect();
    assert_eq!(distinct.len(), 70, "nothing skipped across the restart");
}

/// End to end: a real node, the API, a jailed `lambda_runtime` function; a poison record lands in
/// the failure topic while its neighbours are processed and committed.
#[tokio::test]
async fn a_node_runs_a_mapping_end_to_end() {
    let redis = RedisServer::start();
    let prefix = unique_name("e2e").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &["--lease-ttl", "3s"]);
    let bundle = Bundle::of("fn-stream");
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/2015-03-31/functions", node.endpoint))
        .json(&json!({ "FunctionName": "consumer", "Code": { "Path": bundle.path() } }))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let topic = unique_name("events");
    let failed = unique_name("events-failed");
    create_topic(&topic, 2).await.expect("topic");
    let r = http
        .post(format!("{}/2015-03-31/event-source-mappings/", node.endpoint))
        .json(&json!({
            "FunctionName": "consumer", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 10,
            "MaximumBatchingWindowInSeconds": 1, "BisectBatchOnFunctionError": true, "MaximumRetryAttempts": 1,
            "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } },
            "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } }
        }))
        .send()
        .await
        .expect("create mapping");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let m: Value = r.json().await.expect("json");
    assert_eq!(m["State"], "Creating");
    let uuid = m["UUID"].as_str().expect("uuid").to_owned();
    let mut recs: Vec<(String, Value)> = (0..30)
        .map(|i| (format!("k{i}"), json!({ "i": i })))
        .collect();
    recs[17].1 = json!({ "i": 17, "poison": true });
    produce(&topic, &recs).await;
    let fails = read_until(&failed, Duration::from_secs(90), |r| !r.is_empty()).await;
    assert_eq!(fails.len(), 1);
    assert_eq!(fails[0].0, "k17");
    let got: Value = http
        .get(format!(
            "{}/2015-03-31/event-source-mappings/{uuid}",
            node.endpoint
        ))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(got["State"], "Enabled");
    assert_eq!(got["Topics"][0], topic.as_str());
    let list: Value = http
        .get(format!(
            "{}/2015-03-31/event-source-mappings/?FunctionName=consumer",
            node.endpoint
        ))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list["EventSourceMappings"].as_array().map(Vec::len),
        Some(1)
    );
    // Create-only fields are refused on update; BatchSize is applied.
    let r = http
        .put(format!(
            "{}/2015-03-31/event-source-mappings/{uuid}",
            node.endpoint
        ))
        .json(&json!({ "StartingPosition": "LATEST" }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), 400);
    let r = http
        .put(format!(
            "{}/2015-03-31/event-source-mappings/{uuid}",
            node.endpoint
        ))
        .json(&json!({ "BatchSize": 5 }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), 202);
    let r = http
        .delete(format!(
            "{}/2015-03-31/event-source-mappings/{uuid}",
            node.endpoint
        ))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 202);
}

/// Three nodes share a mapping's partitions; one is SIGKILLed mid-stream. Its leases expire, the
/// others take its partitions over from the last commits, and every record is processed: the
/// mapping's consumer group ends at the end of every partition.
#[tokio::test]
async fn partitions_move_when_a_node_dies() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let redis = RedisServer::start();
    let prefix = unique_name("fleet").replace('-', "");
    let flags = ["--lease-ttl", "2s"];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start(
                &bootstrap(),
                &redis.url(),
                &prefix,
                &[&flags[..], &["--node-id", &format!("n{i}")]].concat(),
            )
        })
        .collect();
    let bundle = Bundle::of("fn-stream");
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/2015-03-31/functions", nodes[0].endpoint))
        .json(&json!({ "FunctionName": "consumer", "Code": { "Path": bundle.path() } }))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let topic = unique_name("fleet-events");
    create_topic(&topic, 6).await.expect("topic");
    let producer: FutureProducer = KafkaSettings::new(bootstrap())
        .durable_producer_config()
        .create()
        .expect("producer");
    for p in 0..6 {
        for i in 0..60 {
            let value = json!({ "i": i, "sleep_ms": 60 }).to_string();
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&format!("k{i}"))
                        .payload(&value)
                        .partition(p),
                    Duration::from_secs(30),
                )
                .await
                .expect("produce");
        }
    }
    let r = http
        .post(format!("{}/2015-03-31/event-source-mappings/", nodes[1].endpoint))
        .json(&json!({ "FunctionName": "consumer", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 5,
                       "MaximumBatchingWindowInSeconds": 0 }))
        .send()
        .await
        .expect("mapping");
    assert_eq!(r.status(), 202);
    let uuid = r.json::<Value>().await.expect("json")["UUID"]
        .as_str()
        .expect("uuid")
        .to_owned();
    tokio::time::sleep(Duration::from_secs(4)).await;
    nodes[2].kill();
    let started = std::time::Instant::now();
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &uuid)
        .create()
        .expect("consumer");
    let done = loop {
        let topic2 = topic.clone();
        let c = &consumer;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..6 {
            tpl.add_partition(&topic2, p);
        }
        let committed = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed");
        let at_end = committed
            .elements()
            .iter()
            .filter(|e| matches!(e.offset(), rdkafka::Offset::Offset(60)))
            .count();
        if at_end == 6 {
            break true;
        }
        if started.elapsed() > Duration::from_secs(90) {
            eprintln!(
                "committed: {:?}",
                committed
                    .elements()
                    .iter()
                    .map(|e| e.offset())
                    .collect::<Vec<_>>()
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(done, "every partition finished after a node died");
    let mut duplicates = 0.0;
    for n in &nodes[..2] {
        duplicates += n.metric("sluice_stream_duplicates_total", "").await;
    }
    eprintln!(
        "all partitions done {:?} after the SIGKILL; {duplicates} records redelivered (counted as duplicates)",
        started.elapsed()
    );
    drop(nodes);
}
