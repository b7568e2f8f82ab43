//! The worker role's wiring: which sandbox backend this host can run, and the local pool.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::ValueEnum;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::kvm::{self, KvmBackend, KvmConfig};
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

/// Where the guest kernel is: `$SLUICE_GUEST_KERNEL`, else the cache of
/// `scripts/build-guest-kernel.sh`.
fn guest_kernel() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_GUEST_KERNEL") {
        return Some(p.into());
    }
    let cache = std::path::Path::new("/var/cache/sluice/guest-kernel");
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .find(|p| p.is_file())
}

/// Picks and builds the sandbox backend, logging and exporting why; the jail keeps its
/// sandboxes' directories under `run_dir` (the node's own).
pub fn backend(
    kind: SandboxKind,
    run_dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn SandboxBackend>> {
    let support = kvm::detect();
    let usable = support.can_run_guest_userspace();
    metrics::gauge!("sluice_kvm_usable").set(if usable { 1.0 } else { 0.0 });
    metrics::gauge!("sluice_kvm_pvm").set(if support.pvm { 1.0 } else { 0.0 });
    if support.pvm {
        tracing::info!(reason = %support.reason, "/dev/kvm is PVM");
    }
    let want_kvm = match kind {
        SandboxKind::Kvm => true,
        SandboxKind::Jail => false,
        SandboxKind::Auto => usable,
    };
    if want_kvm {
        let agent = JailConfig::detect().agent;
        let init = agent.with_file_name("sluice-vm-init");
        let kernel = guest_kernel()
            .unwrap_or_else(|| "/var/cache/sluice/guest-kernel/<hash>/vmlinux".into());
        let config = KvmConfig {
            kernel,
            agent,
            init,
            boot_timeout: std::time::Duration::from_secs(30),
        };
        match KvmBackend::new(config) {
            Ok(b) => {
                tracing::info!("sandbox backend: kvm (Sluice's own micro-VM)");
                metrics::gauge!("sluice_sandbox_backend_info", "backend" => "kvm", "cgroups" => "none").set(1.0);
                return Ok(Arc::new(b));
            }
            Err(e) if kind == SandboxKind::Kvm => bail!("{e}. Use --sandbox jail (or auto)."),
            Err(e) => tracing::warn!(error = %e, "micro-VMs unavailable; using the jail"),
        }
    } else if kind == SandboxKind::Auto {
        tracing::info!(reason = %support.reason, "micro-VMs unavailable; functions run in jailed processes");
    }
    let mut config = JailConfig::detect();
    config.run_dir = run_dir.join("jail");
    tracing::info!(cgroups = config.cgroups.name(), agent = %config.agent.display(), "sandbox backend: jail");
    metrics::gauge!("sluice_sandbox_backend_info", "backend" => "jail", "cgroups" => config.cgroups.name()).set(1.0);
    let backend = JailBackend::new(config).context("set up the jail backend")?;
    Ok(Arc::new(backend))
}
