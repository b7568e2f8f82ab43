//! Function settings through the Lambda-compatible API, as a real node runs them.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

#[tokio::test]
async fn ephemeral_storage_sizes_the_functions_tmp_and_is_checked() {
    let redis = RedisServer::start();
    let prefix = unique_name("fa").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = Bundle::of("fn-misbehave");
    let http = reqwest::Client::new();
    let create = |name: &str, extra: Value| {
        let mut body = json!({ "FunctionName": name, "Code": { "Path": bundle.path() } });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        http.post(format!("{}/2015-03-31/functions", node.endpoint))
            .json(&body)
            .send()
    };
    let tmp_mb = |name: &'static str| {
        let (http, endpoint) = (http.clone(), node.endpoint.clone());
        async move {
            let r = http
                .post(format!(
                    "{endpoint}/2015-03-31/functions/{name}/invocations"
                ))
                .body(r#"{"action":"tmp"}"#)
                .send()
                .await
                .expect("invoke");
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.expect("json");
            v["tmp_mb"].as_u64().unwrap_or_else(|| panic!("{v}"))
        }
    };

    let r = create("big", json!({ "EphemeralStorage": { "Size": 1024 } }))
        .await
        .expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["EphemeralStorage"]["Size"], 1024, "{v}");
    assert_eq!(tmp_mb("big").await, 1024);

    let r = create("plain", json!({})).await.expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(tmp_mb("plain").await, 512, "Lambda's default");

    // UpdateFunctionConfiguration changes it; the next sandbox gets the new size.
    let r = http
        .put(format!(
            "{}/2015-03-31/functions/plain/configuration",
            node.endpoint
        ))
        .json(&json!({ "EphemeralStorage": { "Size": 2048 } }))
        .send()
        .await
        .expect("update");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
    assert_eq!(tmp_mb("plain").await, 2048);

    let r = create("tiny", json!({ "EphemeralStorage": { "Size": 100 } }))
        .await
        .expect("create");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let msg = r.text().await.unwrap_or_default();
    assert!(
        msg.contains("EphemeralStorage.Size") && msg.contains("512") && msg.contains("100"),
        "{msg}"
    );
}
