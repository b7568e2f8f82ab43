//! The host side of the virtio devices under hostile input: one harness shared by the
//! cargo-fuzz target (`fuzz/fuzz_targets/virtio_chain.rs`) and a randomized unit test.
//!
//! The input becomes the guest: the first bytes lay out the tx and rx descriptor tables, avail
//! rings and indices, the rest fills guest memory (packet headers and data). The vsock device
//! then processes its queues with a listener and an accepted connection in place; it must never
//! panic, never touch memory outside the guest, and either keep working or fail-stop.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::vsock::Vsock;
use crate::virtio::{Interrupt, VirtioDevice};

/// Guest memory of the harness.
pub const MEM_BYTES: usize = 0x2_0000;
const QUEUE_SIZE: u16 = 16;

/// Runs one input through the vsock device. Returns whether the device fail-stopped.
///
/// # Panics
/// Only if the harness itself cannot set up (memory, eventfd).
#[must_use]
pub fn run_vsock(data: &[u8]) -> bool {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("memory");
    // Fill guest memory with the input (repeated), so tables, rings and buffers are hostile.
    if !data.is_empty() {
        let mut fill = Vec::with_capacity(MEM_BYTES);
        while fill.len() < MEM_BYTES {
            fill.extend_from_slice(&data[..data.len().min(MEM_BYTES - fill.len())]);
        }
        mem.write_slice(&fill, GuestAddress(0)).expect("fill");
    }
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let (mut dev, host) = Vsock::new(3).expect("device");
    let _listener = host.listen(u32::from(byte(0))).expect("listen");
    let mut queues = Vec::new();
    for q in 0..3u64 {
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        let base = q * 0x1000;
        queue.set_size(QUEUE_SIZE >> (byte(1 + q as usize) % 4));
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
        queue.set_ready(true);
        queues.push(queue);
    }
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    dev.activate(mem, queues, Interrupt::new(irq))
        .expect("activate");
    for round in 0..4 {
        dev.process_queue(round % 2);
        dev.process_host_event();
    }
    dev.is_broken()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_guests_never_panic_the_host() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x51ce);
        let mut broken = 0;
        for i in 0..3000 {
            let len = rng.random_range(0..2048);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            // Bias some inputs towards small values, which make plausible rings.
            if i % 2 == 0 {
                for b in &mut data {
                    *b &= 0x1f;
                }
            }
            broken += usize::from(super::run_vsock(&data));
        }
        assert!(
            broken > 0,
            "some random rings must be recognised as corrupt"
        );
    }
}
