//! 200 create/run/kill cycles of hostile and well-behaved guests leave no thread, fd or memory
//! behind. One test in its own binary, so no other test's threads or fds move the counts.
use std::time::Duration;

use sluice_vmm::asm::Asm;
use sluice_vmm::layout::SERIAL_PORT_BASE;
use sluice_vmm::testguest;
use sluice_vmm::{ExitReason, Vm, VmConfig};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).expect("proc").count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn cycle(i: usize) {
    let vm = Vm::new(VmConfig {
        mem_mib: 4,
        ..VmConfig::default()
    })
    .expect("create VM");
    testguest::prepare_vsock_rings(vm.memory(), 3, 1234, b"ping").expect("rings");
    let listener = vm.vsock().expect("vsock").listen(1234).expect("listen");
    let mut a = Asm::new();
    let expect = match i % 4 {
        // Never exits: killed at the timeout.
        0 => {
            a.spin();
            ExitReason::Killed
        }
        // Garbage in its ring, then spins: the device fail-stops, the VM is killed.
        1 => {
            testguest::put_descriptor(
                vm.memory(),
                testguest::queue_addrs(1).0,
                0,
                1 << 40,
                64,
                0,
                0,
            )
            .expect("garbage");
            testguest::driver_init(&mut a);
            a.store16(testguest::avail_idx_addr(1), 1);
            testguest::notify(&mut a, 1);
            a.spin();
            ExitReason::Killed
        }
        // Connects over vsock and is killed mid-run with the connection open.
        2 => {
            testguest::driver_init(&mut a);
            testguest::notify(&mut a, 0);
            a.store16(testguest::avail_idx_addr(1), 1);
            testguest::notify(&mut a, 1);
            let top = a.label();
            a.outb(SERIAL_PORT_BASE, b'.').jmp(top);
            ExitReason::Killed
        }
        // Exits cleanly.
        _ => {
            a.print(SERIAL_PORT_BASE, "bye\n").reset();
            ExitReason::Reset
        }
    };
    let entry = vm.load_code(&a.finish()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    let timeout = if expect == ExitReason::Reset {
        10_000
    } else {
        5
    };
    let stopped = running.wait(Duration::from_millis(timeout));
    assert_eq!(stopped.reason, expect, "cycle {i}");
    drop(listener);
}

#[test]
fn two_hundred_cycles_leave_nothing_behind() {
    // Warm up allocator arenas and the kick handler.
    for i in 0..8 {
        cycle(i);
    }
    let threads = count("/proc/self/task");
    let fds = count("/proc/self/fd");
    let rss = rss_kib();
    for i in 0..200 {
        cycle(i);
    }
    assert_eq!(count("/proc/self/task"), threads, "threads");
    assert_eq!(count("/proc/self/fd"), fds, "fds");
    let grown = rss_kib().saturating_sub(rss);
    // Each VM maps 4 MiB of guest memory; a leak of one VM per cycle would add ~800 MiB.
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB over 200 cycles");
}
