//! The Kafka tools of the `sluice` binary against the real broker: `produce`,
//! `destinations tail` and `redrive` (resumable, without loss or repeats).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use sluice_tests::functions::bin_dir;
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};

fn sluice(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("sluice"))
        .args(args)
        .env("SLUICE_KAFKA", bootstrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sluice");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn produce_writes_one_record_per_line_with_keys_and_a_summary() {
    let topic = unique_name("produce");
    create_topic(&topic, 3).await.expect("topic");
    let input: String = (0..100).map(|i| format!("k{}:v{i}\n", i % 7)).collect();
    let (ok, _, err) = sluice(
        &["produce", "-t", &topic, "-K", ":", "-H", "source=test"],
        Some(&input),
    );
    assert!(ok, "{err}");
    assert!(err.contains("100 delivered, 0 failed"), "{err}");
    let recs = read_until(&topic, Duration::from_secs(20), |r| r.len() >= 100).await;
    assert_eq!(recs.len(), 100);
    let by_key: HashMap<String, usize> = recs.iter().fold(HashMap::new(), |mut m, (k, _)| {
        *m.entry(k.clone()).or_default() += 1;
        m
    });
    assert_eq!(by_key.len(), 7);
    // A missing topic or partition: a non-zero exit that says so, at once.
    let (ok, _, err) = sluice(
        &["produce", "-t", &unique_name("missing"), "-c", "1"],
        Some("x\n"),
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, _, err) = sluice(&["produce", "-t", &topic, "-p", "3"], Some("x\n"));
    assert!(!ok && err.contains("partitions 0..=2"), "{err}");
}

#[tokio::test]
async fn redrive_resumes_where_it_stopped_without_loss_or_repeats() {
    let failed = unique_name("failed");
    let prefix = unique_name("rd").replace('-', "");
    create_topic(&failed, 2).await.expect("topic");
    let lines: String = (0..60)
        .map(|i| {
            let rec = json!({
                "version": "1.0",
                "timestamp": "2026-01-01T00:00:00.000Z",
                "requestContext": {
                    "requestId": format!("req-{i}"),
                    "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:orders:$LATEST",
                    "condition": "RetriesExhausted",
                    "approximateInvokeCount": 3
                },
                "requestPayload": { "n": i },
                "responseContext": { "statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled" },
                "responsePayload": { "errorMessage": "boom" }
            });
            format!("orders\t{rec}\n")
        })
        .collect();
    let (ok, _, err) = sluice(&["produce", "-t", &failed, "-K", "\t"], Some(&lines));
    assert!(ok, "{err}");
    let (ok, out, _) = sluice(
        &["destinations", "tail", &format!("kafka://{failed}")],
        None,
    );
    assert!(ok);
    assert_eq!(out.matches("RetriesExhausted").count(), 60, "{out}");
    assert!(out.contains("error (Unhandled):  boom"), "{out}");

    let dest = format!("kafka://{failed}");
    let (ok, _, err) = sluice(
        &["redrive", &dest, "--topic-prefix", &format!("{prefix}.")],
        None,
    );
    assert!(
        !ok && err.contains("does not exist"),
        "a missing queue is named: {err}"
    );
    create_topic(&format!("{prefix}.async"), 4)
        .await
        .expect("queue");
    let topic_prefix = format!("{prefix}.");
    let (ok, _, err) = sluice(
        &[
            "redrive",
            &dest,
            "--topic-prefix",
            &topic_prefix,
            "--limit",
            "25",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(err.contains("25 re-submitted"), "{err}");
    let (ok, _, err) = sluice(&["redrive", &dest, "--topic-prefix", &topic_prefix], None);
    assert!(ok, "{err}");
    assert!(err.contains("35 re-submitted"), "{err}");
    let (ok, _, err) = sluice(&["redrive", &dest, "--topic-prefix", &topic_prefix], None);
    assert!(ok, "{err}");
    assert!(err.contains("0 re-submitted"), "{err}");

    let queue = format!("{prefix}.async");
    let recs = read_until(&queue, Duration::from_secs(20), |r| r.len() >= 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recs.len(), 60, "every failed event exactly once");
    let mut payloads: Vec<i64> = recs
        .iter()
        .map(|(k, v)| {
            // No key: the sticky partitioner spreads events over the queue's partitions.
            assert!(k.is_empty(), "{k}");
            serde_json::from_slice::<serde_json::Value>(v).expect("json")["n"]
                .as_i64()
                .expect("n")
        })
        .collect();
    payloads.sort_unstable();
    assert_eq!(payloads, (0..60).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stream_failure_record_is_tailed_and_redriven_to_its_topic_byte_for_byte() {
    use base64::Engine;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use sluice_destinations::stream_record::condition;
    use sluice_destinations::StreamFailureRecord;

    let source = unique_name("orders");
    let failed = unique_name("failed");
    let prefix = unique_name("rds").replace('-', "");
    create_topic(&source, 1).await.expect("topic");
    create_topic(&failed, 1).await.expect("topic");
    create_topic(&format!("{prefix}.async"), 1)
        .await
        .expect("queue");
    // A record whose value is not UTF-8 and whose key has spaces: both must come back exact.
    let (key, value) = (b"order 7".to_vec(), vec![0xff, 0x00, b'{', 0x80]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let event = json!({ "eventSource": "SelfManagedKafka", "bootstrapServers": bootstrap(),
        "records": { format!("{source}-0"): [ { "topic": source, "partition": 0, "offset": 41,
            "timestamp": 1_700_000_000_000_i64, "timestampType": "CREATE_TIME",
            "key": b64.encode(&key), "value": b64.encode(&value), "headers": [] } ] } });
    let record = StreamFailureRecord::new(
        "fail-1",
        "arn:aws:lambda:us-east-1:000000000000:function:consumer",
        condition::RETRY_ATTEMPTS_EXHAUSTED,
        4,
        Some(br#"{"errorMessage":"poison"}"#),
        &bootstrap(),
        (41, 1_700_000_000_000, 64),
        event,
        "2026-01-01T00:00:00.000Z",
    );
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("producer");
    let text = serde_json::to_vec(&record).expect("encode");
    producer
        .send(
            FutureRecord::to(&failed).key("order 7").payload(&text),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");

    let dest = format!("kafka://{failed}");
    let (ok, out, err) = sluice(&["destinations", "tail", &dest], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("RetryAttemptsExhausted") && out.contains("function=consumer"),
        "{out}"
    );
    assert!(out.contains(&format!("record={source}-0@41")), "{out}");
    assert!(out.contains("error: poison"), "{out}");

    let topic_prefix = format!("{prefix}.");
    let (ok, _, err) = sluice(&["redrive", &dest, "--topic-prefix", &topic_prefix], None);
    assert!(ok, "{err}");
    assert!(err.contains("1 re-submitted"), "{err}");
    let back = read_until(&source, Duration::from_secs(20), |r| !r.is_empty()).await;
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].0.as_bytes(), key.as_slice());
    assert_eq!(back[0].1, value, "the value comes back byte for byte");
}

/// Every invocation's log (START, the function's output, END, REPORT) reaches the logs topic,
/// and `sluice logs` prints a function's logs, all of them or one invocation's.
#[tokio::test]
async fn logs_prints_each_invocations_log_from_the_logs_topic() {
    let redis = sluice_tests::redis::RedisServer::start();
    let prefix = unique_name("logs").replace('-', "");
    let node = sluice_tests::node::Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = sluice_tests::functions::Bundle::of("fn-misbehave");
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", node.endpoint);
    let r = http
        .post(&fns)
        .json(&serde_json::json!({ "FunctionName": "talker", "Code": { "Path": bundle.path() } }))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let mut ids = Vec::new();
    for i in 0..2 {
        let r = http
            .post(format!("{fns}/talker/invocations"))
            .body(format!(r#"{{"action":"log","lines":{i}}}"#))
            .send()
            .await
            .expect("invoke");
        assert_eq!(r.status(), 200);
        ids.push(
            r.headers()["x-amzn-RequestId"]
                .to_str()
                .expect("id")
                .to_owned(),
        );
    }
    let topic_prefix = format!("{prefix}.");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (ok, out, err) = sluice(&["logs", "talker", "--topic-prefix", &topic_prefix], None);
        if ok && out.matches("REPORT RequestId: ").count() >= 2 {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "logs: {out}\n{err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for id in &ids {
        assert!(
            out.contains(&format!("START RequestId: {id} Version: $LATEST")),
            "{out}"
        );
        assert!(out.contains(&format!("END RequestId: {id}")), "{out}");
    }
    assert_eq!(out.matches("hello from stdout").count(), 2, "{out}");
    assert!(out.contains("line 0"), "{out}");
    let (ok, one, err) = sluice(
        &[
            "logs",
            "talker",
            "--topic-prefix",
            &topic_prefix,
            "--request-id",
            &ids[1],
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(one.matches("START RequestId: ").count(), 1, "{one}");
    assert!(one.contains(&ids[1]) && one.contains("line 0"), "{one}");
    // Another function's logs are not printed.
    let (ok, none, err) = sluice(&["logs", "quiet", "--topic-prefix", &topic_prefix], None);
    assert!(ok, "{err}");
    assert!(none.is_empty(), "{none}");
}
