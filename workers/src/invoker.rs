//! [`LocalInvoker`]: runs invocations on this node's pool, under the cluster-wide concurrency
//! limits kept in Redis.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked, Invoker};
use sluice_core::model::FunctionConfig;
use sluice_core::store::{ConfigStore, Versioned};
use sluice_leasing::{unreserved_limit, ConcurrencyCounter, CountError, FunctionLimit};

use crate::pool::{Pool, PoolError};
use crate::sandbox::{FunctionSpec, InvokeOutcome};

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

/// Runs invocations on the local pool.
#[derive(Clone)]
pub struct LocalInvoker {
    store: ConfigStore,
    counter: ConcurrencyCounter,
    pool: Pool,
    account: Arc<AccountIdentity>,
    /// Kafka and the local cache directory, for code kept in the code topic.
    code: Option<(sluice_core::kafka::KafkaSettings, std::path::PathBuf)>,
}

impl LocalInvoker {
    /// An invoker over `pool`, counting concurrency with `counter`.
    #[must_use]
    pub fn new(
        store: ConfigStore,
        counter: ConcurrencyCounter,
        pool: Pool,
        account: AccountIdentity,
    ) -> Self {
        Self {
            store,
            counter,
            pool,
            account: Arc::new(account),
            code: None,
        }
    }

    /// Lets the invoker fetch code kept in Kafka (`Code.ZipFile`) into `cache`.
    #[must_use]
    pub fn with_code_store(
        mut self,
        kafka: sluice_core::kafka::KafkaSettings,
        cache: std::path::PathBuf,
    ) -> Self {
        self.code = Some((kafka, cache));
        self
    }

    /// The pool it runs on.
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn spec(&self, f: &Versioned<FunctionConfig>) -> Result<FunctionSpec, InvokeError> {
        let c = &f.object;
        let task_dir: std::path::PathBuf = match (&c.code.path, &c.code.stored, &self.code) {
            (Some(path), _, _) => path.into(),
            (None, Some(stored), Some((kafka, cache))) => {
                let (kafka, cache, stored) = (kafka.clone(), cache.clone(), stored.clone());
                tokio::task::spawn_blocking(move || {
                    sluice_core::code::fetch_and_unpack(&kafka, &stored, &cache)
                })
                .await
                .map_err(|e| InvokeError::Service(e.to_string()))?
                .map_err(|e| InvokeError::Service(e.to_string()))?
            }
            _ => {
                return Err(InvokeError::Config(format!(
                    "function {} has no code this node can reach",
                    c.function_name
                )))
            }
        };
        let path = &task_dir;
        Ok(FunctionSpec {
            name: c.function_name.clone(),
            revision: f.revision,
            task_dir: path.clone(),
            memory_mb: u64::try_from(c.memory_size).unwrap_or(128),
            timeout: Duration::from_secs(u64::try_from(c.timeout).unwrap_or(3)),
            environment: c
                .environment
                .as_ref()
                .map(|e| e.variables.clone().into_iter().collect())
                .unwrap_or_default(),
            handler: c.handler.clone(),
            arn: format!(
                "arn:aws:lambda:{}:{}:function:{}",
                self.account.region, self.account.account_id, c.function_name
            ),
            region: self.account.region.clone(),
        })
    }

    fn limit(&self, f: &FunctionConfig) -> FunctionLimit {
        match f.reserved_concurrent_executions {
            Some(r) => FunctionLimit::Reserved(u32::try_from(r).unwrap_or(0)),
            None => {
                let reservations = self
                    .store
                    .functions()
                    .into_iter()
                    .filter_map(|f| f.object.reserved_concurrent_executions)
                    .map(|r| u32::try_from(r).unwrap_or(0));
                FunctionLimit::Unreserved {
                    unreserved_limit: unreserved_limit(
                        self.account.concurrency_limit,
                        reservations,
                    ),
                }
            }
        }
    }
}

#[async_trait]
impl Invoker for LocalInvoker {
    async fn invoke(&self, req: InvokeRequest) -> Result<Invoked, InvokeError> {
        let Some(function) = self.store.function(&req.function) else {
            return Err(InvokeError::NotFound(format!(
                "arn:aws:lambda:{}:{}:function:{}",
                self.account.region, self.account.account_id, req.function
            )));
        };
        let spec = Arc::new(self.spec(&function).await?);
        let mut slot = match self
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
        // Keep the slot alive for as long as the function runs (it expires if this node dies).
        let renew_every = self.counter.slot_ttl() / 3;
        let run = self.pool.invoke(&spec, &req.request_id, req.payload);
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
        if let Err(e) = slot.release().await {
            tracing::warn!(function = %req.function, error = %e, "could not release a concurrency slot; it expires on its own");
        }
        let inv = match result {
            Ok(inv) => inv,
            Err(e @ PoolError::NoCapacity { .. }) => {
                return Err(InvokeError::NoCapacity(e.to_string()))
            }
            Err(e) => return Err(InvokeError::Service(e.to_string())),
        };
        metrics::counter!("sluice_invocations_total", &labels).increment(1);
        metrics::histogram!("sluice_duration_seconds", &labels).record(inv.duration.as_secs_f64());
        if inv.cold_start {
            metrics::counter!("sluice_cold_starts_total", &labels).increment(1);
        }
        let result = match &inv.outcome {
            InvokeOutcome::Response(p) => FunctionResult::Ok(p.clone()),
            other => {
                metrics::counter!("sluice_errors_total", &labels).increment(1);
                let (error_type, payload) = other.error(&req.request_id).unwrap_or_default();
                FunctionResult::Err {
                    error_type,
                    payload,
                }
            }
        };
        Ok(Invoked {
            result,
            duration: inv.duration,
            cold_start: inv.cold_start,
        })
    }
}
