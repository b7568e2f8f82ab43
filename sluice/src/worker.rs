//! The worker role's wiring: which sandbox backend this host can run, and the local pool.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::ValueEnum;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::SandboxBackend;

/// How functions are isolated on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxKind {
    /// The KVM micro-VM where hardware virtualization allows it, else the jail.
    Auto,
    /// A jailed process: namespaces, read-only root, seccomp, cgroups.
    Jail,
    /// Sluice's own KVM micro-VM.
    Kvm,
}

/// What this host's `/dev/kvm` can do for micro-VMs.
fn kvm_status() -> (bool, String) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return (false, "/dev/kvm does not exist".into());
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return (
            false,
            "/dev/kvm is PVM (software nested virtualization): guest user space cannot run there, so a \
             micro-VM cannot run a function's bootstrap (see microvm-notes.md)"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")));
    if hw {
        (false, "hardware virtualization is present, but this build of Sluice has no micro-VM backend yet".into())
    } else {
        (
            false,
            "the CPU reports no hardware virtualization (vmx/svm)".into(),
        )
    }
}

/// Picks and builds the sandbox backend, logging why.
pub fn backend(kind: SandboxKind) -> anyhow::Result<Arc<dyn SandboxBackend>> {
    let (kvm_ok, why) = kvm_status();
    metrics::gauge!("sluice_kvm_usable").set(if kvm_ok { 1.0 } else { 0.0 });
    match kind {
        SandboxKind::Kvm if !kvm_ok => {
            bail!("--sandbox kvm refused: {why}. Use --sandbox jail (or auto).")
        }
        SandboxKind::Auto if !kvm_ok => {
            tracing::info!(reason = %why, "micro-VMs unavailable; functions run in jailed processes")
        }
        _ => {}
    }
    let config = JailConfig::detect();
    tracing::info!(cgroups = config.cgroups.name(), agent = %config.agent.display(), "sandbox backend: jail");
    metrics::gauge!("sluice_sandbox_backend_info", "backend" => "jail", "cgroups" => config.cgroups.name()).set(1.0);
    let backend = JailBackend::new(config).context("set up the jail backend")?;
    Ok(Arc::new(backend))
}
