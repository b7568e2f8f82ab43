//! The vCPU: 64-bit set-up (the state Linux's 64-bit boot protocol expects, which freestanding
//! test guests reuse) and the run loop on its own OS thread.
//!
//! Stopping: the run loop checks a stop flag before every `KVM_RUN`; [`kick`] sends the thread
//! a real-time signal whose no-op handler makes a running `KVM_RUN` return `EINTR`. Since a
//! signal landing between the check and the ioctl is lost, the killer repeats the kick until
//! the thread has exited (see `vm::RunningVm::kill`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::LegacyDevices;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, IDENTITY_MAP_GIB, PDPT_START, PD_START,
    PML4_START,
};
use crate::virtio::mmio::MmioBus;

/// Why the vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_GET_SUPPORTED_CPUID`.
    #[error("get supported CPUID")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2`.
    #[error("set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS`.
    #[error("set boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// Building the MSR list.
    #[error("build the MSR list")]
    BuildMsrs,
    /// `KVM_SET_FPU`.
    #[error("set FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// `KVM_GET_LAPIC`/`KVM_SET_LAPIC`.
    #[error("configure the local APIC")]
    Lapic(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SREGS`/`KVM_SET_SREGS`.
    #[error("set special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS`.
    #[error("set registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables into guest memory.
    #[error("write boot tables into guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
    /// Installing the kick signal handler.
    #[error("install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (`outb 0xfe, 0x64`): a clean shutdown.
    Reset,
    /// A triple fault or a system-event shutdown.
    Shutdown,
    /// The guest halted (only seen without an in-kernel irqchip).
    Hlt,
    /// The host stopped it (kill, timeout).
    Killed,
    /// KVM could not emulate or run the guest (`KVM_EXIT_INTERNAL_ERROR`, with its sub-error).
    InternalError(u32),
    /// The hardware refused to enter the guest.
    FailEntry(u64),
    /// An exit this VMM does not handle.
    UnexpectedExit(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

/// The real-time signal used to kick a vCPU thread out of `KVM_RUN`.
#[must_use]
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 4
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: delivery alone makes KVM_RUN return EINTR.
}

static KICK_HANDLER: Once = Once::new();

/// Installs the kick handler once per process.
///
/// # Errors
/// [`VcpuError::SignalHandler`] when `sigaction` fails.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    let mut result = Ok(());
    KICK_HANDLER.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(VcpuError::SignalHandler);
    });
    result
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A GDT entry from flags, base and limit (the usual x86 packing).
#[must_use]
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| u8::try_from((entry >> n) & 1).expect("one bit");
    let g = bit(55);
    let mut limit =
        u32::try_from(((entry >> 32) & 0x000f_0000) | (entry & 0xffff)).expect("20 bits");
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let base = ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16);
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: u8::try_from((entry >> 40) & 0xf).expect("4 bits"),
        present,
        dpl: u8::try_from((entry >> 45) & 0x3).expect("2 bits"),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables covering the first
/// [`IDENTITY_MAP_GIB`] GiB (2 MiB pages) into guest memory.
///
/// # Errors
/// [`VcpuError::WriteTables`] when guest memory is too small for them.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(VcpuError::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(VcpuError::WriteTables)?;
    mem.write_obj(PDPT_START | 0x03, GuestAddress(PML4_START))
        .map_err(VcpuError::WriteTables)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_START + gib * 8))
            .map_err(VcpuError::WriteTables)?;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            mem.write_obj(page | 0x83, GuestAddress(pd + i * 8))
                .map_err(VcpuError::WriteTables)?;
        }
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Configures `vcpu` (id `id`) for 64-bit entry at `rip` with `rsi` pointing at the boot
/// parameters (Linux's 64-bit boot protocol; freestanding guests ignore `rsi`). The boot tables
/// must already be in memory ([`write_boot_tables`]).
///
/// # Errors
/// The [`VcpuError`] of the first ioctl that fails.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd, id: u8, rip: u64, rsi: u64) -> Result<(), VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetSupportedCpuid)?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // Initial APIC id.
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            0xb => entry.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;

    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::BuildMsrs)?;
    vcpu.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VcpuError::SetFpu)?;

    let mut lapic = vcpu.get_lapic().map_err(VcpuError::Lapic)?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(reg.iter()) {
            *b = r.to_ne_bytes()[0];
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = libc::c_char::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(VcpuError::Lapic)?;

    let mut sregs = vcpu.get_sregs().map_err(VcpuError::SetSregs)?;
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).expect("small table");
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    vcpu.set_sregs(&sregs).map_err(VcpuError::SetSregs)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuError::SetRegs)?;
    Ok(())
}

/// Counters of one vCPU's exits, shared with the host for telemetry and tests.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port-I/O exits.
    pub pio: std::sync::atomic::AtomicU64,
    /// MMIO exits.
    pub mmio: std::sync::atomic::AtomicU64,
}

/// What the vCPU thread owns.
pub(crate) struct VcpuRunner {
    pub(crate) fd: VcpuFd,
    pub(crate) legacy: Arc<Mutex<LegacyDevices>>,
    pub(crate) mmio: MmioBus,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) counters: Arc<ExitCounters>,
}

enum Step {
    Continue,
    Stop(ExitReason),
    InternalError,
}

impl VcpuRunner {
    /// Runs the guest until it stops or the host stops it.
    pub(crate) fn run(mut self) -> ExitReason {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return ExitReason::Killed;
            }
            let step = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.counters.pio.fetch_add(1, Ordering::Relaxed);
                    let mut legacy = lock(&self.legacy);
                    legacy.pio_write(port, data);
                    if legacy.reset_requested() {
                        Step::Stop(ExitReason::Reset)
                    } else {
                        Step::Continue
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.counters.pio.fetch_add(1, Ordering::Relaxed);
                    lock(&self.legacy).pio_read(port, data);
                    Step::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.mmio.read(addr, data);
                    Step::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.mmio.write(addr, data);
                    Step::Continue
                }
                Ok(VcpuExit::Hlt) => Step::Stop(ExitReason::Hlt),
                Ok(VcpuExit::Shutdown) => Step::Stop(ExitReason::Shutdown),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    Step::Stop(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        ExitReason::Reset
                    } else {
                        ExitReason::Shutdown
                    })
                }
                Ok(VcpuExit::InternalError) => Step::InternalError,
                Ok(VcpuExit::FailEntry(reason, _)) => Step::Stop(ExitReason::FailEntry(reason)),
                Ok(VcpuExit::Intr) => Step::Continue,
                Ok(other) => Step::Stop(ExitReason::UnexpectedExit(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::Stop(ExitReason::RunFailed(e.to_string())),
            };
            match step {
                Step::Continue => {}
                Step::Stop(reason) => return reason,
                Step::InternalError => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
                    // member of the exit union; it is plain data (integers).
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return ExitReason::InternalError(suberror);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Device state stays consistent across a panic in another holder (each access is a single
    // register operation), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1, "64-bit code");
        assert_eq!(code.present, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.l, 0);
        let null = segment_from_gdt(gdt_entry(0, 0, 0), 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn identity_map_covers_the_mmio_window() {
        let mem = crate::memory::create(16).expect("memory");
        write_boot_tables(&mem).expect("tables");
        let pd3: u64 = mem
            .read_obj(GuestAddress(PDPT_START + 3 * 8))
            .expect("pdpt[3]");
        assert_eq!(pd3 & !0xfff, PD_START + 3 * 0x1000);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_START + 3 * 0x1000 + 511 * 8))
            .expect("last pde");
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }
}
