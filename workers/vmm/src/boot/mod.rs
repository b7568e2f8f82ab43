//! Linux direct boot with the 64-bit boot protocol: the ELF `vmlinux` loaded by linux-loader,
//! the zero page with an e820 map, the command line (with one `virtio_mmio.device=` per
//! device), an MP table ([`mptable`]) and an initramfs ([`initramfs`]).

pub mod initramfs;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MPTABLE_START, ZERO_PAGE_START};
use crate::vm::VirtioWindow;

/// The command line every guest gets: serial console, reset through the i8042 on reboot and
/// panic, no PCI.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Extra words for PVM hosts: hide the CPU features PVM's emulator cannot execute, and skip
/// the `int3` self-test it cannot deliver (our kernel patch, `skip_int3_selftest`).
pub const PVM_CMDLINE: &str = "noxsave nofsgsbase nopcid noinvpcid nopti mitigations=off \
     rodata=off skip_int3_selftest \
     clearcpuid=cx16,popcnt,smap,smep,rdpid,pcid,invpcid,erms,fsrm,bmi1,bmi2,movbe,avx,avx2,\
rdrand,rdseed,aes,pclmulqdq,sha_ni,xsaveopt,xsavec,xsaves,sse4_1,sse4_2,ssse3,fma,f16c,abm,umip,fsgsbase";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Opening the kernel image.
    #[error("open kernel {path}")]
    OpenKernel {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the ELF into guest memory.
    #[error("load the kernel ELF")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// Building the command line.
    #[error("build the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line.
    #[error("write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing the zero page.
    #[error("write the boot parameters")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// Writing the MP table.
    #[error("write the MP table")]
    WriteMpTable(#[source] vm_memory::GuestMemoryError),
    /// The initramfs does not fit below the end of guest memory.
    #[error("initramfs of {0} bytes does not fit in guest memory")]
    InitrdTooLarge(usize),
    /// Writing the initramfs.
    #[error("write the initramfs")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
}

/// Whether `/dev/kvm` is provided by PVM (the `kvm_pvm` module is loaded), where guests need
/// [`PVM_CMDLINE`] and guest user space cannot run.
#[must_use]
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Where the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// The zero page (`rsi`).
    pub boot_params: u64,
}

/// Builds the kernel command line: [`BASE_CMDLINE`], `extra`, and the virtio-mmio devices.
///
/// # Errors
/// [`BootError::Cmdline`] when it does not fit [`CMDLINE_MAX_SIZE`].
pub fn cmdline(extra: &str, windows: &[VirtioWindow]) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    c.insert_str(BASE_CMDLINE).map_err(BootError::Cmdline)?;
    if !extra.is_empty() {
        c.insert_str(extra).map_err(BootError::Cmdline)?;
    }
    for (i, w) in windows.iter().enumerate() {
        c.add_virtio_mmio_device(w.size, GuestAddress(w.base), w.gsi, Some(i as u32))
            .map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// Loads `kernel` (an ELF `vmlinux`), `initrd` (an uncompressed or gzip cpio) and `cmdline`
/// into `mem`, and writes the zero page and the MP table for `vcpus` vCPUs.
///
/// # Errors
/// [`BootError`] naming the step that failed.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&[u8]>,
    cmdline: &Cmdline,
    vcpus: u8,
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::WriteCmdline)?;
    mptable::write(mem, GuestAddress(MPTABLE_START), vcpus).map_err(BootError::WriteMpTable)?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = u32::try_from(
        cmdline
            .as_cstring()
            .map_err(BootError::Cmdline)?
            .as_bytes()
            .len(),
    )
    .unwrap_or(0);
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    let end = mem.last_addr().0 + 1;
    if let Some(initrd) = initrd {
        let size = initrd.len() as u64;
        let addr = end
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= loaded.kernel_end)
            .ok_or(BootError::InitrdTooLarge(initrd.len()))?;
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(BootError::WriteInitrd)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = [
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, HIMEM_START - MPTABLE_START, E820_RESERVED),
        (HIMEM_START, end - HIMEM_START, E820_RAM),
    ];
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::WriteBootParams)?;
    Ok(KernelEntry {
        entry: loaded.kernel_load.0,
        boot_params: ZERO_PAGE_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_each_virtio_window() {
        let w = VirtioWindow {
            base: 0xc000_1000,
            size: 0x1000,
            gsi: 5,
        };
        let c = cmdline(PVM_CMDLINE, &[w]).expect("cmdline");
        let s = c.as_cstring().expect("string").into_string().expect("utf8");
        assert!(s.starts_with("console=ttyS0"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xc0001000:5"), "{s}");
        assert!(s.contains("skip_int3_selftest"), "{s}");
    }
}
