//! What the pollers hold, and what they keep doing, measured on real `sluice node` processes on
//! the real broker and Redis, through the nodes' own metrics (issue 12):
//! - delayed events wait in Kafka, not in memory;
//! - a stuck mapping's buffers are bounded by bytes, not just by count;
//! - an idle partition's commit is refreshed, so Kafka never expires the group's offsets;
//! - a mapping's offset lag rises while its function is slow and is back to 0 once it caught up;
//! - a frozen broker during a hand-over does not freeze a node's API or its lease renewals
//!   (this one on a private tansu, frozen with SIGSTOP).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sluice_tests::broker::Broker;
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, create_topic, create_topic_at, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

async fn call(req: reqwest::RequestBuilder, want: u16, what: &str) -> Value {
    let r = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, want, "{what}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

async fn create_function(node: &Node, name: &str, bundle: &Bundle, timeout_s: u32) {
    call(
        reqwest::Client::new()
            .post(format!("{}/2015-03-31/functions", node.endpoint))
            .json(&json!({ "FunctionName": name, "Code": { "Path": bundle.path() }, "Timeout": timeout_s })),
        201,
        "create function",
    )
    .await;
}

async fn create_mapping(
    node: &Node,
    kafka: &str,
    function: &str,
    topic: &str,
    extra: Value,
) -> String {
    let mut body = json!({ "FunctionName": function, "Topics": [topic], "StartingPosition": "TRIM_HORIZON",
        "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [kafka] } } });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    let m = call(
        reqwest::Client::new()
            .post(format!(
                "{}/2015-03-31/event-source-mappings/",
                node.endpoint
            ))
            .json(&body),
        202,
        "create mapping",
    )
    .await;
    m["UUID"].as_str().expect("uuid").to_owned()
}

/// Sum of the high watermarks of every partition of `topic` on `kafka`.
async fn end_offsets(kafka: &str, topic: &str) -> i64 {
    let (kafka, topic) = (kafka.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka)
            .create()
            .expect("consumer");
        let Ok(md) = c.fetch_metadata(Some(&topic), Duration::from_secs(5)) else {
            return 0;
        };
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        parts
            .into_iter()
            .filter_map(|p| c.fetch_watermarks(&topic, p, Duration::from_secs(5)).ok())
            .map(|(_, high)| high)
            .sum()
    })
    .await
    .expect("watermarks task")
}

/// The group's committed offset of `topic`/`partition` on the shared test broker (a mapping's
/// default group is its UUID).
async fn committed(group: &str, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::{Offset, TopicPartitionList};
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
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

async fn produce(kafka: &str, topic: &str, n: usize, value: &[u8]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("message.max.bytes", "10000000")
        .create()
        .expect("producer");
    for i in 0..n {
        let key = format!("k{i}");
        p.send(
            FutureRecord::to(topic).key(&key).payload(value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what} did not happen within {timeout:?}");
}

#[tokio::test]
async fn delayed_events_wait_in_kafka_not_in_memory() {
    let redis = RedisServer::start();
    let prefix = unique_name("dl").replace('-', "");
    // Retries a minute away: every failed event sits in the 60 s delay topic meanwhile.
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--async-retry-delays", "60s,120s"],
    );
    let bundle = Bundle::of("fn-misbehave");
    create_function(&node, "fails", &bundle, 5).await;
    let http = reqwest::Client::new();
    let n = 300;
    for _ in 0..n {
        call(
            http.post(format!(
                "{}/2015-03-31/functions/fails/invocations",
                node.endpoint
            ))
            .header("X-Amz-Invocation-Type", "Event")
            .body(json!({ "action": "error" }).to_string()),
            202,
            "event",
        )
        .await;
    }
    let delay_topic = format!("{prefix}.async.delay.60000");
    wait_until(
        "every event's retry in the delay topic",
        Duration::from_secs(120),
        || {
            let t = delay_topic.clone();
            async move { end_offsets(&bootstrap(), &t).await >= n }
        },
    )
    .await;
    // The delay poller holds at most its per-partition budget of delayed events (32 on each of
    // the delay topic's 2 partitions); the rest wait in Kafka until the head is due.
    let mut held = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        held.push(
            node.metric("sluice_poller_buffered_records", "source=\"async-delay\"")
                .await,
        );
    }
    let most = held.iter().copied().fold(0.0, f64::max);
    eprintln!("delayed events held in memory: at most {most} of {n} (samples {held:?})");
    assert!(
        most > 0.0,
        "the delay poller held nothing: is the gauge reported? {held:?}"
    );
    assert!(
        most <= 2.0 * 33.0,
        "the delay poller held {most} of {n} delayed events in memory (samples {held:?}); at most 32 per delay partition may wait there"
    );
}

#[tokio::test]
async fn a_stuck_mappings_buffers_are_bounded_by_bytes() {
    let redis = RedisServer::start();
    let prefix = unique_name("bb").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = Bundle::of("fn-misbehave");
    // Every batch hangs until its 60 s timeout: the mapping is stuck while records pile up.
    create_function(&node, "stuck", &bundle, 60).await;
    let topic = unique_name("bb");
    create_topic(&topic, 1).await.expect("topic");
    let record = json!({ "action": "hang", "pad": "x".repeat(1_000_000) }).to_string();
    // 40 records of 1 MB: well over the partition's byte budget with ParallelizationFactor 2,
    // (2 + 1) × 6 MiB, and few enough (40) for the record budget not to be what stops it.
    produce(&bootstrap(), &topic, 40, record.as_bytes()).await;
    let uuid = create_mapping(
        &node,
        &bootstrap(),
        "stuck",
        &topic,
        json!({ "BatchSize": 1, "ParallelizationFactor": 2 }),
    )
    .await;
    let source = format!("source=\"{uuid}\"");
    wait_until(
        "the stuck mapping's partition paused",
        Duration::from_secs(60),
        || {
            let (node, source) = (&node, source.clone());
            async move {
                node.metric("sluice_poller_paused_partitions", &source)
                    .await
                    >= 1.0
            }
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        held.push(node.metric("sluice_poller_buffered_bytes", &source).await);
    }
    let most = held.iter().copied().fold(0.0, f64::max);
    let budget = 3.0 * 6.0 * 1024.0 * 1024.0;
    eprintln!("a stuck mapping buffered at most {most} bytes of 40 MB (budget {budget})");
    assert!(most > 0.0, "nothing buffered: {held:?}");
    assert!(
        most <= budget + 1_100_000.0,
        "a stuck mapping buffered {most} bytes (samples {held:?}); its budget is {budget}"
    );
}

#[tokio::test]
async fn an_idle_partitions_commit_is_refreshed() {
    let redis = RedisServer::start();
    let prefix = unique_name("cr").replace('-', "");
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--commit-refresh-secs", "2"],
    );
    let bundle = Bundle::of("fn-stream");
    create_function(&node, "consumer", &bundle, 5).await;
    let topic = unique_name("cr");
    create_topic(&topic, 1).await.expect("topic");
    produce(&bootstrap(), &topic, 3, br#"{"n":1}"#).await;
    let uuid = create_mapping(&node, &bootstrap(), "consumer", &topic, json!({})).await;
    let source = format!("source=\"{uuid}\"");
    // Processed and committed; then the partition is idle.
    wait_until("the records committed", Duration::from_secs(60), || {
        let (uuid, topic) = (uuid.clone(), topic.clone());
        async move { committed(&uuid, &topic, 0).await == Some(3) }
    })
    .await;
    let before = node
        .metric("sluice_poller_commit_refreshes_total", &source)
        .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = node
        .metric("sluice_poller_commit_refreshes_total", &source)
        .await;
    assert!(
        after >= before + 2.0,
        "an idle partition's commit was refreshed {} times in 7 s with a 2 s refresh",
        after - before
    );
    // A refresh resends the same point: nothing is skipped or replayed.
    assert_eq!(committed(&uuid, &topic, 0).await, Some(3));
}

#[tokio::test]
async fn a_slow_mappings_offset_lag_rises_and_returns_to_zero() {
    let redis = RedisServer::start();
    let prefix = unique_name("lg").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = Bundle::of("fn-stream");
    create_function(&node, "slow", &bundle, 10).await;
    let topic = unique_name("lg");
    create_topic(&topic, 1).await.expect("topic");
    // One record per batch, each taking 1.5 s: the partition is behind for about 12 s.
    let n = 8;
    produce(&bootstrap(), &topic, n, br#"{"sleep_ms":1500}"#).await;
    let uuid = create_mapping(
        &node,
        &bootstrap(),
        "slow",
        &topic,
        json!({ "BatchSize": 1 }),
    )
    .await;
    // The runtime's lag loop reports every 5 s, from its own watermark client.
    let labels = format!("source=\"{uuid}\",topic=\"{topic}\",partition=\"0\"");
    let highest = std::cell::Cell::new(0.0f64);
    wait_until(
        "the mapping's offset lag above 0",
        Duration::from_secs(30),
        || {
            let (node, labels, highest) = (&node, labels.clone(), &highest);
            async move {
                let lag = node
                    .metric("sluice_poller_offset_lag_records", &labels)
                    .await;
                highest.set(highest.get().max(lag));
                lag > 0.0
            }
        },
    )
    .await;
    let highest = highest.get();
    eprintln!("offset lag while the function is slow: {highest} of {n} records");
    assert!(highest <= n as f64, "more lag than records: {highest}");
    wait_until("every record committed", Duration::from_secs(60), || {
        let (uuid, topic) = (uuid.clone(), topic.clone());
        async move { committed(&uuid, &topic, 0).await == Some(n as i64) }
    })
    .await;
    wait_until("the offset lag back to 0", Duration::from_secs(15), || {
        let (node, labels) = (&node, labels.clone());
        async move {
            node.metric("sluice_poller_offset_lag_records", &labels)
                .await
                == 0.0
        }
    })
    .await;
}

/// Lease keys of `holder` in Redis, with their remaining lifetimes (ms).
async fn leases_of(redis: &RedisServer, holder: &str) -> Vec<(String, i64)> {
    let mut conn = redis.connect().await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*lease:*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut out = Vec::new();
    for k in keys.into_iter().filter(|k| !k.ends_with(":fence")) {
        let v: Option<String> = ::redis::cmd("HGET")
            .arg(&k)
            .arg("holder")
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        if v.as_deref() == Some(holder) {
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("pttl");
            out.push((k, ttl));
        }
    }
    out
}

#[tokio::test]
async fn a_frozen_broker_at_hand_over_freezes_neither_the_api_nor_lease_renewals() {
    let broker = Broker::start();
    let kafka = broker.bootstrap();
    let redis = RedisServer::start();
    let prefix = unique_name("fz").replace('-', "");
    let a_id = format!("{prefix}-a");
    let b_id = format!("{prefix}-b");
    let mut a = Node::start(
        &kafka,
        &redis.url(),
        &prefix,
        &["--lease-ttl", "3s", "--node-id", &a_id],
    );
    let bundle = Bundle::of("fn-stream");
    create_function(&a, "consumer", &bundle, 5).await;
    let topic = unique_name("fz");
    create_topic_at(&kafka, &topic, 4).await.expect("topic");
    produce(&kafka, &topic, 20, br#"{"n":1}"#).await;
    create_mapping(&a, &kafka, "consumer", &topic, json!({})).await;
    let mut b = Node::start(
        &kafka,
        &redis.url(),
        &prefix,
        &[
            "--lease-ttl",
            "3s",
            "--node-id",
            &b_id,
            "--roles",
            "poller,worker",
        ],
    );
    // Both nodes hold leases (the queue's, the delay topics' and the mapping's partitions).
    wait_until("both nodes holding leases", Duration::from_secs(60), || {
        let (redis, a_id, b_id) = (&redis, a_id.clone(), b_id.clone());
        async move {
            !leases_of(redis, &a_id).await.is_empty() && !leases_of(redis, &b_id).await.is_empty()
        }
    })
    .await;
    let before: Vec<String> = leases_of(&redis, &a_id)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let b_held: Vec<String> = leases_of(&redis, &b_id)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();

    // Freeze the broker, then kill b: a takes b's partitions over while every Kafka call hangs
    // (committed offsets, commits on hand-over).
    broker.pause();
    b.kill();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let until = Instant::now() + Duration::from_secs(12);
    let mut slowest = Duration::ZERO;
    let mut shortest_ttl = i64::MAX;
    while Instant::now() < until {
        let t = Instant::now();
        let r = http.get(format!("{}/healthz", a.endpoint)).send().await;
        assert!(
            r.is_ok(),
            "a's API did not answer while the broker was frozen: {r:?}"
        );
        slowest = slowest.max(t.elapsed());
        for (k, ttl) in leases_of(&redis, &a_id).await {
            if before.contains(&k) {
                assert!(ttl > 0, "a's lease {k} expired while the broker was frozen");
                shortest_ttl = shortest_ttl.min(ttl);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    broker.resume();
    assert!(
        slowest < Duration::from_secs(1),
        "a's API took {slowest:?} to answer while the broker was frozen"
    );
    assert!(shortest_ttl > 0, "lease TTLs read: {shortest_ttl}");
    // a took over what b held (through the outage, or once the broker was back).
    wait_until(
        "a holding every lease b held",
        Duration::from_secs(60),
        || {
            let (redis, a_id, b_held) = (&redis, a_id.clone(), b_held.clone());
            async move {
                let held: Vec<String> = leases_of(redis, &a_id)
                    .await
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                b_held.iter().all(|k| held.contains(k))
            }
        },
    )
    .await;
    a.kill();
}
