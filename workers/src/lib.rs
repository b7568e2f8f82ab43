//! Workers: where functions run.
//!
//! - [`sandbox`]: one isolated execution environment running the guest agent, and its invocation
//!   API ([`Sandbox::invoke`] → [`InvokeOutcome`]); backend-independent, since every backend
//!   speaks the same host–agent protocol over a byte stream.
//! - [`jail`]: the jailed-process backend (namespaces, read-only root, seccomp, cgroups or
//!   rlimits), what hosts without usable hardware virtualization run.
//! - [`cgroup`]: cgroup v2 or v1 limits and accounting for one sandbox.
//! - [`pool`]: the per-node warm pool: reuses idle sandboxes per function, one invocation at a
//!   time each, within a node memory budget; reaps idle ones; replaces broken ones.
//!
//! Threading: everything here is async on the node's tokio runtime. Each sandbox has one reader
//! task for its channel; the agent and the function run in their own processes.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod invoker;
pub mod jail;
pub mod kvm;
pub mod pool;
pub mod sandbox;

pub use pool::{Pool, PoolConfig, PoolError};
pub use sandbox::{BootError, FunctionSpec, InvokeOutcome, Isolation, Sandbox, SandboxBackend};
