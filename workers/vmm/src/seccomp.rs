//! Seccomp allow-lists for the VMM's threads, installed by each thread on itself before it
//! touches guest-controlled data.
//!
//! A syscall outside the list fails with `EPERM` rather than killing the process: the VMM runs
//! inside the node, and one VM's thread must not take the node down; the denied call still does
//! not happen.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `KVM_RUN` (`_IO(0xAE, 0x80)`): the one ioctl a vCPU thread issues.
pub const KVM_RUN: u64 = 0xae80;

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building the filter.
    #[error("build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// Installing it.
    #[error("install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN`, device register accesses, eventfd writes.
    Vcpu,
    /// The device event loop: epoll, eventfds, guest memory, wakers.
    Device,
}

/// Calls both kinds of thread make: memory allocation, locks, eventfds, logging, thread exit.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
];

/// Builds the filter for `kind`.
///
/// # Errors
/// [`SeccompError::Build`].
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&nr| (nr, Vec::new())).collect();
    match kind {
        ThreadKind::Vcpu => {
            let kvm_run = SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                KVM_RUN,
            )
            .map_err(SeccompError::Build)?])
            .map_err(SeccompError::Build)?;
            rules.insert(libc::SYS_ioctl, vec![kvm_run]);
        }
        ThreadKind::Device => {
            rules.insert(libc::SYS_epoll_wait, Vec::new());
            rules.insert(libc::SYS_epoll_pwait, Vec::new());
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs `program` on the calling thread.
///
/// # Errors
/// [`SeccompError::Install`].
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_deny_outside_the_list() {
        assert!(!filter(ThreadKind::Vcpu).expect("vcpu").is_empty());
        let program = filter(ThreadKind::Device).expect("device");
        let denied = std::thread::spawn(move || {
            install(&program).expect("install");
            // socket(2) is on neither list.
            // SAFETY: plain syscall with constant arguments; the result is only compared.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            (fd, std::io::Error::last_os_error().raw_os_error())
        })
        .join()
        .expect("thread");
        assert_eq!(denied, (-1, Some(libc::EPERM)));
    }
}
