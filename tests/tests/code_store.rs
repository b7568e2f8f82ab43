//! Code never expires ("Delivery I" item 2): a real `sluice node` on the real broker and Redis.
//!
//! A code topic left with delete-by-age retention (as Kafka's 7-day default, or a topic made by
//! an older node) is corrected when a node starts: compacted, `retention.ms=-1`. Every chunk has
//! its own key, so compaction keeps every chunk of every bundle. A node started later, with an
//! empty code cache, fetches the bundle from Kafka and runs it.
//!
//! What tansu does (0.6): it runs its maintenance every 10 minutes; `cleanup.policy` containing
//! `delete` removes records older than `retention.ms` (7 days when unset; and, as tansu reads
//! `-1` literally, every record when it is `-1`), `compact` keeps only the last record of each
//! key. A topic with no explicit `cleanup.policy` is never cleaned by tansu.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_tests::functions::bin_dir;
use sluice_tests::kafka::{bootstrap, read_until, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

/// A zip holding fn-misbehave as `bootstrap`, made with Python's zipfile (executable bit kept).
fn misbehave_zip() -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("{}.zip", unique_name("bundle")));
    let script = format!(
        "import zipfile,sys\n\
         z=zipfile.ZipFile(sys.argv[1],'w',zipfile.ZIP_DEFLATED)\n\
         i=zipfile.ZipInfo('bootstrap'); i.external_attr=0o755<<16; i.compress_type=zipfile.ZIP_DEFLATED\n\
         z.writestr(i, open('{}','rb').read()); z.close()\n",
        bin_dir().join("fn-misbehave").display()
    );
    let mut child = std::process::Command::new("python3")
        .arg("-")
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (makes the test zip)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(child.wait().expect("python3").success());
    let zip = std::fs::read(&out).expect("zip");
    let _ = std::fs::remove_file(&out);
    zip
}

async fn invoke_echo(http: &reqwest::Client, node: &Node, name: &str) -> Value {
    let r = http
        .post(format!(
            "{}/2015-03-31/functions/{name}/invocations",
            node.endpoint
        ))
        .body(r#"{"action":"echo","hello":"code"}"#)
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-amz-function-error").is_none());
    r.json().await.expect("json")
}

#[tokio::test]
async fn code_written_long_ago_runs_on_a_node_with_an_empty_cache() {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let code_topic = format!("{prefix}.code");
    // The code topic as an older node on Kafka left it: deleted by age after 7 days.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin");
    let old = NewTopic::new(&code_topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "604800000");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics([&old], &opts).await.expect("create") {
        r.expect("topic created");
    }

    // Two chunks of a bundle written by an older node: both keyed by the bare hash, so once the
    // topic is compacted only the last would survive unless they are re-keyed first.
    let legacy_sha = "ab".repeat(32);
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("producer");
    for (i, part) in ["legacy-0", "legacy-1"].iter().enumerate() {
        let idx = format!("{i}/2");
        producer
            .send(
                FutureRecord::to(&code_topic)
                    .key(&legacy_sha)
                    .payload(*part)
                    .partition(0)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "sluice-chunk",
                        value: Some(idx.as_bytes()),
                    })),
                Duration::from_secs(30),
            )
            .await
            .expect("legacy chunk");
    }

    let cache_a = std::env::temp_dir().join(unique_name("code-cache"));
    let cache_b = std::env::temp_dir().join(unique_name("code-cache"));
    let cache_flag = |d: &std::path::Path| d.display().to_string();
    let (a_dir, b_dir) = (cache_flag(&cache_a), cache_flag(&cache_b));
    let mut a = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--node-id", "a", "--code-cache-dir", &a_dir],
    );
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&code_topic)], &opts)
        .await
        .expect("describe the code topic");
    let config: Vec<(String, Option<String>)> = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("described")
        .entries
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    let get = |k: &str| {
        config
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.clone())
    };
    assert_eq!(get("retention.ms").as_deref(), Some("-1"), "{config:?}");
    assert_eq!(
        get("cleanup.policy").as_deref(),
        Some("compact"),
        "{config:?}"
    );

    let http = reqwest::Client::new();
    let zip = base64::engine::general_purpose::STANDARD.encode(misbehave_zip());
    let r = http
        .post(format!("{}/2015-03-31/functions", a.endpoint))
        .json(&json!({ "FunctionName": "zipped", "Code": { "ZipFile": zip } }))
        .send()
        .await
        .expect("create");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let f: Value = r.json().await.expect("json");
    let chunks = f["Code"]["SluiceStoredCode"]["Chunks"]
        .as_u64()
        .or_else(|| f["Code"]["SluiceStoredCode"]["chunks"].as_u64());
    assert_eq!(invoke_echo(&http, &a, "zipped").await["hello"], "code");

    // Every chunk has its own key: compaction keeps them all.
    let records = read_until(&code_topic, Duration::from_secs(20), move |r| {
        chunks.is_some_and(|n| r.len() as u64 >= n + 4)
    })
    .await;
    let keyed: Vec<&String> = records
        .iter()
        .map(|(k, _)| k)
        .filter(|k| **k != legacy_sha)
        .collect();
    assert!(
        keyed.len() > 2,
        "a multi-chunk bundle: {} records",
        keyed.len()
    );
    let keys: std::collections::HashSet<&&String> = keyed.iter().collect();
    assert_eq!(
        keys.len(),
        keyed.len(),
        "chunk keys must be unique: {keys:?}"
    );
    for (i, part) in ["legacy-0", "legacy-1"].iter().enumerate() {
        let key = format!("{legacy_sha}/{i}");
        assert!(
            records
                .iter()
                .any(|(k, v)| *k == key && v == part.as_bytes()),
            "legacy chunk {i} re-keyed before compaction"
        );
    }

    // A node that never saw the bundle, with an empty cache, runs it from Kafka.
    a.kill();
    let b = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--node-id", "b", "--code-cache-dir", &b_dir],
    );
    assert_eq!(invoke_echo(&http, &b, "zipped").await["hello"], "code");
    assert!(std::fs::read_dir(&cache_b).expect("cache b").count() > 0);
    let _ = std::fs::remove_dir_all(&cache_a);
    let _ = std::fs::remove_dir_all(&cache_b);
}

/// A zip of the POSIX-shell echo runtime (`examples/echo`) plus `pad_bytes` of random data, so
/// each bundle has its own hash and a known size on disk.
fn echo_zip(pad_bytes: usize) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("{}.zip", unique_name("bundle")));
    let bootstrap =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/echo/bootstrap");
    let script = format!(
        "import zipfile,sys,os\n\
         z=zipfile.ZipFile(sys.argv[1],'w',zipfile.ZIP_DEFLATED)\n\
         i=zipfile.ZipInfo('bootstrap'); i.external_attr=0o755<<16; i.compress_type=zipfile.ZIP_DEFLATED\n\
         z.writestr(i, open('{}','rb').read())\n\
         z.writestr('pad.bin', os.urandom({pad_bytes})); z.close()\n",
        bootstrap.display()
    );
    let mut child = std::process::Command::new("python3")
        .arg("-")
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (makes the test zip)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(child.wait().expect("python3").success());
    let zip = std::fs::read(&out).expect("zip");
    let _ = std::fs::remove_file(&out);
    zip
}

/// The bundles (hash directories) in a code cache.
fn cached(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_code_cache_stays_within_its_bound_except_for_bundles_in_use() {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let cache = std::env::temp_dir().join(unique_name("code-cache"));
    let cache_dir = cache.display().to_string();
    // 1 MiB of cache, bundles of 700 kB: one fits. Idle sandboxes are reaped after 1 s.
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &[
            "--code-cache-dir",
            &cache_dir,
            "--code-cache-max-mb",
            "1",
            "--sandbox-idle-timeout",
            "1s",
            "--init-timeout",
            "2s",
        ],
    );
    let http = reqwest::Client::new();
    for name in ["one", "two", "three"] {
        let zip = base64::engine::general_purpose::STANDARD.encode(echo_zip(700_000));
        let r = http
            .post(format!("{}/2015-03-31/functions", node.endpoint))
            .json(&json!({ "FunctionName": name, "Code": { "ZipFile": zip }, "Timeout": 1 }))
            .send()
            .await
            .expect("create");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap_or_default()
        );
    }
    let invoke = |name: &'static str| {
        let (http, endpoint) = (http.clone(), node.endpoint.clone());
        async move {
            let r = http
                .post(format!(
                    "{endpoint}/2015-03-31/functions/{name}/invocations"
                ))
                .body(format!(r#"{{"hello":"{name}"}}"#))
                .send()
                .await
                .expect("invoke");
            assert_eq!(r.status(), StatusCode::OK, "invoke {name}");
            assert!(
                r.headers().get("x-amz-function-error").is_none(),
                "invoke {name}"
            );
        }
    };
    // A bundle fetched by an invocation is held for that invocation (init 2 s + timeout 1 s +
    // 5 s) and, after it, while its sandbox is idle (reaped after 1 s).
    let held = Duration::from_secs(9);

    invoke("one").await;
    assert_eq!(cached(&cache).len(), 1);
    // `two` while `one` is held: both stay, over the bound, because `one` is in use.
    invoke("two").await;
    assert_eq!(cached(&cache).len(), 2, "a bundle in use was removed");
    // Once neither is in use, fetching `three` removes the least recently used down to the
    // bound: only `three` is left.
    tokio::time::sleep(held).await;
    invoke("three").await;
    let left = cached(&cache);
    assert_eq!(
        left.len(),
        1,
        "cache over its bound with nothing in use: {left:?}"
    );
    // A removed bundle comes back from Kafka (code never expires) and runs.
    tokio::time::sleep(held).await;
    invoke("one").await;
    assert_eq!(cached(&cache).len(), 1);
    assert!(
        node.metric("sluice_code_cache_evictions_total", "").await >= 2.0,
        "evictions counted"
    );
    let _ = std::fs::remove_dir_all(&cache);
}
