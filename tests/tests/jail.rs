//! The jailed-process sandbox, on real namespaces, cgroups and seccomp.

use std::sync::Arc;
use std::time::Duration;

use sluice_tests::functions::Bundle;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::{FunctionSpec, InvokeOutcome, Sandbox};

fn backend() -> JailBackend {
    JailBackend::new(JailConfig::detect()).expect("jail backend")
}

async fn boot(backend: &JailBackend, bundle: &Bundle, memory_mb: u64, timeout: Duration) -> Sandbox {
    let mut spec = FunctionSpec::new("t", bundle.path());
    spec.memory_mb = memory_mb;
    spec.timeout = timeout;
    Sandbox::boot(backend, rand::random::<u32>().into(), Arc::new(spec), Duration::from_secs(10), None)
        .await
        .expect("boot")
}

#[tokio::test]
async fn echo_round_trips_on_one_warm_sandbox() {
    let backend = backend();
    let bundle = Bundle::of("fn-echo");
    let mut sb = boot(&backend, &bundle, 128, Duration::from_secs(3)).await;
    for i in 0..1000 {
        let payload = format!(r#"{{"n":{i}}}"#);
        let out = sb.invoke(&format!("req-{i}"), payload.clone().into_bytes(), "").await;
        assert_eq!(out, InvokeOutcome::Response(payload.into_bytes()), "invocation {i}");
    }
    assert!(sb.is_alive());
    sb.destroy().await;
}
