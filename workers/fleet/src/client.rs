//! The client of the worker API (`sluice_workers::server`): how a node runs an invocation on
//! another node's worker.
//!
//! The client keeps connections alive, gives up connecting after a second, and bounds the wait
//! by the function's timeout plus the init timeout. A connection that breaks before the answer
//! ([`RemoteError::Lost`]) means the worker died mid-invoke: the caller retries elsewhere.

use std::time::Duration;

use axum::http::StatusCode;
use sluice_core::invoke::{FunctionResult, InvokeError, Invoked};
use sluice_workers::server::{INVOKE_PATH, MAX_REMOTE_BODY_BYTES, TOKEN_HEADER};
use sluice_workers::service::WorkerRequest;

/// Why a remote invoke did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No connection could be made: the worker is down or unreachable. Nothing ran.
    #[error("worker {worker} at {addr} is unreachable: {source}")]
    Unreachable {
        /// Worker id.
        worker: String,
        /// Its address.
        addr: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The connection broke before the answer: the worker died mid-invoke.
    #[error("worker {worker} at {addr} was lost mid-invoke: {source}")]
    Lost {
        /// Worker id.
        worker: String,
        /// Its address.
        addr: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the deadline.
    #[error("worker {worker} did not answer within {after:?}")]
    Timeout {
        /// Worker id.
        worker: String,
        /// The deadline.
        after: Duration,
    },
    /// The worker answered with something that is not this protocol.
    #[error("worker {worker} sent a bad response: {detail}")]
    BadResponse {
        /// Worker id.
        worker: String,
        /// What was wrong.
        detail: String,
    },
    /// The worker refused or could not run it.
    #[error(transparent)]
    Refused(InvokeError),
}

impl RemoteError {
    /// Whether another worker should get the invocation (the worker is gone).
    #[must_use]
    pub fn worker_gone(&self) -> bool {
        matches!(
            self,
            RemoteError::Unreachable { .. } | RemoteError::Lost { .. }
        )
    }
}

/// The client side.
#[derive(Clone)]
pub struct RemoteClient {
    http: reqwest::Client,
    token: Option<String>,
}

impl RemoteClient {
    /// A client with keep-alive connections that sends `token` to the workers.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS or resolver set-up).
    pub fn new(token: Option<String>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, token })
    }

    /// Sends `req` to worker `worker` at `addr` and waits up to `deadline` for the answer.
    ///
    /// # Errors
    /// [`RemoteError`].
    pub async fn invoke(
        &self,
        worker: &str,
        addr: &str,
        req: &WorkerRequest,
        deadline: Duration,
    ) -> Result<Invoked, RemoteError> {
        let mut builder = self
            .http
            .post(format!("http://{addr}{INVOKE_PATH}"))
            .timeout(deadline)
            .header("x-sluice-function", &req.request.function)
            .header("x-sluice-revision", req.revision)
            .header("x-sluice-request-id", &req.request.request_id)
            .header("x-sluice-trace-id", &req.request.trace_id)
            .body(req.request.payload.clone());
        if let Some(sb) = req.sandbox {
            builder = builder.header("x-sluice-sandbox", sb);
        }
        if let Some(t) = &self.token {
            builder = builder.header(TOKEN_HEADER, t);
        }
        let classify = |source: reqwest::Error| {
            if source.is_timeout() {
                RemoteError::Timeout {
                    worker: worker.to_owned(),
                    after: deadline,
                }
            } else if source.is_connect() {
                RemoteError::Unreachable {
                    worker: worker.to_owned(),
                    addr: addr.to_owned(),
                    source,
                }
            } else {
                RemoteError::Lost {
                    worker: worker.to_owned(),
                    addr: addr.to_owned(),
                    source,
                }
            }
        };
        let mut resp = builder.send().await.map_err(classify)?;
        let bad = |detail: String| RemoteError::BadResponse {
            worker: worker.to_owned(),
            detail,
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_REMOTE_BODY_BYTES as u64)
        {
            return Err(bad(format!(
                "a {} byte body is over the {MAX_REMOTE_BODY_BYTES} byte limit",
                resp.content_length().unwrap_or_default()
            )));
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_REMOTE_BODY_BYTES {
                return Err(bad(format!(
                    "the body is over the {MAX_REMOTE_BODY_BYTES} byte limit"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status != StatusCode::OK {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| bad(format!("status {status} without a JSON body")))?;
            let message = v["message"].as_str().unwrap_or_default().to_owned();
            return Err(RemoteError::Refused(match v["kind"].as_str() {
                Some("not-found") => InvokeError::NotFound(message),
                Some("no-capacity") => {
                    InvokeError::NoCapacity(format!("worker {worker}: {message}"))
                }
                Some("config") => InvokeError::Config(message),
                Some("unauthorized") => InvokeError::Service(format!(
                    "worker {worker} refused this node's worker token: {message}"
                )),
                _ => InvokeError::Service(format!("worker {worker}: {message}")),
            }));
        }
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let result = match h("x-sluice-result") {
            Some("ok") => FunctionResult::Ok(body),
            Some("error") => FunctionResult::Err {
                error_type: h("x-sluice-error-type").unwrap_or_default().to_owned(),
                payload: body,
            },
            other => return Err(bad(format!("x-sluice-result is {other:?}"))),
        };
        let micros = |name: &str| {
            h(name)
                .and_then(|d| d.parse().ok())
                .map(Duration::from_micros)
        };
        Ok(Invoked {
            result,
            duration: micros("x-sluice-duration-us").unwrap_or_default(),
            cold_start: h("x-sluice-cold-start") == Some("true"),
            init_duration: micros("x-sluice-init-duration-us"),
            log: h("x-sluice-log")
                .and_then(|b| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                })
                .unwrap_or_default(),
        })
    }
}
