//! Fleet benchmark: what serving an invocation on another node costs, against real `sluice node`
//! processes (release build, `--sandbox jail`) on the broker and Redis that `scripts/bench.sh`
//! starts (`SLUICE_KAFKA`, `SLUICE_REDIS`). In one run it starts
//!
//! - node L with every role (`frontend,poller,worker`) on its own topic and key prefix: the
//!   "served locally" baseline;
//! - node F (`--roles frontend`) and node W (`--roles worker`) sharing another prefix, so that F
//!   sends every invocation to W over loopback HTTP.
//!
//! and measures, with the `fn-echo` function (a 9-byte event):
//!
//! 1. Warm sync invoke latency (count, mean, p50, p99): `WARM_INVOKES` sequential invokes through
//!    F (warm sandbox on W) and as many through L, alternating one by one so that both see the
//!    same machine, after a warm-up. The ratio remote/local p50 is the figure.
//! 2. Cold start through F, on `COLD_FUNCTIONS` fresh functions each: the first invoke without
//!    provisioned concurrency; and the first invoke after provisioned concurrency 1 was PUT and
//!    reported READY, with the time from the PUT to READY.
//!
//! The nodes' `sluice_cold_starts_total` are printed beside the figures, to show which invokes
//! were cold. With `COLD_FUNCTIONS` samples, p99 is the slowest one.
//!
//! Run: `scripts/bench.sh fleet` (about a minute after the build).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::functions::Bundle;
use sluice_tests::node::Node;

const WARM_INVOKES: usize = 2000;
const WARM_UP_INVOKES: usize = 50;
const COLD_FUNCTIONS: usize = 20;
/// Sandbox memory of every function; W's budget fits all of them warm at once.
const MEMORY_MB: u64 = 128;
const WORKER_BUDGET_MB: u64 = 16_384;

/// Count, mean and percentiles of a set of latencies.
struct Summary {
    count: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Self {
        let total: Duration = samples.iter().sum();
        let mut at = |p: f64| sluice_tests::percentile(&mut samples, p).expect("no samples");
        let (p50, p99) = (at(0.5), at(0.99));
        Self {
            count: samples.len(),
            mean: total / u32::try_from(samples.len()).expect("few samples"),
            p50,
            p99,
        }
    }

    fn row(&self, what: &str) {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        println!(
            "{what:<52} {:>6} {:>11} {:>11} {:>11}",
            self.count,
            ms(self.mean),
            ms(self.p50),
            ms(self.p99)
        );
    }
}

/// The Lambda API of one front-end node.
struct Api<'a> {
    http: reqwest::Client,
    node: &'a Node,
}

/// Sends `request`; returns the status and body.
async fn call(request: reqwest::RequestBuilder, what: &str) -> (StatusCode, Vec<u8>) {
    let r = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = r.status();
    let body = r.bytes().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    (status, body.to_vec())
}

/// Sends `request` and checks that it answered `want`; returns the body.
async fn expect(request: reqwest::RequestBuilder, want: StatusCode, what: &str) -> Vec<u8> {
    let (status, body) = call(request, what).await;
    assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&body));
    body
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.node.endpoint)
    }

    fn invocations(&self, name: &str) -> String {
        self.url(&format!("/2015-03-31/functions/{name}/invocations"))
    }

    fn provisioned(&self, name: &str) -> String {
        self.url(&format!(
            "/2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=$LATEST"
        ))
    }

    async fn create(&self, name: &str, bundle: &Bundle) {
        let request = self
            .http
            .post(self.url("/2015-03-31/functions"))
            .json(&json!({
                "FunctionName": name,
                "Code": { "Path": bundle.path() },
                "MemorySize": MEMORY_MB,
                "Timeout": 10,
            }));
        expect(request, StatusCode::CREATED, &format!("create {name}")).await;
    }

    /// One sync invoke of `fn-echo`; returns how long the 200 took.
    async fn invoke(&self, name: &str, n: usize) -> Duration {
        let request = self
            .http
            .post(self.invocations(name))
            .body(format!(r#"{{"n":{n}}}"#));
        let started = Instant::now();
        let body = expect(request, StatusCode::OK, &format!("invoke {name}")).await;
        let took = started.elapsed();
        let back: serde_json::Value = serde_json::from_slice(&body).expect("echoed event");
        assert_eq!(back["n"], n, "invoke {name} echoed {back}");
        took
    }

    /// The first invoke of a function whose front end may not have found its worker yet:
    /// retried until it answers 200.
    async fn first_invoke(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = self.http.post(self.invocations(name)).body(r#"{"n":0}"#);
            let (status, body) = call(request, &format!("invoke {name}")).await;
            if status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never answered 200: {status} {}",
                String::from_utf8_lossy(&body)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn put_provisioned(&self, name: &str) {
        let request = self
            .http
            .put(self.provisioned(name))
            .json(&json!({ "ProvisionedConcurrentExecutions": 1 }));
        expect(
            request,
            StatusCode::ACCEPTED,
            &format!("provisioned {name}"),
        )
        .await;
    }

    async fn provisioned_ready(&self, name: &str) -> bool {
        let request = self.http.get(self.provisioned(name));
        let (_, body) = call(request, &format!("get provisioned {name}")).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        v["Status"] == "READY"
    }
}

/// A node's cold starts of the functions whose names start with `prefix`.
async fn cold_starts(node: &Node, prefix: &str) -> u64 {
    let count = node
        .metric("sluice_cold_starts_total", &format!("function=\"{prefix}"))
        .await;
    // A counter: a whole number, 0 when no line matched (the empty sum is -0.0).
    count.abs().round() as u64
}

/// Waits until `node` has `want` functions in its configuration view (a worker must know a
/// function before it can boot it; this keeps config propagation out of the cold-start figure).
async fn wait_functions(node: &Node, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.metric("sluice_config_functions", "").await < want as f64 {
        assert!(
            Instant::now() < deadline,
            "the worker never saw {want} functions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    let kafka = std::env::var("SLUICE_KAFKA").expect("SLUICE_KAFKA (run through scripts/bench.sh)");
    let redis = std::env::var("SLUICE_REDIS").expect("SLUICE_REDIS (run through scripts/bench.sh)");
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (local, remote) = (format!("local{run}"), format!("remote{run}"));
    let budget = WORKER_BUDGET_MB.to_string();
    let common = ["--sandbox", "jail", "--worker-ttl", "2s"];
    let start = |prefix: &str, id: &str, roles: &str| {
        let mut args = common.to_vec();
        args.extend([
            "--node-id",
            id,
            "--roles",
            roles,
            "--memory-budget-mb",
            &budget,
        ]);
        Node::start(&kafka, &redis, prefix, &args)
    };
    let node_l = start(&local, "bench-l", "frontend,poller,worker");
    let node_w = start(&remote, "bench-w", "worker");
    let node_f = start(&remote, "bench-f", "frontend");
    let bundle = Bundle::of("fn-echo");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let l = Api {
            http: http.clone(),
            node: &node_l,
        };
        let f = Api {
            http,
            node: &node_f,
        };

        // 1. Warm sync invokes, alternating local and remote one by one.
        l.create("echo", &bundle).await;
        f.create("echo", &bundle).await;
        wait_functions(&node_w, 1).await;
        l.first_invoke("echo").await;
        f.first_invoke("echo").await;
        for i in 0..WARM_UP_INVOKES {
            l.invoke("echo", i).await;
            f.invoke("echo", i).await;
        }
        let (mut local_lat, mut remote_lat) = (Vec::new(), Vec::new());
        for i in 0..WARM_INVOKES {
            local_lat.push(l.invoke("echo", i).await);
            remote_lat.push(f.invoke("echo", i).await);
        }
        let warm_cold = (
            cold_starts(&node_l, "echo").await,
            cold_starts(&node_f, "echo").await,
        );

        // 2a. Cold starts without provisioned concurrency.
        for i in 0..COLD_FUNCTIONS {
            f.create(&format!("cold-{i}"), &bundle).await;
        }
        wait_functions(&node_w, 1 + COLD_FUNCTIONS).await;
        let mut cold_lat = Vec::new();
        for i in 0..COLD_FUNCTIONS {
            cold_lat.push(f.invoke(&format!("cold-{i}"), i).await);
        }
        let cold_counted = cold_starts(&node_f, "cold-").await;

        // 2b. First invokes after provisioned concurrency 1 is READY.
        for i in 0..COLD_FUNCTIONS {
            f.create(&format!("pc-{i}"), &bundle).await;
        }
        wait_functions(&node_w, 1 + 2 * COLD_FUNCTIONS).await;
        let first_put = Instant::now();
        let mut put_at = Vec::new();
        for i in 0..COLD_FUNCTIONS {
            put_at.push(Instant::now());
            f.put_provisioned(&format!("pc-{i}")).await;
        }
        let mut ready_after: Vec<Option<Duration>> = vec![None; COLD_FUNCTIONS];
        let deadline = first_put + Duration::from_secs(60);
        while ready_after.iter().any(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "provisioned concurrency never READY: {ready_after:?}"
            );
            for (i, ready) in ready_after.iter_mut().enumerate() {
                if ready.is_none() && f.provisioned_ready(&format!("pc-{i}")).await {
                    *ready = Some(put_at[i].elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all_ready = first_put.elapsed();
        let mut pc_lat = Vec::new();
        for i in 0..COLD_FUNCTIONS {
            pc_lat.push(f.invoke(&format!("pc-{i}"), i).await);
        }
        let pc_counted = cold_starts(&node_f, "pc-").await;

        let (local, remote) = (Summary::of(local_lat), Summary::of(remote_lat));
        println!(
            "fleet benchmark: --sandbox jail, fn-echo, {MEMORY_MB} MB, sequential sync invokes"
        );
        println!(
            "{:<52} {:>6} {:>11} {:>11} {:>11}",
            "", "count", "mean", "p50", "p99"
        );
        local.row("warm invoke, served locally (node L, all roles)");
        remote.row("warm invoke, remote (node F → worker W, HTTP)");
        Summary::of(cold_lat).row("cold start, first invoke (F → W)");
        Summary::of(pc_lat).row("first invoke, provisioned concurrency 1 (F → W)");
        Summary::of(ready_after.into_iter().flatten().collect())
            .row("PUT provisioned concurrency 1 → GET says READY");
        println!(
            "ratio remote/local warm p50: {:.2}",
            remote.p50.as_secs_f64() / local.p50.as_secs_f64()
        );
        println!(
            "all {COLD_FUNCTIONS} provisioned functions READY {:.2} s after the first PUT",
            all_ready.as_secs_f64()
        );
        println!(
            "cold starts counted: warm phase L {} F {} (1 each expected); no provisioned \
             concurrency {cold_counted} ({COLD_FUNCTIONS} expected); provisioned {pc_counted} \
             (0 expected)",
            warm_cold.0, warm_cold.1
        );
    });
}
