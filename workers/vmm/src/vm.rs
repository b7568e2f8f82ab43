//! One micro-VM and its lifecycle: [`Vm`] (created, nothing running) → [`RunningVm`] (vCPU and
//! device threads running) → [`StoppedVm`] (threads joined; memory still inspectable until it
//! is dropped). Each transition consumes the previous state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::devices::{ConsoleLog, LegacyDevices};
use crate::layout::{
    GUEST_CODE_START, KVM_TSS_ADDRESS, SERIAL_IRQ, VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use crate::memory::{self, MemoryError};
use crate::seccomp::{self, SeccompError, ThreadKind};
pub use crate::vcpu::ExitReason;
use crate::vcpu::{self, ExitCounters, VcpuError, VcpuRunner};
use crate::virtio::mmio::{self, MmioBus, MmioError, MmioTransport};
use crate::virtio::vsock::{Vsock, VsockError, VsockHost};

/// How long [`RunningVm::kill`] keeps kicking a vCPU thread before giving up on it.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory, MiB (below the 3 GiB MMIO gap).
    pub mem_mib: u64,
    /// The guest's vsock context id, or no vsock device.
    pub vsock_guest_cid: Option<u64>,
    /// Install the seccomp allow-lists on the VM's threads.
    pub seccomp: bool,
    /// Also send complete console lines to `tracing` (target `guest`).
    pub echo_console: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            vsock_guest_cid: Some(3),
            seccomp: true,
            echo_console: false,
        }
    }
}

/// Why a VM could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// `KVM_CREATE_VM`.
    #[error("create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR`.
    #[error("set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP`.
    #[error("create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2`.
    #[error("create the PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("set up guest memory")]
    SetupMemory(#[source] MemoryError),
    /// `KVM_CREATE_VCPU`.
    #[error("create the vCPU")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// vCPU registers and tables.
    #[error("configure the vCPU")]
    ConfigureVcpu(#[source] VcpuError),
    /// An eventfd or epoll instance.
    #[error("create an eventfd or epoll instance")]
    CreateEventFd(#[source] std::io::Error),
    /// `KVM_IRQFD`.
    #[error("register an irqfd")]
    RegisterIrqfd(#[source] kvm_ioctls::Error),
    /// The virtio-mmio transport.
    #[error("create a virtio-mmio transport")]
    CreateTransport(#[source] MmioError),
    /// The vsock device.
    #[error("create the vsock device")]
    CreateVsock(#[source] VsockError),
    /// A seccomp filter.
    #[error("build the VMM's seccomp filters")]
    Seccomp(#[source] SeccompError),
    /// Spawning a VM thread.
    #[error("spawn a VM thread")]
    SpawnThread(#[source] std::io::Error),
    /// Writing guest code into memory.
    #[error("write guest code at {0:#x}")]
    LoadCode(u64, #[source] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device window, for the kernel command line (`virtio_mmio.device=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioWindow {
    /// Guest-physical base.
    pub base: u64,
    /// Size.
    pub size: u64,
    /// Interrupt line.
    pub gsi: u32,
}

/// A created VM: memory mapped, devices and the vCPU created, nothing running.
pub struct Vm {
    // Field order is drop order: the vCPU and VM fds close before guest memory is unmapped.
    vcpu: VcpuFd,
    vm_fd: VmFd,
    kvm: Kvm,
    mem: GuestMemoryMmap,
    console: ConsoleLog,
    legacy: Arc<Mutex<LegacyDevices>>,
    mmio: MmioBus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    windows: Vec<VirtioWindow>,
    vsock: Option<VsockHost>,
    config: VmConfig,
    counters: Arc<ExitCounters>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM: KVM VM with irqchip and PIT, guest memory with the boot tables, the serial
    /// console, the i8042, the vsock device (if configured) and one vCPU.
    ///
    /// # Errors
    /// [`VmError`] naming the step that failed.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "Irqchip"),
            (Cap::Ioeventfd, "Ioeventfd"),
            (Cap::Irqfd, "Irqfd"),
            (Cap::UserMemory, "UserMemory"),
            (Cap::SetTssAddr, "SetTssAddr"),
            (Cap::Pit2, "Pit2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        vm_fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(VmError::CreatePit)?;

        let mem = memory::create(config.mem_mib).map_err(VmError::SetupMemory)?;
        memory::register(&vm_fd, &mem).map_err(VmError::SetupMemory)?;
        vcpu::write_boot_tables(&mem).map_err(VmError::ConfigureVcpu)?;

        let console = ConsoleLog::new(config.echo_console);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::CreateEventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(VmError::RegisterIrqfd)?;
        let legacy = Arc::new(Mutex::new(LegacyDevices::new(console.clone(), serial_irq)));

        let mut mmio = MmioBus::default();
        let mut transports = Vec::new();
        let mut windows = Vec::new();
        let mut vsock = None;
        if let Some(cid) = config.vsock_guest_cid {
            let (device, host) = Vsock::new(cid).map_err(VmError::CreateVsock)?;
            let window = VirtioWindow {
                base: VIRTIO_MMIO_BASE,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_FIRST_GSI,
            };
            let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::CreateEventFd)?);
            vm_fd
                .register_irqfd(&irq, window.gsi)
                .map_err(VmError::RegisterIrqfd)?;
            let transport = MmioTransport::new(Box::new(device), mem.clone(), irq)
                .map_err(VmError::CreateTransport)?;
            for (i, evt) in transport.queue_events().iter().enumerate() {
                let addr = IoEventAddress::Mmio(window.base + mmio::reg::QUEUE_NOTIFY);
                // Without the ioeventfd the write still arrives as an MMIO exit, which the
                // transport turns into the same eventfd signal.
                if let Err(e) = vm_fd.register_ioevent(evt, &addr, u32::try_from(i).unwrap_or(0)) {
                    tracing::debug!(error = %e, "ioeventfd not available; notifications exit");
                }
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(window.base, window.size, transport.clone());
            transports.push(transport);
            windows.push(window);
            vsock = Some(host);
        }

        let vcpu = vm_fd.create_vcpu(0).map_err(VmError::CreateVcpu)?;
        vcpu::install_kick_handler().map_err(VmError::ConfigureVcpu)?;
        Ok(Self {
            vcpu,
            vm_fd,
            kvm,
            mem,
            console,
            legacy,
            mmio,
            transports,
            windows,
            vsock,
            config,
            counters: Arc::default(),
        })
    }

    /// Guest memory.
    #[must_use]
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The console log.
    #[must_use]
    pub fn console(&self) -> ConsoleLog {
        self.console.clone()
    }

    /// The host end of the vsock device, if there is one.
    #[must_use]
    pub fn vsock(&self) -> Option<VsockHost> {
        self.vsock.clone()
    }

    /// The virtio-mmio windows (for `virtio_mmio.device=` on the kernel command line).
    #[must_use]
    pub fn virtio_windows(&self) -> &[VirtioWindow] {
        &self.windows
    }

    /// Writes freestanding guest code at [`GUEST_CODE_START`] and returns its entry point.
    ///
    /// # Errors
    /// [`VmError::LoadCode`] when it does not fit in guest memory.
    pub fn load_code(&self, code: &[u8]) -> Result<u64, VmError> {
        self.mem
            .write_slice(code, GuestAddress(GUEST_CODE_START))
            .map_err(|e| VmError::LoadCode(GUEST_CODE_START, e))?;
        Ok(GUEST_CODE_START)
    }

    /// Starts the vCPU in 64-bit mode at `entry`, with `rsi` = `boot_params` (the zero page for
    /// Linux, anything for freestanding code), and the device event loop.
    ///
    /// # Errors
    /// [`VmError`] naming the step that failed; nothing is left running.
    pub fn start(self, entry: u64, boot_params: u64) -> Result<RunningVm, VmError> {
        vcpu::configure(&self.kvm, &self.vcpu, 0, entry, boot_params)
            .map_err(VmError::ConfigureVcpu)?;
        let (vcpu_filter, device_filter) = if self.config.seccomp {
            (
                Some(seccomp::filter(ThreadKind::Vcpu).map_err(VmError::Seccomp)?),
                Some(seccomp::filter(ThreadKind::Device).map_err(VmError::Seccomp)?),
            )
        } else {
            (None, None)
        };

        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::CreateEventFd)?;
        let epoll = Epoll::new().map_err(VmError::CreateEventFd)?;
        register_events(&epoll, &stop_evt, &self.transports).map_err(VmError::CreateEventFd)?;
        let loop_stop = stop_evt.try_clone().map_err(VmError::CreateEventFd)?;
        let loop_transports = self.transports.clone();
        let (tid_tx, tid_rx) = mpsc::channel();
        let device_tid = tid_tx.clone();
        let event_thread = std::thread::Builder::new()
            .name("sluice-vmm-dev".into())
            .spawn(move || {
                if let Some(f) = device_filter {
                    if let Err(e) = seccomp::install(&f) {
                        tracing::error!(error = %e, "device thread: seccomp");
                        let _ = device_tid.send(gettid());
                        return;
                    }
                }
                // Reported once filtered, so observers never see an unfiltered thread.
                let _ = device_tid.send(gettid());
                event_loop(&epoll, &loop_stop, &loop_transports);
            })
            .map_err(VmError::SpawnThread)?;

        let Vm {
            vcpu,
            vm_fd,
            kvm,
            mem,
            console,
            legacy,
            mmio,
            transports,
            windows: _,
            vsock,
            config: _,
            counters,
        } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let runner = VcpuRunner {
            fd: vcpu,
            legacy: legacy.clone(),
            mmio,
            stop: stop.clone(),
            counters: counters.clone(),
        };
        let (done_tx, done_rx) = mpsc::channel();
        let vcpu_thread = std::thread::Builder::new()
            .name("sluice-vcpu0".into())
            .spawn(move || {
                let _ = vmm_sys_util::signal::unblock_signal(vcpu::kick_signal());
                if let Some(f) = vcpu_filter {
                    if let Err(e) = seccomp::install(&f) {
                        let _ = tid_tx.send(gettid());
                        let _ = done_tx.send(ExitReason::RunFailed(format!("seccomp: {e}")));
                        return;
                    }
                }
                let _ = tid_tx.send(gettid());
                let reason = runner.run();
                let _ = done_tx.send(reason);
            });
        let vcpu_thread = match vcpu_thread {
            Ok(t) => t,
            Err(e) => {
                let _ = stop_evt.write(1);
                let _ = event_thread.join();
                return Err(VmError::SpawnThread(e));
            }
        };
        let thread_ids = tid_rx.iter().take(2).collect();
        Ok(RunningVm {
            vcpu_thread: Some(vcpu_thread),
            event_thread: Some(event_thread),
            stop,
            stop_evt,
            done: done_rx,
            reason: None,
            thread_ids,
            started: Instant::now(),
            parts: Some(Parts {
                vm_fd,
                _kvm: kvm,
                mem,
                console,
                transports,
                vsock,
                counters,
                _legacy: legacy,
            }),
        })
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

const STOP_TOKEN: u64 = 0;
const HOST_EVENT: u64 = 0xffff;

fn register_events(
    epoll: &Epoll,
    stop: &EventFd,
    transports: &[Arc<Mutex<MmioTransport>>],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(stop.as_raw_fd(), STOP_TOKEN)?;
    for (d, t) in transports.iter().enumerate() {
        let t = mmio::lock(t);
        let base = (d as u64 + 1) << 16;
        for (q, evt) in t.queue_events().iter().enumerate() {
            add(evt.as_raw_fd(), base | q as u64)?;
        }
        if let Some(evt) = t.device().host_event() {
            add(evt.as_raw_fd(), base | HOST_EVENT)?;
        }
    }
    Ok(())
}

/// The device thread: waits on queue notifications and host events and runs the devices.
fn event_loop(epoll: &Epoll, stop: &EventFd, transports: &[Arc<Mutex<MmioTransport>>]) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "device event loop: epoll_wait");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = stop.read();
                return;
            }
            let Some(t) = usize::try_from(token >> 16)
                .ok()
                .and_then(|d| d.checked_sub(1))
                .and_then(|d| transports.get(d))
            else {
                continue;
            };
            let mut t = mmio::lock(t);
            let index = token & 0xffff;
            if index == HOST_EVENT {
                if let Some(evt) = t.device().host_event() {
                    let _ = evt.read();
                }
                t.process_host_event();
            } else {
                let q = usize::try_from(index).unwrap_or(usize::MAX);
                if let Some(evt) = t.queue_events().get(q) {
                    let _ = evt.read();
                }
                t.process_queue(q);
            }
        }
    }
}

/// What a running or stopped VM keeps alive.
struct Parts {
    // The VM fd closes before guest memory is unmapped.
    vm_fd: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    console: ConsoleLog,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    vsock: Option<VsockHost>,
    counters: Arc<ExitCounters>,
    _legacy: Arc<Mutex<LegacyDevices>>,
}

/// A running VM. Dropping it kills it.
pub struct RunningVm {
    vcpu_thread: Option<JoinHandle<()>>,
    event_thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stop_evt: EventFd,
    done: mpsc::Receiver<ExitReason>,
    reason: Option<ExitReason>,
    thread_ids: Vec<i32>,
    started: Instant,
    parts: Option<Parts>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("reason", &self.reason)
            .field("thread_ids", &self.thread_ids)
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// Waits up to `timeout` for the guest to stop on its own; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReason> {
        if self.reason.is_none() {
            self.reason = self.done.recv_timeout(timeout).ok();
        }
        self.reason.clone()
    }

    /// Waits up to `timeout` for the guest to stop, then kills it if it has not.
    #[must_use]
    pub fn wait(mut self, timeout: Duration) -> StoppedVm {
        let _ = self.wait_timeout(timeout);
        self.kill()
    }

    /// Stops the VM (if it still runs) and joins its threads.
    #[must_use]
    pub fn kill(mut self) -> StoppedVm {
        self.shutdown();
        let reason = self.reason.clone().unwrap_or(ExitReason::Killed);
        let parts = self.take_parts();
        StoppedVm {
            reason,
            ran_for: self.started.elapsed(),
            parts,
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.vcpu_thread.take() {
            let deadline = Instant::now() + KILL_DEADLINE;
            // A kick can land between the stop check and KVM_RUN; repeat until the thread is out.
            while !t.is_finished() && Instant::now() < deadline {
                let _ = t.kill(vcpu::kick_signal());
                std::thread::sleep(Duration::from_micros(200));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!("vCPU thread did not stop; leaking it");
            }
        }
        if self.reason.is_none() {
            self.reason = self.done.try_recv().ok();
        }
        let _ = self.stop_evt.write(1);
        if let Some(t) = self.event_thread.take() {
            let _ = t.join();
        }
        if let Some(v) = self.parts.as_ref().and_then(|p| p.vsock.as_ref()) {
            v.stop();
        }
    }

    fn take_parts(&mut self) -> Parts {
        self.parts
            .take()
            .expect("parts are taken only by kill, which consumes self")
    }

    fn parts(&self) -> &Parts {
        self.parts
            .as_ref()
            .expect("parts are taken only by kill, which consumes self")
    }

    /// Guest memory.
    #[must_use]
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.parts().mem
    }

    /// The console log.
    #[must_use]
    pub fn console(&self) -> ConsoleLog {
        self.parts().console.clone()
    }

    /// The host end of the vsock device.
    #[must_use]
    pub fn vsock(&self) -> Option<VsockHost> {
        self.parts().vsock.clone()
    }

    /// Port and MMIO exits so far.
    #[must_use]
    pub fn exits(&self) -> (u64, u64) {
        exits(&self.parts().counters)
    }

    /// OS thread ids of the vCPU and device threads.
    #[must_use]
    pub fn thread_ids(&self) -> &[i32] {
        &self.thread_ids
    }

    /// The KVM VM (e.g. to inject interrupts).
    #[must_use]
    pub fn vm_fd(&self) -> &VmFd {
        &self.parts().vm_fd
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn exits(c: &ExitCounters) -> (u64, u64) {
    (
        c.pio.load(Ordering::Relaxed),
        c.mmio.load(Ordering::Relaxed),
    )
}

/// A stopped VM: threads joined, memory and device state still inspectable.
pub struct StoppedVm {
    /// Why it stopped.
    pub reason: ExitReason,
    /// How long it ran.
    pub ran_for: Duration,
    parts: Parts,
}

impl std::fmt::Debug for StoppedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppedVm")
            .field("reason", &self.reason)
            .field("ran_for", &self.ran_for)
            .finish_non_exhaustive()
    }
}

impl StoppedVm {
    /// Guest memory as the guest left it.
    #[must_use]
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.parts.mem
    }

    /// The console output.
    #[must_use]
    pub fn console(&self) -> ConsoleLog {
        self.parts.console.clone()
    }

    /// Port and MMIO exits.
    #[must_use]
    pub fn exits(&self) -> (u64, u64) {
        exits(&self.parts.counters)
    }

    /// Status register of each virtio device (e.g. `DEVICE_NEEDS_RESET` after a fail-stop).
    #[must_use]
    pub fn virtio_status(&self) -> Vec<u32> {
        self.parts
            .transports
            .iter()
            .map(|t| mmio::lock(t).status())
            .collect()
    }

    /// Whether each virtio device fail-stopped.
    #[must_use]
    pub fn virtio_broken(&self) -> Vec<bool> {
        self.parts
            .transports
            .iter()
            .map(|t| mmio::lock(t).device().is_broken())
            .collect()
    }
}
