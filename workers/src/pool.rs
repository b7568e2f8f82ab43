//! The per-node warm pool.
//!
//! Sandboxes are kept per function (name and configuration revision), each serving one
//! invocation at a time. A request takes an idle sandbox of its function, or boots one if the
//! node's memory budget allows (evicting idle sandboxes of other functions, least recently used
//! first, to make room). A sandbox whose invocation crashed, timed out or ran out of memory is
//! destroyed, and the next request boots a fresh one. A reaper destroys sandboxes idle longer
//! than the idle timeout.
//!
//! Provisioned sandboxes ([`Pool::provision`]) are booted ahead of traffic and never reaped or
//! evicted; the provisioned-concurrency reconciler decides how many each node keeps. Every time a
//! sandbox becomes idle or goes away the pool sends a [`PoolEvent`], which the worker turns into
//! the cluster-wide idle-sandbox index in Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::invoke::{FunctionResult, InvokeRequest, Invoked};
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
    /// The invocation's log as Lambda writes it: `START`, the function's output (its last
    /// [`crate::sandbox::LOG_TAIL_BYTES`]), `END`, `REPORT`.
    pub log: Vec<u8>,
}

/// Lambda's log of one invocation around the function's `lines`.
#[must_use]
pub fn lambda_log(
    request_id: &str,
    lines: &[u8],
    duration: Duration,
    init_duration: Option<Duration>,
    memory_mb: u64,
) -> Vec<u8> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let billed = duration.as_millis().max(1);
    let mut log = format!("START RequestId: {request_id} Version: $LATEST\n").into_bytes();
    log.extend_from_slice(lines);
    if !lines.is_empty() && !lines.ends_with(b"\n") {
        log.push(b'\n');
    }
    log.extend_from_slice(
        format!(
            "END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {:.2} ms\t\
             Billed Duration: {billed} ms\tMemory Size: {memory_mb} MB\t",
            ms(duration)
        )
        .as_bytes(),
    );
    if let Some(init) = init_duration {
        log.extend_from_slice(format!("Init Duration: {:.2} ms\t", ms(init)).as_bytes());
    }
    log.push(b'\n');
    log
}

impl Invocation {
    /// A cold start whose boot ended in `outcome` after `init`.
    fn boot_failed(
        outcome: InvokeOutcome,
        request_id: &str,
        init: Duration,
        memory_mb: u64,
    ) -> Self {
        Self {
            outcome,
            cold_start: true,
            init_duration: Some(init),
            duration: Duration::ZERO,
            log: lambda_log(request_id, b"", Duration::ZERO, Some(init), memory_mb),
        }
    }

    /// The caller's view of it: the sandbox's outcome as Lambda reports it (a response, or a
    /// function error of Lambda's type with its body), with the timings.
    #[must_use]
    pub fn into_invoked(self, request_id: &str) -> Invoked {
        let result = match self.outcome {
            InvokeOutcome::Response(p) => FunctionResult::Ok(p),
            other => {
                let (error_type, payload) = other.error(request_id).unwrap_or_default();
                FunctionResult::Err {
                    error_type,
                    payload,
                }
            }
        };
        Invoked {
            result,
            duration: self.duration,
            cold_start: self.cold_start,
            init_duration: self.init_duration,
            log: self.log,
        }
    }
}

/// A function's configuration: name and store revision.
pub type Key = (String, u64);

/// A change the cluster-wide idle index must learn about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// Sandbox `sandbox` of `function` is idle and may be claimed.
    Idle {
        /// Function and revision.
        function: Key,
        /// The sandbox's id on this node.
        sandbox: u64,
    },
    /// Sandbox `sandbox` is busy or gone and must not be offered.
    Gone {
        /// Function and revision.
        function: Key,
        /// The sandbox's id on this node.
        sandbox: u64,
    },
}

/// Figures of a pool at one moment (for the worker registry and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The memory budget, MiB.
    pub budget_mb: u64,
    /// MiB held by sandboxes and boots in progress.
    pub used_mb: u64,
    /// The most `used_mb` has been since the pool started.
    pub peak_used_mb: u64,
    /// MiB held by idle sandboxes that may be evicted (not provisioned).
    pub reclaimable_mb: u64,
    /// Sandboxes running an invocation.
    pub busy: u64,
    /// Idle sandboxes.
    pub idle: u64,
    /// Provisioned sandboxes per function revision: (all, busy).
    pub provisioned: Vec<(Key, u32, u32)>,
}

struct IdleSandbox {
    sandbox: Sandbox,
    provisioned: bool,
}

#[derive(Default)]
struct State {
    idle: HashMap<Key, Vec<IdleSandbox>>,
    /// MiB held by all sandboxes (idle and busy) and by boots in progress.
    used_mb: u64,
    peak_used_mb: u64,
    busy: u64,
    /// Provisioned sandboxes per key (idle and busy), and the busy ones.
    provisioned: HashMap<Key, (u32, u32)>,
}

impl State {
    fn remove_idle(&mut self, key: &Key, pos: usize) -> IdleSandbox {
        let list = self.idle.get_mut(key).expect("caller found the key");
        let i = list.swap_remove(pos);
        if list.is_empty() {
            self.idle.remove(key);
        }
        i
    }
}

/// A node's sandboxes.
#[derive(Clone)]
pub struct Pool {
    backend: Arc<dyn SandboxBackend>,
    config: PoolConfig,
    state: Arc<Mutex<State>>,
    next_id: Arc<AtomicU64>,
    logs: Option<mpsc::Sender<LogLine>>,
    events: Option<mpsc::Sender<PoolEvent>>,
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
            events: None,
        }
    }

    /// Sends idle/gone changes to `events`. The pool never waits on it: when it is full the
    /// change is dropped, and the worker's periodic re-announcement repairs the index.
    #[must_use]
    pub fn with_events(mut self, events: mpsc::Sender<PoolEvent>) -> Self {
        self.events = Some(events);
        self
    }

    fn emit(&self, event: PoolEvent) {
        if let Some(tx) = &self.events {
            if tx.try_send(event).is_err() {
                metrics::counter!("sluice_pool_events_dropped_total").increment(1);
            }
        }
    }

    /// The memory budget, MiB.
    #[must_use]
    pub fn budget_mb(&self) -> u64 {
        self.config.memory_budget_mb
    }

    /// The backend's name (`jail`, `kvm`).
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Figures of the pool now.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        let mut provisioned: Vec<(Key, u32, u32)> = st
            .provisioned
            .iter()
            .map(|(k, (all, busy))| (k.clone(), *all, *busy))
            .collect();
        provisioned.sort();
        PoolStats {
            budget_mb: self.config.memory_budget_mb,
            used_mb: st.used_mb,
            peak_used_mb: st.peak_used_mb,
            reclaimable_mb: st
                .idle
                .values()
                .flatten()
                .filter(|i| !i.provisioned)
                .map(|i| i.sandbox.spec().memory_mb)
                .sum(),
            busy: st.busy,
            idle: st.idle.values().map(|v| v.len() as u64).sum(),
            provisioned,
        }
    }

    /// Idle sandboxes now, with how long each has been idle.
    #[must_use]
    pub fn idle_sandboxes(&self) -> Vec<(Key, u64, Duration)> {
        let now = Instant::now();
        let st = self.lock();
        st.idle
            .iter()
            .flat_map(|(k, v)| {
                v.iter().map(move |i| {
                    (
                        k.clone(),
                        i.sandbox.id(),
                        now.saturating_duration_since(i.sandbox.last_used),
                    )
                })
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The code directories idle sandboxes (provisioned ones included) run from now. A busy
    /// sandbox's directory is not listed: its invocation fetched it, and the code cache holds it
    /// for that invocation (see `sluice_core::code::CodeCache::get`).
    #[must_use]
    pub fn idle_task_dirs(&self) -> std::collections::HashSet<std::path::PathBuf> {
        self.lock()
            .idle
            .values()
            .flatten()
            .map(|i| i.sandbox.spec().task_dir.clone())
            .collect()
    }

    /// How long a sandbox may take to boot (its init timeout).
    #[must_use]
    pub fn init_timeout(&self) -> Duration {
        self.config.init_timeout
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

    /// Boots a sandbox of `spec` (its memory already reserved), timing it.
    async fn boot(&self, spec: &Arc<FunctionSpec>) -> Result<Sandbox, BootError> {
        let started = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sb = Sandbox::boot(
            &*self.backend,
            id,
            Arc::clone(spec),
            self.config.init_timeout,
            self.logs.clone(),
        )
        .await?;
        metrics::histogram!("sluice_sandbox_boot_seconds", "backend" => self.backend.name())
            .record(started.elapsed().as_secs_f64());
        Ok(sb)
    }

    /// Runs one invocation of `spec` on a warm sandbox, or a new one.
    ///
    /// # Errors
    /// [`PoolError::NoCapacity`] when the budget is taken by busy sandboxes;
    /// [`PoolError::Boot`] when the host cannot set a sandbox up. Init errors, an init that
    /// does not finish within the init timeout, and every function failure are outcomes, not
    /// errors.
    pub async fn invoke(
        &self,
        spec: &Arc<FunctionSpec>,
        request_id: &str,
        payload: Vec<u8>,
    ) -> Result<Invocation, PoolError> {
        let request = InvokeRequest {
            function: spec.name.clone(),
            request_id: request_id.to_owned(),
            payload,
            trace_id: String::new(),
        };
        self.invoke_preferring(spec, None, request).await
    }

    /// As [`Pool::invoke`], on idle sandbox `prefer` when it is still idle (the one the worker
    /// manager claimed for this invocation), else on any idle sandbox of the function (a
    /// provisioned one first), else on a new one. `request` goes to the sandbox as the caller
    /// made it: its request id, trace id and event.
    ///
    /// # Errors
    /// As [`Pool::invoke`].
    pub async fn invoke_preferring(
        &self,
        spec: &Arc<FunctionSpec>,
        prefer: Option<u64>,
        request: InvokeRequest,
    ) -> Result<Invocation, PoolError> {
        let InvokeRequest {
            request_id,
            payload,
            trace_id,
            ..
        } = request;
        let request_id = request_id.as_str();
        let key: Key = (spec.name.clone(), spec.revision);
        let warm = self.take_idle(&key, prefer);
        let (mut sandbox, provisioned, cold_start, init_duration) = match warm {
            Some(i) => (i.sandbox, i.provisioned, false, None),
            None => {
                self.reserve(spec.memory_mb)?;
                let started = Instant::now();
                match self.boot(spec).await {
                    Ok(sb) => (sb, false, true, Some(started.elapsed())),
                    Err(e) => {
                        self.release(spec.memory_mb);
                        return match e {
                            BootError::Init {
                                error_type,
                                payload,
                            } => Ok(Invocation::boot_failed(
                                InvokeOutcome::InitError {
                                    error_type,
                                    payload,
                                },
                                request_id,
                                started.elapsed(),
                                spec.memory_mb,
                            )),
                            BootError::Exited(reason) => Ok(Invocation::boot_failed(
                                InvokeOutcome::Crashed { reason },
                                request_id,
                                started.elapsed(),
                                spec.memory_mb,
                            )),
                            // The function's own init did not finish: its failure (Lambda
                            // counts it as a function error), not the host's.
                            BootError::Timeout(after) => Ok(Invocation::boot_failed(
                                InvokeOutcome::InitError {
                                    error_type: "Sandbox.Timedout".into(),
                                    payload: serde_json::json!({
                                        "errorMessage": format!(
                                            "RequestId: {request_id} Error: Init did not finish \
                                             within {:.2} seconds",
                                            after.as_secs_f64()
                                        ),
                                        "errorType": "Sandbox.Timedout",
                                    })
                                    .to_string()
                                    .into_bytes(),
                                },
                                request_id,
                                started.elapsed(),
                                spec.memory_mb,
                            )),
                            other => Err(PoolError::Boot(other)),
                        };
                    }
                }
            }
        };
        let started = Instant::now();
        let outcome = sandbox.invoke(request_id, payload, &trace_id).await;
        let duration = started.elapsed();
        let log = lambda_log(
            request_id,
            &sandbox.take_log(),
            duration,
            init_duration,
            spec.memory_mb,
        );
        let alive = sandbox.is_alive();
        {
            let mut st = self.lock();
            if provisioned {
                let p = st.provisioned.entry(key.clone()).or_default();
                p.1 = p.1.saturating_sub(1);
                if !alive {
                    p.0 = p.0.saturating_sub(1);
                }
                if *p == (0, 0) {
                    st.provisioned.remove(&key);
                }
            }
            if alive {
                st.busy -= 1;
                let id = sandbox.id();
                st.idle.entry(key.clone()).or_default().push(IdleSandbox {
                    sandbox,
                    provisioned,
                });
                drop(st);
                self.emit(PoolEvent::Idle {
                    function: key,
                    sandbox: id,
                });
            } else {
                drop(st);
                self.release(spec.memory_mb);
                metrics::counter!("sluice_sandbox_replaced_total", "function" => spec.name.clone())
                    .increment(1);
                tokio::spawn(sandbox.destroy());
            }
        }
        Ok(Invocation {
            outcome,
            cold_start,
            init_duration,
            duration,
            log,
        })
    }

    /// Takes idle sandbox `prefer` of `key` if it is idle, else any idle one of `key`
    /// (provisioned first).
    fn take_idle(&self, key: &Key, prefer: Option<u64>) -> Option<IdleSandbox> {
        let mut st = self.lock();
        let list = st.idle.get(key)?;
        let pos = prefer
            .and_then(|id| list.iter().position(|i| i.sandbox.id() == id))
            .or_else(|| list.iter().rposition(|i| i.provisioned))
            .or_else(|| list.len().checked_sub(1))?;
        let taken = st.remove_idle(key, pos);
        st.busy += 1;
        if taken.provisioned {
            st.provisioned.entry(key.clone()).or_default().1 += 1;
        }
        drop(st);
        if prefer != Some(taken.sandbox.id()) {
            // The index may still offer it; the claimed one was already taken out of it.
            self.emit(PoolEvent::Gone {
                function: key.clone(),
                sandbox: taken.sandbox.id(),
            });
        }
        Some(taken)
    }

    /// Reserves `memory_mb` for a new sandbox of `key`, evicting idle on-demand sandboxes of
    /// any function (least recently used first) to make room.
    fn reserve(&self, memory_mb: u64) -> Result<(), PoolError> {
        let mut st = self.lock();
        let budget = self.config.memory_budget_mb;
        let mut evicted = Vec::new();
        while st.used_mb + memory_mb > budget {
            let victim = st
                .idle
                .iter()
                .flat_map(|(k, v)| {
                    v.iter()
                        .enumerate()
                        .filter(|(_, i)| !i.provisioned)
                        .map(move |(pos, i)| (k, pos, i.sandbox.last_used))
                })
                .min_by_key(|(_, _, t)| *t)
                .map(|(k, pos, _)| (k.clone(), pos));
            let Some((k, pos)) = victim else { break };
            let i = st.remove_idle(&k, pos);
            st.used_mb -= i.sandbox.spec().memory_mb;
            evicted.push((k, i.sandbox));
        }
        let fits = st.used_mb + memory_mb <= budget;
        let free_mb = budget.saturating_sub(st.used_mb);
        if fits {
            st.used_mb += memory_mb;
            st.peak_used_mb = st.peak_used_mb.max(st.used_mb);
            st.busy += 1;
        }
        drop(st);
        for (k, sb) in evicted {
            metrics::counter!("sluice_sandbox_evictions_total").increment(1);
            self.emit(PoolEvent::Gone {
                function: k,
                sandbox: sb.id(),
            });
            tokio::spawn(sb.destroy());
        }
        if fits {
            Ok(())
        } else {
            Err(PoolError::NoCapacity {
                needed_mb: memory_mb,
                free_mb,
                budget_mb: budget,
            })
        }
    }

    /// Boots one provisioned sandbox of `spec`: kept idle for its function, never reaped or
    /// evicted, until [`Pool::unprovision`].
    ///
    /// # Errors
    /// [`PoolError::NoCapacity`] when the budget has no room; [`PoolError::Boot`] when the
    /// sandbox cannot be set up or its runtime fails to initialise.
    pub async fn provision(&self, spec: &Arc<FunctionSpec>) -> Result<(), PoolError> {
        let key: Key = (spec.name.clone(), spec.revision);
        self.reserve(spec.memory_mb)?;
        let sandbox = match self.boot(spec).await {
            Ok(sb) => sb,
            Err(e) => {
                self.release(spec.memory_mb);
                return Err(PoolError::Boot(e));
            }
        };
        let id = sandbox.id();
        {
            let mut st = self.lock();
            st.busy -= 1;
            st.provisioned.entry(key.clone()).or_default().0 += 1;
            st.idle.entry(key.clone()).or_default().push(IdleSandbox {
                sandbox,
                provisioned: true,
            });
        }
        self.emit(PoolEvent::Idle {
            function: key,
            sandbox: id,
        });
        Ok(())
    }

    /// Turns up to `n` idle provisioned sandboxes of `key` into on-demand ones (reaped when idle
    /// too long); returns how many. Busy ones are left for a later call.
    pub fn unprovision(&self, key: &Key, n: u32) -> u32 {
        let mut st = self.lock();
        let mut done = 0;
        if let Some(list) = st.idle.get_mut(key) {
            for i in list.iter_mut().filter(|i| i.provisioned) {
                if done == n {
                    break;
                }
                i.provisioned = false;
                done += 1;
            }
        }
        if done > 0 {
            if let Some(p) = st.provisioned.get_mut(key) {
                p.0 = p.0.saturating_sub(done);
                if *p == (0, 0) {
                    st.provisioned.remove(key);
                }
            }
        }
        done
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
        let victims: Vec<(Key, Sandbox)> = {
            let mut st = self.lock();
            let mut out = Vec::new();
            for (key, list) in &mut st.idle {
                let (old, keep): (Vec<_>, Vec<_>) = list.drain(..).partition(|i| {
                    !i.provisioned
                        && now.duration_since(i.sandbox.last_used) >= self.config.idle_timeout
                });
                *list = keep;
                out.extend(old.into_iter().map(|i| (key.clone(), i.sandbox)));
            }
            st.idle.retain(|_, v| !v.is_empty());
            for (_, sb) in &out {
                st.used_mb = st.used_mb.saturating_sub(sb.spec().memory_mb);
            }
            out
        };
        let n = victims.len();
        for (key, sb) in victims {
            self.emit(PoolEvent::Gone {
                function: key,
                sandbox: sb.id(),
            });
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

    /// Destroys every idle sandbox, provisioned ones included.
    pub async fn shutdown(&self) {
        let all: Vec<(Key, Sandbox)> = {
            let mut st = self.lock();
            let all: Vec<(Key, Sandbox)> = st
                .idle
                .drain()
                .flat_map(|(k, v)| v.into_iter().map(move |i| (k.clone(), i.sandbox)))
                .collect();
            st.provisioned.clear();
            for (_, sb) in &all {
                st.used_mb = st.used_mb.saturating_sub(sb.spec().memory_mb);
            }
            all
        };
        for (key, sb) in all {
            self.emit(PoolEvent::Gone {
                function: key,
                sandbox: sb.id(),
            });
            sb.destroy().await;
        }
    }
}
