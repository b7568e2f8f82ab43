//! A Kafka event source mapping function (built with `lambda_runtime`). Each record's value is
//! JSON; the function fails the whole batch if any record has `"poison": true`, reports
//! `"partial": true` records as batch item failures (ReportBatchItemFailures), and otherwise
//! succeeds. It returns what it saw: `{"seen": [[key, offset], …]}`.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let mut seen = Vec::new();
    let mut failures = Vec::new();
    let empty = serde_json::Map::new();
    for (tp, records) in event.payload["records"].as_object().unwrap_or(&empty) {
        for r in records.as_array().cloned().unwrap_or_default() {
            let value: Value = r["value"]
                .as_str()
                .and_then(|v| B64.decode(v).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let key = r["key"]
                .as_str()
                .and_then(|k| B64.decode(k).ok())
                .map(|k| String::from_utf8_lossy(&k).into_owned());
            // Benchmarks: how long after it was produced (`ts`, Unix ms) the record reached us.
            if let Some(ts) = value["ts"].as_u64() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                println!("lat {}", now.saturating_sub(ts));
            }
            if let Some(ms) = value["sleep_ms"].as_u64() {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            if value["poison"] == json!(true) {
                return Err(format!("poison record at offset {}", r["offset"]).into());
            }
            if value["partial"] == json!(true) {
                failures.push(
                    json!({ "itemIdentifier": { "topic-partition": tp, "offset": r["offset"] } }),
                );
            }
            seen.push(json!([key, r["offset"]]));
        }
    }
    Ok(json!({ "seen": seen, "batchItemFailures": failures }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
