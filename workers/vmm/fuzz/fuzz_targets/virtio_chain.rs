//! Hostile descriptor tables, avail rings and packets against the vsock device's host side.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_chain` (from workers/vmm).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_vmm::fuzzing::run_vsock(data);
});
