//! Guest memory: one anonymous mapping from guest-physical 0, registered with KVM as slot 0.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::MAX_GUEST_MEMORY;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what the layout supports.
    #[error("guest memory must be 1..={max} MiB, got {got} MiB")]
    Size {
        /// Requested MiB.
        got: u64,
        /// Largest supported MiB.
        max: u64,
    },
    /// The anonymous mapping failed.
    #[error("map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A region has no host mapping (cannot happen for an mmap-backed region).
    #[error("find the host address of guest memory")]
    HostAddress,
    /// KVM refused the memory slot.
    #[error("register guest memory with KVM")]
    SetUserMemoryRegion(#[source] kvm_ioctls::Error),
}

/// Maps `mem_mib` MiB of guest RAM starting at guest-physical 0.
///
/// # Errors
/// [`MemoryError::Size`] when the size is 0 or reaches into the MMIO gap; [`MemoryError::Map`]
/// when the host cannot map it.
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let max = MAX_GUEST_MEMORY >> 20;
    if mem_mib == 0 || mem_mib > max {
        return Err(MemoryError::Size { got: mem_mib, max });
    }
    let bytes =
        usize::try_from(mem_mib << 20).map_err(|_| MemoryError::Size { got: mem_mib, max })?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).map_err(MemoryError::Map)
}

/// Registers every region of `mem` with the VM, slots numbered from 0.
///
/// # Errors
/// [`MemoryError::SetUserMemoryRegion`] when KVM refuses a slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::HostAddress)?;
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("a handful of regions"),
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [userspace_addr, +memory_size) is a live mapping owned by `mem`,
        // and the caller keeps `mem` alive for as long as the VM exists (both are owned by the
        // same `Vm` and the VM fd is closed before the mapping is dropped; see `vm::Vm`'s field
        // order).
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::SetUserMemoryRegion)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_bounds_are_enforced() {
        assert!(matches!(create(0), Err(MemoryError::Size { .. })));
        assert!(matches!(create(4096), Err(MemoryError::Size { .. })));
        let mem = create(2).expect("2 MiB");
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
    }
}
