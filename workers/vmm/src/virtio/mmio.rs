//! The virtio-mmio transport (virtio 1.x, §4.2.2, version 2 register layout) and the MMIO bus
//! the vCPU thread dispatches to.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};

/// "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("SLCE").
pub const VENDOR_ID: u32 = 0x4543_4c53;

/// Register offsets.
pub mod reg {
    /// `MagicValue`.
    pub const MAGIC: u64 = 0x000;
    /// `Version`.
    pub const VERSION: u64 = 0x004;
    /// `DeviceID`.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID`.
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel`.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax`.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum`.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady`.
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify`.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus`.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK`.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status`.
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow`.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh`.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (available ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh`.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh`.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `ConfigGeneration`.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// `ACKNOWLEDGE`.
    pub const ACKNOWLEDGE: u32 = 1;
    /// `DRIVER`.
    pub const DRIVER: u32 = 2;
    /// `DRIVER_OK`.
    pub const DRIVER_OK: u32 = 4;
    /// `FEATURES_OK`.
    pub const FEATURES_OK: u32 = 8;
    /// `DEVICE_NEEDS_RESET`.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// `FAILED`.
    pub const FAILED: u32 = 0x80;
}

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Creating a queue or notification eventfd.
    #[error("create a queue eventfd")]
    CreateEventFd(#[source] std::io::Error),
    /// A queue size the queue implementation rejects.
    #[error("create virtqueue")]
    CreateQueue(#[source] virtio_queue::Error),
}

/// One device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device` over `mem`, interrupting through `irqfd`.
    ///
    /// # Errors
    /// [`MmioError`] when an eventfd or queue cannot be created.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Arc<EventFd>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(MmioError::CreateQueue)?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::CreateEventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Interrupt::new(irqfd),
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfd signalled when the guest notifies each queue (register them as ioeventfds
    /// on `QueueNotify` with the queue index as datamatch).
    #[must_use]
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device.
    #[must_use]
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status register.
    #[must_use]
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver finished initialisation and the device runs.
    #[must_use]
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The event loop saw queue `index` notified.
    pub fn process_queue(&mut self, index: usize) {
        if self.activated && !self.device.is_broken() {
            self.device.process_queue(index);
            self.check_broken();
        }
    }

    /// The event loop saw the device's host event.
    pub fn process_host_event(&mut self) {
        if self.activated && !self.device.is_broken() {
            self.device.process_host_event();
            self.check_broken();
        }
    }

    fn check_broken(&mut self) {
        if self.device.is_broken() && self.status & status::DEVICE_NEEDS_RESET == 0 {
            tracing::warn!(
                device_type = self.device.device_type(),
                "virtio device fail-stopped on a corrupt ring; it needs a reset"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let lo =
            |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, Some(value), None);
        let hi =
            |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, None, Some(value));
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 =>
            {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NOTIFY => {
                // KVM normally takes these writes through the ioeventfd; this is the fallback.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ if self.queue_config_allowed() => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => q.set_size(u16::try_from(value).unwrap_or(0)),
                    reg::QUEUE_READY => q.set_ready(value == 1),
                    reg::QUEUE_DESC_LOW => lo(q, Queue::set_desc_table_address),
                    reg::QUEUE_DESC_HIGH => hi(q, Queue::set_desc_table_address),
                    reg::QUEUE_DRIVER_LOW => lo(q, Queue::set_avail_ring_address),
                    reg::QUEUE_DRIVER_HIGH => hi(q, Queue::set_avail_ring_address),
                    reg::QUEUE_DEVICE_LOW => lo(q, Queue::set_used_ring_address),
                    reg::QUEUE_DEVICE_HIGH => hi(q, Queue::set_used_ring_address),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added (besides a reset), and FAILED is the driver's to set.
        let added = value & !self.status;
        if value & self.status != self.status {
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features() | VIRTIO_F_VERSION_1;
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads FEATURES_OK back and gives up.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let usable = self.status & status::FEATURES_OK != 0
            && self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem));
        if !usable {
            tracing::warn!(
                device_type = self.device.device_type(),
                "driver set DRIVER_OK with unusable queues"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(queues) = queues else {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG);
            return;
        };
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => {
                self.activated = true;
                // The driver may have queued buffers before DRIVER_OK.
                for evt in &self.queue_evts {
                    let _ = evt.write(1);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "activate virtio device");
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.activated = false;
        self.status = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// The MMIO windows of a VM's devices, as the vCPU thread sees them.
#[derive(Debug, Clone, Default)]
pub struct MmioBus {
    windows: Vec<(u64, u64, Arc<Mutex<MmioTransport>>)>,
}

impl MmioBus {
    /// Adds a device window `[base, base + size)`.
    pub fn insert(&mut self, base: u64, size: u64, transport: Arc<Mutex<MmioTransport>>) {
        self.windows.push((base, size, transport));
    }

    fn find(&self, addr: u64) -> Option<(u64, MutexGuard<'_, MmioTransport>)> {
        self.windows
            .iter()
            .find(|(base, size, _)| addr >= *base && addr - base < *size)
            .map(|(base, _, t)| (addr - base, lock(t)))
    }

    /// An MMIO read; unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, mut t)) => t.read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// An MMIO write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, mut t)) = self.find(addr) {
            t.write(offset, data);
        }
    }
}

/// Locks a transport; a panic in another holder leaves register state usable.
pub fn lock(t: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
