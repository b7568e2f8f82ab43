//! The virtio-vsock device (type 19): host CID 2, one guest CID, stream sockets only.
//!
//! Guest-initiated connections to CID 2 port P are handed to the [`VsockListener`] on P;
//! the host writes and reads them as [`VsockStream`]s. Flow control follows the spec's credit
//! scheme in both directions, so what a guest can make the host buffer is bounded by
//! [`host::CONN_BUF_ALLOC`] × [`host::MAX_CONNECTIONS`].
//!
//! A malformed descriptor chain, an impossible avail index or a header whose length exceeds its
//! chain is a corrupt ring: the device fail-stops (`is_broken`), its transport sets
//! `DEVICE_NEEDS_RESET`, and every host stream ends. Protocol misbehaviour on one connection
//! (data beyond credit, unknown ops) only resets that connection.

pub mod host;
pub mod packet;

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use host::{VsockError, VsockHost, VsockListener, VsockStream};

use self::host::{
    Conn, ConnKey, Control, Shared, State, CONN_BUF_ALLOC, LISTEN_BACKLOG, MAX_CONNECTIONS,
};
use self::packet::{
    Header, HEADER_BYTES, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::chain::{self, Chain};
use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING};

/// Virtio device type of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Queue size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Why the device stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The avail index moved more than a queue's worth.
    #[error("avail index jumped by {0}")]
    AvailIndex(u16),
    /// A ring could not be read or written.
    #[error("ring not accessible in guest memory")]
    Ring,
    /// A chain broke a validation rule.
    #[error("descriptor chain: {0}")]
    Chain(#[from] chain::ChainError),
    /// A chain's shape does not fit the queue (writable on tx, readable on rx, too short).
    #[error("descriptor chain does not fit its queue: {0}")]
    Shape(&'static str),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    shared: Arc<Shared>,
    active: Option<Active>,
    broken: Option<RingError>,
    /// Packets the device processed, both directions (telemetry, tests).
    packets: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for a guest with context id `guest_cid` and its host handle.
    ///
    /// # Errors
    /// [`VsockError::CreateEventFd`].
    pub fn new(guest_cid: u64) -> Result<(Self, VsockHost), VsockError> {
        let shared = Shared::new()?;
        Ok((
            Self {
                guest_cid,
                shared: shared.clone(),
                active: None,
                broken: None,
                packets: Arc::default(),
            },
            VsockHost { shared },
        ))
    }

    /// Why the device fail-stopped, if it did.
    #[must_use]
    pub fn broken_reason(&self) -> Option<&RingError> {
        self.broken.as_ref()
    }

    /// The packet counter.
    #[must_use]
    pub fn packet_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.packets.clone()
    }

    fn fail(&mut self, e: RingError) {
        tracing::warn!(guest_cid = self.guest_cid, error = %e, "vsock device fail-stopped");
        self.broken = Some(e);
        self.shared.lock().stop();
    }

    /// Processes everything pending: guest packets, then packets for the guest.
    pub fn process(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let result = process_tx(active, &self.shared, self.guest_cid, &self.packets)
            .and_then(|()| process_rx(active, &self.shared, self.guest_cid, &self.packets));
        if let Err(e) = result {
            self.fail(e);
        }
    }
}

/// Pops the next available head of `q`, or `None` when the driver has queued nothing more.
fn pop_head(q: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<u16>, RingError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| RingError::Ring)?;
    let next = Wrapping(q.next_avail());
    let pending = (avail - next).0;
    if pending == 0 {
        return Ok(None);
    }
    if pending > q.size() {
        return Err(RingError::AvailIndex(pending));
    }
    let slot = u64::from(next.0 % q.size());
    let at = GuestAddress(q.avail_ring())
        .checked_add(4 + 2 * slot)
        .ok_or(RingError::Ring)?;
    let head: u16 = mem.read_obj(at).map_err(|_| RingError::Ring)?;
    q.set_next_avail((next + Wrapping(1)).0);
    Ok(Some(head))
}

fn has_avail(q: &Queue, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| RingError::Ring)?;
    Ok(avail.0 != q.next_avail())
}

fn complete(active: &mut Active, queue: usize, head: u16, len: u32) -> Result<(), RingError> {
    let q = &mut active.queues[queue];
    q.add_used(&active.mem, head, len)
        .map_err(|_| RingError::Ring)?;
    if q.needs_notification(&active.mem)
        .map_err(|_| RingError::Ring)?
    {
        active.interrupt.signal(VIRTIO_MMIO_INT_VRING);
    }
    Ok(())
}

fn process_tx(
    active: &mut Active,
    shared: &Shared,
    guest_cid: u64,
    packets: &std::sync::atomic::AtomicU64,
) -> Result<(), RingError> {
    loop {
        let q = &mut active.queues[TX];
        let Some(head) = pop_head(q, &active.mem)? else {
            return Ok(());
        };
        let chain = chain::walk(&active.mem, GuestAddress(q.desc_table()), q.size(), head)?;
        if !chain.writable.is_empty() {
            return Err(RingError::Shape("device-writable buffer on the tx queue"));
        }
        let (header, data) = read_tx_packet(&active.mem, &chain)?;
        packets.fetch_add(1, Ordering::Relaxed);
        handle_guest_packet(&mut shared.lock(), guest_cid, &header, data);
        complete(active, TX, head, 0)?;
    }
}

fn read_tx_packet(mem: &GuestMemoryMmap, chain: &Chain) -> Result<(Header, Vec<u8>), RingError> {
    let mut raw = [0u8; HEADER_BYTES];
    if chain
        .read_into(mem, 0, &mut raw)
        .map_err(|_| RingError::Ring)?
        != HEADER_BYTES
    {
        return Err(RingError::Shape("tx chain shorter than a header"));
    }
    let header = Header::parse(&raw);
    if header.len > MAX_PKT_DATA {
        return Err(RingError::Shape("tx payload larger than 64 KiB"));
    }
    if u64::from(header.len) > chain.readable_len() - HEADER_BYTES as u64 {
        return Err(RingError::Shape("tx header length exceeds its chain"));
    }
    // Bounded by MAX_PKT_DATA and by what the chain really holds.
    let mut data = vec![0u8; header.len as usize];
    chain
        .read_into(mem, HEADER_BYTES as u64, &mut data)
        .map_err(|_| RingError::Ring)?;
    Ok((header, data))
}

fn reset_conn(state: &mut State, key: ConnKey) {
    if let Some(conn) = state.conns.get_mut(&key) {
        conn.reset = true;
        conn.wake();
    }
    state.push_control(Control::Rst(key));
}

fn handle_guest_packet(state: &mut State, guest_cid: u64, h: &Header, data: Vec<u8>) {
    // Spoofed or misdirected packets are dropped, as Firecracker does.
    if h.src_cid != guest_cid || h.dst_cid != HOST_CID || state.stopped {
        return;
    }
    let key: ConnKey = (h.dst_port, h.src_port);
    if h.type_ != TYPE_STREAM {
        if h.op != OP_RST {
            state.push_control(Control::Rst(key));
        }
        return;
    }
    if let Some(conn) = state.conns.get_mut(&key) {
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }
    match h.op {
        OP_REQUEST => {
            let accept = !state.conns.contains_key(&key)
                && state.conns.len() < MAX_CONNECTIONS
                && state
                    .listeners
                    .get(&h.dst_port)
                    .is_some_and(|l| l.backlog.len() < LISTEN_BACKLOG);
            if !accept {
                state.push_control(Control::Rst(key));
                return;
            }
            state.conns.insert(
                key,
                Conn {
                    peer_buf_alloc: h.buf_alloc,
                    peer_fwd_cnt: Wrapping(h.fwd_cnt),
                    ..Conn::default()
                },
            );
            state.push_control(Control::Response(key));
            if let Some(l) = state.listeners.get_mut(&h.dst_port) {
                l.backlog.push_back(key);
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
        }
        OP_RW => {
            let Some(conn) = state.conns.get_mut(&key) else {
                state.push_control(Control::Rst(key));
                return;
            };
            if conn.reset {
                return;
            }
            // Credit the guest may use: what we advertised minus what the host still holds.
            let held = conn.rx.len();
            if held + data.len() > CONN_BUF_ALLOC as usize || conn.guest_done_sending {
                reset_conn(state, key);
                return;
            }
            conn.rx.extend(&data);
            if let Some(w) = conn.read_waker.take() {
                w.wake();
            }
        }
        OP_SHUTDOWN => {
            if let Some(conn) = state.conns.get_mut(&key) {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    // The guest takes no more data: drop what we still had for it.
                    conn.tx.clear();
                    conn.host_shutdown = true;
                    conn.shutdown_sent = true;
                }
                conn.wake();
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    reset_conn(state, key);
                }
            }
        }
        OP_RST => {
            if let Some(conn) = state.conns.get_mut(&key) {
                conn.reset = true;
                conn.wake();
            }
        }
        OP_CREDIT_UPDATE => {
            if let Some(conn) = state.conns.get_mut(&key) {
                if let Some(w) = conn.write_waker.take() {
                    w.wake();
                }
            }
        }
        OP_CREDIT_REQUEST => {
            if state.conns.contains_key(&key) {
                state.push_control(Control::CreditUpdate(key));
            }
        }
        // Includes OP_RESPONSE: the host never initiates, so a response answers nothing.
        _ => reset_conn(state, key),
    }
}

/// The next packet for the guest, at most `room` payload bytes, or `None`.
fn next_rx_packet(state: &mut State, guest_cid: u64, room: usize) -> Option<(Header, Vec<u8>)> {
    let header = |key: ConnKey, op: u16, conn: Option<&mut Conn>| {
        let (buf_alloc, fwd_cnt) = match conn {
            Some(c) => {
                c.fwd_cnt_sent = c.fwd_cnt;
                (CONN_BUF_ALLOC, c.fwd_cnt.0)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    };
    while let Some(c) = state.control.pop_front() {
        match c {
            Control::Response(key) => {
                if let Some(conn) = state.conns.get_mut(&key) {
                    if !conn.reset {
                        return Some((header(key, OP_RESPONSE, Some(conn)), Vec::new()));
                    }
                }
            }
            Control::CreditUpdate(key) => {
                if let Some(conn) = state.conns.get_mut(&key) {
                    return Some((header(key, OP_CREDIT_UPDATE, Some(conn)), Vec::new()));
                }
            }
            Control::Rst(key) => return Some((header(key, OP_RST, None), Vec::new())),
        }
    }
    for (&key, conn) in &mut state.conns {
        if conn.reset {
            continue;
        }
        let credit = conn.peer_credit() as usize;
        if !conn.tx.is_empty() && credit > 0 {
            let n = conn
                .tx
                .len()
                .min(credit)
                .min(room)
                .min(MAX_PKT_DATA as usize);
            let data: Vec<u8> = conn.tx.drain(..n).collect();
            conn.tx_cnt += Wrapping(u32::try_from(n).expect("at most 64 KiB"));
            if let Some(w) = conn.write_waker.take() {
                w.wake();
            }
            let mut h = header(key, OP_RW, Some(conn));
            h.len = u32::try_from(n).expect("at most 64 KiB");
            return Some((h, data));
        }
        if conn.host_shutdown && conn.tx.is_empty() && !conn.shutdown_sent {
            conn.shutdown_sent = true;
            let mut h = header(key, OP_SHUTDOWN, Some(conn));
            h.flags = SHUTDOWN_SEND;
            return Some((h, Vec::new()));
        }
    }
    None
}

fn process_rx(
    active: &mut Active,
    shared: &Shared,
    guest_cid: u64,
    packets: &std::sync::atomic::AtomicU64,
) -> Result<(), RingError> {
    loop {
        if !has_avail(&active.queues[RX], &active.mem)? {
            return Ok(());
        }
        let q = &mut active.queues[RX];
        let head = pop_head(q, &active.mem)?.ok_or(RingError::Ring)?;
        let chain = chain::walk(&active.mem, GuestAddress(q.desc_table()), q.size(), head)?;
        if !chain.readable.is_empty() {
            return Err(RingError::Shape("device-readable buffer on the rx queue"));
        }
        let capacity = chain.writable_len();
        if capacity < HEADER_BYTES as u64 {
            return Err(RingError::Shape("rx buffer shorter than a header"));
        }
        let room = usize::try_from(capacity - HEADER_BYTES as u64).unwrap_or(usize::MAX);
        let Some((header, data)) = next_rx_packet(&mut shared.lock(), guest_cid, room) else {
            // Nothing to send: give the buffer back for later.
            q.set_next_avail(q.next_avail().wrapping_sub(1));
            return Ok(());
        };
        chain
            .write_from(&active.mem, 0, &header.to_bytes())
            .map_err(|_| RingError::Ring)?;
        chain
            .write_from(&active.mem, HEADER_BYTES as u64, &data)
            .map_err(|_| RingError::Ring)?;
        packets.fetch_add(1, Ordering::Relaxed);
        let len = u32::try_from(HEADER_BYTES + data.len()).expect("at most 64 KiB + header");
        complete(active, RX, head, len)?;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = None;
        let mut state = self.shared.lock();
        for conn in state.conns.values_mut() {
            conn.reset = true;
            conn.wake();
        }
        state.control.clear();
    }

    fn process_queue(&mut self, _index: usize) {
        self.process();
    }

    fn host_event(&self) -> Option<&EventFd> {
        Some(&self.shared.evt)
    }

    fn process_host_event(&mut self) {
        self.process();
    }

    fn is_broken(&self) -> bool {
        self.broken.is_some()
    }
}

#[cfg(test)]
mod tests;
