//! Workers: where functions run, on one host.
//!
//! - [`sandbox`]: one isolated execution environment running the guest agent, and its invocation
//!   API ([`Sandbox::invoke`] → [`InvokeOutcome`]); backend-independent, since every backend
//!   speaks the same host–agent protocol over a byte stream.
//! - [`jail`]: the jailed-process backend (namespaces, read-only root, seccomp, cgroups or
//!   rlimits), what hosts without usable hardware virtualization run.
//! - [`cgroup`]: cgroup v2 or v1 limits and accounting for one sandbox.
//! - [`pool`]: the per-node warm pool: reuses idle sandboxes per function, one invocation at a
//!   time each, within a node memory budget; reaps idle ones; replaces broken ones.
//! - [`service`]: the worker role: runs what callers send on the pool.
//! - [`server`]: the worker's HTTP API, through which other nodes invoke on this one.
//!
//! What spans hosts (the worker registry, the Worker Manager's index of idle sandboxes,
//! placement, provisioned concurrency, the cluster invoker and this API's client) is the fleet's,
//! in `sluice-fleet` (`workers/fleet`), which depends on this crate and never the other way.
//!
//! Threading: everything here is async on the node's tokio runtime. Each sandbox has one reader
//! task for its channel; the agent and the function run in their own processes.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod elf;
pub mod jail;
pub mod kvm;
pub mod pool;
pub mod sandbox;
pub mod server;
pub mod service;

pub use pool::{Pool, PoolConfig, PoolError, PoolEvent, PoolStats};
pub use sandbox::{BootError, FunctionSpec, InvokeOutcome, Isolation, Sandbox, SandboxBackend};
