//! The micro-VM backend end to end: the echo function (built with the public `lambda_runtime`
//! crate) answering 100 invocations inside a micro-VM.
//!
//! On a PVM host (this project's machines) guest user space cannot run, so the test asserts the
//! other half of the contract instead: `detect()` reports PVM with the reason, and
//! `KvmBackend::new` refuses with that explanation. On a host with hardware virtualization it
//! boots the VM and runs the invocations (it needs the guest kernel from
//! scripts/build-guest-kernel.sh).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::functions::{bin_dir, Bundle};
use sluice_workers::kvm::{detect, KvmBackend, KvmConfig};
use sluice_workers::{BootError, FunctionSpec, InvokeOutcome, Sandbox};

fn config() -> KvmConfig {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/build-guest-kernel.sh"
    );
    let kernel = std::env::var_os("SLUICE_GUEST_KERNEL")
        .map(Into::into)
        .or_else(|| {
            let out = Command::new("bash")
                .arg(script)
                .arg("--print-path")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().into())
        })
        .unwrap_or_default();
    KvmConfig {
        kernel,
        agent: bin_dir().join("sluice-agent"),
        init: bin_dir().join("sluice-vm-init"),
        boot_timeout: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn echo_answers_100_invocations_in_a_micro_vm_or_pvm_is_refused() {
    let support = detect();
    assert!(
        support.dev_kvm,
        "these tests need /dev/kvm: {}",
        support.reason
    );
    if support.pvm {
        assert!(!support.can_run_guest_userspace());
        assert!(support.reason.contains("PVM"), "{}", support.reason);
        match KvmBackend::new(config()) {
            Err(BootError::Setup(msg)) => {
                assert!(msg.contains("--sandbox kvm refused"), "{msg}");
                assert!(
                    msg.contains("syscall from guest user space faults"),
                    "{msg}"
                );
            }
            other => panic!("a PVM host must refuse the kvm backend, got {other:?}"),
        }
        eprintln!(
            "PVM host: kvm backend refused as expected ({})",
            support.reason
        );
        return;
    }
    let backend = KvmBackend::new(config()).expect("kvm backend");
    let bundle = Bundle::of("fn-echo");
    let spec = Arc::new(FunctionSpec::new("echo", bundle.path()));
    let mut sb = Sandbox::boot(&backend, 1, spec, Duration::from_secs(30), None)
        .await
        .expect("boot the micro-VM");
    for i in 0..100 {
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
    sb.destroy().await;
}
