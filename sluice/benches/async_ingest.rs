//! Async ingest benchmark, against a real `sluice node` (release build) on the broker and Redis
//! that `scripts/bench.sh` starts (`SLUICE_KAFKA`, `SLUICE_REDIS`):
//!
//! 1. `Event` invocations with 16 concurrent clients: throughput and p50/p99 of the 202, beside a
//!    plain rdkafka producer (idempotent, `acks=all`) writing the same records with 16 concurrent
//!    senders to the same broker in the same run. The ratio is the figure.
//! 2. p50/p99 from the 202 to the function starting to run, with warm sandboxes.
//!
//! Run: `scripts/bench.sh ingest`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::time::unix_ms as now_ms;
use sluice_tests::free_port;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

const CLIENTS: usize = 16;
const PHASE: Duration = Duration::from_secs(8);
const LATENCY_EVENTS: usize = 300;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    sluice_tests::percentile(v, p).expect("latency samples")
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `send` from `CLIENTS` tasks for `PHASE`; returns (ops/s, latencies).
async fn hammer<F, Fut>(send: F) -> (f64, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let send = Arc::new(send);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let send = Arc::clone(&send);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while started.elapsed() < PHASE {
                let t = Instant::now();
                assert!(send(c * 1_000_000 + i).await, "a send failed");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    (all.len() as f64 / started.elapsed().as_secs_f64(), all)
}

fn main() {
    let kafka = std::env::var("SLUICE_KAFKA").expect("SLUICE_KAFKA (run through scripts/bench.sh)");
    let redis = std::env::var("SLUICE_REDIS").expect("SLUICE_REDIS (run through scripts/bench.sh)");
    let exe = std::env::current_exe().expect("bench path");
    let bin = exe
        .ancestors()
        .nth(2)
        .expect("target/release")
        .to_path_buf();
    for b in ["sluice", "sluice-agent", "fn-misbehave"] {
        assert!(
            bin.join(b).is_file(),
            "{} missing: scripts/bench.sh builds it",
            bin.join(b).display()
        );
    }
    let prefix = format!("bench{}", now_ms());
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut node = Command::new(bin.join("sluice"))
        .args([
            "node",
            "--kafka",
            &kafka,
            "--redis",
            &redis,
            "--api",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--topic-prefix",
            &format!("{prefix}."),
            "--redis-prefix",
            &format!("{prefix}:"),
        ])
        .env("RUST_LOG", "warn")
        // The bench bundles are made under the temporary directory.
        .env("SLUICE_CODE_PATH_ROOTS", std::env::temp_dir())
        .stdout(Stdio::null())
        .spawn()
        .expect("start node");
    let bundle = std::env::temp_dir().join(format!("{prefix}-bundle"));
    std::fs::create_dir_all(&bundle).expect("bundle");
    std::fs::copy(bin.join("fn-misbehave"), bundle.join("bootstrap")).expect("copy");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        for _ in 0..600 {
            if http.get(format!("{endpoint}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = http
            .post(format!("{endpoint}/2015-03-31/functions"))
            .json(&json!({ "FunctionName": "bench", "Code": { "Path": bundle } }))
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), 201);
        let ok_topic = format!("{prefix}-ok");
        http.put(format!("{endpoint}/2019-09-25/functions/bench/event-invoke-config"))
            .json(&json!({ "DestinationConfig": { "OnSuccess": { "Destination": format!("kafka://{ok_topic}") } } }))
            .send()
            .await
            .expect("eic");
        // Warm one sandbox, then measure 202 → function start one event at a time, before the
        // load phases (so no backlog is in the way).
        let r = http
            .post(format!("{endpoint}/2015-03-31/functions/bench/invocations"))
            .body(r#"{"action":"echo"}"#)
            .send()
            .await
            .expect("warm-up");
        assert_eq!(r.status(), 200);
        // 2. 202 → function start, one event at a time (a warm sandbox serves them).
        let url = format!("{endpoint}/2015-03-31/functions/bench/invocations");
        let mut accepted = std::collections::HashMap::new();
        for i in 0..LATENCY_EVENTS {
            let body = json!({ "action": "stamp", "sent_ms": i }).to_string();
            let r = http.post(&url).header("X-Amz-Invocation-Type", "Event").body(body).send().await.expect("event");
            let id = r.headers()["x-amzn-RequestId"].to_str().expect("id").to_owned();
            accepted.insert(id, now_ms());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let want = accepted.len();
        let recs = sluice_tests_read(&kafka, &ok_topic, want).await;
        let mut start_lat = Vec::new();
        for v in recs {
            let id = v["requestContext"]["requestId"].as_str().unwrap_or("");
            if let (Some(acc), Some(started)) = (accepted.get(id), v["responsePayload"]["started_ms"].as_u64()) {
                start_lat.push(Duration::from_millis(started.saturating_sub(*acc)));
            }
        }
        // 1. Ingest: Sluice's 202 beside a plain producer, on a front-end-only node (so that the
        //    pollers running those events do not share the two cores with the measurement).
        let fport = free_port();
        let mut frontend = Command::new(bin.join("sluice"))
            .args(["node", "--roles", "frontend", "--kafka", &kafka, "--redis", &redis, "--api", &format!("127.0.0.1:{fport}")])
            .args(["--topic-prefix", &format!("{prefix}-ingest."), "--redis-prefix", &format!("{prefix}-ingest:")])
            .env("RUST_LOG", "warn")
            // The bench bundles are made under the temporary directory.
            .env("SLUICE_CODE_PATH_ROOTS", std::env::temp_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("start front-end node");
        let fendpoint = format!("http://127.0.0.1:{fport}");
        for _ in 0..600 {
            if http.get(format!("{fendpoint}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = http
            .post(format!("{fendpoint}/2015-03-31/functions"))
            .json(&json!({ "FunctionName": "bench", "Code": { "Path": bundle } }))
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), 201);
        let fe_queue = sluice_core::kafka::TopicSpec { name: format!("{prefix}-ingest.async"), partitions: 8, config: Vec::new() };
        sluice_core::kafka::ensure_topic(&sluice_core::kafka::KafkaSettings::new(&kafka), &fe_queue).await.expect("queue");
        let payload = br#"{"action":"echo","order":{"id":"0000000000","items":[1,2,3],"note":"a typical small event"}}"#.to_vec();
        let plain_payload = payload.clone();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .expect("producer");
        let plain_topic = format!("{prefix}.plain");
        sluice_core::kafka::ensure_topic(
            &sluice_core::kafka::KafkaSettings::new(&kafka),
            &sluice_core::kafka::TopicSpec { name: plain_topic.clone(), partitions: 8, config: Vec::new() },
        )
        .await
        .expect("plain topic");
        let (plain_rate, mut plain_lat) = hammer(move |i| {
            let (producer, p, topic) = (producer.clone(), plain_payload.clone(), plain_topic.clone());
            async move {
                let key = format!("k{i}");
                producer.send(FutureRecord::to(&topic).key(&key).payload(&p), Duration::from_secs(30)).await.is_ok()
            }
        })
        .await;
        let url = format!("{fendpoint}/2015-03-31/functions/bench/invocations");
        let (h, p) = (http.clone(), payload.clone());
        let (sluice_rate, mut sluice_lat) = hammer(move |_| {
            let (h, p, url) = (h.clone(), p.clone(), url.clone());
            async move {
                h.post(&url).header("X-Amz-Invocation-Type", "Event").body(p).send().await.map(|r| r.status() == 202).unwrap_or(false)
            }
        })
        .await;
        let _ = frontend.kill();
        let _ = frontend.wait();
        println!("async ingest benchmark: {CLIENTS} concurrent clients, {} s per phase, payload {} bytes", PHASE.as_secs(), 96);
        println!("{:<44} {:>10} {:>10} {:>10}", "", "ops/s", "p50", "p99");
        let (s50, s99) = (pct(&mut sluice_lat, 0.5), pct(&mut sluice_lat, 0.99));
        let (p50, p99) = (pct(&mut plain_lat, 0.5), pct(&mut plain_lat, 0.99));
        println!("{:<44} {:>10.0} {:>10} {:>10}", "sluice Invoke (Event) → 202", sluice_rate, ms(s50), ms(s99));
        println!("{:<44} {:>10.0} {:>10} {:>10}", "plain rdkafka producer → delivery report", plain_rate, ms(p50), ms(p99));
        println!("ratio sluice/plain: throughput {:.2}, p50 latency {:.2}", sluice_rate / plain_rate, s50.as_secs_f64() / p50.as_secs_f64());
        if start_lat.is_empty() {
            println!("202 → function start: no records arrived");
        } else {
            let n = start_lat.len();
            println!("202 → function start (warm, {n} events): p50 {} p99 {}", ms(pct(&mut start_lat, 0.5)), ms(pct(&mut start_lat, 0.99)));
        }
    });
    let _ = node.kill();
    let _ = node.wait();
    let _ = std::fs::remove_dir_all(&bundle);
}

async fn sluice_tests_read(kafka: &str, topic: &str, want: usize) -> Vec<Value> {
    std::env::set_var("SLUICE_TEST_KAFKA", kafka);
    let raw = sluice_tests::kafka::read_until(topic, Duration::from_secs(120), move |r| {
        r.iter()
            .filter(|(_, v)| v.windows(10).any(|w| w == b"started_ms"))
            .count()
            >= want
    })
    .await;
    raw.iter()
        .filter_map(|(_, v)| serde_json::from_slice(v).ok())
        .collect()
}
