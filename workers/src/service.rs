//! [`WorkerService`]: the worker role. It runs invocations that the worker manager or placement
//! sent to this node on its [`Pool`], whether they came over the network
//! (`crate::server`) or from the same process, and boots provisioned sandboxes.
//! It does not count concurrency: the caller holds the slot.
//!
//! What the function's owner caused is a function error ([`FunctionResult::Err`], counted as an
//! attempt by every caller, as Lambda counts it): an init that fails, exits or does not finish
//! within the init timeout (`Sandbox.Timedout`), a `Code.Path` with no `bootstrap`
//! (`Runtime.InvalidEntrypoint`), code in Kafka that cannot be fetched
//! (`Runtime.CodeUnavailable`). Only what the host caused is an [`InvokeError`]: no capacity
//! (retryable, not an attempt), a sandbox that cannot be set up, a view that lags.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::code::{CodeCache, CodePathRoots};
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked};
use sluice_core::kafka::KafkaSettings;
use sluice_core::model::FunctionConfig;
use sluice_core::store::{ConfigStore, Versioned};

use crate::pool::{Pool, PoolError};
use crate::sandbox::FunctionSpec;

/// How long a worker waits for its configuration view to reach the revision a caller saw.
const VIEW_CATCH_UP: Duration = Duration::from_secs(3);

/// The code cache's size bound when none is given (`--code-cache-max-mb`).
pub const DEFAULT_CODE_CACHE_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// Why a function's sandbox cannot be described.
enum SpecError {
    /// The host's problem.
    Invoke(InvokeError),
    /// The function's: reported as a function error of this type.
    Function {
        error_type: &'static str,
        message: String,
    },
}

impl SpecError {
    fn into_result(self, request_id: &str) -> Result<Invoked, InvokeError> {
        match self {
            SpecError::Invoke(e) => Err(e),
            SpecError::Function {
                error_type,
                message,
            } => Ok(Invoked {
                result: FunctionResult::Err {
                    error_type: error_type.to_owned(),
                    payload: serde_json::json!({
                        "errorMessage": format!("RequestId: {request_id} Error: {message}"),
                        "errorType": error_type,
                    })
                    .to_string()
                    .into_bytes(),
                },
                duration: Duration::ZERO,
                cold_start: true,
                init_duration: None,
                log: Vec::new(),
            }),
        }
    }
}

/// Account identity used in function ARNs.
#[derive(Debug, Clone)]
pub struct AccountIdentity {
    /// Region, e.g. `us-east-1`.
    pub region: String,
    /// Account id.
    pub account_id: String,
    /// Account concurrency limit.
    pub concurrency_limit: u32,
}

impl AccountIdentity {
    /// The ARN of function `name`.
    #[must_use]
    pub fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account_id
        )
    }
}

/// One invocation for this worker: the caller's request as it came in (function, request id,
/// trace id, event), with where the fleet wants it run.
#[derive(Debug, Clone)]
pub struct WorkerRequest {
    /// The invocation, unchanged from the front end or poller that made it.
    pub request: InvokeRequest,
    /// The configuration revision the caller saw (the worker waits until its view has it).
    pub revision: u64,
    /// The idle sandbox the worker manager claimed for it, if any.
    pub sandbox: Option<u64>,
}

/// The worker role of a node.
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    pool: Pool,
    store: ConfigStore,
    account: AccountIdentity,
    /// Kafka and the local cache, for code kept in the code topic.
    code: Option<(KafkaSettings, CodeCache)>,
    /// Where a `Code.Path` may point on this worker. Checked here as well as at the front end:
    /// a record written by an older or differently configured node is not trusted.
    code_path_roots: CodePathRoots,
    /// Where each invocation's log goes (the logs topic), if anywhere.
    logs: Option<sluice_core::logs::LogShipper>,
}

impl WorkerService {
    /// Worker `id` running on `pool`; with `code` (Kafka and a cache directory) it can fetch
    /// code kept in Kafka (`Code.ZipFile`).
    #[must_use]
    pub fn new(
        id: String,
        pool: Pool,
        store: ConfigStore,
        account: AccountIdentity,
        code: Option<(KafkaSettings, PathBuf)>,
    ) -> Self {
        let code = code.map(|(k, dir)| (k, CodeCache::new(dir, DEFAULT_CODE_CACHE_BYTES)));
        Self::with_code_cache(id, pool, store, account, code, CodePathRoots::default())
    }

    /// As [`WorkerService::new`], with a bounded code cache.
    #[must_use]
    pub fn with_code_cache(
        id: String,
        pool: Pool,
        store: ConfigStore,
        account: AccountIdentity,
        code: Option<(KafkaSettings, CodeCache)>,
        code_path_roots: CodePathRoots,
    ) -> Self {
        // Bundles that idle sandboxes run from stay in the cache whatever its bound.
        let code = code.map(|(kafka, cache)| {
            let (p, dir) = (pool.clone(), cache.dir.clone());
            let in_use: sluice_core::code::InUse = Arc::new(move || {
                p.idle_task_dirs()
                    .into_iter()
                    .filter(|d| d.parent() == Some(dir.as_path()))
                    .filter_map(|d| Some(d.file_name()?.to_str()?.to_owned()))
                    .collect()
            });
            (kafka, cache.with_in_use(in_use))
        });
        Self {
            inner: Arc::new(Inner {
                id,
                pool,
                store,
                account,
                code,
                code_path_roots,
                logs: None,
            }),
        }
    }

    /// Writes every invocation's log to `logs` (call before the service is shared).
    ///
    /// # Panics
    /// When the service was cloned already.
    #[must_use]
    pub fn with_logs(mut self, logs: sluice_core::logs::LogShipper) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_logs is called before the service is shared")
            .logs = Some(logs);
        self
    }

    /// This worker's node id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Its pool.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Its configuration view.
    #[must_use]
    pub fn store(&self) -> &ConfigStore {
        &self.inner.store
    }

    /// The function `name` at `min_revision` or later, waiting briefly for this node's view.
    async fn function(
        &self,
        name: &str,
        min_revision: u64,
    ) -> Result<Versioned<FunctionConfig>, InvokeError> {
        let store = &self.inner.store;
        let deadline = Instant::now() + VIEW_CATCH_UP;
        let mut changes = store.changes();
        loop {
            let found = store.function(name);
            if let Some(f) = &found {
                if f.revision >= min_revision {
                    return Ok(found.expect("just matched"));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changes.changed()).await.is_err() {
                return Err(match found {
                    None if min_revision == 0 => {
                        InvokeError::NotFound(self.inner.account.function_arn(name))
                    }
                    _ => InvokeError::Service(format!(
                        "worker {} has not seen revision {min_revision} of function {name} \
                         within {VIEW_CATCH_UP:?}",
                        self.inner.id
                    )),
                });
            }
        }
    }

    /// What a sandbox of `f` needs: its code on this node, limits and environment.
    async fn spec(&self, f: &Versioned<FunctionConfig>) -> Result<FunctionSpec, SpecError> {
        let c = &f.object;
        let task_dir: PathBuf = match (&c.code.path, &c.code.stored, &self.inner.code) {
            (Some(path), _, _) => {
                let dir = PathBuf::from(path);
                if !dir.join("bootstrap").is_file() {
                    return Err(SpecError::Function {
                        error_type: "Runtime.InvalidEntrypoint",
                        message: format!(
                            "Couldn't find valid bootstrap(s): [{}] (Code.Path of function {} on worker {})",
                            dir.join("bootstrap").display(),
                            c.function_name,
                            self.inner.id
                        ),
                    });
                }
                self.inner
                    .code_path_roots
                    .check(path)
                    .map_err(|e| SpecError::Function {
                        error_type: "Runtime.CodeUnavailable",
                        message: format!("worker {} will not run this code: {e}", self.inner.id),
                    })?
            }
            (None, Some(stored), Some((kafka, cache))) => {
                let (kafka, cache, stored) = (kafka.clone(), cache.clone(), stored.clone());
                // Held for this invocation's boot and run; an idle sandbox after it is known to
                // the cache through the pool.
                let hold = self.inner.pool.init_timeout()
                    + Duration::from_secs(u64::try_from(c.timeout).unwrap_or(3))
                    + Duration::from_secs(5);
                tokio::task::spawn_blocking(move || cache.get(&kafka, &stored, hold))
                    .await
                    .map_err(|e| SpecError::Invoke(InvokeError::Service(e.to_string())))?
                    .map_err(|e| SpecError::Function {
                        error_type: "Runtime.CodeUnavailable",
                        message: format!("cannot fetch the function's code: {e}"),
                    })?
            }
            (None, Some(_), None) => {
                return Err(SpecError::Invoke(InvokeError::Config(format!(
                    "worker {} has no code store to fetch function {}'s code from",
                    self.inner.id, c.function_name
                ))))
            }
            (None, None, _) => {
                return Err(SpecError::Function {
                    error_type: "Runtime.InvalidEntrypoint",
                    message: format!("function {} has no code", c.function_name),
                })
            }
        };
        Ok(FunctionSpec {
            name: c.function_name.clone(),
            revision: f.revision,
            task_dir,
            memory_mb: u64::try_from(c.memory_size).unwrap_or(128),
            timeout: Duration::from_secs(u64::try_from(c.timeout).unwrap_or(3)),
            environment: c
                .environment
                .as_ref()
                .map(|e| e.variables.clone().into_iter().collect())
                .unwrap_or_default(),
            handler: c.handler.clone(),
            arn: self.inner.account.function_arn(&c.function_name),
            region: self.inner.account.region.clone(),
            ephemeral_storage_mb: u64::try_from(c.ephemeral_storage_mb()).unwrap_or(512),
        })
    }

    /// Runs `req` on the claimed sandbox, another idle one, or a new one.
    ///
    /// # Errors
    /// [`InvokeError::NoCapacity`] when this node's memory budget has no room;
    /// [`InvokeError::NotFound`], [`InvokeError::Config`], [`InvokeError::Service`] otherwise.
    /// Function failures are [`FunctionResult::Err`].
    pub async fn invoke(&self, req: WorkerRequest) -> Result<Invoked, InvokeError> {
        let WorkerRequest {
            request,
            revision,
            sandbox,
        } = req;
        let function = request.function.clone();
        let request_id = request.request_id.clone();
        let f = self.function(&function, revision).await?;
        let spec = match self.spec(&f).await {
            Ok(spec) => Arc::new(spec),
            Err(e) => {
                metrics::counter!("sluice_worker_invocations_total", "function" => function)
                    .increment(1);
                return e.into_result(&request_id);
            }
        };
        // On its own task: a caller that goes away (a dropped connection) must not abandon a
        // sandbox in the middle of an invocation. The request moves on to the sandbox as is.
        let pool = self.inner.pool.clone();
        let inv =
            tokio::spawn(async move { pool.invoke_preferring(&spec, sandbox, request).await })
                .await
                .map_err(|e| InvokeError::Service(format!("invocation task failed: {e}")))?
                .map_err(invoke_error)?;
        metrics::counter!("sluice_worker_invocations_total", "function" => function.clone())
            .increment(1);
        if let Some(logs) = &self.inner.logs {
            logs.ship(&function, &request_id, &inv.log);
        }
        Ok(inv.into_invoked(&request_id))
    }

    /// Boots one provisioned sandbox of function `name` (its current configuration).
    ///
    /// # Errors
    /// As [`WorkerService::invoke`]; an init error is a [`InvokeError::Service`] here.
    pub async fn provision(&self, name: &str) -> Result<(), InvokeError> {
        let f = self.function(name, 0).await?;
        let spec = match self.spec(&f).await {
            Ok(spec) => Arc::new(spec),
            Err(SpecError::Invoke(e)) => return Err(e),
            Err(SpecError::Function { message, .. }) => return Err(InvokeError::Service(message)),
        };
        self.inner.pool.provision(&spec).await.map_err(invoke_error)
    }
}

/// A pool's refusal as the callers see it: no room is a capacity throttle, a sandbox the host
/// could not set up a service error (both retryable, neither an attempt).
fn invoke_error(e: PoolError) -> InvokeError {
    match e {
        e @ PoolError::NoCapacity { .. } => InvokeError::NoCapacity(e.to_string()),
        e @ PoolError::Boot(_) => InvokeError::Service(e.to_string()),
    }
}
