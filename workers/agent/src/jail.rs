//! The jailed-process sandbox, as the agent builds it around itself.
//!
//! The host starts `sluice-agent jail <spec>` with the protocol socket as its stdin. Stage 1
//! joins the sandbox's cgroups, sets rlimits, unshares user, mount, PID, network, IPC and UTS
//! namespaces, and asks the host (one byte on the socket) to write its UID/GID maps, since only a
//! process outside the new user namespace may map it to an unprivileged host id. Stage 1 then
//! starts stage 2 (`sluice-agent init <spec>`), which is PID 1 of the new PID namespace: it builds
//! a read-only root (host `/usr`, `/lib*`, `/bin`, `/sbin`, `/etc` read-only, the bundle read-only
//! at `/var/task`, a private `/tmp`, a minimal `/dev`, a fresh `/proc`), pivots into it, brings up
//! loopback (the only interface), sets `no_new_privs`, installs the seccomp filter, and becomes
//! the agent.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, pivot_root, sethostname, setresgid, setresuid, Gid, Uid};
use serde::{Deserialize, Serialize};

/// Byte stage 1 sends when it has unshared and waits for its ID maps.
pub const SYNC_UNSHARED: u8 = b'U';
/// Byte the host sends when the maps are written.
pub const SYNC_MAPPED: u8 = b'G';

/// Everything the agent needs to jail itself; passed as JSON on its command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailSpec {
    /// An empty host directory that becomes the sandbox's root (a tmpfs is mounted on it inside
    /// the sandbox's own mount namespace, so the host never sees it).
    pub root_dir: PathBuf,
    /// The function bundle, mounted read-only at `/var/task`.
    pub task_dir: PathBuf,
    /// Host directories bind-mounted read-only at the same place in the sandbox.
    pub ro_binds: Vec<PathBuf>,
    /// `cgroup.procs` files stage 1 writes its PID into (the host created and limited them).
    pub cgroup_procs: Vec<PathBuf>,
    /// Size of the private `/tmp`, MiB.
    pub tmp_size_mb: u64,
    /// Resource limits (always set; the only memory limit where cgroups are unavailable).
    pub rlimits: Rlimits,
    /// Install the seccomp filter.
    pub seccomp: bool,
}

/// Resource limits for the sandbox's processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rlimits {
    /// Open files.
    pub nofile: u64,
    /// Address space bytes (`None`: unlimited, because a cgroup limits memory).
    pub address_space_bytes: Option<u64>,
    /// Largest file the sandbox may write, bytes.
    pub file_size_bytes: u64,
}

/// A set-up step that failed; the agent exits with it before the function runs.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("{step}: {source}")]
    Sys {
        /// What was being done.
        step: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// File or socket I/O failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The host broke the start-up handshake.
    #[error("start-up handshake: {0}")]
    Handshake(String),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

fn sys<T>(step: impl Into<String>, r: nix::Result<T>) -> Result<T, JailError> {
    r.map_err(|source| JailError::Sys {
        step: step.into(),
        source,
    })
}

fn io<T>(step: impl Into<String>, r: std::io::Result<T>) -> Result<T, JailError> {
    r.map_err(|source| JailError::Io {
        step: step.into(),
        source,
    })
}

/// Stage 1, on the host side of the namespaces. Returns once this process is uid 0 in its new
/// user namespace and may start stage 2. `channel` is the protocol socket (stdin).
///
/// # Errors
/// Any failed step, named.
pub fn stage1<C: Read + Write>(spec: &JailSpec, channel: &mut C) -> Result<(), JailError> {
    // If the host dies, so does the sandbox.
    sys(
        "set the parent-death signal",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        io(
            format!("join cgroup {}", procs.display()),
            std::fs::write(procs, &pid),
        )?;
    }
    set_rlimits(&spec.rlimits)?;
    sys(
        "unshare user, mount, PID, network, IPC and UTS namespaces",
        unshare(
            CloneFlags::CLONE_NEWUSER
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS,
        ),
    )?;
    io(
        "ask the host for ID maps",
        channel.write_all(&[SYNC_UNSHARED]),
    )?;
    let mut b = [0u8; 1];
    io("wait for ID maps", channel.read_exact(&mut b))?;
    if b[0] != SYNC_MAPPED {
        return Err(JailError::Handshake(format!(
            "expected {SYNC_MAPPED}, got {}",
            b[0]
        )));
    }
    sys(
        "become gid 0 in the sandbox",
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
    )?;
    sys(
        "become uid 0 in the sandbox",
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
    )?;
    Ok(())
}

fn set_rlimits(r: &Rlimits) -> Result<(), JailError> {
    sys(
        "set RLIMIT_NOFILE",
        setrlimit(Resource::RLIMIT_NOFILE, r.nofile, r.nofile),
    )?;
    sys(
        "set RLIMIT_FSIZE",
        setrlimit(Resource::RLIMIT_FSIZE, r.file_size_bytes, r.file_size_bytes),
    )?;
    sys("set RLIMIT_CORE", setrlimit(Resource::RLIMIT_CORE, 0, 0))?;
    if let Some(bytes) = r.address_space_bytes {
        sys(
            "set RLIMIT_AS",
            setrlimit(Resource::RLIMIT_AS, bytes, bytes),
        )?;
    }
    Ok(())
}

/// Stage 2: PID 1 of the sandbox builds the root file system and locks itself down.
///
/// # Errors
/// Any failed step, named.
pub fn stage2(spec: &JailSpec) -> Result<(), JailError> {
    // Stage 1 dying (the host's kill) takes PID 1 and so the whole namespace with it.
    sys(
        "set the parent-death signal",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    let none: Option<&str> = None;
    sys(
        "make mounts private",
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none),
    )?;
    let root = &spec.root_dir;
    sys(
        format!("mount the root tmpfs on {}", root.display()),
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=1m,mode=0755"),
        ),
    )?;
    for dir in &spec.ro_binds {
        if dir.exists() {
            bind_ro(dir, &inside(root, dir))?;
        }
    }
    bind_ro(&spec.task_dir, &root.join("var/task"))?;
    let tmp = root.join("tmp");
    io("create /tmp", std::fs::create_dir_all(&tmp))?;
    sys(
        "mount /tmp",
        mount(
            Some("tmpfs"),
            &tmp,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={}m,mode=1777", spec.tmp_size_mb).as_str()),
        ),
    )?;
    make_dev(root)?;
    let proc = root.join("proc");
    io("create /proc", std::fs::create_dir_all(&proc))?;
    sys(
        "mount /proc",
        mount(
            Some("proc"),
            &proc,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        ),
    )?;
    let old = root.join(".old-root");
    io(
        "create the old-root mount point",
        std::fs::create_dir_all(&old),
    )?;
    sys("pivot_root", pivot_root(root, &old))?;
    sys("chdir /", chdir("/"))?;
    sys(
        "detach the host's root",
        umount2("/.old-root", MntFlags::MNT_DETACH),
    )?;
    io(
        "remove the old-root mount point",
        std::fs::remove_dir("/.old-root"),
    )?;
    sys(
        "make the root read-only",
        mount(
            none,
            "/",
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            none,
        ),
    )?;
    sys("set the host name", sethostname("sandbox"))?;
    loopback_up()?;
    sys("set no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    if spec.seccomp {
        crate::jail::seccomp::install()?;
    }
    Ok(())
}

/// `dir` under the new root.
fn inside(root: &Path, dir: &Path) -> PathBuf {
    root.join(dir.strip_prefix("/").unwrap_or(dir))
}

fn bind_ro(src: &Path, dst: &Path) -> Result<(), JailError> {
    let none: Option<&str> = None;
    io(
        format!("create {}", dst.display()),
        std::fs::create_dir_all(dst),
    )?;
    sys(
        format!("bind {} on {}", src.display(), dst.display()),
        mount(
            Some(src),
            dst,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        ),
    )?;
    // In a user namespace a remount must keep the flags the host mount has locked.
    let current = sys(format!("statvfs {}", dst.display()), statvfs(dst))?.flags();
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    for (fs, ms) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(fs) {
            flags |= ms;
        }
    }
    sys(
        format!("make {} read-only", dst.display()),
        mount(none, dst, none, flags, none),
    )
}

fn make_dev(root: &Path) -> Result<(), JailError> {
    let none: Option<&str> = None;
    let dev = root.join("dev");
    io("create /dev", std::fs::create_dir_all(&dev))?;
    sys(
        "mount /dev",
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("size=64k,mode=0755"),
        ),
    )?;
    for name in ["null", "zero", "full", "random", "urandom"] {
        let target = dev.join(name);
        io(format!("create /dev/{name}"), std::fs::write(&target, b""))?;
        sys(
            format!("bind /dev/{name}"),
            mount(
                Some(Path::new("/dev").join(name).as_path()),
                &target,
                none,
                MsFlags::MS_BIND,
                none,
            ),
        )?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        io(
            format!("link /dev/{link}"),
            std::os::unix::fs::symlink(to, dev.join(link)),
        )?;
    }
    sys(
        "make /dev read-only",
        mount(
            none,
            &dev,
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            none,
        ),
    )
}

/// Brings up `lo` (interface index 1 in a new network namespace) with one rtnetlink request.
fn loopback_up() -> Result<(), JailError> {
    use nix::sys::socket::{
        recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
    };
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const IFF_UP: u32 = 1;
    let fd = sys(
        "open a netlink socket",
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        ),
    )?;
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&32u32.to_ne_bytes()); // nlmsg_len
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[0, 0]); // ifi_family AF_UNSPEC, pad
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&1i32.to_ne_bytes()); // ifi_index: lo
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    use std::os::fd::AsRawFd;
    // An unconnected netlink socket sends to the kernel (port 0).
    sys(
        "send the link-up request",
        send(fd.as_raw_fd(), &msg, MsgFlags::empty()),
    )?;
    let mut ack = [0u8; 256];
    let n = sys(
        "read the link-up answer",
        recv(fd.as_raw_fd(), &mut ack, MsgFlags::empty()),
    )?;
    // nlmsgerr: header (16 bytes) then i32 error (0 = success).
    if n >= 20 {
        let err = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
        if err != 0 {
            return Err(JailError::Sys {
                step: "bring up loopback".into(),
                source: nix::Error::from_raw(-err),
            });
        }
        return Ok(());
    }
    Err(JailError::Handshake("short netlink answer".into()))
}

pub mod seccomp {
    //! The sandbox's seccomp filter: everything is allowed except system calls a function has no
    //! business making (they could escape or weaken the jail, or reach the host kernel's rarely
    //! used surfaces). A forbidden call kills the whole sandbox process with SIGSYS, which the
    //! host reports as the runtime exiting on a signal.

    use std::collections::BTreeMap;

    use seccompiler::{apply_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

    use super::JailError;

    /// System calls that kill the calling process.
    pub const FORBIDDEN: &[(&str, i64)] = &[
        ("mount", libc_nr::MOUNT),
        ("umount2", libc_nr::UMOUNT2),
        ("pivot_root", libc_nr::PIVOT_ROOT),
        ("chroot", libc_nr::CHROOT),
        ("unshare", libc_nr::UNSHARE),
        ("setns", libc_nr::SETNS),
        ("ptrace", libc_nr::PTRACE),
        ("process_vm_readv", libc_nr::PROCESS_VM_READV),
        ("process_vm_writev", libc_nr::PROCESS_VM_WRITEV),
        ("kexec_load", libc_nr::KEXEC_LOAD),
        ("kexec_file_load", libc_nr::KEXEC_FILE_LOAD),
        ("init_module", libc_nr::INIT_MODULE),
        ("finit_module", libc_nr::FINIT_MODULE),
        ("delete_module", libc_nr::DELETE_MODULE),
        ("bpf", libc_nr::BPF),
        ("perf_event_open", libc_nr::PERF_EVENT_OPEN),
        ("keyctl", libc_nr::KEYCTL),
        ("add_key", libc_nr::ADD_KEY),
        ("request_key", libc_nr::REQUEST_KEY),
        ("swapon", libc_nr::SWAPON),
        ("swapoff", libc_nr::SWAPOFF),
        ("reboot", libc_nr::REBOOT),
        ("syslog", libc_nr::SYSLOG),
        ("acct", libc_nr::ACCT),
        ("settimeofday", libc_nr::SETTIMEOFDAY),
        ("clock_settime", libc_nr::CLOCK_SETTIME),
        ("clock_adjtime", libc_nr::CLOCK_ADJTIME),
        ("adjtimex", libc_nr::ADJTIMEX),
        ("open_by_handle_at", libc_nr::OPEN_BY_HANDLE_AT),
        ("userfaultfd", libc_nr::USERFAULTFD),
        ("iopl", libc_nr::IOPL),
        ("ioperm", libc_nr::IOPERM),
        ("quotactl", libc_nr::QUOTACTL),
        ("fsopen", libc_nr::FSOPEN),
        ("fsmount", libc_nr::FSMOUNT),
        ("move_mount", libc_nr::MOVE_MOUNT),
        ("open_tree", libc_nr::OPEN_TREE),
    ];

    /// x86_64 system call numbers (from the kernel's `syscall_64.tbl`).
    #[allow(missing_docs)]
    mod libc_nr {
        pub const MOUNT: i64 = 165;
        pub const UMOUNT2: i64 = 166;
        pub const PIVOT_ROOT: i64 = 155;
        pub const CHROOT: i64 = 161;
        pub const UNSHARE: i64 = 272;
        pub const SETNS: i64 = 308;
        pub const PTRACE: i64 = 101;
        pub const PROCESS_VM_READV: i64 = 310;
        pub const PROCESS_VM_WRITEV: i64 = 311;
        pub const KEXEC_LOAD: i64 = 246;
        pub const KEXEC_FILE_LOAD: i64 = 320;
        pub const INIT_MODULE: i64 = 175;
        pub const FINIT_MODULE: i64 = 313;
        pub const DELETE_MODULE: i64 = 176;
        pub const BPF: i64 = 321;
        pub const PERF_EVENT_OPEN: i64 = 298;
        pub const KEYCTL: i64 = 250;
        pub const ADD_KEY: i64 = 248;
        pub const REQUEST_KEY: i64 = 249;
        pub const SWAPON: i64 = 167;
        pub const SWAPOFF: i64 = 168;
        pub const REBOOT: i64 = 169;
        pub const SYSLOG: i64 = 103;
        pub const ACCT: i64 = 163;
        pub const SETTIMEOFDAY: i64 = 164;
        pub const CLOCK_SETTIME: i64 = 227;
        pub const CLOCK_ADJTIME: i64 = 305;
        pub const ADJTIMEX: i64 = 159;
        pub const OPEN_BY_HANDLE_AT: i64 = 304;
        pub const USERFAULTFD: i64 = 323;
        pub const IOPL: i64 = 172;
        pub const IOPERM: i64 = 173;
        pub const QUOTACTL: i64 = 179;
        pub const FSOPEN: i64 = 430;
        pub const FSMOUNT: i64 = 432;
        pub const MOVE_MOUNT: i64 = 429;
        pub const OPEN_TREE: i64 = 428;
    }

    /// Builds the filter.
    ///
    /// # Errors
    /// When the filter cannot be compiled (unsupported architecture).
    pub fn program() -> Result<BpfProgram, JailError> {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            FORBIDDEN.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::KillProcess,
            arch,
        )
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
    }

    /// Installs the filter on this process (inherited by everything it starts).
    ///
    /// # Errors
    /// When the filter cannot be built or the kernel refuses it.
    pub fn install() -> Result<(), JailError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(JailError::Seccomp(
                "the filter's system call numbers are for x86_64 only".into(),
            ));
        }
        let prog = program()?;
        apply_filter(&prog).map_err(|e| JailError::Seccomp(e.to_string()))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_filter_compiles_for_this_host() {
            let prog = super::program().expect("filter");
            assert!(prog.len() > super::FORBIDDEN.len());
        }
    }
}
