//! Freestanding guest programs shared by the tests and the benchmark: a minimal virtio-mmio
//! driver for the vsock device written with [`crate::asm`], and the ring layout it uses (which
//! the host pre-fills, as a driver would before notifying).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::asm::Asm;
use crate::layout::{SERIAL_PORT_BASE, VIRTIO_MMIO_BASE};
use crate::virtio::mmio::reg;
use crate::virtio::vsock::packet::{Header, HEADER_BYTES, OP_REQUEST, OP_RW, TYPE_STREAM};
use crate::virtio::vsock::HOST_CID;

/// Size of each of the guest's queues.
pub const QUEUE_SIZE: u16 = 8;
/// Receive buffers posted (4 KiB each).
pub const RX_BUFFERS: u16 = 4;
/// Where the guest stores the `MagicValue` it read.
pub const RESULT_MAGIC: u64 = 0x23_0000;
/// Where the guest stores the `Status` it read back after `FEATURES_OK`.
pub const RESULT_STATUS: u64 = 0x23_0004;
/// Where the guest stores a read from an unclaimed MMIO address.
pub const RESULT_UNCLAIMED: u64 = 0x23_0008;
/// The guest's port.
pub const GUEST_PORT: u32 = 5000;
const RX_BUFFER_BASE: u64 = 0x21_0000;
const TX_PACKET_BASE: u64 = 0x22_0000;

/// (descriptor table, avail ring, used ring) of queue `q` (0 rx, 1 tx, 2 event).
#[must_use]
pub fn queue_addrs(q: u64) -> (u64, u64, u64) {
    let base = 0x20_0000 + q * 0x1000;
    (base, base + 0x100, base + 0x200)
}

/// Address of the used ring's `idx` of queue `q`.
#[must_use]
pub fn used_idx_addr(q: u64) -> u64 {
    queue_addrs(q).2 + 2
}

/// Address of the avail ring's `idx` of queue `q`.
#[must_use]
pub fn avail_idx_addr(q: u64) -> u64 {
    queue_addrs(q).1 + 2
}

/// Writes descriptor `index` of the table at `table`.
///
/// # Errors
/// When the table is outside guest memory.
pub fn put_descriptor(
    mem: &GuestMemoryMmap,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(table + u64::from(index) * 16))
}

/// Pre-fills the rings: [`RX_BUFFERS`] receive buffers already made available, and on the tx
/// queue a connection request to host port `host_port` (descriptor 0) and one data packet
/// carrying `data` (descriptor 1); the tx avail ring lists descriptor 0 and then descriptor 1
/// in every later slot, and the guest makes them available by bumping the avail index.
///
/// # Errors
/// When the layout does not fit in guest memory (it needs 3 MiB).
pub fn prepare_vsock_rings(
    mem: &GuestMemoryMmap,
    guest_cid: u64,
    host_port: u32,
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let (rx_desc, rx_avail, _) = queue_addrs(0);
    for i in 0..RX_BUFFERS {
        put_descriptor(
            mem,
            rx_desc,
            i,
            RX_BUFFER_BASE + u64::from(i) * 0x1000,
            0x1000,
            2,
            0,
        )?;
    }
    for slot in 0..QUEUE_SIZE {
        mem.write_obj(
            slot % RX_BUFFERS,
            GuestAddress(rx_avail + 4 + 2 * u64::from(slot)),
        )?;
    }
    mem.write_obj(RX_BUFFERS, GuestAddress(rx_avail + 2))?;

    let header = |op, len| Header {
        src_cid: guest_cid,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: host_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        // Effectively unlimited credit: the guest never reads what it receives.
        buf_alloc: u32::MAX,
        fwd_cnt: 0,
    };
    let (tx_desc, tx_avail, _) = queue_addrs(1);
    let request = header(OP_REQUEST, 0).to_bytes();
    mem.write_slice(&request, GuestAddress(TX_PACKET_BASE))?;
    put_descriptor(mem, tx_desc, 0, TX_PACKET_BASE, HEADER_BYTES as u32, 0, 0)?;
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut packet = header(OP_RW, len).to_bytes().to_vec();
    packet.extend_from_slice(data);
    mem.write_slice(&packet, GuestAddress(TX_PACKET_BASE + 0x1000))?;
    put_descriptor(
        mem,
        tx_desc,
        1,
        TX_PACKET_BASE + 0x1000,
        u32::try_from(packet.len()).unwrap_or(u32::MAX),
        0,
        0,
    )?;
    for slot in 0..QUEUE_SIZE {
        mem.write_obj(
            u16::from(slot != 0),
            GuestAddress(tx_avail + 4 + 2 * u64::from(slot)),
        )?;
    }
    Ok(())
}

fn mmio(offset: u64) -> u64 {
    VIRTIO_MMIO_BASE + offset
}

/// Emits the driver's initialisation: reset, ACKNOWLEDGE|DRIVER, `VIRTIO_F_VERSION_1`,
/// FEATURES_OK (read back into [`RESULT_STATUS`]), the three queues of [`queue_addrs`], then
/// DRIVER_OK; stores `MagicValue` into [`RESULT_MAGIC`].
pub fn driver_init(a: &mut Asm) {
    a.store32(mmio(reg::STATUS), 0)
        .load32(mmio(reg::MAGIC))
        .store_eax(RESULT_MAGIC)
        .load32(0xd000_0000)
        .store_eax(RESULT_UNCLAIMED)
        .store32(mmio(reg::STATUS), 1)
        .store32(mmio(reg::STATUS), 3)
        .store32(mmio(reg::DRIVER_FEATURES_SEL), 1)
        .store32(mmio(reg::DRIVER_FEATURES), 1)
        .store32(mmio(reg::DRIVER_FEATURES_SEL), 0)
        .store32(mmio(reg::DRIVER_FEATURES), 0)
        .store32(mmio(reg::STATUS), 0xb)
        .load32(mmio(reg::STATUS))
        .store_eax(RESULT_STATUS);
    for q in 0..3u64 {
        let (desc, avail, used) = queue_addrs(q);
        a.store32(mmio(reg::QUEUE_SEL), q as u32)
            .store32(mmio(reg::QUEUE_NUM), u32::from(QUEUE_SIZE))
            .store32(mmio(reg::QUEUE_DESC_LOW), desc as u32)
            .store32(mmio(reg::QUEUE_DESC_HIGH), 0)
            .store32(mmio(reg::QUEUE_DRIVER_LOW), avail as u32)
            .store32(mmio(reg::QUEUE_DRIVER_HIGH), 0)
            .store32(mmio(reg::QUEUE_DEVICE_LOW), used as u32)
            .store32(mmio(reg::QUEUE_DEVICE_HIGH), 0)
            .store32(mmio(reg::QUEUE_READY), 1);
    }
    a.store32(mmio(reg::STATUS), 0xf);
}

/// Emits: notify queue `q`.
pub fn notify(a: &mut Asm, q: u32) {
    a.store32(mmio(reg::QUEUE_NOTIFY), q);
}

/// Emits: spin until the used index of queue `q` reaches `ecx`.
pub fn wait_used_ecx(a: &mut Asm, q: u64) {
    let wait = a.label();
    a.load16(used_idx_addr(q)).cmp_eax_ecx().jb(wait);
}

/// A guest that connects to host port `host_port` (see [`prepare_vsock_rings`]), sends the
/// data packet once, waits for one packet back, prints `done` and resets.
#[must_use]
pub fn vsock_ping_guest() -> Vec<u8> {
    let mut a = Asm::new();
    driver_init(&mut a);
    notify(&mut a, 0);
    a.store16(avail_idx_addr(1), 1);
    notify(&mut a, 1);
    a.mov_ecx(1);
    wait_used_ecx(&mut a, 0);
    a.store16(avail_idx_addr(1), 2);
    notify(&mut a, 1);
    a.mov_ecx(2);
    wait_used_ecx(&mut a, 0);
    a.print(SERIAL_PORT_BASE, "done\n").reset();
    a.finish()
}

/// A guest that connects, then answers every packet it receives with the data packet, forever
/// (the benchmark's vsock echo).
#[must_use]
pub fn vsock_echo_guest() -> Vec<u8> {
    let mut a = Asm::new();
    driver_init(&mut a);
    notify(&mut a, 0);
    a.store16(avail_idx_addr(1), 1);
    notify(&mut a, 1);
    a.mov_ecx(2) // used rx index to wait for: the response, then one per host packet
        .mov_ebx(2) // next tx avail index
        .mov_edx(u32::from(RX_BUFFERS) + 1); // next rx avail index
    let top = a.label();
    wait_used_ecx(&mut a, 0);
    a.store_bx(avail_idx_addr(1)).inc_ebx();
    notify(&mut a, 1);
    // Re-post a receive buffer for the next packet.
    a.store_dx(avail_idx_addr(0)).inc_edx();
    notify(&mut a, 0);
    a.inc_ecx().jmp(top);
    a.finish()
}
