//! The micro-VM backend: each sandbox is a `sluice-vmm` VM booting the project's guest kernel
//! with an initramfs holding `sluice-vm-init` (PID 1), the agent and the function's bundle; the
//! agent's channel is a virtio-vsock connection from the guest to host port [`AGENT_PORT`].
//!
//! [`detect`] says whether this host can run it. On PVM hosts (`kvm_pvm`: a software
//! hypervisor, no VMX/SVM) the guest kernel boots but the first `syscall` of guest user space
//! faults, so no agent can run: [`KvmBackend::new`] refuses there with that explanation and
//! auto-detection picks the jail.
//!
//! Threading: the VM's vCPU and device threads are OS threads owned by `sluice-vmm`; this module
//! only crosses into them through the vsock stream (async) and `spawn_blocking` for set-up and
//! teardown.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sluice_vmm::boot::{self, initramfs};
use sluice_vmm::{RunningVm, Vm, VmConfig};

use crate::sandbox::{BootError, Channel, FunctionSpec, Isolation, SandboxBackend};

/// Host vsock port the guest's init connects to.
pub const AGENT_PORT: u32 = 1024;
/// Guest memory beyond the function's, MiB (kernel, initramfs, agent).
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// What this host's `/dev/kvm` can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmSupport {
    /// `/dev/kvm` exists and opens.
    pub dev_kvm: bool,
    /// It is provided by PVM (`/sys/module/kvm_pvm`).
    pub pvm: bool,
    /// The CPU advertises VMX or SVM.
    pub hardware_virtualization: bool,
    /// Why a micro-VM can or cannot run guest user space here.
    pub reason: String,
}

impl KvmSupport {
    /// Whether a micro-VM can run the agent here.
    #[must_use]
    pub fn can_run_guest_userspace(&self) -> bool {
        self.dev_kvm && !self.pvm
    }
}

/// Inspects `/dev/kvm`, `/sys/module/kvm_pvm` and `/proc/cpuinfo`.
#[must_use]
pub fn detect() -> KvmSupport {
    let dev_kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let pvm = boot::pvm_host();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware_virtualization = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let reason = if !dev_kvm {
        "/dev/kvm is missing or not accessible: no micro-VMs on this host".to_owned()
    } else if pvm {
        format!(
            "/dev/kvm is provided by PVM (kvm_pvm loaded; {}): guests boot to /init, but the first \
             syscall from guest user space faults, so the agent cannot run in a micro-VM here",
            if hardware_virtualization { "VMX/SVM present" } else { "no VMX/SVM in /proc/cpuinfo" }
        )
    } else {
        "/dev/kvm with hardware virtualization: micro-VMs can run the agent".to_owned()
    };
    KvmSupport {
        dev_kvm,
        pvm,
        hardware_virtualization,
        reason,
    }
}

/// Settings of the micro-VM backend.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// The guest kernel (`vmlinux` from scripts/build-guest-kernel.sh).
    pub kernel: PathBuf,
    /// The `sluice-agent` executable copied into each guest.
    pub agent: PathBuf,
    /// The `sluice-vm-init` executable (guest PID 1).
    pub init: PathBuf,
    /// How long a guest may take from start to connecting its agent.
    pub boot_timeout: Duration,
}

/// The micro-VM backend.
#[derive(Debug)]
pub struct KvmBackend {
    config: KvmConfig,
}

impl KvmBackend {
    /// A backend with `config`, if this host can run micro-VM guests.
    ///
    /// # Errors
    /// [`BootError::Setup`] with [`KvmSupport::reason`] when it cannot (no `/dev/kvm`, or PVM),
    /// or naming the missing kernel, agent or init.
    pub fn new(config: KvmConfig) -> Result<Self, BootError> {
        let support = detect();
        if !support.can_run_guest_userspace() {
            return Err(BootError::Setup(format!(
                "--sandbox kvm refused: {}",
                support.reason
            )));
        }
        for (what, path) in [
            ("guest kernel", &config.kernel),
            ("agent", &config.agent),
            ("guest init", &config.init),
        ] {
            if !path.is_file() {
                return Err(BootError::Setup(format!(
                    "the {what} {} does not exist",
                    path.display()
                )));
            }
        }
        Ok(Self { config })
    }
}

/// The host's shared libraries an executable needs in the guest, read from its ELF headers
/// (never by running `ldd` on a function's file, which may execute it).
fn with_libraries(exe: &Path) -> Vec<PathBuf> {
    crate::elf::host_libraries(exe)
}

fn build_initrd(config: &KvmConfig, spec: &FunctionSpec) -> std::io::Result<Vec<u8>> {
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    let mut add_file = |entries: &mut Vec<initramfs::Entry>, dest: &str, src: &Path| {
        let data = std::fs::read(src)?;
        let mut parent = Path::new(dest).parent();
        let mut new_dirs = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            new_dirs.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        for d in new_dirs.into_iter().rev() {
            if dirs.insert(d.clone()) {
                entries.push(initramfs::Entry::Dir(d));
            }
        }
        entries.push(initramfs::Entry::File {
            path: dest.to_owned(),
            mode: 0o755,
            data,
        });
        Ok::<_, std::io::Error>(())
    };
    add_file(&mut entries, "init", &config.init)?;
    add_file(&mut entries, "sluice-agent", &config.agent)?;
    let mut libs = std::collections::BTreeSet::new();
    libs.extend(with_libraries(&config.init));
    libs.extend(with_libraries(&config.agent));
    for f in std::fs::read_dir(&spec.task_dir)? {
        let f = f?;
        if f.file_type()?.is_file() {
            libs.extend(with_libraries(&f.path()));
            let dest = format!("var/task/{}", f.file_name().to_string_lossy());
            add_file(&mut entries, &dest, &f.path())?;
        }
    }
    for lib in libs {
        let dest = lib.to_string_lossy().trim_start_matches('/').to_owned();
        add_file(&mut entries, &dest, &lib)?;
    }
    Ok(initramfs::build(&entries))
}

struct MicroVm {
    vm: Mutex<Option<RunningVm>>,
    memory_bytes: u64,
}

#[async_trait]
impl Isolation for MicroVm {
    async fn destroy(self: Box<Self>) {
        let vm = self
            .vm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(vm) = vm {
            let _ = tokio::task::spawn_blocking(move || drop(vm.kill())).await;
        }
    }

    fn out_of_memory(&self) -> bool {
        false
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(self.memory_bytes)
    }
}

#[async_trait]
impl SandboxBackend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    async fn launch(
        &self,
        _id: u64,
        spec: &FunctionSpec,
    ) -> Result<(Pin<Box<dyn Channel>>, Box<dyn Isolation>), BootError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| BootError::Setup(format!("{what}: {e}"));
        let config = self.config.clone();
        let spec_owned = spec.clone();
        let mem_mib = spec.memory_mb + GUEST_OVERHEAD_MIB;
        let started = tokio::task::spawn_blocking(move || {
            let vm = Vm::new(VmConfig {
                mem_mib,
                ..VmConfig::default()
            })
            .map_err(|e| setup("create the micro-VM", &e))?;
            let listener = vm
                .vsock()
                .ok_or_else(|| BootError::Setup("the micro-VM has no vsock device".into()))?
                .listen(AGENT_PORT)
                .map_err(|e| setup("listen for the agent", &e))?;
            let initrd =
                build_initrd(&config, &spec_owned).map_err(|e| setup("build the initramfs", &e))?;
            let cmdline = boot::cmdline("init=/init", vm.virtio_windows())
                .map_err(|e| setup("build the command line", &e))?;
            let entry = boot::load_linux(vm.memory(), &config.kernel, Some(&initrd), &cmdline, 1)
                .map_err(|e| setup("load the guest kernel", &e))?;
            let running = vm
                .start(entry.entry, entry.boot_params)
                .map_err(|e| setup("start the micro-VM", &e))?;
            Ok::<_, BootError>((running, listener))
        })
        .await
        .map_err(|e| setup("micro-VM set-up task", &e))??;
        let (running, listener) = started;
        let isolation = MicroVm {
            vm: Mutex::new(Some(running)),
            memory_bytes: mem_mib << 20,
        };
        match tokio::time::timeout(self.config.boot_timeout, listener.accept()).await {
            Ok(Ok(stream)) => Ok((Box::pin(stream), Box::new(isolation))),
            Ok(Err(e)) => {
                Box::new(isolation).destroy().await;
                Err(setup("accept the agent's connection", &e))
            }
            Err(_) => {
                Box::new(isolation).destroy().await;
                Err(BootError::Setup(format!(
                    "the guest did not connect its agent within {:?}",
                    self.config.boot_timeout
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_explains_itself() {
        let s = detect();
        assert!(!s.reason.is_empty());
        if s.pvm {
            assert!(!s.can_run_guest_userspace());
            assert!(s.reason.contains("PVM"), "{}", s.reason);
        }
    }
}
