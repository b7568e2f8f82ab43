//! The jailed-process sandbox, as the agent builds it around itself.
//!
//! The host starts `sluice-agent jail <spec>` with the protocol socket as its stdin. Stage 1
//! joins the sandbox's cgroups, drops the host's supplementary groups, sets rlimits (open files,
//! file size, processes, and address space where there is no memory cgroup), unshares user,
//! mount, PID, network, IPC and UTS
//! namespaces, and asks the host (one byte on the socket) to write its UID/GID maps, since only a
//! process outside the new user namespace may map it to unprivileged host ids. Two ids are
//! mapped, each to its own host id: 0 for the agent and [`FUNCTION_UID`] for the function, so
//! that the function cannot ptrace, signal or read the agent, which holds the host socket.
//!
//! Stage 1 then starts stage 2 (`sluice-agent init <spec>`), PID 1 of the new PID namespace: it
//! builds a read-only root (host `/usr`, `/lib*`, `/bin`, `/sbin` read-only, a generated minimal
//! `/etc`, the bundle read-only at `/var/task`, a size-capped `/tmp`, a minimal `/dev`, a fresh
//! `/proc`), pivots into it, brings up loopback (the only interface), forbids nested namespaces,
//! empties its capability bounding set and keeps only `CAP_SETUID`/`CAP_SETGID` (to start the
//! function under its own id), makes itself undumpable, sets `no_new_privs`, installs the seccomp
//! policy of [`seccomp`], and becomes the agent. The function it starts runs as [`FUNCTION_UID`]
//! with no capabilities at all and inherits `no_new_privs`, the policy and the rlimits.

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

/// The function's uid inside the sandbox (the agent is 0); the host maps it to a host id of its
/// own, never the agent's.
pub const FUNCTION_UID: u32 = 1000;
/// The function's gid inside the sandbox.
pub const FUNCTION_GID: u32 = 1000;
/// The function's user name in the generated `/etc/passwd`.
pub const FUNCTION_USER: &str = "sbx_user";
/// The sandbox's host name.
pub const HOSTNAME: &str = "sandbox";

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
    /// Name servers written to the generated `/etc/resolv.conf`.
    pub nameservers: Vec<std::net::IpAddr>,
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
    /// Processes and threads of one uid in the sandbox (`RLIMIT_NPROC`; it binds the function,
    /// which has no capability to ignore it, with or without a pids cgroup).
    pub processes: u64,
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
    // Host root's supplementary groups would follow the process into the namespace (as the
    // overflow gid, but with their host powers) and `setgroups` is denied there.
    sys("drop supplementary groups", nix::unistd::setgroups(&[]))?;
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
    sys(
        "set RLIMIT_NPROC",
        setrlimit(Resource::RLIMIT_NPROC, r.processes, r.processes),
    )?;
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
    write_etc(&root.join("etc"), &spec.nameservers)?;
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
    sys("set the host name", sethostname(HOSTNAME))?;
    loopback_up()?;
    forbid_nested_namespaces()?;
    drop_capabilities()?;
    // Undumpable: /proc/1/{mem,fd,environ,…} belong to root, and only a holder of
    // CAP_SYS_PTRACE over the sandbox (none is left) may ptrace the agent or take its fds,
    // even at the same uid. The function's exec makes it dumpable again, for itself.
    sys(
        "make the agent undumpable",
        nix::sys::prctl::set_dumpable(false),
    )?;
    sys("set no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    if spec.seccomp {
        seccomp::install()?;
    }
    Ok(())
}

/// Writes the sandbox's `/etc`: users, groups, hosts, resolver and NSS configuration, and
/// nothing of the host's.
fn write_etc(etc: &Path, nameservers: &[std::net::IpAddr]) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    io("create /etc", std::fs::create_dir_all(etc))?;
    let resolv: String = if nameservers.is_empty() {
        "# no name servers configured\n".to_owned()
    } else {
        nameservers
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect()
    };
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 {FUNCTION_USER}:x:{FUNCTION_UID}:{FUNCTION_GID}:Lambda function:/tmp:/usr/sbin/nologin\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\n{FUNCTION_USER}:x:{FUNCTION_GID}:\nnogroup:x:65534:\n"),
        ),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        ),
        ("resolv.conf", resolv),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n\
             protocols: files\nservices: files\n"
                .to_owned(),
        ),
    ];
    for (name, text) in files {
        let path = etc.join(name);
        io(format!("write /etc/{name}"), std::fs::write(&path, text))?;
        io(
            format!("chmod /etc/{name}"),
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)),
        )?;
    }
    Ok(())
}

/// No further namespaces of any kind under the sandbox's user namespace. Without capabilities a
/// function can still create a user namespace (and, inside it, every other kind) with `unshare`
/// or `clone`; the seccomp policy refuses those calls, and this holds where the policy is off.
fn forbid_nested_namespaces() -> Result<(), JailError> {
    for kind in ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"] {
        let path = format!("/proc/sys/user/max_{kind}_namespaces");
        match std::fs::write(&path, "0") {
            // Older kernels lack some of these (time namespaces came in 5.6).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => io(format!("write 0 to {path}"), r)?,
        }
    }
    Ok(())
}

/// Empties the bounding and ambient sets (nothing the agent starts can gain a capability, even
/// by exec) and keeps, of the agent's own capabilities, only what it needs to start the function
/// as [`FUNCTION_UID`]; that `setuid` then clears the function's permitted and effective sets.
fn drop_capabilities() -> Result<(), JailError> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let caps = |step: &str, r: rustix::io::Result<()>| {
        r.map_err(|e| JailError::Sys {
            step: step.to_owned(),
            source: nix::Error::from_raw(e.raw_os_error()),
        })
    };
    for bit in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            r => caps(&format!("drop capability {bit} from the bounding set"), r)?,
        }
    }
    caps(
        "clear the ambient capabilities",
        rustix::thread::clear_ambient_capability_set(),
    )?;
    let keep = CapabilitySet::SETUID | CapabilitySet::SETGID;
    caps(
        "keep only CAP_SETUID and CAP_SETGID",
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: keep,
                permitted: keep,
                inheritable: CapabilitySet::empty(),
            },
        ),
    )
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

pub mod seccomp;
