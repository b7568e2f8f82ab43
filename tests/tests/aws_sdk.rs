//! The AWS SDK for Python (boto3) against a node with access keys: SigV4 signatures verified,
//! Lambda's operations and error codes as the SDK expects them.

use std::process::Command;

use serde_json::json;
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

#[tokio::test]
async fn boto3_works_against_a_node_and_signatures_are_enforced() {
    let redis = RedisServer::start();
    let prefix = unique_name("sdk").replace('-', "");
    let bundle = Bundle::of("fn-misbehave");
    // The function is created unsigned (boto3 only sends zip code); the configuration lives in
    // Kafka, so the node restarted with keys still has it.
    let mut node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/2015-03-31/functions", node.endpoint))
        .json(&json!({ "FunctionName": "sdkfn", "Code": { "Path": bundle.path() } }))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    node.kill();
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--access-key", "AKIDSLUICETEST:s3cr3t/key+with=chars"],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/aws/sdk_check.py");
    let out = Command::new("python3")
        .args([
            script,
            &node.endpoint,
            "AKIDSLUICETEST",
            "s3cr3t/key+with=chars",
            "sdkfn",
            &sluice_tests::functions::bin_dir()
                .join("fn-misbehave")
                .display()
                .to_string(),
        ])
        .output()
        .expect("python3 (scripts/test.sh installs boto3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "boto3 checks failed:\n{stdout}\n{stderr}"
    );
}
