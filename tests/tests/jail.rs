//! The jailed-process sandbox, on real namespaces, cgroups and seccomp.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::functions::Bundle;
use sluice_workers::cgroup::CgroupMode;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::sandbox::LogLine;
use sluice_workers::{BootError, FunctionSpec, InvokeOutcome, Sandbox};
use tokio::sync::mpsc;

fn backend() -> JailBackend {
    JailBackend::new(JailConfig::detect()).expect("jail backend")
}

fn spec(bundle: &Bundle, memory_mb: u64, timeout: Duration) -> Arc<FunctionSpec> {
    let mut spec = FunctionSpec::new("t", bundle.path());
    spec.memory_mb = memory_mb;
    spec.timeout = timeout;
    spec.environment = vec![("GREETING".into(), "hello".into())];
    Arc::new(spec)
}

async fn boot_with_logs(
    backend: &JailBackend,
    bundle: &Bundle,
    memory_mb: u64,
    timeout: Duration,
    logs: Option<mpsc::Sender<LogLine>>,
) -> Result<Sandbox, BootError> {
    Sandbox::boot(
        backend,
        rand::random::<u32>().into(),
        spec(bundle, memory_mb, timeout),
        Duration::from_secs(10),
        logs,
    )
    .await
}

async fn boot(
    backend: &JailBackend,
    bundle: &Bundle,
    memory_mb: u64,
    timeout: Duration,
) -> Sandbox {
    boot_with_logs(backend, bundle, memory_mb, timeout, None)
        .await
        .expect("boot")
}

fn json_of(out: &InvokeOutcome) -> Value {
    match out {
        InvokeOutcome::Response(p) => serde_json::from_slice(p).expect("JSON response"),
        other => panic!("expected a response, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_round_trips_on_one_warm_sandbox() {
    let backend = backend();
    let bundle = Bundle::of("fn-echo");
    let mut sb = boot(&backend, &bundle, 128, Duration::from_secs(3)).await;
    for i in 0..1000 {
        let payload = format!(r#"{{"n":{i}}}"#);
        let out = sb
            .invoke(&format!("req-{i}"), payload.clone().into_bytes(), "")
            .await;
        assert_eq!(
            out,
            InvokeOutcome::Response(payload.into_bytes()),
            "invocation {i}"
        );
    }
    assert!(sb.is_alive());
    sb.destroy().await;
}

#[tokio::test]
async fn the_function_sees_lambdas_environment_inside_the_jail() {
    let backend = backend();
    let bundle = Bundle::of("fn-misbehave");
    let mut sb = boot(&backend, &bundle, 256, Duration::from_secs(3)).await;
    let v = json_of(
        &sb.invoke("req-inspect", br#"{"action":"inspect"}"#.to_vec(), "")
            .await,
    );
    // Its own PID namespace (the agent is PID 1), its own UTS and user namespace.
    assert!(v["pid"].as_u64().expect("pid") < 10, "{v}");
    assert!(v["processes"].as_u64().expect("count") <= 3, "{v}");
    assert_eq!(v["hostname"], "sandbox");
    assert_eq!(
        v["uid"],
        sluice_agent::jail::FUNCTION_UID,
        "an unprivileged uid inside (the agent is 0), its own unprivileged host uid outside"
    );
    // Read-only root, bundle and /etc; a private writable /tmp.
    for path in ["write_task", "write_etc", "write_root"] {
        assert!(
            v[path]
                .as_str()
                .expect("str")
                .contains("Read-only file system"),
            "{path}: {v}"
        );
    }
    assert_eq!(v["write_tmp"], "written");
    assert_eq!(v["task_root"], "/var/task");
    assert_eq!(v["runtime_api"], "127.0.0.1:9001");
    assert_eq!(v["function_name"], "t");
    assert_eq!(v["memory"], "256");
    assert_eq!(v["user_var"], "hello");
    assert_eq!(v["request_id"], "req-inspect");
    assert_eq!(v["arn"], "arn:aws:lambda:us-east-1:000000000000:function:t");
    assert!(v["deadline_ms"].as_u64().expect("deadline") > 1_600_000_000_000);
    sb.destroy().await;
}

#[tokio::test]
async fn function_errors_are_reported_and_the_sandbox_stays_warm() {
    let backend = backend();
    let bundle = Bundle::of("fn-misbehave");
    let mut sb = boot(&backend, &bundle, 128, Duration::from_secs(3)).await;
    let out = sb.invoke("r1", br#"{"action":"error"}"#.to_vec(), "").await;
    let InvokeOutcome::FunctionError { payload, .. } = &out else {
        panic!("expected a function error, got {out:?}")
    };
    let body: Value = serde_json::from_slice(payload).expect("JSON error");
    assert_eq!(body["errorMessage"], "the function failed on purpose");
    assert!(sb.is_alive());
    assert_eq!(
        json_of(
            &sb.invoke("r2", br#"{"action":"echo","x":1}"#.to_vec(), "")
                .await
        )["x"],
        1
    );
    sb.destroy().await;
}

#[tokio::test]
async fn stdout_and_stderr_become_log_lines_tagged_with_the_request() {
    let backend = backend();
    let bundle = Bundle::of("fn-misbehave");
    let (tx, mut rx) = mpsc::channel(4096);
    let mut sb = boot_with_logs(&backend, &bundle, 128, Duration::from_secs(3), Some(tx))
        .await
        .expect("boot");
    // The lines a function writes before its result are relayed before it: they are all
    // there, tagged, the moment the invocation returns, every time, even right after a burst.
    for i in 0..20 {
        let id = format!("req-log-{i}");
        json_of(
            &sb.invoke(&id, br#"{"action":"log","lines":1000}"#.to_vec(), "")
                .await,
        );
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            assert_eq!(l.request_id, id, "{l:?}");
            lines.push(l.line);
        }
        assert_eq!(lines.len(), 1002, "invocation {i}");
        let stdout: Vec<&String> = lines.iter().filter(|l| *l != "hello from stderr").collect();
        let expected: Vec<String> = (0..1000)
            .map(|n| format!("line {n}"))
            .chain(["hello from stdout".to_owned()])
            .collect();
        assert_eq!(
            stdout,
            expected.iter().collect::<Vec<_>>(),
            "stdout in order"
        );
    }
    sb.destroy().await;
}

/// Each misbehaving function gets its error while a neighbour sandbox keeps serving.
#[tokio::test]
async fn misbehaving_functions_fail_alone() {
    let backend = backend();
    let echo = Bundle::of("fn-echo");
    let bad = Bundle::of("fn-misbehave");
    let mut neighbour = boot(&backend, &echo, 128, Duration::from_secs(3)).await;

    type Check = Box<dyn Fn(&InvokeOutcome) -> bool>;
    let cases: Vec<(&str, u64, Check)> = vec![
        (
            "exit",
            128,
            Box::new(
                |o| matches!(o, InvokeOutcome::Crashed { reason } if reason == "exit status 3"),
            ),
        ),
        (
            "hang",
            128,
            Box::new(
                |o| matches!(o, InvokeOutcome::Timeout { after } if *after == Duration::from_secs(1)),
            ),
        ),
        (
            "syscall",
            128,
            Box::new(
                |o| matches!(o, InvokeOutcome::Crashed { reason } if reason == "signal: bad system call"),
            ),
        ),
    ];
    for (action, memory, check) in cases {
        let mut sb = boot(&backend, &bad, memory, Duration::from_secs(1)).await;
        let out = sb
            .invoke(
                &format!("req-{action}"),
                json!({ "action": action }).to_string().into_bytes(),
                "",
            )
            .await;
        assert!(check(&out), "{action}: {out:?}");
        assert!(
            !sb.is_alive(),
            "{action}: a broken sandbox must not be reused"
        );
        let (error_type, body) = out.error(&format!("req-{action}")).expect("an error");
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert!(
            body["errorMessage"]
                .as_str()
                .expect("message")
                .contains(&format!("RequestId: req-{action}")),
            "{body}"
        );
        assert!(!error_type.is_empty());
        sb.destroy().await;
        let n = format!(r#"{{"after":"{action}"}}"#);
        assert_eq!(
            neighbour.invoke("n", n.clone().into_bytes(), "").await,
            InvokeOutcome::Response(n.into_bytes())
        );
    }
    neighbour.destroy().await;
}

#[tokio::test]
async fn the_network_is_loopback_only() {
    let backend = backend();
    let bundle = Bundle::of("fn-misbehave");
    let mut sb = boot(&backend, &bundle, 128, Duration::from_secs(5)).await;
    let v = json_of(
        &sb.invoke("req-net", br#"{"action":"net"}"#.to_vec(), "")
            .await,
    );
    assert!(
        v["outside"].as_str().expect("str").contains("unreachable"),
        "{v}"
    );
    sb.destroy().await;
}

#[tokio::test]
async fn allocating_past_the_memory_limit_is_out_of_memory() {
    let backend = backend();
    assert_ne!(
        backend.config().cgroups,
        CgroupMode::None,
        "this host has cgroups; the test needs them"
    );
    let bundle = Bundle::of("fn-misbehave");
    let mut sb = boot(&backend, &bundle, 128, Duration::from_secs(10)).await;
    let out = sb
        .invoke("req-hog", br#"{"action":"hog","mb":512}"#.to_vec(), "")
        .await;
    assert_eq!(out, InvokeOutcome::OutOfMemory);
    let (error_type, _) = out.error("req-hog").expect("error");
    assert_eq!(error_type, "Runtime.OutOfMemory");
    sb.destroy().await;
    // Within the limit is fine.
    let mut sb = boot(&backend, &bundle, 256, Duration::from_secs(10)).await;
    assert_eq!(
        json_of(
            &sb.invoke("req-ok", br#"{"action":"hog","mb":64}"#.to_vec(), "")
                .await
        )["allocated_mb"],
        64
    );
    sb.destroy().await;
}

#[tokio::test]
async fn an_init_error_is_reported_as_lambda_reports_it() {
    let backend = backend();
    let bundle = Bundle::of("fn-init-error");
    let err = boot_with_logs(&backend, &bundle, 128, Duration::from_secs(3), None)
        .await
        .err()
        .expect("init fails");
    let BootError::Init {
        error_type,
        payload,
    } = err
    else {
        panic!("expected an init error, got {err}")
    };
    assert_eq!(error_type, "Runtime.ConfigError");
    let body: Value = serde_json::from_slice(&payload).expect("JSON");
    assert_eq!(
        body["errorMessage"],
        "cannot load configuration: missing TABLE_NAME"
    );
}
