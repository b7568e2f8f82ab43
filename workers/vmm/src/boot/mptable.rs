//! The Intel MultiProcessor table (spec 1.4) for kernels without ACPI: one processor entry per
//! vCPU, the ISA bus, the IOAPIC and identity routing of its 24 pins.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `vcpus` vCPUs, placed at `at`.
#[must_use]
pub fn build(at: u64, vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        entries.extend([0u8, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 });
        entries.extend(CPU_STEPPING.to_le_bytes());
        entries.extend((CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([1u8, 0]);
    entries.extend(*b"ISA   ");
    let ioapic_id = vcpus;
    entries.extend([2u8, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IO_APIC_DEFAULT_BASE.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.extend([3u8, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entries.extend([4u8, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([4u8, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    let count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut header = Vec::with_capacity(44);
    header.extend(*b"PCMP");
    header.extend(
        u16::try_from(44 + entries.len())
            .expect("small table")
            .to_le_bytes(),
    );
    header.extend([4u8, 0]); // spec revision, checksum (below)
    header.extend(*b"SLUICE  ");
    header.extend(*b"MICROVM     ");
    header.extend(0u32.to_le_bytes());
    header.extend(0u16.to_le_bytes());
    header.extend(count.to_le_bytes());
    header.extend(APIC_DEFAULT_BASE.to_le_bytes());
    header.extend([0u8; 4]);
    let mut config = header;
    config.extend(entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend(*b"_MP_");
    floating.extend(u32::try_from(at + 16).expect("below 4 GiB").to_le_bytes());
    floating.extend([1u8, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);
    floating.extend(config);
    floating
}

/// Writes the table at `at`.
///
/// # Errors
/// When it does not fit in guest memory.
pub fn write(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    vcpus: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(at.0, vcpus), at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_pointer_are_consistent() {
        let t = build(0x9fc00, 1);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(len, t.len() - 16);
        assert_eq!(t[16..].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(u32::from_le_bytes([t[4], t[5], t[6], t[7]]), 0x9fc10);
        assert!(t.len() < 0x400, "fits below 640 KiB");
    }
}
