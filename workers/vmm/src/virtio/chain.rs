//! Whole-chain validation of split-virtqueue descriptor chains, before a device acts on them.
//!
//! A chain from the guest is accepted only if every descriptor index is inside the table, no
//! descriptor is indirect (the feature is not offered), every buffer lies inside guest memory,
//! device-readable buffers all come before device-writable ones, the chain has at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors (which also bounds loops) and its total length fits
//! in `u32`. Anything else is a corrupt ring.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Longest chain accepted; longer chains (or loops) are corrupt.
pub const MAX_CHAIN_DESCRIPTORS: usize = 32;

const VIRTQ_DESC_F_NEXT: u16 = 0x1;
const VIRTQ_DESC_F_WRITE: u16 = 0x2;
const VIRTQ_DESC_F_INDIRECT: u16 = 0x4;

/// Why a chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index is outside the descriptor table.
    #[error("descriptor index {index} outside a table of {size}")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// The table size.
        size: u16,
    },
    /// The descriptor table itself is not in guest memory.
    #[error("descriptor table entry {0} is not in guest memory")]
    TableOutOfMemory(u16),
    /// An indirect descriptor (not offered).
    #[error("indirect descriptor {0} (VIRTIO_F_INDIRECT_DESC not offered)")]
    Indirect(u16),
    /// A buffer outside guest memory.
    #[error("descriptor {index} buffer [{addr:#x}, +{len}) is outside guest memory")]
    BufferOutOfMemory {
        /// The descriptor.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A readable descriptor after a writable one.
    #[error("device-readable descriptor {0} follows a device-writable one")]
    ReadableAfterWritable(u16),
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors (or a loop).
    #[error("chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors (or a loop)")]
    TooLong,
    /// Total length overflows `u32`.
    #[error("chain longer than 4 GiB")]
    TotalLength,
}

/// One validated buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
}

/// A validated chain: readable buffers, then writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

impl Chain {
    /// Total device-readable bytes.
    #[must_use]
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Total device-writable bytes.
    #[must_use]
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Copies up to `out.len()` readable bytes from the start of the chain into `out`, returning
    /// how many were copied. Buffers were bounds-checked by [`walk`].
    ///
    /// # Errors
    /// A guest-memory error (cannot happen for a validated chain over unchanged memory).
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        skip: u64,
        out: &mut [u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        copy(&self.readable, skip, out.len(), |addr, range| {
            mem.read_slice(&mut out[range], addr)
        })
    }

    /// Writes `data` into the writable buffers starting `skip` bytes in, returning how many
    /// bytes fitted.
    ///
    /// # Errors
    /// A guest-memory error (cannot happen for a validated chain over unchanged memory).
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        skip: u64,
        data: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        copy(&self.writable, skip, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
        })
    }
}

fn copy(
    buffers: &[Buffer],
    mut skip: u64,
    want: usize,
    mut op: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), vm_memory::GuestMemoryError>,
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for b in buffers {
        if done == want {
            break;
        }
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(want - done);
        op(b.addr.unchecked_add(skip), done..done + n)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// Walks and validates the chain starting at `head` in the table at `desc_table` of
/// `queue_size` entries.
///
/// # Errors
/// [`ChainError`] for the first rule the chain breaks.
pub fn walk(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    let mut index = head;
    let mut total: u32 = 0;
    for _ in 0..MAX_CHAIN_DESCRIPTORS {
        if index >= queue_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: queue_size,
            });
        }
        let mut raw = [0u8; 16];
        let at = desc_table
            .checked_add(u64::from(index) * 16)
            .ok_or(ChainError::TableOutOfMemory(index))?;
        mem.read_slice(&mut raw, at)
            .map_err(|_| ChainError::TableOutOfMemory(index))?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
        let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect(index));
        }
        let in_memory = len == 0
            || (addr.checked_add(u64::from(len)).is_some()
                && mem.check_range(GuestAddress(addr), len as usize));
        if !in_memory {
            return Err(ChainError::BufferOutOfMemory { index, addr, len });
        }
        total = total.checked_add(len).ok_or(ChainError::TotalLength)?;
        let buffer = Buffer {
            addr: GuestAddress(addr),
            len,
        };
        if flags & VIRTQ_DESC_F_WRITE != 0 {
            chain.writable.push(buffer);
        } else if chain.writable.is_empty() {
            chain.readable.push(buffer);
        } else {
            return Err(ChainError::ReadableAfterWritable(index));
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = next;
    }
    Err(ChainError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn put(
        mem: &GuestMemoryMmap,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + u64::from(index) * 16))
            .expect("write descriptor");
    }

    #[test]
    fn valid_chain_splits_readable_and_writable() {
        let m = mem();
        put(&m, 0x1000, 0, 0x2000, 44, VIRTQ_DESC_F_NEXT, 1);
        put(
            &m,
            0x1000,
            1,
            0x3000,
            100,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            2,
        );
        put(&m, 0x1000, 2, 0x4000, 100, VIRTQ_DESC_F_WRITE, 0);
        let c = walk(&m, GuestAddress(0x1000), 8, 0).expect("valid");
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable_len(), 200);
    }

    #[test]
    fn loops_are_rejected() {
        let m = mem();
        put(&m, 0x1000, 0, 0x2000, 1, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0x1000, 1, 0x2000, 1, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn out_of_memory_buffers_are_rejected() {
        let m = mem();
        put(&m, 0x1000, 0, 0xf_ff00, 0x200, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::BufferOutOfMemory { .. })
        ));
        put(&m, 0x1000, 0, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::BufferOutOfMemory { .. })
        ));
    }

    #[test]
    fn bad_index_indirect_and_order_are_rejected() {
        let m = mem();
        put(&m, 0x1000, 0, 0x2000, 1, VIRTQ_DESC_F_NEXT, 9);
        assert!(matches!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::IndexOutOfRange { index: 9, .. })
        ));
        put(&m, 0x1000, 0, 0x2000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::Indirect(0))
        );
        put(
            &m,
            0x1000,
            0,
            0x2000,
            4,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        put(&m, 0x1000, 1, 0x3000, 4, 0, 0);
        assert_eq!(
            walk(&m, GuestAddress(0x1000), 8, 0),
            Err(ChainError::ReadableAfterWritable(1))
        );
        assert!(matches!(
            walk(&m, GuestAddress(0xf_fff8), 8, 0),
            Err(ChainError::TableOutOfMemory(0))
        ));
    }

    #[test]
    fn copies_span_buffers() {
        let m = mem();
        put(
            &m,
            0x1000,
            0,
            0x2000,
            3,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        put(&m, 0x1000, 1, 0x3000, 5, VIRTQ_DESC_F_WRITE, 0);
        let c = walk(&m, GuestAddress(0x1000), 8, 0).expect("valid");
        assert_eq!(c.write_from(&m, 1, b"abcdefghij").expect("write"), 7);
        let mut out = [0u8; 5];
        m.read_slice(&mut out, GuestAddress(0x3000)).expect("read");
        assert_eq!(&out, b"cdefg");
    }
}
