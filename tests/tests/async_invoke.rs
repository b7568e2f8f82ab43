//! Asynchronous invocation end to end: a real `sluice node` process on the real broker, Redis and
//! jailed sandboxes, driven through the Lambda-compatible API.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

struct Env {
    node: Node,
    http: reqwest::Client,
    prefix: String,
    _redis: RedisServer,
    _bundle: Bundle,
}

async fn env(extra: &[&str]) -> Env {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let mut args = sluice_tests::node::FAST_RETRIES.to_vec();
    args.extend_from_slice(extra);
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &args);
    let bundle = Bundle::of("fn-misbehave");
    Env {
        node,
        http: reqwest::Client::new(),
        prefix,
        _redis: redis,
        _bundle: bundle,
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.node.endpoint)
    }

    async fn create(&self, name: &str, extra: Value) {
        let mut body =
            json!({ "FunctionName": name, "Code": { "Path": self._bundle.path() }, "Timeout": 5 });
        if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
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

    async fn destinations(&self, name: &str, retries: u32) -> (String, String) {
        let ok = format!("{}-ok-{name}", self.prefix);
        let failed = format!("{}-failed-{name}", self.prefix);
        let r = self
            .http
            .put(self.url(&format!("/2019-09-25/functions/{name}/event-invoke-config")))
            .json(&json!({
                "MaximumRetryAttempts": retries,
                "DestinationConfig": {
                    "OnSuccess": { "Destination": format!("kafka://{ok}") },
                    "OnFailure": { "Destination": format!("kafka://{failed}") },
                },
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
        (ok, failed)
    }

    async fn invoke(&self, name: &str, kind: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/2015-03-31/functions/{name}/invocations")))
            .header("X-Amz-Invocation-Type", kind)
            .body(body)
            .send()
            .await
            .expect("invoke")
    }

    async fn event(&self, name: &str, payload: Value) -> String {
        let r = self
            .invoke(name, "Event", payload.to_string().into_bytes())
            .await;
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap_or_default()
        );
        r.headers()
            .get("x-amzn-RequestId")
            .and_then(|v| v.to_str().ok())
            .expect("request id")
            .to_owned()
    }
}

fn records(raw: &[(String, Vec<u8>)]) -> Vec<Value> {
    raw.iter()
        .map(|(_, v)| serde_json::from_slice(v).expect("record JSON"))
        .collect()
}

async fn wait_records(topic: &str, n: usize, timeout: Duration) -> Vec<Value> {
    records(&read_until(topic, timeout, move |r| r.len() >= n).await)
}

#[tokio::test]
async fn success_writes_the_on_success_record() {
    let e = env(&[]).await;
    e.create("ok", json!({})).await;
    let (ok, failed) = e.destinations("ok", 2).await;
    let id = e
        .event("ok", json!({ "action": "echo", "order": 42 }))
        .await;
    let recs = wait_records(&ok, 1, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["requestContext"]["requestId"], id.as_str());
    assert_eq!(r["requestContext"]["condition"], "Success");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(
        r["requestContext"]["functionArn"],
        "arn:aws:lambda:us-east-1:000000000000:function:ok:$LATEST"
    );
    assert_eq!(r["requestPayload"]["order"], 42);
    assert_eq!(r["responseContext"]["statusCode"], 200);
    assert_eq!(r["responsePayload"]["order"], 42);
    assert_eq!(r["version"], "1.0");
    assert!(read_until(&failed, Duration::from_secs(1), |_| false)
        .await
        .is_empty());
}

#[tokio::test]
async fn a_failing_function_gets_one_plus_retries_attempts_then_one_failure_record() {
    let e = env(&[]).await;
    e.create("bad", json!({})).await;
    let (_, failed) = e.destinations("bad", 2).await;
    let id = e.event("bad", json!({ "action": "error" })).await;
    let recs = wait_records(&failed, 1, Duration::from_secs(40)).await;
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r["requestContext"]["requestId"], id.as_str());
    assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(r["responseContext"]["functionError"], "Unhandled");
    assert_eq!(
        r["responsePayload"]["errorMessage"],
        "the function failed on purpose"
    );
    // Exactly three invocations, and no more records arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        e.node
            .metric("sluice_invocations_total", "function=\"bad\"")
            .await,
        3.0
    );
    assert_eq!(
        wait_records(&failed, 2, Duration::from_secs(2)).await.len(),
        1
    );
}

#[tokio::test]
async fn an_event_older_than_its_maximum_age_goes_to_on_failure_without_running() {
    let e = env(&[]).await;
    e.create("old", json!({})).await;
    let (_, failed) = e.destinations("old", 2).await;
    let r = e
        .http
        .post(e.url("/2019-09-25/functions/old/event-invoke-config"))
        .json(&json!({ "MaximumEventAgeInSeconds": 60 }))
        .send()
        .await
        .expect("update eic");
    assert_eq!(r.status(), StatusCode::OK);
    // An event that waited two minutes in the queue (a backlog): written as the front end would.
    let producer = sluice_core::events::EventProducer::new(
        &sluice_core::kafka::KafkaSettings::new(bootstrap()),
    )
    .expect("producer");
    let mut event = sluice_core::events::AsyncEvent::new(
        "old",
        "old-request",
        br#"{"action":"echo"}"#.to_vec(),
    );
    event.enqueued_ms -= 120_000;
    producer
        .send(&format!("{}.async", e.prefix), &event)
        .await
        .expect("produce");
    let recs = wait_records(&failed, 1, Duration::from_secs(30)).await;
    assert_eq!(recs[0]["requestContext"]["condition"], "EventAgeExceeded");
    assert_eq!(recs[0]["requestContext"]["approximateInvokeCount"], 0);
    assert!(recs[0].get("responseContext").is_none());
    assert_eq!(
        e.node
            .metric("sluice_invocations_total", "function=\"old\"")
            .await,
        0.0
    );
}

#[tokio::test]
async fn reserved_concurrency_zero_goes_straight_to_on_failure_and_throttles_sync() {
    let e = env(&[]).await;
    e.create("zero", json!({ "ReservedConcurrentExecutions": 0 }))
        .await;
    let (_, failed) = e.destinations("zero", 2).await;
    e.event("zero", json!({ "action": "echo" })).await;
    let recs = wait_records(&failed, 1, Duration::from_secs(30)).await;
    assert_eq!(
        recs[0]["requestContext"]["condition"],
        "ZeroReservedConcurrency"
    );
    assert_eq!(recs[0]["requestContext"]["approximateInvokeCount"], 0);
    let r = e.invoke("zero", "RequestResponse", b"{}".to_vec()).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["x-amzn-ErrorType"], "TooManyRequestsException");
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("ReservedFunctionConcurrentInvocationLimitExceeded"));
}

#[tokio::test]
async fn throttled_events_back_off_and_all_run() {
    let e = env(&[]).await;
    e.create("narrow", json!({ "ReservedConcurrentExecutions": 1 }))
        .await;
    let (ok, _) = e.destinations("narrow", 0).await;
    let mut ids = HashSet::new();
    for i in 0..6 {
        ids.insert(
            e.event("narrow", json!({ "action": "sleep", "ms": 300, "i": i }))
                .await,
        );
    }
    let recs = wait_records(&ok, 6, Duration::from_secs(60)).await;
    let got: HashSet<String> = recs
        .iter()
        .map(|r| {
            r["requestContext"]["requestId"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(got, ids);
    assert!(
        recs.iter()
            .all(|r| r["requestContext"]["approximateInvokeCount"] == 1),
        "throttles are not attempts"
    );
    assert!(
        e.node
            .metric("sluice_throttles_total", "function=\"narrow\"")
            .await
            > 0.0,
        "nothing was throttled"
    );
}

#[tokio::test]
async fn bad_requests_get_lambdas_errors() {
    let e = env(&[]).await;
    e.create("f", json!({})).await;
    let big = vec![b'1'; 1024 * 1024 + 1];
    let r = e.invoke("f", "Event", big).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["x-amzn-ErrorType"], "RequestTooLargeException");
    let r = e
        .invoke("f", "RequestResponse", vec![b'1'; 6 * 1024 * 1024 + 1])
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = e.invoke("nope", "Event", b"{}".to_vec()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-amzn-ErrorType"], "ResourceNotFoundException");
    let r = e.invoke("f", "Event", b"{not json".to_vec()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.headers()["x-amzn-ErrorType"],
        "InvalidRequestContentException"
    );
    let r = e.invoke("f", "Sideways", b"{}".to_vec()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = e.invoke("f", "DryRun", b"{}".to_vec()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Synchronous: the payload, or the error with X-Amz-Function-Error.
    let r = e
        .invoke(
            "f",
            "RequestResponse",
            br#"{"action":"echo","v":7}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json")["v"], 7);
    let r = e
        .invoke("f", "RequestResponse", br#"{"action":"exit"}"#.to_vec())
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-amz-function-error"], "Unhandled");
    assert_eq!(
        r.json::<Value>().await.expect("json")["errorType"],
        "Runtime.ExitError"
    );
    // A stale RevisionId is refused with 412.
    let r = e
        .http
        .put(e.url("/2015-03-31/functions/f/configuration"))
        .json(&json!({ "MemorySize": 256, "RevisionId": "99" }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = e
        .http
        .put(e.url("/2015-03-31/functions/f/configuration"))
        .json(&json!({ "MemorySize": 64 }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("MemorySize must be 128..=10240, got 64"));
}

/// Events acknowledged with 202 survive a SIGKILL of the node: after a restart every one of them
/// is invoked (duplicates allowed, counted) and reaches its destination.
#[tokio::test]
async fn acknowledged_events_survive_a_sigkill() {
    let mut e = env(&[]).await;
    e.create("durable", json!({})).await;
    let (ok, _) = e.destinations("durable", 2).await;
    let mut ids = HashSet::new();
    for i in 0..60 {
        ids.insert(
            e.event("durable", json!({ "action": "sleep", "ms": 300, "i": i }))
                .await,
        );
    }
    // Kill it mid-stream: some events done, others running or waiting.
    let done_before = wait_records(&ok, 5, Duration::from_secs(30)).await.len();
    assert!(
        (5..60).contains(&done_before),
        "{done_before} done before the kill"
    );
    e.node.kill();
    e.node.restart();
    let want = ids.clone();
    let raw = read_until(&ok, Duration::from_secs(90), move |r| {
        let got: HashSet<String> = r
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice::<Value>(v).ok())
            .filter_map(|v| v["requestContext"]["requestId"].as_str().map(str::to_owned))
            .collect();
        want.is_subset(&got)
    })
    .await;
    let got: Vec<String> = records(&raw)
        .iter()
        .map(|r| {
            r["requestContext"]["requestId"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let unique: HashSet<String> = got.iter().cloned().collect();
    let missing: Vec<&String> = ids.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "lost {} acknowledged events: {missing:?}",
        missing.len()
    );
    eprintln!(
        "{} records for {} events ({done_before} before the SIGKILL, {} duplicates)",
        got.len(),
        ids.len(),
        got.len() - unique.len()
    );
}

/// A poller on another node than the front end reads the queue and the configuration through
/// separate consumers, so an event can reach it before the function's record does: it must catch
/// its view up with the log before it drops the event as FunctionDeleted. The poller's view is
/// made to lag by 3 s (`--fault-config-view-lag-ms`), so every event here reaches it before its
/// function does; without the catch-up every one of them is dropped.
#[tokio::test]
async fn a_poller_whose_view_lags_catches_up_instead_of_dropping_a_new_functions_event() {
    let redis = RedisServer::start();
    let prefix = unique_name("lag").replace('-', "");
    let mut front_args = sluice_tests::node::FAST_RETRIES.to_vec();
    let front_id = format!("{prefix}-front");
    front_args.extend(["--roles", "frontend", "--node-id", &front_id]);
    let front = Node::start(&bootstrap(), &redis.url(), &prefix, &front_args);
    let mut poller_args = sluice_tests::node::FAST_RETRIES.to_vec();
    let poller_id = format!("{prefix}-poller");
    poller_args.extend([
        "--roles",
        "poller,worker",
        "--node-id",
        &poller_id,
        "--fault-config-view-lag-ms",
        "3000",
    ]);
    let poller = Node::start(&bootstrap(), &redis.url(), &prefix, &poller_args);
    let bundle = Bundle::of("fn-echo");
    let http = reqwest::Client::new();
    let ok = format!("{prefix}-ok");
    let n = 10;
    for i in 0..n {
        let name = format!("new{i}");
        let r = http
            .post(format!("{}/2015-03-31/functions", front.endpoint))
            .json(&json!({ "FunctionName": name, "Code": { "Path": bundle.path() } }))
            .send()
            .await
            .expect("create");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap_or_default()
        );
        let r = http
            .put(format!("{}/2019-09-25/functions/{name}/event-invoke-config", front.endpoint))
            .json(&json!({ "DestinationConfig": { "OnSuccess": { "Destination": format!("kafka://{ok}") } } }))
            .send()
            .await
            .expect("eic");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{}",
            r.text().await.unwrap_or_default()
        );
        let r = http
            .post(format!(
                "{}/2015-03-31/functions/{name}/invocations",
                front.endpoint
            ))
            .header("X-Amz-Invocation-Type", "Event")
            .body(json!({ "i": i }).to_string())
            .send()
            .await
            .expect("invoke");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let got = read_until(&ok, Duration::from_secs(90), move |r| r.len() >= n).await;
    let dropped = poller
        .metric("sluice_async_events_dropped_total", "FunctionDeleted")
        .await;
    assert_eq!(
        dropped, 0.0,
        "events dropped as FunctionDeleted by the poller"
    );
    let mut seen: Vec<String> = records(&got)
        .iter()
        .filter_map(|r| {
            r["requestContext"]["functionArn"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        n,
        "on-success records of {} of {n} functions",
        seen.len()
    );
}

/// SIGTERM while events run: the node stops intake, lets the running invocations finish, commits,
/// releases its leases and deregisters, within the sum of its stages' deadlines (14 s); a node
/// started afterwards runs what was left. Every acknowledged event reaches its on-success
/// destination (at least once).
#[tokio::test]
async fn sigterm_under_load_loses_nothing_and_exits_within_the_shutdown_deadlines() {
    let mut e = env(&[]).await;
    e.create("slow", json!({ "Timeout": 10 })).await;
    let (ok, _) = e.destinations("slow", 2).await;
    let n = 100;
    for i in 0..n {
        e.event("slow", json!({ "action": "sleep", "ms": 1500, "i": i }))
            .await;
    }
    // Under load: some done, many running or queued.
    let first = wait_records(&ok, 5, Duration::from_secs(60)).await;
    assert!(first.len() >= 5, "no event ran: {}", first.len());
    let (took, status) = e
        .node
        .terminate(Duration::from_secs(20))
        .expect("the node did not exit within 20 s of SIGTERM");
    eprintln!("the node stopped {took:?} after SIGTERM");
    assert!(status.success(), "the node exited with {status}");
    assert!(
        took <= Duration::from_secs(15),
        "the node took {took:?} to stop; its stages allow 14 s"
    );
    // Another node picks up what the first one left.
    let mut args = sluice_tests::node::FAST_RETRIES.to_vec();
    let id = format!("{}-second", e.prefix);
    args.extend(["--node-id", &id]);
    let _second = Node::start(&bootstrap(), &e._redis.url(), &e.prefix, &args);
    let want: HashSet<i64> = (0..n).collect();
    let got = read_until(&ok, Duration::from_secs(120), move |r| {
        let seen: HashSet<i64> = records(r)
            .iter()
            .filter_map(|v| v["requestPayload"]["i"].as_i64())
            .collect();
        seen.len() >= usize::try_from(n).unwrap_or(0)
    })
    .await;
    let seen: HashSet<i64> = records(&got)
        .iter()
        .filter_map(|v| v["requestPayload"]["i"].as_i64())
        .collect();
    let lost: Vec<&i64> = want.difference(&seen).collect();
    assert!(lost.is_empty(), "events lost across the SIGTERM: {lost:?}");
}

/// The caller's X-Ray trace header reaches the function (`Lambda-Runtime-Trace-Id`, which the
/// runtime exports as `_X_AMZN_TRACE_ID`), synchronously and through the async queue; without
/// one, the invocation gets a new one of X-Ray's shape.
#[tokio::test]
async fn the_trace_header_travels_with_the_invocation_to_the_function() {
    let e = env(&[]).await;
    e.create("traced", json!({})).await;
    let (ok, _) = e.destinations("traced", 0).await;
    let given = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
    let inspect = json!({ "action": "inspect" }).to_string();

    let r = e
        .http
        .post(e.url("/2015-03-31/functions/traced/invocations"))
        .header("X-Amzn-Trace-Id", given)
        .body(inspect.clone())
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["trace_header"], given, "{v}");
    assert_eq!(v["trace_env"], given, "{v}");

    let r = e
        .invoke("traced", "RequestResponse", inspect.clone().into_bytes())
        .await;
    let v: Value = r.json().await.expect("json");
    let made = v["trace_header"].as_str().unwrap_or_default();
    assert!(
        made.starts_with("Root=1-") && made.contains(";Parent=") && made.len() > 40,
        "a new trace header: {v}"
    );

    let r = e
        .http
        .post(e.url("/2015-03-31/functions/traced/invocations"))
        .header("X-Amz-Invocation-Type", "Event")
        .header("X-Amzn-Trace-Id", given)
        .body(inspect)
        .send()
        .await
        .expect("event");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let recs = wait_records(&ok, 1, Duration::from_secs(30)).await;
    assert_eq!(
        recs[0]["responsePayload"]["trace_header"], given,
        "{}",
        recs[0]
    );
}
