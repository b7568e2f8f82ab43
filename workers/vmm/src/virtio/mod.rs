//! Virtio over MMIO: the transport ([`mmio`]), whole-chain validation ([`chain`]) and the
//! vsock device ([`vsock`]).
//!
//! A device is driven from two threads: register accesses come from the vCPU thread (MMIO
//! exits) and queue processing runs on the device event-loop thread; both go through the
//! transport's mutex. Queue notifications reach the event loop through ioeventfds (or, where
//! KVM did not take the write, through the transport writing the same eventfd); interrupts go
//! to the guest through an irqfd.

pub mod chain;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the only transport feature offered (modern devices only).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used buffer was added.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// The interrupt of one virtio device: the interrupt-status register and the irqfd behind it.
#[derive(Debug, Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt raising `irqfd`.
    #[must_use]
    pub fn new(irqfd: Arc<EventFd>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd,
        }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::debug!(error = %e, "raise virtio interrupt");
        }
    }

    /// The interrupt-status register.
    #[must_use]
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Acknowledges `bits` (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// The device's queues.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
}

/// A virtio device behind an MMIO transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered (including transport bits such as [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset` into `data` (out of range reads as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    ///
    /// # Errors
    /// [`ActivateError`] when the queues do not fit the device.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (driver wrote 0 to `Status`).
    fn reset(&mut self);
    /// The guest notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// An eventfd the host side raises when it has work for the device, if any.
    fn host_event(&self) -> Option<&EventFd>;
    /// The host side raised [`VirtioDevice::host_event`].
    fn process_host_event(&mut self);
    /// Whether the device fail-stopped on a corrupt ring (it then needs a reset).
    fn is_broken(&self) -> bool;
}
