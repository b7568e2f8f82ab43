//! The fleet: front-end-only, poller and worker-only nodes as separate processes on loopback,
//! on the real broker, Redis and jailed sandboxes. Invocations run on the workers; the worker
//! manager shares warm sandboxes with every front end; a worker killed mid-invoke loses nothing;
//! provisioned concurrency survives a worker restart; placement keeps every worker inside its
//! memory budget.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_fleet::registry::WorkerRegistry;
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

struct Fleet {
    /// The nodes without the worker role.
    fronts: Vec<Node>,
    workers: Vec<Node>,
    http: reqwest::Client,
    prefix: String,
    /// How many of `fronts` serve the Lambda API (they come first).
    api_nodes: usize,
    _redis: RedisServer,
    bundle: Bundle,
}

const WORKER_TOKEN: &str = "fleet-test-secret";

/// Request ids of Lambda invocation records.
fn request_ids(records: &[(String, Vec<u8>)]) -> HashSet<String> {
    records
        .iter()
        .map(|(_, v)| {
            let v: Value = serde_json::from_slice(v).expect("record");
            v["requestContext"]["requestId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Nodes with `roles` (one entry per node; those serving the Lambda API come first) and
/// `workers` worker-only nodes, each with `budget_mb` of sandbox memory.
fn fleet(roles: &[&str], workers: usize, budget_mb: u64) -> Fleet {
    let redis = RedisServer::start();
    let prefix = unique_name("fl").replace('-', "");
    let budget = budget_mb.to_string();
    let start = |id: String, roles: &str| {
        let mut args: Vec<&str> = sluice_tests::node::FAST_RETRIES.to_vec();
        args.extend(["--worker-ttl", "2s", "--node-id", &id, "--roles", roles]);
        args.extend(["--worker-token", WORKER_TOKEN]);
        args.extend(["--memory-budget-mb", &budget]);
        Node::start(&bootstrap(), &redis.url(), &prefix, &args)
    };
    let workers: Vec<Node> = (0..workers)
        .map(|i| start(format!("{prefix}-w{i}"), "worker"))
        .collect();
    let fronts: Vec<Node> = roles
        .iter()
        .enumerate()
        .map(|(i, roles)| start(format!("{prefix}-f{i}"), roles))
        .collect();
    Fleet {
        fronts,
        workers,
        http: reqwest::Client::new(),
        prefix,
        api_nodes: roles.iter().take_while(|r| r.contains("frontend")).count(),
        _redis: redis,
        bundle: Bundle::of("fn-misbehave"),
    }
}

impl Fleet {
    fn url(&self, front: usize, path: &str) -> String {
        format!("{}{path}", self.fronts[front].endpoint)
    }

    async fn create(&self, name: &str) {
        let r = self
            .http
            .post(self.url(0, "/2015-03-31/functions"))
            .json(&json!({
                "FunctionName": name,
                "Code": { "Path": self.bundle.path() },
                "Timeout": 10,
                "MemorySize": 128,
            }))
            .send()
            .await
            .expect("create");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap_or_default()
        );
        // Every front end must see it before it is invoked there.
        for f in 1..self.api_nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = self
                    .http
                    .get(self.url(f, &format!("/2015-03-31/functions/{name}")))
                    .send()
                    .await
                    .expect("get");
                if r.status() == StatusCode::OK {
                    break;
                }
                assert!(Instant::now() < deadline, "front end {f} never saw {name}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn invoke(&self, front: usize, name: &str, payload: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.url(front, &format!("/2015-03-31/functions/{name}/invocations")))
            .body(payload.to_string())
            .send()
            .await
            .expect("invoke");
        let status = r.status();
        let body = r.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn event(&self, name: &str, payload: &Value) -> String {
        let r = self
            .http
            .post(self.url(0, &format!("/2015-03-31/functions/{name}/invocations")))
            .header("X-Amz-Invocation-Type", "Event")
            .body(payload.to_string())
            .send()
            .await
            .expect("event");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.headers()
            .get("x-amzn-RequestId")
            .and_then(|v| v.to_str().ok())
            .expect("request id")
            .to_owned()
    }

    async fn on_success(&self, name: &str) -> String {
        let topic = format!("{}-ok-{name}", self.prefix);
        let r = self
            .http
            .put(self.url(
                0,
                &format!("/2019-09-25/functions/{name}/event-invoke-config"),
            ))
            .json(&json!({
                "DestinationConfig": { "OnSuccess": { "Destination": format!("kafka://{topic}") } },
            }))
            .send()
            .await
            .expect("eic");
        assert_eq!(r.status(), StatusCode::OK);
        topic
    }

    async fn front_metric(&self, name: &str, labels: &str) -> f64 {
        let mut sum = 0.0;
        for f in &self.fronts {
            sum += f.metric(name, labels).await;
        }
        sum
    }

    async fn worker_metrics(&self, name: &str, labels: &str) -> Vec<f64> {
        let mut out = Vec::new();
        for w in &self.workers {
            out.push(w.metric(name, labels).await);
        }
        out
    }

    async fn provisioned(&self, name: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(
                0,
                &format!("/2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=$LATEST"),
            ))
            .send()
            .await
            .expect("get provisioned");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what} did not happen within {timeout:?}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn invocations_run_on_workers_and_warm_sandboxes_are_shared_by_every_front_end() {
    // Two front ends, a poller-only node, two workers.
    let fl = fleet(&["frontend", "frontend", "poller"], 2, 1024);
    fl.create("shared").await;
    let ok_topic = fl.on_success("shared").await;

    let (s, body) = fl
        .invoke(0, "shared", &json!({ "action": "echo", "n": 1 }))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["n"], 1);
    // The second front end finds the sandbox the first one's invocation booted.
    for i in 0..10 {
        let (s, body) = fl
            .invoke(1 - (i % 2), "shared", &json!({ "action": "echo", "n": i }))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    assert_eq!(
        fl.front_metric("sluice_cold_starts_total", "function=\"shared\"")
            .await,
        1.0,
        "one cold start in the whole fleet for 11 sequential invokes"
    );
    // The worker's boot time travels back with the result to the front end that asked.
    let init_count = fl
        .front_metric("sluice_init_duration_seconds_count", "function=\"shared\"")
        .await;
    let init_sum = fl
        .front_metric("sluice_init_duration_seconds_sum", "function=\"shared\"")
        .await;
    assert_eq!(init_count, 1.0, "one init duration reported");
    assert!(
        init_sum > 0.0,
        "the init duration is measured ({init_sum} s)"
    );
    assert_eq!(
        fl.fronts[1]
            .metric("sluice_invocations_total", "function=\"shared\"")
            .await,
        5.0
    );

    // Async events, taken by the poller node, run on the workers too.
    let mut ids = HashSet::new();
    for i in 0..10 {
        ids.insert(
            fl.event("shared", &json!({ "action": "echo", "e": i }))
                .await,
        );
    }
    let recs = read_until(&ok_topic, Duration::from_secs(60), |r| r.len() >= 10).await;
    let got = request_ids(&recs);
    assert_eq!(got, ids);
    assert_eq!(
        fl.fronts[2]
            .metric("sluice_invocations_total", "function=\"shared\"")
            .await,
        10.0,
        "the poller node invoked the events"
    );

    // Every invocation ran on a worker: the front ends have no sandboxes.
    let ran: f64 = fl
        .worker_metrics("sluice_worker_invocations_total", "function=\"shared\"")
        .await
        .iter()
        .sum();
    assert_eq!(ran, 21.0);
    assert_eq!(
        fl.front_metric("sluice_worker_invocations_total", "").await,
        0.0
    );

    // The workers are registered in Redis, and their API runs nothing without the token.
    let registry = WorkerRegistry::new(
        fl._redis.connect().await,
        format!("{}:", fl.prefix),
        Duration::from_secs(2),
    );
    let workers = registry.list().await.expect("registry");
    assert_eq!(workers.len(), 2);
    assert!(workers
        .iter()
        .all(|w| w.backend == "jail" && w.budget_mb == 1024));
    for token in [None, Some("wrong")] {
        let mut req = fl
            .http
            .post(format!(
                "http://{}/sluice/worker/v1/invoke",
                workers[0].addr
            ))
            .header("x-sluice-function", "shared")
            .header("x-sluice-revision", "0")
            .header("x-sluice-request-id", "intruder")
            .body("{}");
        if let Some(t) = token {
            req = req.header("x-sluice-worker-token", t);
        }
        let r = req.send().await.expect("worker API");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn a_worker_killed_mid_invoke_loses_nothing() {
    // Room for every invocation on either worker alone.
    let mut fl = fleet(&["frontend,poller"], 2, 4096);
    fl.create("slow").await;
    let ok_topic = fl.on_success("slow").await;
    let sleep = json!({ "action": "sleep", "ms": 2500 });

    // Sync invocations in flight on both workers, and async events behind them.
    let mut sync = Vec::new();
    for _ in 0..6 {
        let http = fl.http.clone();
        let url = fl.url(0, "/2015-03-31/functions/slow/invocations");
        let body = sleep.to_string();
        sync.push(tokio::spawn(async move {
            let r = http.post(url).body(body).send().await.expect("invoke");
            r.status()
        }));
    }
    let mut ids = HashSet::new();
    for _ in 0..12 {
        ids.insert(fl.event("slow", &sleep).await);
    }
    eventually(
        "both workers running invocations",
        Duration::from_secs(20),
        || async {
            let busy = fl.worker_metrics("sluice_sandboxes_busy", "").await;
            if busy.iter().all(|b| *b >= 1.0) {
                Ok(())
            } else {
                Err(format!("busy sandboxes per worker: {busy:?}"))
            }
        },
    )
    .await;
    fl.workers[0].kill();

    for s in sync {
        assert_eq!(
            s.await.expect("join"),
            StatusCode::OK,
            "a sync invoke on the killed worker is retried on the other"
        );
    }
    let recs = read_until(&ok_topic, Duration::from_secs(90), |r| {
        let got: HashSet<Vec<u8>> = r.iter().map(|(_, v)| v.clone()).collect();
        got.len() >= 12
    })
    .await;
    let got = request_ids(&recs);
    assert_eq!(got, ids, "every acknowledged event ran to success");
    assert!(
        fl.front_metric("sluice_workers_lost_total", "").await >= 1.0,
        "the front end saw the worker go"
    );
}

/// Waits until function `pc` reports 4 of 4 provisioned, READY, with 2 booted on each worker.
async fn wait_provisioned(fl: &Fleet, what: &str) {
    eventually(what, Duration::from_secs(40), || async {
        let (_, v) = fl.provisioned("pc").await;
        let per_worker = fl
            .worker_metrics(
                "sluice_provisioned_concurrent_executions",
                "function=\"pc\"",
            )
            .await;
        if v["Status"] == "READY"
            && v["AllocatedProvisionedConcurrentExecutions"] == 4
            && per_worker == [2.0, 2.0]
        {
            Ok(())
        } else {
            Err(format!("{v}; per worker {per_worker:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn provisioned_concurrency_keeps_four_booted_across_a_worker_restart() {
    let mut fl = fleet(&["frontend,poller"], 2, 2048);
    fl.create("pc").await;
    let r = fl
        .http
        .put(fl.url(
            0,
            "/2019-09-30/functions/pc/provisioned-concurrency?Qualifier=$LATEST",
        ))
        .json(&json!({ "ProvisionedConcurrentExecutions": 4 }))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    wait_provisioned(&fl, "4 provisioned, 2 on each worker").await;

    // Provisioned sandboxes serve without a cold start.
    let (s, body) = fl.invoke(0, "pc", &json!({ "action": "echo" })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        fl.front_metric("sluice_cold_starts_total", "function=\"pc\"")
            .await,
        0.0
    );

    fl.workers[0].restart();
    wait_provisioned(&fl, "4 provisioned again after a worker restart").await;

    let r = fl
        .http
        .delete(fl.url(
            0,
            "/2019-09-30/functions/pc/provisioned-concurrency?Qualifier=$LATEST",
        ))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    eventually(
        "provisioned sandboxes released",
        Duration::from_secs(20),
        || async {
            let per_worker = fl
                .worker_metrics(
                    "sluice_provisioned_concurrent_executions",
                    "function=\"pc\"",
                )
                .await;
            if per_worker.iter().all(|n| *n == 0.0) {
                Ok(())
            } else {
                Err(format!("{per_worker:?}"))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_burst_of_100_cold_starts_never_exceeds_a_workers_budget() {
    let fl = fleet(&["frontend,poller"], 2, 512);
    fl.create("burst").await;
    let mut calls = Vec::new();
    for _ in 0..100 {
        let http = fl.http.clone();
        let url = fl.url(0, "/2015-03-31/functions/burst/invocations");
        calls.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .body(json!({ "action": "sleep", "ms": 1500 }).to_string())
                .send()
                .await
                .expect("invoke");
            let kind = r
                .headers()
                .get("x-amzn-ErrorType")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (
                r.status(),
                format!("{kind} {}", r.text().await.unwrap_or_default()),
            )
        }));
    }
    let (mut ok, mut throttled) = (0, 0);
    for c in calls {
        let (status, body) = c.await.expect("join");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(body.contains("TooManyRequestsException"), "{body}");
                throttled += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ok + throttled, 100);
    assert!(ok >= 8, "both workers' 4 slots were used: {ok} ran");
    assert!(throttled > 0, "100 × 1.5 s on 8 slots must throttle some");
    let peaks = fl.worker_metrics("sluice_worker_memory_peak_mib", "").await;
    assert!(
        peaks.iter().all(|p| *p > 0.0 && *p <= 512.0),
        "peak sandbox memory per worker {peaks:?} (budget 512)"
    );
    assert!(fl.front_metric("sluice_placement_failures_total", "").await >= 1.0);
}
