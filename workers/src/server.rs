//! The worker's HTTP/1.1 API, through which other nodes run invocations on this worker (its
//! client is `sluice_fleet::client`).
//!
//! `POST /sluice/worker/v1/invoke` carries the event as the body (at most
//! [`MAX_REMOTE_BODY_BYTES`]) and the invocation in headers (`x-sluice-function`,
//! `x-sluice-revision`, `x-sluice-sandbox`, `x-sluice-request-id`, `x-sluice-trace-id`). A 200
//! carries the function's payload with `x-sluice-result: ok|error`, `x-sluice-error-type`,
//! `x-sluice-duration-us`, `x-sluice-cold-start`; any other status carries
//! `{"kind","message"}`: `not-found` (404), `no-capacity` (429), `config` (400), `service` (503).

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest};

use crate::service::{WorkerRequest, WorkerService};

/// Largest request or response body: Lambda's 6 MiB payload limit plus room for the batch
/// envelope.
pub const MAX_REMOTE_BODY_BYTES: usize = 6 * 1024 * 1024 + 256 * 1024;

/// The invoke route.
pub const INVOKE_PATH: &str = "/sluice/worker/v1/invoke";

/// The header carrying the shared worker token (`--worker-token`).
pub const TOKEN_HEADER: &str = "x-sluice-worker-token";

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
        request: InvokeRequest {
            function: function.to_owned(),
            request_id: request_id.to_owned(),
            trace_id: header(&headers, "x-sluice-trace-id")
                .unwrap_or_default()
                .to_owned(),
            payload: body.to_vec(),
        },
        revision,
        sandbox: header(&headers, "x-sluice-sandbox").and_then(|s| s.parse().ok()),
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
            if !r.log.is_empty() {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&r.log);
                if let Ok(v) = HeaderValue::from_str(&b64) {
                    h.insert("x-sluice-log", v);
                }
            }
            if let Some(init) = r.init_duration {
                h.insert(
                    "x-sluice-init-duration-us",
                    HeaderValue::from(u64::try_from(init.as_micros()).unwrap_or(u64::MAX)),
                );
            }
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
