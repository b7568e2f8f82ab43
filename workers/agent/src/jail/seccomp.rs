//! The sandbox's seccomp policy, installed by the agent on itself at the end of stage 2 and so
//! inherited by the function it starts: one list for both, since the agent needs nothing a
//! function may not have.
//!
//! In the spirit of Docker's default profile (`profiles/seccomp/default.json` in moby):
//! - An allow-list ([`ALLOWED`]); any other call fails with `EPERM`, as in Docker, so that a
//!   runtime probing for a feature falls back. x32 numbers (`nr | 0x4000_0000`) are on no list and
//!   fail the same way; any architecture other than x86_64 (the i386 `int 0x80` entry) kills the
//!   process.
//! - `clone` only without namespace flags ([`CLONE_NAMESPACE_FLAGS`]); `clone3`, whose flags sit in
//!   memory a filter cannot read, fails with `ENOSYS`, so that glibc and musl fall back to
//!   `clone`. `personality` only with Docker's five values; `socket` for any family but
//!   `AF_VSOCK`.
//! - Unlike Docker, `io_uring_*` (as moby dropped them in 2023), `ptrace`, `process_vm_*`,
//!   `pidfd_getfd`, `kcmp` and every call Docker allows only with a capability are refused.
//! - A deny-list ([`KILLED`]) of calls that no runtime needs and that only serve to escape or weaken
//!   the jail (the mount API, namespaces, `ptrace`, modules, keyrings, `bpf`, …) kills the whole
//!   process with `SIGSYS`, which the host reports as the runtime exiting on a signal.
//!
//! The policy is three filters, since one seccompiler filter has one action on match: the
//! allow-list, then `clone3` → `ENOSYS`, then the deny-list. The kernel runs every filter on
//! every call and takes the most severe result (kill, then errno, then allow), and caches the
//! calls every filter allows whatever their arguments, so the stack costs nothing on hot calls.

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::JailError;

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
/// CLONE_NEWNET`: `clone` with any of these fails with `EPERM` (Docker's mask, 2114060288).
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// x86_64 numbers (`arch/x86/entry/syscalls/syscall_64.tbl`) of the calls with argument rules.
const CLONE: i64 = 56;
const SOCKET: i64 = 41;
const PERSONALITY: i64 = 135;
const CLONE3: i64 = 435;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
const AF_VSOCK: u64 = 40;
/// `personality` values Docker allows: `PER_LINUX`, `UNAME26`, `PER_LINUX32`, `PER_LINUX32 |
/// UNAME26`, and the query `0xffffffff`.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Calls allowed whatever their arguments, by x86_64 number: Docker's unconditional list for
/// amd64 less `io_uring_*`, plus calls added to the kernel since.
pub const ALLOWED: &[(&str, i64)] = &[
    ("read", 0),
    ("write", 1),
    ("open", 2),
    ("close", 3),
    ("stat", 4),
    ("fstat", 5),
    ("lstat", 6),
    ("poll", 7),
    ("lseek", 8),
    ("mmap", 9),
    ("mprotect", 10),
    ("munmap", 11),
    ("brk", 12),
    ("rt_sigaction", 13),
    ("rt_sigprocmask", 14),
    ("rt_sigreturn", 15),
    ("ioctl", 16),
    ("pread64", 17),
    ("pwrite64", 18),
    ("readv", 19),
    ("writev", 20),
    ("access", 21),
    ("pipe", 22),
    ("select", 23),
    ("sched_yield", 24),
    ("mremap", 25),
    ("msync", 26),
    ("mincore", 27),
    ("madvise", 28),
    ("shmget", 29),
    ("shmat", 30),
    ("shmctl", 31),
    ("dup", 32),
    ("dup2", 33),
    ("pause", 34),
    ("nanosleep", 35),
    ("getitimer", 36),
    ("alarm", 37),
    ("setitimer", 38),
    ("getpid", 39),
    ("sendfile", 40),
    ("connect", 42),
    ("accept", 43),
    ("sendto", 44),
    ("recvfrom", 45),
    ("sendmsg", 46),
    ("recvmsg", 47),
    ("shutdown", 48),
    ("bind", 49),
    ("listen", 50),
    ("getsockname", 51),
    ("getpeername", 52),
    ("socketpair", 53),
    ("setsockopt", 54),
    ("getsockopt", 55),
    ("fork", 57),
    ("vfork", 58),
    ("execve", 59),
    ("exit", 60),
    ("wait4", 61),
    ("kill", 62),
    ("uname", 63),
    ("semget", 64),
    ("semop", 65),
    ("semctl", 66),
    ("shmdt", 67),
    ("msgget", 68),
    ("msgsnd", 69),
    ("msgrcv", 70),
    ("msgctl", 71),
    ("fcntl", 72),
    ("flock", 73),
    ("fsync", 74),
    ("fdatasync", 75),
    ("truncate", 76),
    ("ftruncate", 77),
    ("getdents", 78),
    ("getcwd", 79),
    ("chdir", 80),
    ("fchdir", 81),
    ("rename", 82),
    ("mkdir", 83),
    ("rmdir", 84),
    ("creat", 85),
    ("link", 86),
    ("unlink", 87),
    ("symlink", 88),
    ("readlink", 89),
    ("chmod", 90),
    ("fchmod", 91),
    ("chown", 92),
    ("fchown", 93),
    ("lchown", 94),
    ("umask", 95),
    ("gettimeofday", 96),
    ("getrlimit", 97),
    ("getrusage", 98),
    ("sysinfo", 99),
    ("times", 100),
    ("getuid", 102),
    ("getgid", 104),
    ("setuid", 105),
    ("setgid", 106),
    ("geteuid", 107),
    ("getegid", 108),
    ("setpgid", 109),
    ("getppid", 110),
    ("getpgrp", 111),
    ("setsid", 112),
    ("setreuid", 113),
    ("setregid", 114),
    ("getgroups", 115),
    ("setgroups", 116),
    ("setresuid", 117),
    ("getresuid", 118),
    ("setresgid", 119),
    ("getresgid", 120),
    ("getpgid", 121),
    ("setfsuid", 122),
    ("setfsgid", 123),
    ("getsid", 124),
    ("capget", 125),
    ("capset", 126),
    ("rt_sigpending", 127),
    ("rt_sigtimedwait", 128),
    ("rt_sigqueueinfo", 129),
    ("rt_sigsuspend", 130),
    ("sigaltstack", 131),
    ("utime", 132),
    ("mknod", 133),
    ("statfs", 137),
    ("fstatfs", 138),
    ("getpriority", 140),
    ("setpriority", 141),
    ("sched_setparam", 142),
    ("sched_getparam", 143),
    ("sched_setscheduler", 144),
    ("sched_getscheduler", 145),
    ("sched_get_priority_max", 146),
    ("sched_get_priority_min", 147),
    ("sched_rr_get_interval", 148),
    ("mlock", 149),
    ("munlock", 150),
    ("mlockall", 151),
    ("munlockall", 152),
    ("modify_ldt", 154),
    ("prctl", 157),
    ("arch_prctl", 158),
    ("adjtimex", 159),
    ("setrlimit", 160),
    ("sync", 162),
    ("gettid", 186),
    ("readahead", 187),
    ("setxattr", 188),
    ("lsetxattr", 189),
    ("fsetxattr", 190),
    ("getxattr", 191),
    ("lgetxattr", 192),
    ("fgetxattr", 193),
    ("listxattr", 194),
    ("llistxattr", 195),
    ("flistxattr", 196),
    ("removexattr", 197),
    ("lremovexattr", 198),
    ("fremovexattr", 199),
    ("tkill", 200),
    ("time", 201),
    ("futex", 202),
    ("sched_setaffinity", 203),
    ("sched_getaffinity", 204),
    ("set_thread_area", 205),
    ("io_setup", 206),
    ("io_destroy", 207),
    ("io_getevents", 208),
    ("io_submit", 209),
    ("io_cancel", 210),
    ("get_thread_area", 211),
    ("epoll_create", 213),
    ("remap_file_pages", 216),
    ("getdents64", 217),
    ("set_tid_address", 218),
    ("restart_syscall", 219),
    ("semtimedop", 220),
    ("fadvise64", 221),
    ("timer_create", 222),
    ("timer_settime", 223),
    ("timer_gettime", 224),
    ("timer_getoverrun", 225),
    ("timer_delete", 226),
    ("clock_gettime", 228),
    ("clock_getres", 229),
    ("clock_nanosleep", 230),
    ("exit_group", 231),
    ("epoll_wait", 232),
    ("epoll_ctl", 233),
    ("tgkill", 234),
    ("utimes", 235),
    ("mq_open", 240),
    ("mq_unlink", 241),
    ("mq_timedsend", 242),
    ("mq_timedreceive", 243),
    ("mq_notify", 244),
    ("mq_getsetattr", 245),
    ("waitid", 247),
    ("ioprio_set", 251),
    ("ioprio_get", 252),
    ("inotify_init", 253),
    ("inotify_add_watch", 254),
    ("inotify_rm_watch", 255),
    ("openat", 257),
    ("mkdirat", 258),
    ("mknodat", 259),
    ("fchownat", 260),
    ("futimesat", 261),
    ("newfstatat", 262),
    ("unlinkat", 263),
    ("renameat", 264),
    ("linkat", 265),
    ("symlinkat", 266),
    ("readlinkat", 267),
    ("fchmodat", 268),
    ("faccessat", 269),
    ("pselect6", 270),
    ("ppoll", 271),
    ("set_robust_list", 273),
    ("get_robust_list", 274),
    ("splice", 275),
    ("tee", 276),
    ("sync_file_range", 277),
    ("vmsplice", 278),
    ("utimensat", 280),
    ("epoll_pwait", 281),
    ("signalfd", 282),
    ("timerfd_create", 283),
    ("eventfd", 284),
    ("fallocate", 285),
    ("timerfd_settime", 286),
    ("timerfd_gettime", 287),
    ("accept4", 288),
    ("signalfd4", 289),
    ("eventfd2", 290),
    ("epoll_create1", 291),
    ("dup3", 292),
    ("pipe2", 293),
    ("inotify_init1", 294),
    ("preadv", 295),
    ("pwritev", 296),
    ("rt_tgsigqueueinfo", 297),
    ("recvmmsg", 299),
    ("fanotify_mark", 301),
    ("prlimit64", 302),
    ("name_to_handle_at", 303),
    ("clock_adjtime", 305),
    ("syncfs", 306),
    ("sendmmsg", 307),
    ("getcpu", 309),
    ("sched_setattr", 314),
    ("sched_getattr", 315),
    ("renameat2", 316),
    ("seccomp", 317),
    ("getrandom", 318),
    ("memfd_create", 319),
    ("execveat", 322),
    ("membarrier", 324),
    ("mlock2", 325),
    ("copy_file_range", 326),
    ("preadv2", 327),
    ("pwritev2", 328),
    ("pkey_mprotect", 329),
    ("pkey_alloc", 330),
    ("pkey_free", 331),
    ("statx", 332),
    ("io_pgetevents", 333),
    ("rseq", 334),
    ("pidfd_send_signal", 424),
    ("pidfd_open", 434),
    ("close_range", 436),
    ("openat2", 437),
    ("faccessat2", 439),
    ("epoll_pwait2", 441),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
    ("memfd_secret", 447),
    ("process_mrelease", 448),
    ("futex_waitv", 449),
    // Newer than Docker's profile (kernel 6.5 to 6.13); harmless variants of allowed calls.
    ("cachestat", 451),
    ("fchmodat2", 452),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("mseal", 462),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
];

/// Calls that kill the calling process.
pub const KILLED: &[(&str, i64)] = &[
    ("ptrace", 101),
    ("syslog", 103),
    ("pivot_root", 155),
    ("chroot", 161),
    ("acct", 163),
    ("settimeofday", 164),
    ("mount", 165),
    ("umount2", 166),
    ("swapon", 167),
    ("swapoff", 168),
    ("reboot", 169),
    ("iopl", 172),
    ("ioperm", 173),
    ("init_module", 175),
    ("delete_module", 176),
    ("quotactl", 179),
    ("clock_settime", 227),
    ("kexec_load", 246),
    ("add_key", 248),
    ("request_key", 249),
    ("keyctl", 250),
    ("unshare", 272),
    ("perf_event_open", 298),
    ("open_by_handle_at", 304),
    ("setns", 308),
    ("process_vm_readv", 310),
    ("process_vm_writev", 311),
    ("finit_module", 313),
    ("kexec_file_load", 320),
    ("bpf", 321),
    ("userfaultfd", 323),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("mount_setattr", 442),
    ("quotactl_fd", 443),
    ("open_tree_attr", 467),
];

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| JailError::Seccomp(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conditions).map_err(|e| JailError::Seccomp(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, JailError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(|e| JailError::Seccomp(e.to_string()))?
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

/// The filters, in the order they are installed.
///
/// # Errors
/// When a filter cannot be compiled (unsupported architecture).
pub fn programs() -> Result<Vec<BpfProgram>, JailError> {
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    allowed.insert(
        CLONE,
        vec![rule(vec![condition(
            0,
            SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )?])?],
    );
    // Allowed here so that the next filter's ENOSYS is what the caller sees.
    allowed.insert(CLONE3, Vec::new());
    allowed.insert(
        SOCKET,
        vec![rule(vec![condition(0, SeccompCmpOp::Ne, AF_VSOCK)?])?],
    );
    allowed.insert(
        PERSONALITY,
        PERSONALITIES
            .iter()
            .map(|p| rule(vec![condition(0, SeccompCmpOp::Eq, *p)?]))
            .collect::<Result<_, _>>()?,
    );
    let allow_list = compile(allowed, SeccompAction::Errno(EPERM), SeccompAction::Allow)?;
    let clone3 = compile(
        BTreeMap::from([(CLONE3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(ENOSYS),
    )?;
    let deny_list = compile(
        KILLED.iter().map(|(_, nr)| (*nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )?;
    Ok(vec![allow_list, clone3, deny_list])
}

/// Installs the policy on this thread (inherited by everything it starts). Needs
/// `no_new_privs` (or `CAP_SYS_ADMIN`); call it while the process has one thread.
///
/// # Errors
/// When a filter cannot be built or the kernel refuses it.
pub fn install() -> Result<(), JailError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(JailError::Seccomp(
            "the filters' system call numbers are for x86_64 only".into(),
        ));
    }
    for prog in programs()? {
        apply_filter(&prog).map_err(|e| JailError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The filters run on a small classic-BPF interpreter, combined the way the kernel combines
    //! stacked filters, so each rule is checked without installing anything.

    use super::*;
    use seccompiler::sock_filter;

    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;

    /// `struct seccomp_data` as the filter sees it.
    struct Call {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    fn call(nr: i64, args: &[u64]) -> Call {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        Call {
            nr: u32::try_from(nr).expect("small number"),
            arch: AUDIT_ARCH_X86_64,
            args: a,
        }
    }

    fn load(c: &Call, offset: u32) -> u32 {
        match offset {
            0 => c.nr,
            4 => c.arch,
            8 | 12 => 0,
            16..=63 => {
                let arg = c.args[((offset - 16) / 8) as usize];
                if offset % 8 == 0 {
                    arg as u32
                } else {
                    (arg >> 32) as u32
                }
            }
            _ => panic!("load beyond seccomp_data at {offset}"),
        }
    }

    fn run_one(prog: &[sock_filter], c: &Call) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                0x20 => acc = load(c, i.k), // BPF_LD | BPF_W | BPF_ABS
                0x54 => acc &= i.k,         // BPF_ALU | BPF_AND | BPF_K
                0x05 => pc += i.k as usize, // BPF_JMP | BPF_JA
                0x06 => return i.k,         // BPF_RET | BPF_K
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match i.code {
                        0x15 => acc == i.k,  // JEQ
                        0x25 => acc > i.k,   // JGT
                        0x35 => acc >= i.k,  // JGE
                        _ => acc & i.k != 0, // JSET
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                code => panic!("instruction {code:#x} not interpreted"),
            }
        }
    }

    /// The kernel runs the newest filter first and keeps the first most severe action.
    fn run(c: &Call) -> u32 {
        let progs = programs().expect("filters");
        let mut result = RET_ALLOW;
        for prog in progs.iter().rev() {
            let r = run_one(prog, c);
            if ((r & 0xffff_0000) as i32) < ((result & 0xffff_0000) as i32) {
                result = r;
            }
        }
        result
    }

    fn nr(name: &str) -> i64 {
        ALLOWED
            .iter()
            .chain(KILLED)
            .find(|(n, _)| *n == name)
            .map(|(_, nr)| *nr)
            .unwrap_or_else(|| panic!("{name} is on no list"))
    }

    #[test]
    fn everyday_calls_are_allowed() {
        for name in [
            "read",
            "write",
            "mmap",
            "futex",
            "epoll_wait",
            "execve",
            "rt_sigreturn",
        ] {
            assert_eq!(run(&call(nr(name), &[])), RET_ALLOW, "{name}");
        }
    }

    #[test]
    fn calls_off_the_list_fail_with_eperm() {
        for n in [
            425, /* io_uring_setup */
            438, /* pidfd_getfd */
            312, /* kcmp */
            170, /* sethostname */
            1000,
        ] {
            assert_eq!(run(&call(n, &[])), RET_ERRNO | 1, "{n}");
        }
    }

    #[test]
    fn x32_numbers_fail_with_eperm() {
        assert_eq!(run(&call(0x4000_0000 | nr("getpid"), &[])), RET_ERRNO | 1);
        assert_eq!(run(&call(0x4000_0000 | nr("read"), &[])), RET_ERRNO | 1);
    }

    #[test]
    fn another_architecture_is_killed() {
        let mut c = call(nr("getpid"), &[]);
        c.arch = AUDIT_ARCH_I386;
        assert_eq!(run(&c), RET_KILL_PROCESS);
    }

    #[test]
    fn clone_makes_threads_and_processes_but_no_namespaces() {
        // What glibc's pthread_create and fork pass.
        let thread = 0x003d_0f00;
        let fork = 0x0120_0011;
        assert_eq!(run(&call(CLONE, &[thread])), RET_ALLOW);
        assert_eq!(run(&call(CLONE, &[fork])), RET_ALLOW);
        for bit in 0..64 {
            let flag = 1u64 << bit;
            let expected = if CLONE_NAMESPACE_FLAGS & flag != 0 {
                RET_ERRNO | 1
            } else {
                RET_ALLOW
            };
            assert_eq!(
                run(&call(CLONE, &[fork | flag])),
                expected,
                "flag {flag:#x}"
            );
        }
    }

    #[test]
    fn clone3_fails_with_enosys_so_libcs_fall_back() {
        assert_eq!(run(&call(CLONE3, &[])), RET_ERRNO | 38);
    }

    #[test]
    fn socket_and_personality_have_dockers_argument_rules() {
        assert_eq!(run(&call(SOCKET, &[2 /* AF_INET */])), RET_ALLOW);
        assert_eq!(run(&call(SOCKET, &[16 /* AF_NETLINK */])), RET_ALLOW);
        assert_eq!(run(&call(SOCKET, &[AF_VSOCK])), RET_ERRNO | 1);
        assert_eq!(run(&call(PERSONALITY, &[0xffff_ffff])), RET_ALLOW);
        // ADDR_NO_RANDOMIZE
        assert_eq!(run(&call(PERSONALITY, &[0x0004_0000])), RET_ERRNO | 1);
    }

    #[test]
    fn escape_calls_kill_the_process() {
        for name in [
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "fspick",
            "fsconfig",
            "mount_setattr",
        ] {
            assert_eq!(run(&call(nr(name), &[])), RET_KILL_PROCESS, "{name}");
        }
    }

    #[test]
    fn the_lists_are_disjoint_and_have_no_duplicates() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, n) in ALLOWED.iter().chain(KILLED) {
            assert!(seen.insert(*n), "{name} ({n}) listed twice");
            assert!(
                ![CLONE, CLONE3, SOCKET, PERSONALITY].contains(n),
                "{name} has argument rules"
            );
        }
    }

    /// Where the kernel headers are installed, every number matches them.
    #[test]
    fn numbers_match_the_kernel_headers() {
        let Ok(h) = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") else {
            return;
        };
        let header: BTreeMap<&str, i64> = h
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("#define __NR_")?.split_whitespace();
                Some((w.next()?, w.next()?.parse().ok()?))
            })
            .collect();
        for (name, n) in ALLOWED.iter().chain(KILLED) {
            if let Some(h) = header.get(name) {
                assert_eq!(h, n, "{name}");
            }
        }
        assert_eq!(header.get("clone"), Some(&CLONE));
        assert_eq!(header.get("clone3"), Some(&CLONE3));
        assert_eq!(header.get("socket"), Some(&SOCKET));
        assert_eq!(header.get("personality"), Some(&PERSONALITY));
    }
}
