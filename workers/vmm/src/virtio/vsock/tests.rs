//! Device logic on virtio-queue's mock split queues (no KVM).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::packet::*;
use super::*;

const CID: u64 = 3;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: Vsock,
    host: VsockHost,
    next_tx: u16,
    next_rx: u16,
    next_buf: u64,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("memory")
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let rx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x4000), 16);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let (mut dev, host) = Vsock::new(CID).expect("device");
        let queues = vec![
            rx.create_queue().expect("rx"),
            tx.create_queue().expect("tx"),
            ev.create_queue().expect("event"),
        ];
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        dev.activate(mem.clone(), queues, Interrupt::new(irq))
            .expect("activate");
        Self {
            mem,
            rx,
            tx,
            dev,
            host,
            next_tx: 0,
            next_rx: 0,
            next_buf: 0x10_0000,
        }
    }

    fn buffer(&mut self, data: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.next_buf += 0x1_0000;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("buffer");
        addr
    }

    /// Queues a guest packet on tx as header + data descriptors.
    fn send(&mut self, h: Header, data: &[u8]) {
        let hdr = self.buffer(&h.to_bytes());
        let mut descs = vec![SplitDescriptor::new(hdr, HEADER_BYTES as u32, 0, 0)];
        if !data.is_empty() {
            let d = self.buffer(data);
            descs[0] = SplitDescriptor::new(hdr, HEADER_BYTES as u32, F_NEXT, self.next_tx + 1);
            descs.push(SplitDescriptor::new(d, data.len() as u32, 0, 0));
        }
        self.add_tx(&descs);
    }

    fn add_tx(&mut self, descs: &[SplitDescriptor]) {
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        self.tx
            .add_desc_chains(&raw, self.next_tx)
            .expect("tx chain");
        self.next_tx += descs.len() as u16;
    }

    /// Posts one 4 KiB receive buffer.
    fn post_rx(&mut self) -> u64 {
        let addr = self.buffer(&[0u8; 0x1000]);
        let d = RawDescriptor::from(SplitDescriptor::new(addr, 0x1000, F_WRITE, 0));
        self.rx
            .add_desc_chains(&[d], self.next_rx)
            .expect("rx chain");
        self.next_rx += 1;
        addr
    }

    fn received(&self, addr: u64) -> (Header, Vec<u8>) {
        let mut raw = [0u8; HEADER_BYTES];
        self.mem
            .read_slice(&mut raw, GuestAddress(addr))
            .expect("header");
        let h = Header::parse(&raw);
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HEADER_BYTES as u64))
            .expect("data");
        (h, data)
    }
}

fn guest(op: u16, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn connection_to_a_listener_is_accepted_and_data_flows_both_ways() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let listener = rig.host.listen(1024).expect("listen");
    let response_buf = rig.post_rx();
    rig.send(guest(OP_REQUEST, 0), &[]);
    rig.dev.process();
    let (h, _) = rig.received(response_buf);
    assert_eq!((h.op, h.dst_cid, h.dst_port), (OP_RESPONSE, CID, 5000));
    assert_eq!(h.buf_alloc, host::CONN_BUF_ALLOC);

    rig.send(guest(OP_RW, 5), b"hello");
    rig.dev.process();
    let rt = rt();
    let mut stream = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(1), listener.accept()).await })
        .expect("accepted")
        .expect("stream");
    let mut got = [0u8; 5];
    rt.block_on(stream.read_exact(&mut got)).expect("read");
    assert_eq!(&got, b"hello");

    rt.block_on(stream.write_all(b"world")).expect("write");
    let data_buf = rig.post_rx();
    rig.dev.process_host_event();
    let (h, data) = rig.received(data_buf);
    assert_eq!((h.op, h.len, h.fwd_cnt), (OP_RW, 5, 5));
    assert_eq!(data, b"world");
    assert!(!rig.dev.is_broken());
}

#[test]
fn request_without_listener_is_refused_with_rst() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let buf = rig.post_rx();
    rig.send(guest(OP_REQUEST, 0), &[]);
    rig.dev.process();
    assert_eq!(rig.received(buf).0.op, OP_RST);
    assert_eq!(rig.host.connections(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let listener = rig.host.listen(1024).expect("listen");
    let mut h = guest(OP_REQUEST, 0);
    h.buf_alloc = 3;
    rig.post_rx();
    rig.send(h, &[]);
    rig.dev.process();
    let rt = rt();
    let mut stream = rt.block_on(listener.accept()).expect("stream");
    rt.block_on(stream.write_all(b"abcdef")).expect("write");
    let first = rig.post_rx();
    let second = rig.post_rx();
    rig.dev.process();
    assert_eq!(rig.received(first).1, b"abc", "only the credit's worth");
    assert_eq!(
        rig.received(second).0.op,
        0,
        "nothing more until credit returns"
    );
    let mut update = guest(OP_CREDIT_UPDATE, 0);
    update.buf_alloc = 3;
    update.fwd_cnt = 3;
    rig.send(update, &[]);
    rig.dev.process();
    assert_eq!(rig.received(second).1, b"def");
}

#[test]
fn data_beyond_the_advertised_credit_resets_only_that_connection() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let listener = rig.host.listen(1024).expect("listen");
    rig.post_rx();
    rig.send(guest(OP_REQUEST, 0), &[]);
    rig.dev.process();
    let rt = rt();
    let mut stream = rt.block_on(listener.accept()).expect("stream");
    // Five 64 KiB packets overrun the 256 KiB window.
    let chunk = vec![7u8; MAX_PKT_DATA as usize];
    for _ in 0..5 {
        rig.send(guest(OP_RW, MAX_PKT_DATA), &chunk);
    }
    let rst = rig.post_rx();
    rig.dev.process();
    assert_eq!(rig.received(rst).0.op, OP_RST);
    assert!(
        !rig.dev.is_broken(),
        "a protocol violation is not a corrupt ring"
    );
    let mut all = Vec::new();
    let err = rt
        .block_on(stream.read_to_end(&mut all))
        .expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(
        all.len(),
        4 * MAX_PKT_DATA as usize,
        "what fitted the window was delivered"
    );
}

#[test]
fn writable_buffer_on_tx_fail_stops_the_device_and_ends_streams() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let listener = rig.host.listen(1024).expect("listen");
    rig.post_rx();
    rig.send(guest(OP_REQUEST, 0), &[]);
    rig.dev.process();
    let rt = rt();
    let mut stream = rt.block_on(listener.accept()).expect("stream");
    let addr = rig.buffer(&guest(OP_RW, 0).to_bytes());
    rig.add_tx(&[SplitDescriptor::new(addr, HEADER_BYTES as u32, F_WRITE, 0)]);
    rig.dev.process();
    assert!(rig.dev.is_broken());
    assert!(matches!(rig.dev.broken_reason(), Some(RingError::Shape(_))));
    let mut b = [0u8; 1];
    assert!(rt.block_on(stream.read(&mut b)).is_err());
    assert!(rt.block_on(listener.accept()).is_err());
    // Nothing is processed any more.
    rig.send(guest(OP_REQUEST, 0), &[]);
    rig.dev.process();
}

#[test]
fn header_length_beyond_its_chain_fail_stops_the_device() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.send(guest(OP_RW, 1000), b"short");
    rig.dev.process();
    assert_eq!(
        rig.dev.broken_reason(),
        Some(&RingError::Shape("tx header length exceeds its chain"))
    );
}

#[test]
fn spoofed_source_cid_is_dropped() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let _listener = rig.host.listen(1024).expect("listen");
    let buf = rig.post_rx();
    let mut h = guest(OP_REQUEST, 0);
    h.src_cid = 99;
    rig.send(h, &[]);
    rig.dev.process();
    assert_eq!(rig.received(buf).0.op, 0, "no reply at all");
    assert_eq!(rig.host.connections(), 0);
}
