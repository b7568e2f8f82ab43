//! The guest-physical layout (Firecracker's x86_64 layout): where the VMM puts boot structures,
//! page tables, the command line and the devices.

/// GDT used for the initial long-mode segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// `boot_params` ("zero page") for Linux's 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPT_START: u64 = 0xa000;
/// First of [`IDENTITY_MAP_GIB`] page directories (2 MiB pages).
pub const PD_START: u64 = 0xb000;
/// The identity map covers this many GiB, so guest code can reach the MMIO window at 3 GiB.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest kernel command line.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP table (end of the 640 KiB of conventional memory).
pub const MPTABLE_START: u64 = 0x9fc00;
/// First byte above the legacy hole: where RAM resumes.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where freestanding guest code is loaded (tests, benchmarks).
pub const GUEST_CODE_START: u64 = HIMEM_START;
/// The 32-bit MMIO gap; guest RAM ends below it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First virtio-mmio window (4 KiB each, one per device).
pub const VIRTIO_MMIO_BASE: u64 = 0xc000_1000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio device.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port (`outb 0xfe, 0x64` resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// KVM's TSS (three pages just below the 4 GiB boundary's BIOS area).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The largest guest the 32-bit layout supports (RAM must end below the MMIO gap).
pub const MAX_GUEST_MEMORY: u64 = MMIO_GAP_START;
