//! Sizes and spread on the way in and out ("Delivery I" item 3, "Pollers II" item 3, produce side):
//! a real `sluice node` on the real broker, Redis and jailed sandboxes.
//!
//! - An Event payload up to Lambda's 1 MiB gets 202 and is delivered (librdkafka's default
//!   1,000,000-byte message limit made 1,040,012 bytes a 500); one byte over gets 413.
//! - One function's events spread over every partition of the async queue.
//! - A destination record too large for the producer is delivered truncated (payloads replaced
//!   by a marker with their sizes and the source position) and counted; a record that cannot be
//!   made to fit ends the write with a permanent error instead of being retried forever.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::kafka::KafkaSettings;
use sluice_destinations::DestinationWriter;
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

struct Env {
    node: Node,
    http: reqwest::Client,
    prefix: String,
    _redis: RedisServer,
    bundle: Bundle,
}

async fn env(extra: &[&str]) -> Env {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let mut args = sluice_tests::node::FAST_RETRIES.to_vec();
    args.extend_from_slice(extra);
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &args);
    Env {
        node,
        http: reqwest::Client::new(),
        prefix,
        _redis: redis,
        bundle: Bundle::of("fn-misbehave"),
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.node.endpoint)
    }

    async fn create(&self, name: &str) {
        let body =
            json!({ "FunctionName": name, "Code": { "Path": self.bundle.path() }, "Timeout": 10 });
        let r = self
            .http
            .post(self.url("/2015-03-31/functions"))
            .json(&body)
            .send()
            .await
            .expect("create");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    async fn on_success(&self, name: &str) -> String {
        let ok = format!("{}-ok-{name}", self.prefix);
        let r = self
            .http
            .put(self.url(&format!("/2019-09-25/functions/{name}/event-invoke-config")))
            .json(&json!({
                "MaximumRetryAttempts": 0,
                "DestinationConfig": { "OnSuccess": { "Destination": format!("kafka://{ok}") } },
            }))
            .send()
            .await
            .expect("eic");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{}",
            r.text().await.unwrap_or_default()
        );
        ok
    }

    async fn event(&self, name: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/2015-03-31/functions/{name}/invocations")))
            .header("X-Amz-Invocation-Type", "Event")
            .body(body)
            .send()
            .await
            .expect("invoke")
    }
}

/// A JSON event for fn-misbehave (`echo`) of exactly `len` bytes.
fn padded_event(len: usize) -> Vec<u8> {
    let shell = json!({ "action": "echo", "pad": "" }).to_string();
    let pad = "x".repeat(len - shell.len());
    let body = json!({ "action": "echo", "pad": pad })
        .to_string()
        .into_bytes();
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn an_event_just_under_one_mib_is_accepted_and_delivered_and_one_byte_over_is_413() {
    let e = env(&[]).await;
    e.create("big").await;
    let ok = e.on_success("big").await;
    let r = e.event("big", padded_event(1_040_012)).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let r = e.event("big", padded_event(1_048_576)).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let r = e.event("big", padded_event(1_048_577)).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let got = read_until(&ok, Duration::from_secs(90), |r| r.len() >= 2).await;
    assert_eq!(
        got.len(),
        2,
        "both accepted events reach the on-success destination"
    );
    let mut sizes: Vec<usize> = got
        .iter()
        .map(|(_, v)| {
            let rec: Value = serde_json::from_slice(v).expect("record");
            assert_eq!(rec["requestContext"]["condition"], "Success");
            rec["responsePayload"]["pad"]
                .as_str()
                .expect("echoed pad")
                .len()
        })
        .collect();
    sizes.sort_unstable();
    let shell = json!({ "action": "echo", "pad": "" }).to_string().len();
    assert_eq!(sizes, [1_040_012 - shell, 1_048_576 - shell]);
}

#[tokio::test]
async fn one_functions_events_spread_over_every_queue_partition() {
    let e = env(&[]).await;
    e.create("hot").await;
    for i in 0..64 {
        let r = e
            .event("hot", json!({ "i": i }).to_string().into_bytes())
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let queue = format!("{}.async", e.prefix);
    let partitions = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let md = consumer
            .fetch_metadata(Some(&queue), Duration::from_secs(10))
            .expect("metadata");
        let count = md.topics()[0].partitions().len();
        let mut tpl = TopicPartitionList::new();
        for p in 0..count {
            tpl.add_partition_offset(&queue, i32::try_from(p).expect("few"), Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&tpl).expect("assign");
        let mut seen = HashSet::new();
        let mut n = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while n < 64 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                seen.insert(m.partition());
                n += 1;
            }
        }
        assert_eq!(n, 64, "every accepted event is on the queue");
        (seen.len(), count)
    })
    .await
    .expect("reader");
    assert!(
        partitions.1 > 1,
        "the queue has {} partitions",
        partitions.1
    );
    assert!(
        partitions.0 * 2 > partitions.1,
        "64 events of one function landed on {} of {} partitions",
        partitions.0,
        partitions.1
    );
}

#[tokio::test]
async fn a_destination_record_too_large_for_the_producer_is_truncated_counted_and_delivered() {
    let e = env(&["--kafka-property", "message.max.bytes=1500000"]).await;
    e.create("wide").await;
    let ok = e.on_success("wide").await;
    // 900 kB in, echoed back: the on-success record holds both (~1.8 MB > 1.5 MB).
    let r = e.event("wide", padded_event(900_000)).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let got = read_until(&ok, Duration::from_secs(60), |r| !r.is_empty()).await;
    assert_eq!(got.len(), 1, "the record is delivered");
    let rec: Value = serde_json::from_slice(&got[0].1).expect("record");
    assert_eq!(rec["requestContext"]["condition"], "Success");
    for field in ["requestPayload", "responsePayload"] {
        let m = &rec[field]["sluiceTruncated"];
        assert!(
            m["bytes"].as_u64().expect("size") >= 900_000,
            "{field}: {m}"
        );
        assert_eq!(m["source"]["requestId"], rec["requestContext"]["requestId"]);
    }
    assert!(
        e.node
            .metric("sluice_destination_records_truncated_total", "")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_permanent_destination_error_ends_the_write_instead_of_retrying_forever() {
    let mut kafka = KafkaSettings::new(bootstrap());
    kafka
        .properties
        .push(("message.max.bytes".into(), "2000".into()));
    let producer: FutureProducer = kafka.durable_producer_config().create().expect("producer");
    let writer = DestinationWriter::new(kafka, producer, 1);
    let topic = unique_name("dest");
    // Fits once its payload is replaced by the marker: delivered, truncated.
    let record =
        json!({ "requestContext": { "requestId": "r-1" }, "requestPayload": "y".repeat(5000) });
    let d = tokio::time::timeout(
        Duration::from_secs(60),
        writer.deliver(&topic, "k", record.to_string().as_bytes(), &[]),
    )
    .await
    .expect("a too-large record is truncated, not retried")
    .expect("delivered");
    assert!(d.truncated);
    let got = read_until(&topic, Duration::from_secs(30), |r| !r.is_empty()).await;
    let back: Value = serde_json::from_slice(&got[0].1).expect("json");
    assert!(back["requestPayload"]["sluiceTruncated"]["bytes"].as_u64() > Some(5000));
    // Too large even truncated (the envelope itself): a permanent error, returned at once.
    let envelope = json!({ "requestContext": { "requestId": "z".repeat(5000) } });
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        writer.deliver(&topic, "k", envelope.to_string().as_bytes(), &[]),
    )
    .await
    .expect("a permanent error is not retried forever")
    .expect_err("cannot fit");
    assert!(!err.is_retryable(), "{err}");
    // The compatible `write` returns too (it logs and counts), so a caller's commit point moves.
    let at = tokio::time::timeout(
        Duration::from_secs(60),
        writer.write(&topic, "k", envelope.to_string().as_bytes(), &[]),
    )
    .await
    .expect("write returns");
    assert_eq!(at, (-1, -1));
}
