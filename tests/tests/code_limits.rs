//! Code that cannot hurt a worker (issue 14): zip bombs and `Code.Path` roots, on a real
//! `sluice node` with the real broker and Redis.
//!
//! The bombs are made with Python's zipfile: a `bootstrap` and an entry of 1 GiB of zeros
//! (about 1 MB deflated). The lying one has its headers rewritten to declare 1 KiB; the honest
//! one declares 300 MiB, over Lambda's 250 MiB unzipped. Before the streaming unpack, the lying
//! bomb was accepted by CreateFunction and its first invoke took the node to 1.09 GB RSS and
//! wrote 1.1 GB into the code cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::FunctionConfig;
use sluice_core::store::{ConfigObject, ConfigStore, ConfigStoreConfig, Expected, ObjectKey};
use sluice_tests::kafka::{bootstrap, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

/// Runs a Python script with `args`, which writes the zip at `args[0]`; returns its bytes.
fn python_zip(script: &str, args: &[String]) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("{}.zip", unique_name("bundle")));
    let mut child = std::process::Command::new("python3")
        .arg("-")
        .arg(&out)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (makes the test zip)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(child.wait().expect("python3").success(), "python3 failed");
    let zip = std::fs::read(&out).expect("zip");
    let _ = std::fs::remove_file(&out);
    zip
}

fn echo_bootstrap() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/echo/bootstrap")
        .display()
        .to_string()
}

/// The echo runtime plus `bomb`: `inflated` bytes of zeros whose headers declare `declared`.
fn bomb(inflated: u64, declared: u64) -> Vec<u8> {
    const SCRIPT: &str = r"
import struct, sys, zipfile
out, boot, inflated, declared = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:
    i = zipfile.ZipInfo('bootstrap'); i.external_attr = 0o755 << 16
    i.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(i, open(boot, 'rb').read())
    b = zipfile.ZipInfo('bomb'); b.compress_type = zipfile.ZIP_DEFLATED
    with z.open(b, 'w') as w:
        mb = bytes(1 << 20)
        left = inflated
        while left > 0:
            w.write(mb[:min(left, len(mb))]); left -= len(mb)
data = bytearray(open(out, 'rb').read())
patched = 0
for sig, size_at, len_at, name_at in ((b'PK\x03\x04', 22, 26, 30), (b'PK\x01\x02', 24, 28, 46)):
    at = data.find(sig)
    while at >= 0:
        n = struct.unpack_from('<H', data, at + len_at)[0]
        if data[at + name_at:at + name_at + n] == b'bomb':
            struct.pack_into('<I', data, at + size_at, declared); patched += 1
        at = data.find(sig, at + 1)
assert patched == 2, patched
open(out, 'wb').write(data)
";
    python_zip(
        SCRIPT,
        &[echo_bootstrap(), inflated.to_string(), declared.to_string()],
    )
}

/// The echo runtime alone.
fn echo_zip() -> Vec<u8> {
    const SCRIPT: &str = r"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:
    i = zipfile.ZipInfo('bootstrap'); i.external_attr = 0o755 << 16
    i.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(i, open(sys.argv[2], 'rb').read())
";
    python_zip(SCRIPT, &[echo_bootstrap()])
}

const GIB: u64 = 1 << 30;

fn b64(zip: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(zip)
}

/// The pid of the `sluice node` whose command line holds `marker` (its own cache directory).
fn node_pid(marker: &str) -> u32 {
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) == Some(&&b"node"[..]) && args.contains(&marker.as_bytes()) {
            return pid;
        }
    }
    panic!("no sluice node process with {marker} on its command line");
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Every name in `dir` and below, with the bytes of its files.
fn tree(dir: &Path) -> (Vec<PathBuf>, u64) {
    let (mut names, mut bytes) = (Vec::new(), 0);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            names.push(e.path());
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                _ => bytes += e.metadata().map(|m| m.len()).unwrap_or(0),
            }
        }
    }
    (names, bytes)
}

async fn post(http: &reqwest::Client, url: String, body: &Value) -> (StatusCode, String, Value) {
    let r = http.post(url).json(body).send().await.expect("request");
    let status = r.status();
    let kind = r
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        kind,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// CreateFunction with `zip` is refused: 400 `InvalidZipFileException` saying `why`.
async fn assert_create_refused(http: &reqwest::Client, fns: &str, zip: &[u8], why: &str) {
    let (status, kind, body) = post(
        http,
        fns.to_owned(),
        &json!({ "FunctionName": "bomb", "Code": { "ZipFile": b64(zip) } }),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(kind, "InvalidZipFileException", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{body}");
}

/// Creates function `name` (the echo runtime) with `code`, and invokes it.
async fn assert_create_and_echo(http: &reqwest::Client, fns: &str, name: &str, code: Value) {
    let body = json!({ "FunctionName": name, "Code": code });
    let (status, _, body) = post(http, fns.to_owned(), &body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let r = http
        .post(format!("{fns}/{name}/invocations"))
        .body(format!(r#"{{"hello":"{name}"}}"#))
        .send()
        .await
        .expect("invoke");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-amz-function-error").is_none());
    let got: Value = r.json().await.expect("json");
    assert_eq!(got["hello"], name, "{got}");
}

#[tokio::test]
async fn a_zip_bomb_is_refused_by_create_function_and_update_function_code() {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", node.endpoint);

    let lying = bomb(GIB, 1024);
    assert!(lying.len() < 2 << 20, "the bomb is {} bytes", lying.len());
    let declared = "\"bomb\" inflates past the 1024 bytes its header declares";
    assert_create_refused(&http, &fns, &lying, declared).await;
    let honest = bomb(1 << 20, 300 << 20);
    let limit = "at most 262144000 (250 MiB, Lambda's unzipped limit)";
    assert_create_refused(&http, &fns, &honest, limit).await;

    // UpdateFunctionCode refuses it too, and the function keeps its code.
    let (status, _, body) = post(
        &http,
        fns.clone(),
        &json!({ "FunctionName": "good", "Code": { "ZipFile": b64(&echo_zip()) } }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sha = body["CodeSha256"].clone();
    let r = http
        .put(format!("{fns}/good/code"))
        .json(&json!({ "ZipFile": b64(&lying) }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http
        .get(format!("{fns}/good/configuration"))
        .send()
        .await
        .expect("get");
    let now: Value = r.json().await.expect("json");
    assert_eq!(now["CodeSha256"], sha, "{now}");
}

#[tokio::test]
async fn a_bomb_past_the_front_end_fails_its_invoke_and_the_worker_stays_small() {
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let cache = std::env::temp_dir().join(unique_name("code-cache"));
    let cache_flag = cache.display().to_string();
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--code-cache-dir", &cache_flag],
    );
    let pid = node_pid(&cache_flag);
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", node.endpoint);

    // As a node of an older version could have: the bomb straight into the code topic, and a
    // function record pointing at it into the configuration topic.
    let kafka = KafkaSettings::new(bootstrap());
    let producer: rdkafka::producer::FutureProducer =
        kafka.durable_producer_config().create().expect("producer");
    let zip = bomb(GIB, 1024);
    let stored = sluice_core::code::store(&kafka, &producer, &format!("{prefix}.code"), &zip)
        .await
        .expect("store the bomb");
    let mut cfg = ConfigStoreConfig::new("code-limits-test");
    cfg.topic = format!("{prefix}.config");
    cfg.redis_prefix = format!("{prefix}:");
    let cancel = tokio_util::sync::CancellationToken::new();
    let store = ConfigStore::open(&kafka, cfg, Some(redis.connect().await), cancel.clone())
        .await
        .expect("store");
    let mut f = FunctionConfig::from_path("bomb", "/nowhere");
    f.code.path = None;
    f.code.stored = Some(Box::new(stored));
    store
        .write(
            &ObjectKey::function("bomb"),
            Some(ConfigObject::Function(f)),
            Expected::Absent,
        )
        .await
        .expect("write the function");

    let before_kib = status_kib(pid, "VmHWM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = http
            .post(format!("{fns}/bomb/invocations"))
            .body("{}")
            .send()
            .await
            .expect("invoke");
        if r.status() != StatusCode::NOT_FOUND || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status(), StatusCode::OK);
    let error = r
        .headers()
        .get("x-amz-function-error")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body: Value = r.json().await.expect("json");
    let hwm_kib = status_kib(pid, "VmHWM");
    let (left, bytes) = tree(&cache);
    let left: Vec<PathBuf> = left
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != ".lock"))
        .collect();
    eprintln!(
        "node VmHWM {before_kib} KiB before the invoke, {hwm_kib} KiB after; code cache: \
         {bytes} bytes in {left:?}"
    );
    assert_eq!(error.as_deref(), Some("Unhandled"), "{body}");
    assert_eq!(body["errorType"], "Runtime.CodeUnavailable", "{body}");
    assert!(
        body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("inflates past the 1024 bytes")),
        "{body}"
    );
    assert!(
        hwm_kib < 256 * 1024,
        "the node's peak RSS reached {hwm_kib} KiB unpacking a 1 GiB bomb"
    );
    assert!(left.is_empty(), "left in the code cache: {left:?}");

    // The worker is still up and runs good code.
    let code = json!({ "ZipFile": b64(&echo_zip()) });
    assert_create_and_echo(&http, &fns, "good", code).await;
    cancel.cancel();
    let _ = std::fs::remove_dir_all(&cache);
}

/// A bundle directory holding the echo runtime as `bootstrap`, readable by sandboxes.
fn echo_bundle(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::copy(echo_bootstrap(), dir.join("bootstrap")).expect("copy bootstrap");
    for (p, mode) in [(dir.to_path_buf(), 0o755), (dir.join("bootstrap"), 0o755)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

#[tokio::test]
async fn code_path_is_allowed_only_under_the_nodes_code_path_roots() {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::temp_dir().join(unique_name("code-roots"));
    let (root, outside) = (base.join("root"), base.join("outside"));
    echo_bundle(&root.join("echo"));
    echo_bundle(&outside.join("echo"));
    for d in [&base, &root] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::os::unix::fs::symlink(outside.join("echo"), root.join("escape")).expect("symlink");
    let redis = RedisServer::start();
    let prefix = unique_name("t").replace('-', "");
    let root_flag = root.display().to_string();
    let node = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &["--code-path-root", &root_flag],
    );
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", node.endpoint);
    let canonical_root = std::fs::canonicalize(&root).expect("canonical root");

    let code = json!({ "Path": root.join("echo") });
    assert_create_and_echo(&http, &fns, "inside", code).await;

    for (name, path) in [
        ("outside", outside.join("echo")),
        ("escape", root.join("escape")),
        ("dotdot", root.join("../outside/echo")),
    ] {
        let (status, kind, body) = post(
            &http,
            fns.clone(),
            &json!({ "FunctionName": name, "Code": { "Path": path } }),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert_eq!(kind, "InvalidParameterValueException", "{name}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("outside the directories this node allows")
                && message.contains(&canonical_root.display().to_string()),
            "{name}: {body}"
        );
    }
    let r = http
        .put(format!("{fns}/inside/code"))
        .json(&json!({ "Path": root.join("escape") }))
        .send()
        .await
        .expect("update");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let _ = std::fs::remove_dir_all(&base);
}

/// The worker checks a `Code.Path` against its own roots too: a front end that allows a
/// directory (or a record written by an older node, which checked nothing) cannot make a worker
/// run code from a directory the worker does not allow. The invoke is a function error
/// (`Runtime.CodeUnavailable`), and a bundle under the worker's roots still runs.
#[tokio::test]
async fn a_worker_runs_code_paths_only_under_its_own_roots() {
    use std::os::unix::fs::PermissionsExt;
    let base = std::env::temp_dir().join(unique_name("worker-roots"));
    let (front_root, worker_root) = (base.join("front"), base.join("front/worker"));
    echo_bundle(&front_root.join("echo"));
    echo_bundle(&worker_root.join("echo"));
    for d in [&base, &front_root, &worker_root] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let redis = RedisServer::start();
    let prefix = unique_name("wr").replace('-', "");
    let (front_flag, worker_flag) = (
        front_root.display().to_string(),
        worker_root.display().to_string(),
    );
    let front_id = format!("{prefix}-front");
    let front = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &[
            "--roles",
            "frontend",
            "--node-id",
            &front_id,
            "--code-path-root",
            &front_flag,
        ],
    );
    let worker_id = format!("{prefix}-worker");
    let _worker = Node::start(
        &bootstrap(),
        &redis.url(),
        &prefix,
        &[
            "--roles",
            "worker",
            "--node-id",
            &worker_id,
            "--code-path-root",
            &worker_flag,
        ],
    );
    let http = reqwest::Client::new();
    let fns = format!("{}/2015-03-31/functions", front.endpoint);
    // Allowed by both: runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = json!({ "Path": worker_root.join("echo") });
    assert_create_and_echo(&http, &fns, "both", code).await;
    // Allowed by the front end only: created, but the worker will not run it.
    let (status, _, body) = post(
        &http,
        fns.clone(),
        &json!({ "FunctionName": "frontonly", "Code": { "Path": front_root.join("echo") } }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let r = loop {
        let r = http
            .post(format!("{fns}/frontonly/invocations"))
            .body(r#"{"hello":"frontonly"}"#)
            .send()
            .await
            .expect("invoke");
        if r.status() == StatusCode::OK || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get("x-amz-function-error")
            .and_then(|v| v.to_str().ok()),
        Some("Unhandled")
    );
    let got: Value = r.json().await.expect("json");
    assert_eq!(got["errorType"], "Runtime.CodeUnavailable", "{got}");
    assert!(
        got["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("outside the directories this node allows")),
        "{got}"
    );
    let _ = std::fs::remove_dir_all(&base);
}
