//! The invoke contract between the stages that need a function run (the front end, the async
//! and stream pollers) and the part that runs it (a local worker pool now; a remote worker chosen
//! by the worker manager later). Stages depend on this trait, never on `sluice-workers`.

use std::time::Duration;

use async_trait::async_trait;

/// One invocation to run.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// Function name.
    pub function: String,
    /// Request id given to the runtime.
    pub request_id: String,
    /// The event.
    pub payload: Vec<u8>,
    /// The X-Ray trace header (`Root=1-…;Parent=…;Sampled=…`), passed to the function as
    /// `Lambda-Runtime-Trace-Id` (runtimes export it as `_X_AMZN_TRACE_ID`); empty when none.
    pub trace_id: String,
}

/// A new X-Ray trace header, as Lambda makes one for an invocation that came without one:
/// `Root=1-<8 hex digits of Unix seconds>-<24 random hex digits>;Parent=<16 random hex
/// digits>;Sampled=0`.
#[must_use]
pub fn new_trace_id() -> String {
    let secs = crate::time::unix_ms() / 1000;
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &a[..24],
        &b[..16]
    )
}

/// What the function returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionResult {
    /// A response payload.
    Ok(Vec<u8>),
    /// A function error (handled, unhandled, crash, timeout, out of memory, init error), with
    /// Lambda's error type and body (`{"errorMessage", "errorType", …}`).
    Err {
        /// E.g. `Runtime.ExitError`, `Sandbox.Timedout`, or the function's own type.
        error_type: String,
        /// The error body.
        payload: Vec<u8>,
    },
}

/// A finished invocation.
#[derive(Debug, Clone)]
pub struct Invoked {
    /// What the function returned.
    pub result: FunctionResult,
    /// Time spent in the function.
    pub duration: Duration,
    /// Whether a sandbox was booted for it.
    pub cold_start: bool,
    /// Time to boot the sandbox, on a cold start (Lambda's Init Duration).
    pub init_duration: Option<Duration>,
    /// The invocation's log as Lambda writes it (`START`, the function's output, `END`,
    /// `REPORT`), with at most the last 4 KB of the output; empty where none was captured.
    pub log: Vec<u8>,
}

/// Why an invocation did not run. None of these is the function's fault.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No such function.
    #[error("Function not found: {0}")]
    NotFound(String),
    /// Over a concurrency limit (HTTP 429). `reason` is Lambda's
    /// (`ReservedFunctionConcurrentInvocationLimitExceeded` or `ConcurrentInvocationLimitExceeded`).
    #[error("Rate Exceeded: {reason} (limit {limit})")]
    Throttled {
        /// Lambda's reason.
        reason: String,
        /// The limit that was reached.
        limit: u32,
    },
    /// No worker capacity right now (placement found no room).
    #[error("no capacity to run the function: {0}")]
    NoCapacity(String),
    /// The function's configuration cannot run (e.g. its code is missing on this worker).
    #[error("the function cannot run: {0}")]
    Config(String),
    /// Sluice itself failed (Redis, sandbox set-up); retrying may help.
    #[error("service error: {0}")]
    Service(String),
}

impl InvokeError {
    /// Whether a later retry can succeed (throttles, capacity and service errors).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            InvokeError::Throttled { .. } | InvokeError::NoCapacity(_) | InvokeError::Service(_)
        )
    }

    /// The error body a caller records when it counts this error as a function error (one no
    /// retry can fix, e.g. [`InvokeError::Config`]): Lambda's `{"errorType", "errorMessage"}`
    /// with type `Runtime.ConfigurationError`.
    #[must_use]
    pub fn function_error_body(&self) -> Vec<u8> {
        serde_json::json!({
            "errorType": "Runtime.ConfigurationError",
            "errorMessage": self.to_string(),
        })
        .to_string()
        .into_bytes()
    }
}

/// Runs functions.
#[async_trait]
pub trait Invoker: Send + Sync {
    /// Runs one invocation synchronously (takes a concurrency slot, finds or boots a sandbox,
    /// waits for the result).
    ///
    /// # Errors
    /// [`InvokeError`] when the invocation could not run; function failures are
    /// [`FunctionResult::Err`], not errors.
    async fn invoke(&self, request: InvokeRequest) -> Result<Invoked, InvokeError>;

    /// How many provisioned sandboxes of `function` (its current configuration) are booted
    /// across the fleet now; `None` when this invoker cannot see the fleet.
    async fn provisioned_ready(&self, _function: &str) -> Option<u32> {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_trace_id_has_xrays_shape() {
        let t = super::new_trace_id();
        let parts: Vec<&str> = t.split(';').collect();
        assert_eq!(parts.len(), 3, "{t}");
        let root: Vec<&str> = parts[0].trim_start_matches("Root=").split('-').collect();
        assert_eq!(root[0], "1");
        assert_eq!(root[1].len(), 8);
        assert_eq!(root[2].len(), 24);
        assert!(
            parts[1].starts_with("Parent=") && parts[1].len() == 7 + 16,
            "{t}"
        );
        assert_eq!(parts[2], "Sampled=0");
    }
}
