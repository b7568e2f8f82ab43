//! [`WorkerNode`]: what a node with the worker role runs besides its API: the heartbeat into the
//! worker registry, the sync of its idle sandboxes into the worker manager's index, and the
//! provisioned-concurrency reconciler.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::provisioned;
use crate::registry::{RegistryError, WorkerInfo, WorkerRegistry};
use crate::worker_manager::IdleIndex;
use sluice_workers::pool::{Key, PoolEvent};
use sluice_workers::service::WorkerService;

/// A sandbox idle for this long is offered again at each resync, repairing index entries lost
/// to a dropped event, a Redis flush, or a claim whose invocation never arrived.
const REANNOUNCE_AFTER: Duration = Duration::from_secs(2);

/// The worker role's background duties.
#[derive(Clone)]
pub struct WorkerNode {
    service: WorkerService,
    registry: WorkerRegistry,
    index: IdleIndex,
    addr: String,
    /// The last provisioning failure per function, so that a failure repeating every pass is
    /// logged once at WARN.
    provision_failures: Arc<Mutex<HashMap<String, String>>>,
}

impl WorkerNode {
    /// The duties of `service`, whose API is reachable at `addr`.
    #[must_use]
    pub fn new(
        service: WorkerService,
        registry: WorkerRegistry,
        index: IdleIndex,
        addr: String,
    ) -> Self {
        Self {
            service,
            registry,
            index,
            addr,
            provision_failures: Arc::default(),
        }
    }

    /// What this worker publishes now.
    #[must_use]
    pub fn info(&self) -> WorkerInfo {
        let pool = self.service.pool();
        let stats = pool.stats();
        let mut provisioned = BTreeMap::new();
        for ((name, rev), all, _busy) in &stats.provisioned {
            provisioned.insert(WorkerInfo::provisioned_key(name, *rev), *all);
        }
        WorkerInfo {
            id: self.service.id().to_owned(),
            addr: self.addr.clone(),
            backend: pool.backend_name().to_owned(),
            budget_mb: stats.budget_mb,
            used_mb: stats.used_mb,
            reclaimable_mb: stats.reclaimable_mb,
            busy: stats.busy,
            idle: stats.idle,
            provisioned,
            heartbeat_ms: sluice_core::time::unix_ms(),
        }
    }

    /// Publishes this worker's registration once.
    ///
    /// # Errors
    /// [`RegistryError`] when Redis fails.
    pub async fn heartbeat(&self) -> Result<(), RegistryError> {
        self.registry.heartbeat(&self.info()).await
    }

    /// Heartbeats every `every` until `cancel`, then deregisters.
    pub async fn run_heartbeat(self, every: Duration, cancel: CancellationToken) {
        let mut reported: HashSet<String> = HashSet::new();
        loop {
            if let Err(e) = self.heartbeat().await {
                tracing::warn!(error = %e, "worker heartbeat failed");
            }
            reported = self.export_metrics(reported);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if let Err(e) = self.registry.deregister(self.service.id()).await {
            tracing::warn!(error = %e, "could not deregister; the registration expires on its own");
        }
    }

    /// Sets the pool's gauges; returns the functions with provisioned gauges set (so that the
    /// next call zeroes those that went away).
    fn export_metrics(&self, before: HashSet<String>) -> HashSet<String> {
        let stats = self.service.pool().stats();
        metrics::gauge!("sluice_worker_memory_budget_mib").set(stats.budget_mb as f64);
        metrics::gauge!("sluice_worker_memory_used_mib").set(stats.used_mb as f64);
        metrics::gauge!("sluice_worker_memory_peak_mib").set(stats.peak_used_mb as f64);
        metrics::gauge!("sluice_sandboxes_busy").set(stats.busy as f64);
        let mut per_function: HashMap<String, (u32, u32)> = HashMap::new();
        for ((name, _), all, busy) in &stats.provisioned {
            let e = per_function.entry(name.clone()).or_default();
            e.0 += all;
            e.1 += busy;
        }
        for gone in before {
            per_function.entry(gone).or_default();
        }
        for (f, (all, busy)) in &per_function {
            metrics::gauge!("sluice_provisioned_concurrent_executions", "function" => f.clone())
                .set(f64::from(*all));
            let utilization = if *all == 0 {
                0.0
            } else {
                f64::from(*busy) / f64::from(*all)
            };
            metrics::gauge!("sluice_provisioned_concurrency_utilization", "function" => f.clone())
                .set(utilization);
        }
        per_function
            .into_iter()
            .filter(|(_, (all, _))| *all > 0)
            .map(|(f, _)| f)
            .collect()
    }

    /// Applies the pool's idle/gone events to the index, in order, and re-offers long-idle
    /// sandboxes every `resync`, until `cancel`; then withdraws nothing (the pool's shutdown
    /// sends the last events).
    pub async fn run_index_sync(
        self,
        mut events: mpsc::Receiver<PoolEvent>,
        resync: Duration,
        cancel: CancellationToken,
    ) {
        let me = self.service.id().to_owned();
        let mut tick = tokio::time::interval(resync);
        loop {
            tokio::select! {
                biased;
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    let r = match &ev {
                        PoolEvent::Idle { function, sandbox } => self.index.announce(&me, function, *sandbox).await,
                        PoolEvent::Gone { function, sandbox } => self.index.withdraw(&me, function, *sandbox).await,
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, event = ?ev, "could not update the idle-sandbox index");
                    }
                }
                _ = tick.tick() => {
                    let idle: Vec<(Key, u64)> = self
                        .service
                        .pool()
                        .idle_sandboxes()
                        .into_iter()
                        .filter(|(_, _, idle_for)| *idle_for >= REANNOUNCE_AFTER)
                        .map(|(key, sandbox, _)| (key, sandbox))
                        .collect();
                    if let Err(e) = self.index.announce_many(&me, &idle).await {
                        tracing::warn!(error = %e, "could not re-offer idle sandboxes");
                    }
                }
                () = cancel.cancelled() => {
                    // Drain what the pool's shutdown sends, briefly.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    while let Ok(Some(PoolEvent::Gone { function, sandbox } | PoolEvent::Idle { function, sandbox })) =
                        tokio::time::timeout_at(deadline, events.recv()).await
                    {
                        let _ = self.index.withdraw(&me, &function, sandbox).await;
                    }
                    return;
                }
            }
        }
    }

    /// Keeps this worker's share of every function's provisioned concurrency booted, checking
    /// every `every` and whenever the configuration changes, until `cancel`.
    pub async fn run_provisioned(self, every: Duration, cancel: CancellationToken) {
        let mut changes = self.service.store().changes();
        loop {
            if let Err(e) = self.reconcile_provisioned().await {
                tracing::warn!(error = %e, "provisioned concurrency: could not read the registry");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
                _ = changes.changed() => {}
            }
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.provision_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass of the provisioned-concurrency reconciler.
    ///
    /// # Errors
    /// [`RegistryError`] when the registry cannot be read.
    pub async fn reconcile_provisioned(&self) -> Result<(), RegistryError> {
        let workers: Vec<(String, u64)> = self
            .registry
            .list()
            .await?
            .into_iter()
            .map(|w| (w.id, w.budget_mb))
            .collect();
        let me = self.service.id();
        if !workers.iter().any(|(w, _)| w == me) {
            return Ok(());
        }
        let store = self.service.store();
        let mut desired: HashMap<Key, u32> = HashMap::new();
        for (name, pc) in store.provisioned_concurrency_configs() {
            let Some(f) = store.function(&name) else {
                continue;
            };
            let want = provisioned::share(
                pc.object.requested_provisioned_concurrent_executions,
                &workers,
                me,
                &name,
            );
            if want > 0 {
                desired.insert((name, f.revision), want);
            }
        }
        let pool = self.service.pool();
        let have: HashMap<Key, u32> = pool
            .stats()
            .provisioned
            .into_iter()
            .map(|(k, all, _)| (k, all))
            .collect();
        let mut changed = false;
        for (key, all) in &have {
            let want = desired.get(key).copied().unwrap_or(0);
            if *all > want {
                changed = true;
                let n = pool.unprovision(key, all - want);
                tracing::info!(function = %key.0, revision = key.1, released = n, "provisioned concurrency lowered");
            }
        }
        for (key, want) in desired {
            let mut have = have.get(&key).copied().unwrap_or(0);
            while have < want {
                match self.service.provision(&key.0).await {
                    Ok(()) => {
                        have += 1;
                        changed = true;
                        self.failures().remove(&key.0);
                        metrics::counter!("sluice_provisioned_boots_total", "function" => key.0.clone())
                            .increment(1);
                    }
                    Err(e) => {
                        metrics::counter!("sluice_provisioned_failures_total", "function" => key.0.clone())
                            .increment(1);
                        let message = e.to_string();
                        if self.failures().insert(key.0.clone(), message.clone()) == Some(message) {
                            tracing::debug!(function = %key.0, error = %e, have, want, "could not boot a provisioned sandbox (again)");
                        } else {
                            tracing::warn!(function = %key.0, error = %e, have, want, "could not boot a provisioned sandbox; retrying every pass");
                        }
                        break;
                    }
                }
            }
        }
        if changed {
            // Publish at once: GetProvisionedConcurrencyConfig reads READY from the registry.
            self.heartbeat().await?;
        }
        Ok(())
    }
}
