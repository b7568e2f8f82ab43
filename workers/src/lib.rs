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
//! - [`registry`]: the worker registry in Redis (address, backend, budget, free capacity,
//!   heartbeat).
//! - [`manager`]: the worker manager's cluster-wide index of idle warm sandboxes (Redis), with
//!   atomic claims.
//! - [`placement`]: which worker boots a new sandbox (power of two choices over free memory and
//!   load, never over a budget).
//! - [`remote`]: the worker API and client for invoking across nodes.
//! - [`service`]: the worker role: runs what callers send on the pool.
//! - [`invoker`]: [`invoker::ClusterInvoker`], the front end's and pollers' way to run a
//!   function anywhere in the fleet (concurrency slot → warm claim → placement → worker).
//! - [`node`] and [`provisioned`]: the worker's heartbeat, index sync and provisioned
//!   concurrency.
//!
//! Threading: everything here is async on the node's tokio runtime. Each sandbox has one reader
//! task for its channel; the agent and the function run in their own processes.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod invoker;
pub mod jail;
pub mod kvm;
pub mod manager;
pub mod node;
pub mod placement;
pub mod pool;
pub mod provisioned;
pub mod registry;
pub mod remote;
pub mod sandbox;
pub mod service;

pub use pool::{Pool, PoolConfig, PoolError, PoolEvent, PoolStats};
pub use sandbox::{BootError, FunctionSpec, InvokeOutcome, Isolation, Sandbox, SandboxBackend};
