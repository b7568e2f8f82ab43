//! Remote invoke between nodes: the worker's HTTP/1.1 API and its client.
//!
//! `POST /sluice/worker/v1/invoke` carries the event as the body (at most
//! [`MAX_REMOTE_BODY_BYTES`]) and the invocation in headers (`x-sluice-function`,
//! `x-sluice-revision`, `x-sluice-sandbox`, `x-sluice-request-id`, `x-sluice-trace-id`). A 200
//! carries the function's payload with `x-sluice-result: ok|error`, `x-sluice-error-type`,
//! `x-sluice-duration-us`, `x-sluice-cold-start`; any other status carries
//! `{"kind","message"}`: `not-found` (404), `no-capacity` (429), `config` (400), `service` (503).
//!
//! The client keeps connections alive, gives up connecting after a second, and bounds the wait
//! by the function's timeout plus the init timeout. A connection that breaks before the answer
//! ([`RemoteError::Lost`]) means the worker died mid-invoke: the caller retries elsewhere.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sluice_core::invoke::{FunctionResult, InvokeError};

use crate::service::{WorkerRequest, WorkerResult, WorkerService};

/// Largest request or response body: Lambda's 6 MiB payload limit plus room for the batch
/// envelope.
pub const MAX_REMOTE_BODY_BYTES: usize = 6 * 1024 * 1024 + 256 * 1024;

const INVOKE_PATH: &str = "/sluice/worker/v1/invoke";

const TOKEN_HEADER: &str = "x-sluice-worker-token";

/// The worker API's routes. With a `token`, every invoke must carry it in
/// `x-sluice-worker-token` (else 401): only nodes given the same `--worker-token` may run
/// functions here.
pub fn router(service: WorkerService, token: Option<String>) -> Router {
    Router::new()
        .route(
            INVOKE_PATH,
            post(invoke).layer(DefaultBodyLimit::max(MAX_REMOTE_BODY_BYTES)),
        )
        .route_layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let token = token.clone();
                async move {
                    let given = header(req.headers(), TOKEN_HEADER);
                    match &token {
                        Some(t) if given.is_none_or(|g| !constant_time_eq(g, t)) => refusal(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            format!("a valid {TOKEN_HEADER} is required (--worker-token)"),
                        ),
                        _ => next.run(req).await,
                    }
                }
            },
        ))
        .route("/sluice/worker/v1/health", get(|| async { "ok\n" }))
        .with_state(service)
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn refusal(status: StatusCode, kind: &str, message: String) -> Response {
    let body = serde_json::json!({ "kind": kind, "message": message }).to_string();
    (status, [("content-type", "application/json")], body).into_response()
}

async fn invoke(State(service): State<WorkerService>, headers: HeaderMap, body: Bytes) -> Response {
    let (Some(function), Some(revision), Some(request_id)) = (
        header(&headers, "x-sluice-function"),
        header(&headers, "x-sluice-revision").and_then(|r| r.parse::<u64>().ok()),
        header(&headers, "x-sluice-request-id"),
    ) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "config",
            "x-sluice-function, a numeric x-sluice-revision and x-sluice-request-id are required"
                .into(),
        );
    };
    let req = WorkerRequest {
        function: function.to_owned(),
        revision,
        sandbox: header(&headers, "x-sluice-sandbox").and_then(|s| s.parse().ok()),
        request_id: request_id.to_owned(),
        trace_id: header(&headers, "x-sluice-trace-id")
            .unwrap_or_default()
            .to_owned(),
        payload: body.to_vec(),
    };
    match service.invoke(req).await {
        Ok(r) => {
            let (result, error_type, payload) = match r.result {
                FunctionResult::Ok(p) => ("ok", String::new(), p),
                FunctionResult::Err {
                    error_type,
                    payload,
                } => ("error", error_type, payload),
            };
            let mut h = HeaderMap::new();
            h.insert("x-sluice-result", HeaderValue::from_static(result));
            if let Ok(v) = HeaderValue::from_str(&error_type) {
                h.insert("x-sluice-error-type", v);
            }
            h.insert(
                "x-sluice-duration-us",
                HeaderValue::from(u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX)),
            );
            h.insert(
                "x-sluice-cold-start",
                HeaderValue::from_static(if r.cold_start { "true" } else { "false" }),
            );
            (StatusCode::OK, h, payload).into_response()
        }
        Err(e) => {
            let (status, kind) = match &e {
                InvokeError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
                InvokeError::NoCapacity(_) | InvokeError::Throttled { .. } => {
                    (StatusCode::TOO_MANY_REQUESTS, "no-capacity")
                }
                InvokeError::Config(_) => (StatusCode::BAD_REQUEST, "config"),
                InvokeError::Service(_) => (StatusCode::SERVICE_UNAVAILABLE, "service"),
            };
            let message = match e {
                InvokeError::NotFound(m)
                | InvokeError::NoCapacity(m)
                | InvokeError::Config(m)
                | InvokeError::Service(m) => m,
                other @ InvokeError::Throttled { .. } => other.to_string(),
            };
            refusal(status, kind, message)
        }
    }
}

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
    ) -> Result<WorkerResult, RemoteError> {
        let mut builder = self
            .http
            .post(format!("http://{addr}{INVOKE_PATH}"))
            .timeout(deadline)
            .header("x-sluice-function", &req.function)
            .header("x-sluice-revision", req.revision)
            .header("x-sluice-request-id", &req.request_id)
            .header("x-sluice-trace-id", &req.trace_id)
            .body(req.payload.clone());
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
        Ok(WorkerResult {
            result,
            duration: Duration::from_micros(
                h("x-sluice-duration-us")
                    .and_then(|d| d.parse().ok())
                    .unwrap_or_default(),
            ),
            cold_start: h("x-sluice-cold-start") == Some("true"),
            init_duration: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq("s3cret", "s3cret"));
        assert!(!constant_time_eq("s3cret", "s3creT"));
        assert!(!constant_time_eq("s3cret", "s3cret!"));
        assert!(!constant_time_eq("", "x"));
    }
}
