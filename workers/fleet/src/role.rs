//! The worker role's starter: everything a node runs to be one of the fleet's workers.
//!
//! [`start_worker`] builds the pool on the given sandbox backend, the worker service with its
//! code cache, serves the worker API (`sluice_workers::server`), registers the worker and keeps
//! its registration, its idle sandboxes in the Worker Manager's index and its share of
//! provisioned sandboxes up to date. Every task it starts is on the caller's tracker and stops
//! with the caller's token; on stop the worker deregisters and the pool destroys its sandboxes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::code::CodeCache;
use sluice_core::kafka::KafkaSettings;
use sluice_core::store::ConfigStore;
use sluice_workers::service::{AccountIdentity, WorkerService};
use sluice_workers::{server, Pool, PoolConfig, SandboxBackend};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::member::WorkerNode;
use crate::registry::{RegistryError, WorkerRegistry};
use crate::worker_manager::IdleIndex;

/// How often the worker re-offers its idle sandboxes and reconciles provisioned ones.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What the worker role runs with.
pub struct WorkerRoleConfig {
    /// This node's id (the worker's id in the registry).
    pub node_id: String,
    /// Where sandboxes run.
    pub backend: Arc<dyn SandboxBackend>,
    /// The pool's budget and timeouts.
    pub pool: PoolConfig,
    /// The unpacked-code cache (its directory is this node's alone).
    pub code_cache: CodeCache,
    /// Where the worker API listens (port 0: any free port).
    pub listen: SocketAddr,
    /// The address other nodes use, when not the one it listens on.
    pub advertise: Option<String>,
    /// The shared secret callers must send, if any.
    pub token: Option<String>,
    /// The registration's TTL (heartbeats go five times per TTL).
    pub ttl: Duration,
    /// Where a function's `Code.Path` may point on this worker (`--code-path-root`).
    pub code_path_roots: sluice_core::code::CodePathRoots,
    /// The logs topic and how long it keeps records; every invocation's log is written there.
    pub logs: Option<(String, Duration)>,
}

/// The node's shared parts the worker uses.
pub struct WorkerRoleParts<'a> {
    /// The configuration view.
    pub store: &'a ConfigStore,
    /// Kafka (for code kept in the code topic).
    pub kafka: &'a KafkaSettings,
    /// The account, for ARNs and limits.
    pub identity: &'a AccountIdentity,
    /// The worker registry.
    pub registry: &'a WorkerRegistry,
    /// The Worker Manager's index of idle sandboxes.
    pub index: &'a IdleIndex,
}

/// Why the worker role could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerRoleError {
    /// The worker API's address could not be bound.
    #[error("listen on {addr} for the worker API (pass --worker-listen): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It listens on every interface and no address for the others was given.
    #[error(
        "--worker-listen {0} binds every interface, which is not an address other nodes can use: \
         pass --worker-advertise HOST:PORT as they should reach this node"
    )]
    NoAdvertisedAddress(SocketAddr),
    /// The first registration failed.
    #[error("register this worker in Redis: {0}")]
    Register(#[source] RegistryError),
}

/// Starts the worker role on `tracker`, stopping with `cancel`; returns the service for this
/// node's own invocations.
///
/// # Errors
/// [`WorkerRoleError`].
pub async fn start_worker(
    cfg: WorkerRoleConfig,
    parts: WorkerRoleParts<'_>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<WorkerService, WorkerRoleError> {
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(4096);
    let pool = Pool::new(cfg.backend, cfg.pool, None).with_events(events_tx);
    tracker.spawn(pool.clone().run_reaper(cancel.child_token()));
    let service = WorkerService::with_code_cache(
        cfg.node_id,
        pool,
        parts.store.clone(),
        parts.identity.clone(),
        Some((parts.kafka.clone(), cfg.code_cache)),
        cfg.code_path_roots,
    );
    let service = match &cfg.logs {
        Some((topic, retention)) => {
            match sluice_core::logs::LogShipper::open(parts.kafka, topic, *retention).await {
                Ok(logs) => service.with_logs(logs),
                Err(e) => {
                    // The worker still runs functions; their output stays in this node's log.
                    tracing::error!(topic = %topic, error = %e, "cannot write function logs to Kafka");
                    service
                }
            }
        }
        None => service,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WorkerRoleError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| WorkerRoleError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = match cfg.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => {
            return Err(WorkerRoleError::NoAdvertisedAddress(cfg.listen))
        }
        None => bound.to_string(),
    };
    tracing::info!(listen = %bound, advertise = %addr, "worker API listening");
    let app = server::router(service.clone(), cfg.token);
    let stop = cancel.clone();
    tracker.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "worker API stopped");
        }
    });
    let node = WorkerNode::new(
        service.clone(),
        parts.registry.clone(),
        parts.index.clone(),
        addr,
    );
    node.heartbeat().await.map_err(WorkerRoleError::Register)?;
    tracker.spawn(
        node.clone()
            .run_heartbeat(cfg.ttl / 5, cancel.child_token()),
    );
    tracker.spawn(
        node.clone()
            .run_index_sync(events_rx, SYNC_EVERY, cancel.child_token()),
    );
    tracker.spawn(node.run_provisioned(SYNC_EVERY, cancel.child_token()));
    Ok(service)
}
