//! The configuration store on a compacted log: a node started on a topic that holds only the last
//! record of each key (what Kafka's log cleaner leaves) sees exactly what the running nodes see,
//! and a record that lost a race can never shadow the winner.
//!
//! tansu does not run a log cleaner, so the test compacts by hand, as Kafka would: it copies the
//! config topic keeping only the last record of each key and dropping keys whose last record is a
//! tombstone (what remains once `delete.retention.ms` has passed), in log order, to the config
//! topic of a second node.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

async fn send(
    http: &reqwest::Client,
    req: reqwest::RequestBuilder,
    want: u16,
    what: &str,
) -> Value {
    let _ = http;
    let r = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// The end offset of partition 0 of `topic` (the config topic has one partition).
async fn end_offset(topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .expect("consumer");
        let (_, high) = c
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        usize::try_from(high).expect("offset")
    })
    .await
    .expect("watermarks task")
}

/// Every record of `topic` in log order, up to its end offset now; `None` payloads are
/// tombstones.
async fn records(topic: &str) -> Vec<(String, Option<Vec<u8>>)> {
    let end = end_offset(topic).await;
    read_until(topic, Duration::from_secs(20), move |got| got.len() >= end)
        .await
        .into_iter()
        .map(|(k, v)| (k, if v.is_empty() { None } else { Some(v) }))
        .collect()
}

/// What Kafka's log cleaner leaves of `log`: the last record of each key, in log order, minus
/// keys whose last record is a tombstone.
fn compact(log: &[(String, Option<Vec<u8>>)]) -> Vec<(String, Vec<u8>)> {
    let last: HashMap<&str, usize> = log
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_str(), i))
        .collect();
    log.iter()
        .enumerate()
        .filter(|(i, (k, _))| last[k.as_str()] == *i)
        .filter_map(|(_, (k, v))| Some((k.clone(), v.clone()?)))
        .collect()
}

/// The object a record key names: `<kind>/<name>` (whatever follows, e.g. a write id, dropped).
fn object_of(key: &str) -> String {
    key.splitn(3, '/').take(2).collect::<Vec<_>>().join("/")
}

/// The objects of a List* answer (`list[array]`), by `id`, keeping only `fields`: what two nodes
/// with the same configuration must agree on.
fn by_id(list: &Value, array: &str, id: &str, fields: &[&str]) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = list[array]
        .as_array()
        .unwrap_or_else(|| panic!("{array} in {list}"))
        .iter()
        .map(|o| {
            let kept: serde_json::Map<String, Value> = fields
                .iter()
                .map(|f| ((*f).to_owned(), o[*f].clone()))
                .collect();
            (o[id].as_str().expect("id").to_owned(), Value::Object(kept))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn functions_by_name(list: &Value) -> Vec<(String, Value)> {
    by_id(
        list,
        "Functions",
        "FunctionName",
        &["MemorySize", "Timeout", "RevisionId", "LastModified"],
    )
}

fn mappings_by_uuid(list: &Value) -> Vec<(String, Value)> {
    by_id(
        list,
        "EventSourceMappings",
        "UUID",
        &["BatchSize", "FunctionArn", "Topics", "State"],
    )
}

#[tokio::test]
async fn a_node_started_on_a_compacted_config_log_sees_what_the_others_see() {
    let redis = RedisServer::start();
    let prefix_a = unique_name("cmpa").replace('-', "");
    let a = Node::start(&bootstrap(), &redis.url(), &prefix_a, &[]);
    let bundle = Bundle::of("fn-echo");
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", a.endpoint);

    // once: never updated. upd: updated twice. gone: created and deleted. Plus an event-invoke
    // config updated once and a mapping (which the tracker moves to Enabled: revision 2+).
    for name in ["once", "upd", "gone"] {
        send(
            &http,
            http.post(&fns)
                .json(&json!({ "FunctionName": name, "Code": { "Path": bundle.path() } })),
            201,
            "create function",
        )
        .await;
    }
    for memory in [256, 512] {
        send(
            &http,
            http.put(format!("{fns}/upd/configuration"))
                .json(&json!({ "MemorySize": memory })),
            200,
            "update function",
        )
        .await;
    }
    send(&http, http.delete(format!("{fns}/gone")), 204, "delete").await;
    let eic = format!(
        "{}/2019-09-25/functions/upd/event-invoke-config",
        a.endpoint
    );
    send(
        &http,
        http.put(&eic).json(&json!({ "MaximumRetryAttempts": 1 })),
        200,
        "put eic",
    )
    .await;
    send(
        &http,
        http.post(&eic)
            .json(&json!({ "MaximumEventAgeInSeconds": 120 })),
        200,
        "update eic",
    )
    .await;
    let topic = unique_name("cmp-events");
    create_topic(&topic, 1).await.expect("topic");
    let m = send(
        &http,
        http.post(format!("{}/2015-03-31/event-source-mappings/", a.endpoint))
            .json(&json!({ "FunctionName": "once", "Topics": [topic], "StartingPosition": "TRIM_HORIZON",
                           "BatchSize": 7,
                           "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } } })),
        202,
        "create mapping",
    )
    .await;
    let uuid = m["UUID"].as_str().expect("uuid").to_owned();
    let mapping_url = format!("{}/2015-03-31/event-source-mappings/{uuid}", a.endpoint);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = send(&http, http.get(&mapping_url), 200, "get mapping").await;
        if m["State"] == "Enabled" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mapping never Enabled: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A record that lost a race and reached the log anyway (a writer past its lock's TTL): the
    // create of `upd` again, based on revision 0, written after the winners, keyed as the store
    // keys its own writes.
    let config_a = format!("{prefix_a}.config");
    let log = records(&config_a).await;
    let (create_key, create) = log
        .iter()
        .find(|(k, v)| {
            object_of(k) == "function/upd"
                && v.as_ref().is_some_and(|v| {
                    serde_json::from_slice::<Value>(v).expect("record")["baseRevision"] == 0
                })
        })
        .cloned()
        .expect("the create of upd");
    let mut loser: Value = serde_json::from_slice(&create.expect("payload")).expect("record");
    let old_id = loser["writeId"].as_str().expect("writeId").to_owned();
    let new_id = uuid::Uuid::new_v4().to_string();
    loser["writeId"] = json!(new_id);
    loser["object"]["Spec"]["MemorySize"] = json!(999);
    let loser_key = create_key.replace(&old_id, &new_id);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&config_a)
                .key(&loser_key)
                .payload(&loser.to_string()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the losing record");

    // The running node refuses the loser.
    let before = send(&http, http.get(&fns), 200, "list on a").await;
    let upd = send(
        &http,
        http.get(format!("{fns}/upd/configuration")),
        200,
        "get upd",
    )
    .await;
    assert_eq!(
        upd["MemorySize"], 512,
        "the live node applied a losing record"
    );

    // Compact A's log into B's config topic and start B on it.
    let log = records(&config_a).await;
    let compacted = compact(&log);
    let upd_records = compacted
        .iter()
        .filter(|(k, _)| object_of(k) == "function/upd")
        .count();
    let prefix_b = unique_name("cmpb").replace('-', "");
    let config_b = format!("{prefix_b}.config");
    create_topic(&config_b, 1).await.expect("config topic of b");
    for (k, v) in &compacted {
        producer
            .send(
                FutureRecord::to(&config_b).key(k).payload(v),
                Duration::from_secs(10),
            )
            .await
            .expect("copy");
    }
    let b = Node::start(&bootstrap(), &redis.url(), &prefix_b, &[]);
    let fns_b = format!("{}/2015-03-31/functions", b.endpoint);
    let after = send(&http, http.get(&fns_b), 200, "list on b").await;
    assert_eq!(
        functions_by_name(&after),
        functions_by_name(&before),
        "functions on the compacted log ({} of {} records kept) differ",
        compacted.len(),
        log.len()
    );
    let names: Vec<String> = functions_by_name(&after).into_iter().map(|f| f.0).collect();
    assert_eq!(names, ["once", "upd"]);
    let mappings_a = send(
        &http,
        http.get(format!("{}/2015-03-31/event-source-mappings/", a.endpoint)),
        200,
        "mappings a",
    )
    .await;
    let mappings_b = send(
        &http,
        http.get(format!("{}/2015-03-31/event-source-mappings/", b.endpoint)),
        200,
        "mappings b",
    )
    .await;
    assert_eq!(mappings_by_uuid(&mappings_b), mappings_by_uuid(&mappings_a));
    assert_eq!(mappings_by_uuid(&mappings_b).len(), 1);
    let eic_b = format!(
        "{}/2019-09-25/functions/upd/event-invoke-config",
        b.endpoint
    );
    let got = send(&http, http.get(&eic_b), 200, "eic on b").await;
    assert_eq!(got["MaximumRetryAttempts"], 1);
    assert_eq!(got["MaximumEventAgeInSeconds"], 120);
    // B runs the updated function, and accepts its async events.
    send(
        &http,
        http.post(format!("{fns_b}/upd/invocations")).body("{}"),
        200,
        "invoke upd on b",
    )
    .await;
    // Superseded revisions are tombstoned by their successors: of `upd` only the winner and the
    // injected loser (which no later write superseded) survive compaction.
    assert_eq!(
        upd_records, 2,
        "records of function/upd left after compaction: {upd_records}"
    );
}

/// A rolling upgrade: a newer node writes a record with a field this node does not know; this
/// node still applies it (its view never splits from the newer nodes'), while users keep getting
/// 400 for unknown fields.
#[tokio::test]
async fn a_record_from_a_newer_node_is_applied_and_user_input_stays_strict() {
    let redis = RedisServer::start();
    let prefix = unique_name("fwd").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = Bundle::of("fn-echo");
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", node.endpoint);
    let refused = send(
        &http,
        http.post(&fns).json(
            &json!({ "FunctionName": "x", "Code": { "Path": bundle.path() },
                                       "SnapStart": { "ApplyOn": "None" } }),
        ),
        400,
        "create with an unknown field",
    )
    .await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("SnapStart"),
        "{refused}"
    );
    send(
        &http,
        http.post(&fns)
            .json(&json!({ "FunctionName": "base", "Code": { "Path": bundle.path() } })),
        201,
        "create base",
    )
    .await;
    // The newer node's record: this node's own record of `base`, renamed, with fields added at
    // the top level and inside nested objects.
    let topic = format!("{prefix}.config");
    let log = records(&topic).await;
    let (_, payload) = log
        .iter()
        .find(|(k, _)| object_of(k) == "function/base")
        .cloned()
        .expect("record of base");
    let mut record: Value = serde_json::from_slice(&payload.expect("payload")).expect("record");
    let write_id = uuid::Uuid::new_v4().to_string();
    record["writeId"] = json!(write_id);
    record["writer"] = json!("a-newer-node");
    record["object"]["Spec"]["FunctionName"] = json!("newer");
    record["object"]["Spec"]["SnapStart"] = json!({ "ApplyOn": "PublishedVersions" });
    record["object"]["Spec"]["Code"]["SourceKMSKeyArn"] = json!("arn:aws:kms:x");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&format!("function/newer/{write_id}"))
                .payload(&record.to_string()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .get(format!("{fns}/newer/configuration"))
            .send()
            .await
            .expect("get");
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never applied the newer node's record of `newer`"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send(
        &http,
        http.post(format!("{fns}/newer/invocations")).body("{}"),
        200,
        "invoke newer",
    )
    .await;
}
