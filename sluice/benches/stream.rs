//! Stream mapping benchmark, on the broker and Redis that `scripts/bench.sh` starts: records/s
//! through one mapping (8 partitions, BatchSize 100, a trivial function, warm sandboxes) and
//! p50/p99 from produce to the function starting, beside a plain rdkafka consumer in the same run
//! feeding the same function in the same kind of sandbox directly (the ratio is Sluice's
//! overhead).
//!
//! Run: `scripts/bench.sh stream`.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::time::unix_ms as now_ms;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;
use sluice_core::kafka::{ensure_topic, KafkaSettings, TopicSpec};
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::{FunctionSpec, Pool, PoolConfig};

const PARTITIONS: i32 = 8;
const BACKLOG: usize = 16_000;
const RATE_PER_SEC: u64 = 200;
const LATENCY_SECS: u64 = 10;

fn pct(v: &mut [u64], p: f64) -> u64 {
    sluice_tests::percentile(v, p).unwrap_or(0)
}

async fn produce_backlog(kafka: &KafkaSettings, topic: &str) {
    let producer: FutureProducer = kafka.durable_producer_config().create().expect("producer");
    let mut futs = Vec::new();
    for i in 0..BACKLOG {
        let v = json!({ "i": i }).to_string();
        let k = format!("k{}", i % 64);
        futs.push(
            producer
                .send_result(FutureRecord::to(topic).key(&k).payload(&v))
                .map_err(|(e, _)| e)
                .expect("queue"),
        );
    }
    for f in futs {
        f.await.expect("delivery").expect("produce");
    }
}

/// Produces at RATE_PER_SEC for LATENCY_SECS, each value stamped with its produce time.
async fn produce_paced(kafka: &KafkaSettings, topic: &str) {
    let producer: FutureProducer = kafka
        .durable_producer_config()
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let interval = Duration::from_micros(1_000_000 / RATE_PER_SEC);
    let mut tick = tokio::time::interval(interval);
    for i in 0..RATE_PER_SEC * LATENCY_SECS {
        tick.tick().await;
        let v = json!({ "i": i, "ts": now_ms() }).to_string();
        let k = format!("k{}", i % 64);
        let _ = producer.send_result(FutureRecord::to(topic).key(&k).payload(&v));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn end_offsets(kafka: &KafkaSettings, topic: &str) -> i64 {
    let c: BaseConsumer = kafka.client_config().create().expect("consumer");
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks")
                .1
        })
        .sum()
}

fn committed(kafka: &KafkaSettings, group: &str, topic: &str) -> i64 {
    let c: BaseConsumer = kafka
        .client_config()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(5))
        .map(|t| {
            t.elements()
                .iter()
                .map(|e| {
                    if let Offset::Offset(o) = e.offset() {
                        o
                    } else {
                        0
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let kafka_addr =
        std::env::var("SLUICE_KAFKA").expect("SLUICE_KAFKA (run through scripts/bench.sh)");
    let redis = std::env::var("SLUICE_REDIS").expect("SLUICE_REDIS (run through scripts/bench.sh)");
    let kafka = KafkaSettings::new(&kafka_addr);
    let bin = std::env::current_exe()
        .expect("path")
        .ancestors()
        .nth(2)
        .expect("target/release")
        .to_path_buf();
    let prefix = format!("sbench{}", now_ms());
    let bundle = std::env::temp_dir().join(format!("{prefix}-bundle"));
    std::fs::create_dir_all(&bundle).expect("bundle");
    std::fs::copy(bin.join("fn-stream"), bundle.join("bootstrap"))
        .expect("copy fn-stream (scripts/bench.sh builds it)");
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
        // --- Sluice: a node with a mapping.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut node = Command::new(bin.join("sluice"))
            .args(["node", "--kafka", &kafka_addr, "--redis", &redis, "--api", &format!("127.0.0.1:{port}")])
            .args(["--topic-prefix", &format!("{prefix}."), "--redis-prefix", &format!("{prefix}:")])
            .env("RUST_LOG", "warn,function=info")
            // The bench bundle is made under the temporary directory.
            .env("SLUICE_CODE_PATH_ROOTS", std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        let lat_lines = Arc::new(Mutex::new(Vec::<u64>::new()));
        {
            let out = node.stdout.take().expect("stdout");
            let lat = Arc::clone(&lat_lines);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(v) = line.split("lat ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()) {
                        lat.lock().expect("lock").push(v);
                    }
                }
            });
        }
        let http = reqwest::Client::new();
        for _ in 0..600 {
            if http.get(format!("{endpoint}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        http.post(format!("{endpoint}/2015-03-31/functions"))
            .json(&json!({ "FunctionName": "bench", "Code": { "Path": bundle }, "MemorySize": 128 }))
            .send()
            .await
            .expect("create");
        let topic = format!("{prefix}-in");
        ensure_topic(&kafka, &TopicSpec { name: topic.clone(), partitions: PARTITIONS, config: Vec::new() }).await.expect("topic");
        produce_backlog(&kafka, &topic).await;
        let r = http
            .post(format!("{endpoint}/2015-03-31/event-source-mappings/"))
            .json(&json!({ "FunctionName": "bench", "Topics": [topic], "StartingPosition": "TRIM_HORIZON", "BatchSize": 100,
                           "MaximumBatchingWindowInSeconds": 0 }))
            .send()
            .await
            .expect("mapping");
        let group = r.json::<serde_json::Value>().await.expect("json")["UUID"].as_str().expect("uuid").to_owned();
        let total = end_offsets(&kafka, &topic);
        let started = Instant::now();
        while committed(&kafka, &group, &topic) < total && started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let sluice_secs = started.elapsed().as_secs_f64();
        let sluice_rate = total as f64 / sluice_secs;
        lat_lines.lock().expect("lock").clear();
        produce_paced(&kafka, &topic).await;
        let mut sluice_lat = lat_lines.lock().expect("lock").clone();
        let _ = node.kill();
        let _ = node.wait();

        // --- Baseline: a plain consumer feeding the same function in the same sandboxes.
        let backend = JailBackend::new(JailConfig { agent: bin.join("sluice-agent"), ..JailConfig::detect() }).expect("jail");
        let (log_tx, mut log_rx) = tokio::sync::mpsc::channel(100_000);
        let pool = Pool::new(Arc::new(backend), PoolConfig::default(), Some(log_tx));
        let spec = Arc::new(FunctionSpec::new("bench", &bundle));
        let topic2 = format!("{prefix}-plain");
        ensure_topic(&kafka, &TopicSpec { name: topic2.clone(), partitions: PARTITIONS, config: Vec::new() }).await.expect("topic");
        produce_backlog(&kafka, &topic2).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let processed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for p in 0..PARTITIONS {
            let (kafka, topic2, pool, spec, stop, processed) =
                (kafka.clone(), topic2.clone(), pool.clone(), Arc::clone(&spec), Arc::clone(&stop), Arc::clone(&processed));
            workers.push(tokio::spawn(async move {
                let c: StreamConsumer = kafka.client_config().set("group.id", "plain").set("fetch.wait.max.ms", "20").create().expect("consumer");
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic2, p, Offset::Beginning).expect("assign");
                c.assign(&tpl).expect("assign");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut batch = Vec::new();
                    let first = tokio::time::timeout(Duration::from_millis(200), c.recv()).await;
                    let Ok(Ok(m)) = first else { continue };
                    batch.push(json!({ "topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                                       "value": base64_encode(m.payload().unwrap_or_default()), "key": base64_encode(m.key().unwrap_or_default()) }));
                    drop(m);
                    while batch.len() < 100 {
                        match tokio::time::timeout(Duration::from_millis(1), c.recv()).await {
                            Ok(Ok(m)) => batch.push(json!({ "topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                                                             "value": base64_encode(m.payload().unwrap_or_default()), "key": base64_encode(m.key().unwrap_or_default()) })),
                            _ => break,
                        }
                    }
                    let n = batch.len();
                    let event = json!({ "eventSource": "SelfManagedKafka", "records": { format!("{topic2}-{p}"): batch } });
                    pool.invoke(&spec, "plain", event.to_string().into_bytes()).await.expect("invoke");
                    processed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        let started = Instant::now();
        while processed.load(std::sync::atomic::Ordering::Relaxed) < BACKLOG && started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let plain_rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
        while log_rx.try_recv().is_ok() {}
        produce_paced(&kafka, &topic2).await;
        let mut plain_lat = Vec::new();
        while let Ok(l) = log_rx.try_recv() {
            if let Some(v) = l.line.strip_prefix("lat ").and_then(|n| n.trim().parse().ok()) {
                plain_lat.push(v);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            let _ = w.await;
        }
        pool.shutdown().await;

        println!("stream mapping benchmark: {PARTITIONS} partitions, BatchSize 100, window 0, fn-stream (lambda_runtime) in warm jails");
        println!("{:<40} {:>12} {:>14} {:>14}", "", "records/s", "p50 produce→fn", "p99 produce→fn");
        let (s50, s99) = (pct(&mut sluice_lat, 0.5), pct(&mut sluice_lat, 0.99));
        let (b50, b99) = (pct(&mut plain_lat, 0.5), pct(&mut plain_lat, 0.99));
        println!("{:<40} {:>12.0} {:>11} ms {:>11} ms", "sluice mapping (leases, lanes, commits)", sluice_rate, s50, s99);
        println!("{:<40} {:>12.0} {:>11} ms {:>11} ms", "plain consumer → same sandboxes", plain_rate, b50, b99);
        println!(
            "ratio sluice/plain: throughput {:.2}; latency samples {} / {} at {RATE_PER_SEC} records/s",
            sluice_rate / plain_rate,
            sluice_lat.len(),
            plain_lat.len()
        );
    });
    let _ = std::fs::remove_dir_all(&bundle);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
