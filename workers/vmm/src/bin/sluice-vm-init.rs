//! `sluice-vm-init`: PID 1 of a Sluice micro-VM. Mounts `/proc`, `/dev` and `/tmp`, connects to
//! the host over virtio-vsock (CID 2, port [`AGENT_PORT`]) and runs `sluice-agent serve` with
//! that connection as its stdin. When the agent exits, PID 1 exits and the kernel reboots
//! (`panic=1 reboot=k`), which the VMM sees as an i8042 reset.
#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::process::{Command, ExitCode, Stdio};

use nix::mount::{mount, MsFlags};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Host port the agent connects to (must match `sluice_workers::kvm::AGENT_PORT`).
const AGENT_PORT: u32 = 1024;
const HOST_CID: u32 = 2;

fn main() -> ExitCode {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(
            Some(src),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            eprintln!("sluice-vm-init: mount {target}: {e}");
        }
    }
    let fd: OwnedFd = match socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("sluice-vm-init: vsock socket: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(HOST_CID, AGENT_PORT),
    ) {
        eprintln!("sluice-vm-init: connect to the host: {e}");
        return ExitCode::from(1);
    }
    match Command::new("/sluice-agent")
        .args(["serve", "--task-root", "/var/task"])
        .stdin(Stdio::from(fd))
        .status()
    {
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("sluice-vm-init: start the agent: {e}");
            ExitCode::from(1)
        }
    }
}
