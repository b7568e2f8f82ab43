//! `sluice redrive` re-submits exactly what was sent, under request ids of its own run: a real
//! node fails every event into a failure topic, and the redriven events are compared byte for
//! byte with the originals.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::functions::bin_dir;
use sluice_tests::kafka::{bootstrap, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

fn sluice(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("sluice"))
        .args(args)
        .env("SLUICE_KAFKA", bootstrap())
        .output()
        .expect("run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn failures(topic: &str, n: usize) -> Vec<Value> {
    let recs = read_until(topic, Duration::from_secs(60), move |r| r.len() >= n).await;
    recs.iter()
        .map(|(_, v)| serde_json::from_slice(v).expect("failure record"))
        .collect()
}

#[tokio::test]
async fn redriven_events_are_byte_identical_and_every_run_has_its_own_request_ids() {
    let redis = RedisServer::start();
    let prefix = unique_name("rdx").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let http = reqwest::Client::new();
    let code = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/echo");
    let fns = format!("{}/2015-03-31/functions", node.endpoint);
    let r = http
        .post(&fns)
        .json(&json!({ "FunctionName": "f", "Code": { "Path": code.canonicalize().expect("examples/echo") } }))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let failed = unique_name("rdx-failed");
    let r = http
        .put(format!("{}/2019-09-25/functions/f/event-invoke-config", node.endpoint))
        .json(&json!({ "MaximumRetryAttempts": 0,
                       "DestinationConfig": { "OnFailure": { "Destination": format!("kafka://{failed}") } } }))
        .send()
        .await
        .expect("eic");
    assert_eq!(r.status(), 200);
    // The function fails every event containing "fail".
    let originals: Vec<&[u8]> = vec![
        br#""please fail""#,
        br#"{"fail":true,"id":123456789012345678901234567890,"x":1.00000000000000000001}"#,
        br#"{ "fail" : [ 1 , 2 ] }"#,
    ];
    for p in &originals {
        let r = http
            .post(format!("{fns}/f/invocations"))
            .header("X-Amz-Invocation-Type", "Event")
            .body(p.to_vec())
            .send()
            .await
            .expect("invoke");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
    let first = failures(&failed, 3).await;
    assert_eq!(first.len(), 3);

    let dest = format!("kafka://{failed}");
    let topic_prefix = format!("{prefix}.");
    let (ok, err) = sluice(&["redrive", &dest, "--topic-prefix", &topic_prefix]);
    assert!(ok && err.contains("3 re-submitted"), "{err}");
    let second = failures(&failed, 6).await;
    assert_eq!(
        second.len(),
        6,
        "every redriven event ran (and failed) again"
    );
    // A second redrive of the same records: new request ids, so the pollers run them again.
    let (ok, err) = sluice(&[
        "redrive",
        &dest,
        "--topic-prefix",
        &topic_prefix,
        "--from-beginning",
    ]);
    assert!(ok && err.contains("6 re-submitted"), "{err}");
    let third = failures(&failed, 12).await;
    assert_eq!(
        third.len(),
        12,
        "events of the second redrive were skipped as already run"
    );
    let ids: std::collections::HashSet<&str> = third
        .iter()
        .map(|r| r["requestContext"]["requestId"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 12, "request ids repeat across runs: {ids:?}");

    // What went back to the queue is what the callers sent, byte for byte.
    let queue = format!("{prefix}.async");
    let events = read_until(&queue, Duration::from_secs(30), |r| r.len() >= 12).await;
    assert_eq!(events.len(), 12);
    for p in &originals {
        let copies = events.iter().filter(|(_, v)| v.as_slice() == *p).count();
        assert_eq!(
            copies,
            4,
            "{} is in the queue {copies} times, byte-identical (want the original and 3 redrives); queue: {:?}",
            String::from_utf8_lossy(p),
            events
                .iter()
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        );
    }
}
