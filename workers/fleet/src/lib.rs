//! The fleet: what spans the worker hosts, SVS405's Worker Manager and Placement Service and
//! the invoke path that uses them. One host's sandboxes, pool and worker API are
//! `sluice-workers`; this crate depends on it and it never on this one.
//!
//! - [`registry`]: the worker registry in Redis (address, backend, budget, free capacity,
//!   heartbeat), one record per worker with a TTL.
//! - [`worker_manager`]: the Worker Manager, a cluster-wide index of idle warm sandboxes per
//!   function revision (Redis), with atomic claims.
//! - [`placement`]: the Placement Service, which worker boots a new sandbox (power of two
//!   choices over free memory and load, never over a budget).
//! - [`provisioned`]: provisioned concurrency, every worker computing the same split of each
//!   function's provisioned sandboxes over the live workers.
//! - [`member`]: a worker's membership in the fleet (heartbeat, idle-index sync, its share of
//!   provisioned sandboxes).
//! - [`client`]: the client of the worker API (`sluice_workers::server`).
//! - [`invoker`]: [`invoker::ClusterInvoker`], the front end's and pollers' way to run a
//!   function anywhere in the fleet (concurrency slot → warm claim → placement → worker).
//! - [`role`]: the worker role's starter, which a node calls to join the fleet as a worker.
//!
//! Threading: everything here is async on the node's tokio runtime; Redis is reached through
//! `ConnectionManager`s, the worker API through a keep-alive HTTP/1.1 client.
#![forbid(unsafe_code)]

pub mod client;
pub mod invoker;
pub mod member;
pub mod placement;
pub mod provisioned;
pub mod registry;
pub mod role;
pub mod worker_manager;
