//! Boots the project's guest kernel (scripts/build-guest-kernel.sh) to `/init` with the vsock
//! device on the command line.
//!
//! Slow under PVM (about 40 s), so it runs only when `SLUICE_VMM_LINUX_BOOT=1` is set and the
//! kernel is cached (`SLUICE_GUEST_KERNEL`, else the script's cache path); otherwise it says
//! why on stderr and passes without booting.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_vmm::boot::{self, initramfs};
use sluice_vmm::{Vm, VmConfig};

fn kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_GUEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/build-guest-kernel.sh"
    );
    let out = Command::new("bash")
        .arg(script)
        .arg("--print-path")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn linux_boots_to_init_and_probes_the_virtio_mmio_vsock_device() {
    if std::env::var_os("SLUICE_VMM_LINUX_BOOT").is_none() {
        eprintln!("linux boot test not run: set SLUICE_VMM_LINUX_BOOT=1 (about 40 s under PVM)");
        return;
    }
    let Some(kernel) = kernel().filter(|k| k.is_file()) else {
        panic!("SLUICE_VMM_LINUX_BOOT is set but no guest kernel is cached: run scripts/build-guest-kernel.sh");
    };
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        ..VmConfig::default()
    })
    .expect("create VM");
    let extra = if boot::pvm_host() {
        boot::PVM_CMDLINE
    } else {
        ""
    };
    let cmdline = boot::cmdline(extra, vm.virtio_windows()).expect("cmdline");
    let initrd = initramfs::build(&[
        initramfs::Entry::Dir("dev".into()),
        initramfs::Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: b"#!/bin/sh\necho sluice\n".to_vec(),
        },
    ]);
    let entry =
        boot::load_linux(vm.memory(), &kernel, Some(&initrd), &cmdline, 1).expect("load kernel");
    let mut running = vm.start(entry.entry, entry.boot_params).expect("start");
    let console = running.console();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180)
        && !console.text().contains("Run /init as init process")
        && running.wait_timeout(Duration::from_millis(250)).is_none()
    {}
    // Let the kernel finish what it does right after (the init attempt, a panic under PVM).
    let _ = running.wait_timeout(Duration::from_secs(2));
    let stopped = running.kill();
    let log = stopped.console().text();
    eprintln!(
        "booted to /init in {:?}; stop reason {:?}",
        started.elapsed(),
        stopped.reason
    );
    eprintln!(
        "--- guest console (tail) ---\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    assert!(log.contains("Linux version 6.1"), "kernel started");
    assert!(
        log.contains("Run /init as init process"),
        "kernel reached /init"
    );
    assert!(log.contains("NET: Registered PF_VSOCK"), "vsock core up");
    // The virtio-vsock driver found the command-line device and brought it up.
    assert_eq!(stopped.virtio_status(), vec![0xf], "driver set DRIVER_OK");
    assert_eq!(stopped.virtio_broken(), vec![false]);
}
