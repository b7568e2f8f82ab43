//! The guest agent: PID 1 of every sandbox (jailed process or micro-VM).
//!
//! It serves the Lambda Runtime API (`/2018-06-01/runtime/…`) on `127.0.0.1:9001` to the
//! function's `bootstrap`, so custom runtimes (for example ones built with the `lambda_runtime`
//! crate) run unmodified, and relays invocations to and from the host over one byte stream with
//! the small protocol of [`protocol`].
//!
//! Modules:
//! - [`protocol`]: the host–agent frames (shared with the host side in `sluice-workers`).
//! - [`jail`]: the jail's description ([`jail::JailSpec`]) and the set-up the agent performs on
//!   itself: stage 1 (namespaces, cgroups, rlimits, id maps) and stage 2 (mounts, a generated
//!   `/etc`, `pivot_root`, loopback, capabilities, `no_new_privs`, the seccomp policy of
//!   [`jail::seccomp`]) before it becomes the agent, which runs the function as an unprivileged
//!   uid with no capabilities.
//! - [`runtime`]: the agent proper: the Runtime API server, `bootstrap`'s life, log relaying.
//!
//! Threading: set-up is plain synchronous code; the agent then runs a current-thread tokio
//! runtime, plus one OS thread per output stream of `bootstrap` (line reading).
#![forbid(unsafe_code)]

pub mod jail;
mod output;
pub mod protocol;
pub mod runtime;
