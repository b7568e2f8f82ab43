//! [`ClusterInvoker`]: how the front end and the pollers run a function anywhere in the fleet.
//!
//! Per invocation: take a cluster-wide concurrency slot (Redis; 429 when over), then ask the
//! worker manager's index for an idle warm sandbox of the function on a live worker; if there is
//! none, placement picks a worker with room for a new one (a cold start). The request goes to
//! that worker over the network ([`crate::client`]), or straight to the pool when the worker is
//! this node. A worker that is unreachable or dies mid-invoke is skipped for one registry TTL and
//! the invocation goes to another worker (at least once, like every Sluice delivery); when no
//! worker has room the invocation is throttled ([`InvokeError::NoCapacity`], 429 / re-queued).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked, Invoker};
use sluice_core::model::FunctionConfig;
use sluice_core::store::{ConfigStore, Versioned};
use sluice_leasing::{unreserved_limit, ConcurrencyCounter, CountError, FunctionLimit};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{RemoteClient, RemoteError};
use crate::placement;
use crate::registry::{RegistryError, WorkerInfo, WorkerRegistry};
use crate::worker_manager::IdleIndex;
pub use sluice_workers::service::AccountIdentity;
use sluice_workers::service::{WorkerRequest, WorkerService};

/// How many workers an invocation tries when workers die under it.
const MAX_WORKERS_LOST: usize = 3;
/// How many workers placement asks before it throttles.
const MAX_PLACEMENT_TRIES: usize = 3;
/// Margin over the function's timeout and the init timeout before a remote invoke gives up.
const REMOTE_MARGIN: Duration = Duration::from_secs(5);

/// Runs invocations on the fleet's workers.
#[derive(Clone)]
pub struct ClusterInvoker {
    inner: Arc<Inner>,
}

struct Inner {
    store: ConfigStore,
    counter: ConcurrencyCounter,
    account: AccountIdentity,
    registry: WorkerRegistry,
    index: IdleIndex,
    client: RemoteClient,
    local: Option<WorkerService>,
    init_timeout: Duration,
    fleet: watch::Sender<Arc<Vec<WorkerInfo>>>,
    /// Workers whose connection failed, and when: skipped for one registry TTL.
    suspects: Mutex<HashMap<String, Instant>>,
}

/// The parts a [`ClusterInvoker`] works with.
pub struct ClusterParts {
    /// The configuration view.
    pub store: ConfigStore,
    /// Cluster-wide concurrency slots.
    pub counter: ConcurrencyCounter,
    /// ARNs and the account limit.
    pub account: AccountIdentity,
    /// The worker registry.
    pub registry: WorkerRegistry,
    /// The idle-sandbox index.
    pub index: IdleIndex,
    /// This node's worker, when it has the worker role (invoked without the network).
    pub local: Option<WorkerService>,
    /// Longest a runtime may take to initialise (part of the remote deadline).
    pub init_timeout: Duration,
    /// The shared secret the workers' API requires (`--worker-token`).
    pub worker_token: Option<String>,
}

impl ClusterInvoker {
    /// An invoker over `parts`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(parts: ClusterParts) -> Result<Self, reqwest::Error> {
        Ok(Self {
            inner: Arc::new(Inner {
                store: parts.store,
                counter: parts.counter,
                account: parts.account,
                registry: parts.registry,
                index: parts.index,
                client: RemoteClient::new(parts.worker_token)?,
                local: parts.local,
                init_timeout: parts.init_timeout,
                fleet: watch::Sender::new(Arc::new(Vec::new())),
                suspects: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The live workers as last read from the registry.
    #[must_use]
    pub fn fleet(&self) -> Arc<Vec<WorkerInfo>> {
        self.inner.fleet.borrow().clone()
    }

    /// Reads the registry now.
    ///
    /// # Errors
    /// [`RegistryError`] when Redis fails.
    pub async fn refresh_fleet(&self) -> Result<(), RegistryError> {
        let workers = self.inner.registry.list().await?;
        for w in &workers {
            metrics::gauge!("sluice_worker_free_memory_mib", "worker" => w.id.clone())
                .set(w.free_mb() as f64);
            metrics::gauge!("sluice_worker_busy_sandboxes", "worker" => w.id.clone())
                .set(w.busy as f64);
        }
        metrics::gauge!("sluice_workers_alive").set(workers.len() as f64);
        self.inner.fleet.send_replace(Arc::new(workers));
        Ok(())
    }

    /// Keeps the fleet view fresh (every `every`) until `cancel`.
    pub async fn run_fleet_refresh(self, every: Duration, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.refresh_fleet().await {
                tracing::warn!(error = %e, "could not read the worker registry");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    fn excluded(&self) -> Vec<String> {
        let ttl = self.inner.registry.ttl();
        let mut s = self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.retain(|_, since| since.elapsed() < ttl);
        s.keys().cloned().collect()
    }

    fn suspect(&self, worker: &str) {
        self.inner
            .suspects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(worker.to_owned(), Instant::now());
        metrics::counter!("sluice_workers_lost_total").increment(1);
    }

    async fn send(
        &self,
        worker: &WorkerInfo,
        req: &WorkerRequest,
        deadline: Duration,
    ) -> Result<Invoked, RemoteError> {
        match &self.inner.local {
            Some(local) if local.id() == worker.id => local
                .invoke(req.clone())
                .await
                .map_err(RemoteError::Refused),
            _ => {
                self.inner
                    .client
                    .invoke(&worker.id, &worker.addr, req, deadline)
                    .await
            }
        }
    }

    /// Finds a sandbox for `req` (warm, else placed) and runs it there.
    async fn dispatch(
        &self,
        f: &Versioned<FunctionConfig>,
        req: &InvokeRequest,
    ) -> Result<Invoked, InvokeError> {
        let key = (req.function.clone(), f.revision);
        let need_mb = u64::try_from(f.object.memory_size).unwrap_or(128);
        let deadline = Duration::from_secs(u64::try_from(f.object.timeout).unwrap_or(3))
            + self.inner.init_timeout
            + REMOTE_MARGIN;
        let mut wreq = WorkerRequest {
            request: req.clone(),
            revision: f.revision,
            sandbox: None,
        };
        if self.fleet().is_empty() {
            let _ = self.refresh_fleet().await;
        }
        let mut lost = Vec::new();
        while lost.len() < MAX_WORKERS_LOST {
            let mut excluded = self.excluded();
            // The worker manager: an idle warm sandbox anywhere in the fleet.
            let claim = match self.inner.index.claim(&key).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "idle-sandbox index unavailable; placing a new sandbox");
                    None
                }
            };
            let fleet = self.fleet();
            if let Some(c) = claim {
                let worker = fleet
                    .iter()
                    .find(|w| w.id == c.worker && !excluded.contains(&w.id));
                if let Some(w) = worker {
                    wreq.sandbox = Some(c.sandbox);
                    match self.send(w, &wreq, deadline).await {
                        Ok(r) => return Ok(r),
                        Err(e) if e.worker_gone() => {
                            tracing::warn!(error = %e, request_id = %req.request_id, "worker lost; trying another");
                            self.suspect(&w.id);
                            lost.push(e.to_string());
                            continue;
                        }
                        // Its memory went to other functions meanwhile: place it elsewhere.
                        Err(RemoteError::Refused(InvokeError::NoCapacity(_))) => {
                            excluded.push(w.id.clone());
                        }
                        Err(e) => return Err(into_invoke_error(e)),
                    }
                    wreq.sandbox = None;
                }
            }
            // Placement: a worker with room boots a new sandbox.
            let mut candidates = place(&fleet, need_mb, &excluded);
            if candidates.is_empty() {
                // The view may predate a worker that just joined or freed memory.
                let _ = self.refresh_fleet().await;
                candidates = place(&self.fleet(), need_mb, &excluded);
            }
            let mut refusals = Vec::new();
            let mut worker_lost = false;
            for w in &candidates {
                match self.send(w, &wreq, deadline).await {
                    Ok(r) => return Ok(r),
                    Err(RemoteError::Refused(InvokeError::NoCapacity(m))) => refusals.push(m),
                    Err(e) if e.worker_gone() => {
                        tracing::warn!(error = %e, request_id = %req.request_id, "worker lost; trying another");
                        self.suspect(&w.id);
                        lost.push(e.to_string());
                        worker_lost = true;
                        break;
                    }
                    Err(e) => return Err(into_invoke_error(e)),
                }
            }
            if worker_lost {
                continue;
            }
            metrics::counter!("sluice_placement_failures_total", "function" => req.function.clone())
                .increment(1);
            return Err(InvokeError::NoCapacity(if refusals.is_empty() {
                no_room_message(&self.fleet(), need_mb)
            } else {
                refusals.join("; ")
            }));
        }
        Err(InvokeError::Service(format!(
            "{} workers were lost under this invocation: {}",
            lost.len(),
            lost.join("; ")
        )))
    }

    fn limit(&self, f: &FunctionConfig) -> FunctionLimit {
        match f.reserved_concurrent_executions {
            Some(r) => FunctionLimit::Reserved(u32::try_from(r).unwrap_or(0)),
            None => {
                let reservations = self
                    .inner
                    .store
                    .functions()
                    .into_iter()
                    .filter_map(|f| f.object.reserved_concurrent_executions)
                    .map(|r| u32::try_from(r).unwrap_or(0));
                FunctionLimit::Unreserved {
                    unreserved_limit: unreserved_limit(
                        self.inner.account.concurrency_limit,
                        reservations,
                    ),
                }
            }
        }
    }
}

/// The workers to ask, in order, for a new sandbox of `need_mb`.
fn place(fleet: &[WorkerInfo], need_mb: u64, excluded: &[String]) -> Vec<WorkerInfo> {
    placement::candidates(fleet, need_mb, excluded, &mut rand::rng())
        .into_iter()
        .take(MAX_PLACEMENT_TRIES)
        .cloned()
        .collect()
}

fn no_room_message(fleet: &[WorkerInfo], need_mb: u64) -> String {
    if fleet.is_empty() {
        return "no worker node is registered (start a node with the worker role)".into();
    }
    let each: Vec<String> = fleet
        .iter()
        .map(|w| format!("{} {}/{} MiB free", w.id, w.room_mb(), w.budget_mb))
        .collect();
    format!(
        "no worker has {need_mb} MiB free for a new sandbox ({})",
        each.join(", ")
    )
}

fn into_invoke_error(e: RemoteError) -> InvokeError {
    match e {
        RemoteError::Refused(e) => e,
        other => InvokeError::Service(other.to_string()),
    }
}

/// Counts this node's invocations in flight per function while it lives.
struct InFlight(String);

impl InFlight {
    fn start(function: &str) -> Self {
        metrics::gauge!("sluice_concurrent_executions", "function" => function.to_owned())
            .increment(1.0);
        Self(function.to_owned())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("sluice_concurrent_executions", "function" => self.0.clone())
            .decrement(1.0);
    }
}

#[async_trait]
impl Invoker for ClusterInvoker {
    async fn invoke(&self, req: InvokeRequest) -> Result<Invoked, InvokeError> {
        let Some(function) = self.inner.store.function(&req.function) else {
            return Err(InvokeError::NotFound(
                self.inner.account.function_arn(&req.function),
            ));
        };
        let mut slot = match self
            .inner
            .counter
            .acquire(&req.function, self.limit(&function.object))
            .await
        {
            Ok(slot) => slot,
            Err(CountError::Throttled { reason, limit, .. }) => {
                return Err(InvokeError::Throttled {
                    reason: reason.as_str().to_owned(),
                    limit,
                })
            }
            Err(e) => return Err(InvokeError::Service(format!("concurrency counting: {e}"))),
        };
        let labels = [("function", req.function.clone())];
        let in_flight = InFlight::start(&req.function);
        // Keep the slot alive for as long as the function runs (it expires if this node dies).
        let renew_every = self.inner.counter.slot_ttl() / 3;
        let run = self.dispatch(&function, &req);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                () = tokio::time::sleep(renew_every) => {
                    if let Err(e) = slot.renew().await {
                        tracing::warn!(function = %req.function, error = %e, "could not renew a concurrency slot");
                    }
                }
            }
        };
        drop(in_flight);
        if let Err(e) = slot.release().await {
            tracing::warn!(function = %req.function, error = %e, "could not release a concurrency slot; it expires on its own");
        }
        let inv = result?;
        metrics::counter!("sluice_invocations_total", &labels).increment(1);
        metrics::histogram!("sluice_duration_seconds", &labels).record(inv.duration.as_secs_f64());
        if inv.cold_start {
            metrics::counter!("sluice_cold_starts_total", &labels).increment(1);
        }
        if let Some(init) = inv.init_duration {
            // Measured on the worker that booted the sandbox and carried back with the result.
            metrics::histogram!("sluice_init_duration_seconds", &labels).record(init.as_secs_f64());
        }
        if matches!(inv.result, FunctionResult::Err { .. }) {
            metrics::counter!("sluice_errors_total", &labels).increment(1);
        }
        Ok(inv)
    }

    async fn provisioned_ready(&self, function: &str) -> Option<u32> {
        let f = self.inner.store.function(function)?;
        let key = WorkerInfo::provisioned_key(function, f.revision);
        Some(
            self.fleet()
                .iter()
                .filter_map(|w| w.provisioned.get(&key))
                .sum(),
        )
    }
}
