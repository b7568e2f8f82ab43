//! The per-node warm pool.
//!
//! Sandboxes are kept per function (name and configuration revision), each serving one
//! invocation at a time. A request takes an idle sandbox of its function, or boots one if the
//! node's memory budget allows (evicting idle sandboxes of other functions, least recently used
//! first, to make room). A sandbox whose invocation crashed, timed out or ran out of memory is
//! destroyed, and the next request boots a fresh one. A reaper destroys sandboxes idle longer
//! than the idle timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sandbox::{BootError, FunctionSpec, InvokeOutcome, LogLine, Sandbox, SandboxBackend};

/// Settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Memory all sandboxes of the node may use together, MiB.
    pub memory_budget_mb: u64,
    /// Idle sandboxes older than this are destroyed.
    pub idle_timeout: Duration,
    /// Longest a runtime may take to initialise (Lambda: 10 s).
    pub init_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            memory_budget_mb: 4096,
            idle_timeout: Duration::from_secs(300),
            init_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the pool could not run an invocation.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The node's memory budget is taken by busy sandboxes.
    #[error(
        "no capacity on this node: {needed_mb} MiB needed, {free_mb} MiB of {budget_mb} MiB free"
    )]
    NoCapacity {
        /// What the function needs.
        needed_mb: u64,
        /// What is free after evicting every idle sandbox.
        free_mb: u64,
        /// The budget.
        budget_mb: u64,
    },
    /// A sandbox could not be set up (a host problem).
    #[error("boot a sandbox: {0}")]
    Boot(#[source] BootError),
}

impl PoolError {
    /// Whether another try (later, or on another node) can succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// One finished invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// How it ended.
    pub outcome: InvokeOutcome,
    /// Whether it booted a new sandbox (a cold start).
    pub cold_start: bool,
    /// Time to boot, when it was a cold start.
    pub init_duration: Option<Duration>,
    /// Time in the function.
    pub duration: Duration,
}

type Key = (String, u64);

#[derive(Default)]
struct State {
    idle: HashMap<Key, Vec<Sandbox>>,
    /// MiB held by all sandboxes (idle and busy) and by boots in progress.
    used_mb: u64,
    busy: u64,
}

/// A node's sandboxes.
#[derive(Clone)]
pub struct Pool {
    backend: Arc<dyn SandboxBackend>,
    config: PoolConfig,
    state: Arc<Mutex<State>>,
    next_id: Arc<AtomicU64>,
    logs: Option<mpsc::Sender<LogLine>>,
}

impl Pool {
    /// A pool over `backend`; `logs` receives the functions' log lines.
    #[must_use]
    pub fn new(
        backend: Arc<dyn SandboxBackend>,
        config: PoolConfig,
        logs: Option<mpsc::Sender<LogLine>>,
    ) -> Self {
        Self {
            backend,
            config,
            state: Arc::new(Mutex::new(State::default())),
            next_id: Arc::new(AtomicU64::new(1)),
            logs,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sandboxes that are idle now.
    #[must_use]
    pub fn idle_count(&self) -> usize {
        self.lock().idle.values().map(Vec::len).sum()
    }

    /// MiB reserved by sandboxes now.
    #[must_use]
    pub fn used_mb(&self) -> u64 {
        self.lock().used_mb
    }

    /// Runs one invocation of `spec` on a warm sandbox, or a new one.
    ///
    /// # Errors
    /// [`PoolError::NoCapacity`] when the budget is taken by busy sandboxes;
    /// [`PoolError::Boot`] when the host cannot set a sandbox up. Init errors and every function
    /// failure are outcomes, not errors.
    pub async fn invoke(
        &self,
        spec: &Arc<FunctionSpec>,
        request_id: &str,
        payload: Vec<u8>,
    ) -> Result<Invocation, PoolError> {
        let key: Key = (spec.name.clone(), spec.revision);
        let (warm, evicted) = self.take_or_reserve(&key, spec.memory_mb)?;
        for sb in evicted {
            metrics::counter!("sluice_sandbox_evictions_total").increment(1);
            tokio::spawn(sb.destroy());
        }
        let (mut sandbox, cold_start, init_duration) = match warm {
            Some(sb) => (sb, false, None),
            None => {
                let started = Instant::now();
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                match Sandbox::boot(
                    &*self.backend,
                    id,
                    Arc::clone(spec),
                    self.config.init_timeout,
                    self.logs.clone(),
                )
                .await
                {
                    Ok(sb) => {
                        let took = started.elapsed();
                        metrics::histogram!("sluice_sandbox_boot_seconds", "backend" => self.backend.name()).record(took.as_secs_f64());
                        (sb, true, Some(took))
                    }
                    Err(e) => {
                        self.release(spec.memory_mb);
                        return match e {
                            BootError::Init {
                                error_type,
                                payload,
                            } => Ok(Invocation {
                                outcome: InvokeOutcome::InitError {
                                    error_type,
                                    payload,
                                },
                                cold_start: true,
                                init_duration: Some(started.elapsed()),
                                duration: Duration::ZERO,
                            }),
                            BootError::Exited(reason) => Ok(Invocation {
                                outcome: InvokeOutcome::Crashed { reason },
                                cold_start: true,
                                init_duration: Some(started.elapsed()),
                                duration: Duration::ZERO,
                            }),
                            other => Err(PoolError::Boot(other)),
                        };
                    }
                }
            }
        };
        let started = Instant::now();
        let outcome = sandbox.invoke(request_id, payload, "").await;
        let duration = started.elapsed();
        if sandbox.is_alive() {
            let mut st = self.lock();
            st.busy -= 1;
            st.idle.entry(key).or_default().push(sandbox);
        } else {
            self.release(spec.memory_mb);
            metrics::counter!("sluice_sandbox_replaced_total", "function" => spec.name.clone())
                .increment(1);
            tokio::spawn(sandbox.destroy());
        }
        Ok(Invocation {
            outcome,
            cold_start,
            init_duration,
            duration,
        })
    }

    /// Takes an idle sandbox of `key`, or reserves `memory_mb` for a new one (returning the idle
    /// sandboxes evicted to make room).
    fn take_or_reserve(
        &self,
        key: &Key,
        memory_mb: u64,
    ) -> Result<(Option<Sandbox>, Vec<Sandbox>), PoolError> {
        let mut st = self.lock();
        if let Some(sb) = st.idle.get_mut(key).and_then(Vec::pop) {
            st.busy += 1;
            return Ok((Some(sb), Vec::new()));
        }
        let budget = self.config.memory_budget_mb;
        let mut evicted = Vec::new();
        while st.used_mb + memory_mb > budget {
            // Least recently used idle sandbox of any function.
            let victim = st
                .idle
                .iter()
                .filter_map(|(k, v)| v.first().map(|sb| (k.clone(), sb.last_used)))
                .min_by_key(|(_, t)| *t)
                .map(|(k, _)| k);
            let Some(k) = victim else { break };
            let st = &mut *st;
            if let Some(list) = st.idle.get_mut(&k) {
                let sb = list.remove(0);
                st.used_mb -= sb.spec().memory_mb;
                evicted.push(sb);
                if list.is_empty() {
                    st.idle.remove(&k);
                }
            }
        }
        if st.used_mb + memory_mb > budget {
            let free_mb = budget.saturating_sub(st.used_mb);
            drop(st);
            for sb in evicted {
                tokio::spawn(sb.destroy());
            }
            return Err(PoolError::NoCapacity {
                needed_mb: memory_mb,
                free_mb,
                budget_mb: budget,
            });
        }
        st.used_mb += memory_mb;
        st.busy += 1;
        Ok((None, evicted))
    }

    /// Returns the memory of a busy sandbox (or of a boot that failed) to the budget.
    fn release(&self, memory_mb: u64) {
        let mut st = self.lock();
        st.used_mb = st.used_mb.saturating_sub(memory_mb);
        st.busy = st.busy.saturating_sub(1);
    }

    /// Destroys idle sandboxes unused for longer than the idle timeout; returns how many.
    pub async fn reap_idle(&self) -> usize {
        let now = Instant::now();
        let victims: Vec<Sandbox> = {
            let mut st = self.lock();
            let mut out = Vec::new();
            for list in st.idle.values_mut() {
                let (old, keep): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|sb| now.duration_since(sb.last_used) >= self.config.idle_timeout);
                *list = keep;
                out.extend(old);
            }
            st.idle.retain(|_, v| !v.is_empty());
            for sb in &out {
                st.used_mb = st.used_mb.saturating_sub(sb.spec().memory_mb);
            }
            out
        };
        let n = victims.len();
        for sb in victims {
            sb.destroy().await;
        }
        if n > 0 {
            metrics::counter!("sluice_sandbox_reaped_total").increment(n as u64);
        }
        n
    }

    /// Runs the idle reaper until `cancel`, then destroys every idle sandbox.
    pub async fn run_reaper(self, cancel: CancellationToken) {
        let period = (self.config.idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10));
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(period) => { self.reap_idle().await; }
            }
            let (idle, used) = {
                let st = self.lock();
                (st.idle.values().map(Vec::len).sum::<usize>(), st.used_mb)
            };
            metrics::gauge!("sluice_sandboxes_idle").set(idle as f64);
            metrics::gauge!("sluice_sandbox_memory_reserved_mib").set(used as f64);
        }
        self.shutdown().await;
    }

    /// Destroys every idle sandbox.
    pub async fn shutdown(&self) {
        let all: Vec<Sandbox> = {
            let mut st = self.lock();
            let all: Vec<Sandbox> = st.idle.drain().flat_map(|(_, v)| v).collect();
            for sb in &all {
                st.used_mb = st.used_mb.saturating_sub(sb.spec().memory_mb);
            }
            all
        };
        for sb in all {
            sb.destroy().await;
        }
    }
}
