//! `sluice-vmm`: Sluice's own micro-VM monitor, on the rust-vmm crates (kvm-ioctls, vm-memory,
//! virtio-queue, linux-loader, vm-superio, vmm-sys-util, seccompiler). It is the only crate of
//! the workspace with `unsafe`; every block carries a `SAFETY` comment.
//!
//! What it owns:
//! - [`vm`]: one KVM VM: guest memory ([`memory`]), the in-kernel irqchip and PIT, the devices,
//!   the vCPU and device threads; its lifecycle is typed: [`Vm`] (created) →
//!   [`RunningVm`] → [`StoppedVm`], each transition consuming the previous state.
//! - [`vcpu`]: vCPU set-up (64-bit long mode with identity page tables, as Linux's 64-bit boot
//!   protocol expects) and the run loop, which dispatches port and MMIO exits to the devices.
//! - [`devices`]: the 16550 serial console (captured into a bounded [`ConsoleLog`]) and the
//!   i8042 controller, whose reset command stops the VM.
//! - [`virtio`]: the virtio-mmio transport (virtio 1.x register protocol) and the virtio-vsock
//!   device, with a host-side [`VsockListener`]/[`VsockStream`] API implementing tokio's
//!   `AsyncRead`/`AsyncWrite`.
//! - [`boot`]: Linux direct boot (ELF `vmlinux` via linux-loader, zero page, command line, MP
//!   table) and a `cpio` newc initramfs writer.
//! - [`seccomp`]: the allow-lists installed on the vCPU and device threads.
//! - [`asm`]: a tiny x86-64 emitter for freestanding test guests (tests and benchmarks).
//!
//! Threading: each vCPU runs on its own OS thread (one by default); one device event-loop
//! thread serves the virtio queues. Neither runs on tokio's workers; async code talks to them
//! through the vsock streams (wakers) and through blocking waits run on `spawn_blocking`.
//!
//! The guest is hostile: descriptor chains are validated whole before use, what a guest request
//! can make the host allocate is capped, and a corrupt ring fail-stops its device (never the
//! host).

pub mod asm;
pub mod boot;
pub mod devices;
pub mod fuzzing;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod testguest;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use devices::ConsoleLog;
pub use virtio::vsock::{VsockError, VsockListener, VsockStream};
pub use vm::{ExitReason, RunningVm, StoppedVm, Vm, VmConfig, VmError};
