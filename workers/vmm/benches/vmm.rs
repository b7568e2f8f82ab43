//! VMM micro-benchmarks on this host's /dev/kvm: VM creation to first guest instruction, port
//! and MMIO exit round trips, vsock packet round trip (p50/p99), and the VMM's memory overhead
//! beside guest memory. Run with `cargo bench -p sluice-vmm`.
use std::time::{Duration, Instant};

use sluice_vmm::asm::Asm;
use sluice_vmm::layout::SERIAL_PORT_BASE;
use sluice_vmm::testguest;
use sluice_vmm::{Vm, VmConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn report(name: &str, unit: &str, mut v: Vec<f64>) {
    let p50 = pct(&mut v, 0.50);
    let p99 = pct(&mut v, 0.99);
    println!(
        "{name:<44} p50 {p50:>10.2} {unit}   p99 {p99:>10.2} {unit}   (n={})",
        v.len()
    );
}

fn config(mem_mib: u64) -> VmConfig {
    VmConfig {
        mem_mib,
        ..VmConfig::default()
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn first_instruction() {
    let mut v = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let vm = Vm::new(config(128)).expect("vm");
        let mut a = Asm::new();
        a.outb(SERIAL_PORT_BASE, b'!').spin();
        let entry = vm.load_code(&a.finish()).expect("load");
        let running = vm.start(entry, 0).expect("start");
        let console = running.console();
        while console.text().is_empty() {
            std::hint::spin_loop();
        }
        v.push(t.elapsed().as_secs_f64() * 1e3);
        drop(running.kill());
    }
    report("VM creation -> first guest instruction", "ms", v);
}

fn exit_round_trip(mmio: bool) {
    const N: u32 = 20_000;
    let mut v = Vec::new();
    for _ in 0..10 {
        let vm = Vm::new(config(16)).expect("vm");
        let mut a = Asm::new();
        a.mov_ecx(0);
        let top = a.label();
        if mmio {
            a.load32(0xd000_0000);
        } else {
            a.outb(0x80, 0);
        }
        a.inc_ecx().cmp_ecx(N).jb(top).reset();
        let entry = vm.load_code(&a.finish()).expect("load");
        let t = Instant::now();
        let stopped = vm
            .start(entry, 0)
            .expect("start")
            .wait(Duration::from_secs(60));
        v.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(N));
        drop(stopped);
    }
    report(
        if mmio {
            "MMIO exit round trip (batch mean)"
        } else {
            "PIO exit round trip (batch mean)"
        },
        "us",
        v,
    );
}

fn vsock_round_trip() {
    let vm = Vm::new(config(16)).expect("vm");
    testguest::prepare_vsock_rings(vm.memory(), 3, 1234, b"pong").expect("rings");
    let listener = vm.vsock().expect("vsock").listen(1234).expect("listen");
    let entry = vm.load_code(&testguest::vsock_echo_guest()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let v = rt.block_on(async {
        let mut s = listener.accept().await.expect("accept");
        let mut v = Vec::new();
        let mut buf = [0u8; 4];
        for i in 0..2200 {
            let t = Instant::now();
            s.write_all(b"ping").await.expect("write");
            s.read_exact(&mut buf).await.expect("read");
            if i >= 200 {
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        v
    });
    report("vsock packet round trip (host->guest->host)", "us", v);
    drop(running.kill());
}

fn memory_overhead() {
    let before = rss_kib();
    let vm = Vm::new(config(128)).expect("vm");
    let mut a = Asm::new();
    a.outb(SERIAL_PORT_BASE, b'!').spin();
    let entry = vm.load_code(&a.finish()).expect("load");
    let running = vm.start(entry, 0).expect("start");
    std::thread::sleep(Duration::from_millis(50));
    let during = rss_kib();
    drop(running.kill());
    println!(
        "{:<44} {} KiB RSS added with a 128 MiB guest running (guest pages touched: boot tables + code, ~40 KiB)",
        "VMM memory overhead beside guest memory",
        during.saturating_sub(before)
    );
}

fn main() {
    let pvm = sluice_vmm::boot::pvm_host();
    println!(
        "sluice-vmm benchmarks on /dev/kvm{}",
        if pvm { " (PVM)" } else { "" }
    );
    // First, before other VMs warm the allocator and hide what one VM costs.
    memory_overhead();
    first_instruction();
    exit_round_trip(false);
    exit_round_trip(true);
    vsock_round_trip();
}
