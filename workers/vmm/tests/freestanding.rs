//! Freestanding guests on the real /dev/kvm: a few hundred bytes of 64-bit code, no kernel.
//! They drive the vCPU loop, port and MMIO exits, the serial console, the i8042 reset, the
//! virtio-mmio register protocol and the vsock device.
use std::time::Duration;

use sluice_vmm::asm::Asm;
use sluice_vmm::layout::SERIAL_PORT_BASE;
use sluice_vmm::testguest::{self, RESULT_MAGIC, RESULT_STATUS, RESULT_UNCLAIMED};
use sluice_vmm::virtio::mmio::status;
use sluice_vmm::virtio::vsock::packet::{Header, HEADER_BYTES, OP_RESPONSE, OP_RW};
use sluice_vmm::{ExitReason, Vm, VmConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 1234;

fn config() -> VmConfig {
    VmConfig {
        mem_mib: 4,
        vsock_guest_cid: Some(GUEST_CID),
        ..VmConfig::default()
    }
}

#[test]
fn guest_prints_to_serial_and_resets() {
    let vm = Vm::new(config()).expect("create VM");
    let mut a = Asm::new();
    a.print(SERIAL_PORT_BASE, "hello from the guest\n").reset();
    let entry = vm.load_code(&a.finish()).expect("load");
    let stopped = vm
        .start(entry, 0)
        .expect("start")
        .wait(Duration::from_secs(10));
    assert_eq!(
        stopped.reason,
        ExitReason::Reset,
        "console: {}",
        stopped.console().text()
    );
    assert_eq!(stopped.console().text(), "hello from the guest\n");
    let (pio, _) = stopped.exits();
    assert_eq!(pio, 22, "21 serial bytes and the reset");
}

#[test]
fn guest_that_never_exits_is_stopped_at_the_timeout() {
    let vm = Vm::new(config()).expect("create VM");
    let mut a = Asm::new();
    a.print(SERIAL_PORT_BASE, "spin\n").spin();
    let entry = vm.load_code(&a.finish()).expect("load");
    let stopped = vm
        .start(entry, 0)
        .expect("start")
        .wait(Duration::from_millis(200));
    assert_eq!(stopped.reason, ExitReason::Killed);
    assert_eq!(stopped.console().text(), "spin\n");
}

#[test]
fn halted_guest_is_killed() {
    // With the in-kernel irqchip KVM keeps a halted vCPU inside the kernel: only a kick ends it.
    let vm = Vm::new(config()).expect("create VM");
    let mut a = Asm::new();
    a.print(SERIAL_PORT_BASE, "h").cli_hlt().spin();
    let entry = vm.load_code(&a.finish()).expect("load");
    let mut running = vm.start(entry, 0).expect("start");
    assert_eq!(running.wait_timeout(Duration::from_millis(100)), None);
    let stopped = running.kill();
    assert_eq!(stopped.reason, ExitReason::Killed);
    assert_eq!(stopped.console().text(), "h");
}

#[test]
fn kill_mid_run_stops_a_busy_guest() {
    let vm = Vm::new(config()).expect("create VM");
    let mut a = Asm::new();
    let top = a.label();
    a.outb(SERIAL_PORT_BASE, b'x').jmp(top);
    let entry = vm.load_code(&a.finish()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    let console = running.console();
    while console.text().len() < 100 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stopped = running.kill();
    assert_eq!(stopped.reason, ExitReason::Killed);
    let written = stopped.console().text().len();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        stopped.console().text().len(),
        written,
        "nothing runs after the kill"
    );
}

#[test]
fn mmio_register_protocol_and_vsock_exchange() {
    let vm = Vm::new(config()).expect("create VM");
    testguest::prepare_vsock_rings(vm.memory(), GUEST_CID, HOST_PORT, b"ping").expect("rings");
    let listener = vm
        .vsock()
        .expect("vsock")
        .listen(HOST_PORT)
        .expect("listen");
    let entry = vm.load_code(&testguest::vsock_ping_guest()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let received = rt.block_on(async {
        let mut stream = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("guest connects in time")
            .expect("accept");
        assert_eq!(stream.ports(), (HOST_PORT, testguest::GUEST_PORT));
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
            .await
            .expect("guest sends in time")
            .expect("read");
        stream.write_all(b"pong").await.expect("write");
        // Keep the stream open until the guest has the data.
        (buf, stream)
    });
    let stopped = running.wait(Duration::from_secs(10));
    assert_eq!(&received.0, b"ping");
    assert_eq!(
        stopped.reason,
        ExitReason::Reset,
        "console: {}",
        stopped.console().text()
    );
    assert_eq!(stopped.console().text(), "done\n");

    let mem = stopped.memory();
    let read_u32 = |a| mem.read_obj::<u32>(GuestAddress(a)).expect("result");
    assert_eq!(read_u32(RESULT_MAGIC), 0x7472_6976, "MagicValue");
    assert_eq!(
        read_u32(RESULT_UNCLAIMED),
        0xffff_ffff,
        "unclaimed MMIO reads as ones"
    );
    assert_eq!(
        read_u32(RESULT_STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        "features accepted"
    );
    assert_eq!(stopped.virtio_status(), vec![0xf]);
    // The guest's rx buffers hold the response and then the host's data.
    let (_, _, used) = testguest::queue_addrs(0);
    let packet = |slot: u64| {
        let head: u32 = mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .expect("used elem");
        let mut raw = [0u8; HEADER_BYTES];
        let buf = 0x21_0000 + u64::from(head) * 0x1000;
        mem.read_slice(&mut raw, GuestAddress(buf)).expect("header");
        let mut data = [0u8; 4];
        mem.read_slice(&mut data, GuestAddress(buf + HEADER_BYTES as u64))
            .expect("data");
        (Header::parse(&raw), data)
    };
    let (response, _) = packet(0);
    assert_eq!(response.op, OP_RESPONSE);
    assert_eq!(
        (response.src_port, response.dst_port),
        (HOST_PORT, testguest::GUEST_PORT)
    );
    let (rw, data) = packet(1);
    assert_eq!((rw.op, rw.len, rw.dst_cid), (OP_RW, 4, GUEST_CID));
    assert_eq!(&data, b"pong");
}

/// A guest that corrupts its tx ring (written by `corrupt`), notifies, and waits for the device
/// to report DEVICE_NEEDS_RESET before resetting the machine.
fn run_corrupt_guest(corrupt: impl FnOnce(&vm_memory::GuestMemoryMmap)) -> sluice_vmm::StoppedVm {
    let vm = Vm::new(config()).expect("create VM");
    testguest::prepare_vsock_rings(vm.memory(), GUEST_CID, HOST_PORT, b"ping").expect("rings");
    corrupt(vm.memory());
    let listener = vm
        .vsock()
        .expect("vsock")
        .listen(HOST_PORT)
        .expect("listen");
    let mut a = Asm::new();
    testguest::driver_init(&mut a);
    a.store16(testguest::avail_idx_addr(1), 1);
    testguest::notify(&mut a, 1);
    let wait = a.label();
    a.load32(sluice_vmm::layout::VIRTIO_MMIO_BASE + 0x70)
        .cmp_eax(0xf | status::DEVICE_NEEDS_RESET)
        .jne(wait);
    a.print(SERIAL_PORT_BASE, "needs reset\n").reset();
    let entry = vm.load_code(&a.finish()).expect("load");
    let stopped = vm
        .start(entry, 0)
        .expect("start")
        .wait(Duration::from_secs(10));
    drop(listener);
    stopped
}

#[test]
fn garbage_descriptor_fail_stops_only_the_device() {
    let (tx_desc, _, _) = testguest::queue_addrs(1);
    let stopped = run_corrupt_guest(|mem| {
        // A buffer far outside guest memory, chained to an index outside the table.
        testguest::put_descriptor(mem, tx_desc, 0, 0x7_0000_0000, 4096, 1, 200).expect("write");
    });
    assert_eq!(
        stopped.reason,
        ExitReason::Reset,
        "console: {}",
        stopped.console().text()
    );
    assert_eq!(stopped.virtio_broken(), vec![true]);
    assert_eq!(stopped.console().text(), "needs reset\n");
}

#[test]
fn garbage_avail_index_fail_stops_only_the_device() {
    let vm = Vm::new(config()).expect("create VM");
    testguest::prepare_vsock_rings(vm.memory(), GUEST_CID, HOST_PORT, b"ping").expect("rings");
    vm.memory()
        .write_obj(0x7777u16, GuestAddress(testguest::avail_idx_addr(0)))
        .expect("write");
    let mut a = Asm::new();
    testguest::driver_init(&mut a);
    testguest::notify(&mut a, 0);
    let wait = a.label();
    a.load32(sluice_vmm::layout::VIRTIO_MMIO_BASE + 0x70)
        .cmp_eax(0xf | status::DEVICE_NEEDS_RESET)
        .jne(wait);
    a.reset();
    let entry = vm.load_code(&a.finish()).expect("load");
    let stopped = vm
        .start(entry, 0)
        .expect("start")
        .wait(Duration::from_secs(10));
    assert_eq!(stopped.reason, ExitReason::Reset);
    assert_eq!(stopped.virtio_broken(), vec![true]);
}

#[test]
fn vcpu_and_device_threads_run_under_seccomp() {
    let vm = Vm::new(config()).expect("create VM");
    let mut a = Asm::new();
    a.spin();
    let entry = vm.load_code(&a.finish()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    for tid in running.thread_ids() {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .expect("thread status");
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim);
        assert_eq!(mode, Some("2"), "thread {tid} is filtered");
    }
    assert_eq!(running.thread_ids().len(), 2);
    let _ = running.kill();
}
