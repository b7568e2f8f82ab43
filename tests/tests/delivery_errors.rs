//! User-caused failures count as attempts ("Delivery I" item 5): a real `sluice node` on the real
//! broker, Redis and jailed sandboxes. An init that never finishes, or a `Code.Path` with no
//! bootstrap, is a function error (as Lambda counts it) on every path: sync invoke, async
//! retries and destinations, and a mapping's MaximumRetryAttempts and on-failure destination.
//! Before, the worker reported them as retryable service errors: a mapping retried forever, the
//! async poller backed off as from a throttle for 6 hours.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::kafka::KafkaSettings;
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

struct Env {
    node: Node,
    http: reqwest::Client,
    prefix: String,
    _redis: RedisServer,
    bundle: Bundle,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        sluice_tests::node::FAST_RETRIES,
    );
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

    /// A function whose init sleeps an hour (past the node's 10 s init timeout).
    async fn create_hanging_init(&self, name: &str) {
        let body = json!({
            "FunctionName": name, "Code": { "Path": self.bundle.path() }, "Timeout": 5,
            "Environment": { "Variables": { "INIT_SLEEP_MS": "3600000" } },
        });
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
}

fn records(raw: &[(String, Vec<u8>)]) -> Vec<Value> {
    raw.iter()
        .map(|(_, v)| serde_json::from_slice(v).expect("record JSON"))
        .collect()
}

#[tokio::test]
async fn an_init_that_never_finishes_is_a_function_error_on_sync_and_async() {
    let e = env().await;
    e.create_hanging_init("sleepy").await;
    let failed = format!("{}-failed", e.prefix);
    let r = e
        .http
        .put(e.url("/2019-09-25/functions/sleepy/event-invoke-config"))
        .json(&json!({
            "MaximumRetryAttempts": 1,
            "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } },
        }))
        .send()
        .await
        .expect("eic");
    assert_eq!(r.status(), StatusCode::OK);
    // Sync: 200 with the function error, not a 5xx.
    let r = e
        .http
        .post(e.url("/2015-03-31/functions/sleepy/invocations"))
        .body("{}")
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get("x-amz-function-error")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("Unhandled")
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorType"], "Sandbox.Timedout", "{body}");
    // Async: two attempts (MaximumRetryAttempts 1), then the on-failure record.
    let r = e
        .http
        .post(e.url("/2015-03-31/functions/sleepy/invocations"))
        .header("X-Amz-Invocation-Type", "Event")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .expect("event");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let got = records(&read_until(&failed, Duration::from_secs(90), |r| !r.is_empty()).await);
    assert_eq!(got.len(), 1, "the event reaches the on-failure destination");
    assert_eq!(got[0]["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(got[0]["requestContext"]["approximateInvokeCount"], 2);
    assert_eq!(got[0]["responsePayload"]["errorType"], "Sandbox.Timedout");
}

#[tokio::test]
async fn a_mapping_whose_function_never_finishes_init_honours_maximum_retry_attempts() {
    let e = env().await;
    e.create_hanging_init("sleepy").await;
    let topic = unique_name("events");
    let failed = unique_name("events-failed");
    create_topic(&topic, 1).await.expect("topic");
    let r = e
        .http
        .post(e.url("/2015-03-31/event-source-mappings/"))
        .json(&json!({
            "FunctionName": "sleepy", "Topics": [topic], "StartingPosition": "TRIM_HORIZON",
            "BatchSize": 10, "MaximumRetryAttempts": 1,
            "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } },
            "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } }
        }))
        .send()
        .await
        .expect("create mapping");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let producer: FutureProducer = KafkaSettings::new(bootstrap())
        .durable_producer_config()
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&topic)
                .key("k1")
                .payload(r#"{"n":1}"#)
                .partition(0),
            Duration::from_secs(30),
        )
        .await
        .expect("produce");
    let got = records(&read_until(&failed, Duration::from_secs(120), |r| !r.is_empty()).await);
    assert_eq!(
        got.len(),
        1,
        "the record reaches the on-failure destination"
    );
    assert_eq!(
        got[0]["responsePayload"]["errorType"], "Sandbox.Timedout",
        "{}",
        got[0]
    );
    let invokes = got[0]["requestContext"]["approximateInvokeCount"].as_u64();
    assert!(matches!(invokes, Some(1..=2)), "{}", got[0]);
}

#[tokio::test]
async fn a_code_path_without_bootstrap_is_a_function_error() {
    let e = env().await;
    // The API checks the bundle at create; the worker finds it gone later.
    let bundle = Bundle::of("fn-echo");
    let r = e
        .http
        .post(e.url("/2015-03-31/functions"))
        .json(&json!({ "FunctionName": "nocode", "Code": { "Path": bundle.path() } }))
        .send()
        .await
        .expect("create");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    std::fs::remove_file(bundle.path().join("bootstrap")).expect("rm bootstrap");
    let r = e
        .http
        .post(e.url("/2015-03-31/functions/nocode/invocations"))
        .body("{}")
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get("x-amz-function-error")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("Unhandled")
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorType"], "Runtime.InvalidEntrypoint", "{body}");
}
