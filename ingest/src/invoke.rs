//! Invoke: `POST /2015-03-31/functions/{name}/invocations` with `X-Amz-Invocation-Type`
//! `RequestResponse` (default), `Event` or `DryRun`.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_core::events::{AsyncEvent, MAX_ASYNC_PAYLOAD_BYTES};
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest};

use crate::{ApiError, ApiState};

/// Lambda's payload limit for synchronous invocations.
pub const MAX_SYNC_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

fn with_request_id(mut resp: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-amzn-RequestId", v);
    }
    resp
}

fn check_json(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidRequestContentException",
            message: format!("Could not parse request body into json: {e}"),
        })
}

pub(crate) async fn invoke(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let result = invoke_inner(&state, &name, &headers, body, &request_id).await;
    let resp = match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    with_request_id(resp, &request_id)
}

async fn invoke_inner(
    state: &ApiState,
    name: &str,
    headers: &HeaderMap,
    body: Bytes,
    request_id: &str,
) -> Result<Response, ApiError> {
    // The caller's X-Ray trace header, or a new one: it travels with the invocation (through the
    // async queue for events) to the function's `Lambda-Runtime-Trace-Id`.
    let trace_id = headers
        .get("x-amzn-trace-id")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .map_or_else(sluice_core::invoke::new_trace_id, str::to_owned);
    let kind = headers
        .get("x-amz-invocation-type")
        .map(|v| v.to_str().unwrap_or("?"))
        .unwrap_or("RequestResponse");
    if !matches!(kind, "RequestResponse" | "Event" | "DryRun") {
        return Err(ApiError::invalid(format!(
            "X-Amz-Invocation-Type must be one of RequestResponse, Event, DryRun, got {kind:?}"
        )));
    }
    if state.store.function(name).is_none() {
        return Err(ApiError::not_found(format!(
            "Function not found: {}",
            state.account.function_arn(name)
        )));
    }
    match kind {
        "DryRun" => Ok(StatusCode::NO_CONTENT.into_response()),
        "Event" => {
            if body.len() > MAX_ASYNC_PAYLOAD_BYTES {
                return Err(too_large(body.len(), MAX_ASYNC_PAYLOAD_BYTES));
            }
            check_json(&body)?;
            let Some(events) = &state.events else {
                return Err(ApiError::service(
                    "this node does not accept asynchronous invocations",
                ));
            };
            let event = AsyncEvent::new(name, request_id, body.to_vec()).with_trace_id(trace_id);
            match events.send(&state.async_topic, &event).await {
                Ok((partition, offset)) => {
                    metrics::counter!("sluice_async_events_received_total", "function" => name.to_owned()).increment(1);
                    tracing::debug!(
                        function = name,
                        request_id,
                        partition,
                        offset,
                        "event accepted"
                    );
                    Ok(StatusCode::ACCEPTED.into_response())
                }
                Err(e) if sluice_core::kafka::is_too_large(&e) => {
                    // Under Lambda's limit but over the cluster's (a broker with a lower
                    // `message.max.bytes`): the caller's request is too large here, not a fault.
                    tracing::warn!(function = name, bytes = body.len(), error = %e, "event larger than the cluster accepts");
                    Err(too_large(body.len(), body.len().saturating_sub(1)))
                }
                Err(e) => {
                    tracing::warn!(function = name, error = %e, "could not write an event to Kafka");
                    Err(ApiError::service(format!(
                        "could not store the event durably: {e}; nothing was accepted, retry"
                    )))
                }
            }
        }
        _ => {
            if body.len() > MAX_SYNC_PAYLOAD_BYTES {
                return Err(too_large(body.len(), MAX_SYNC_PAYLOAD_BYTES));
            }
            check_json(&body)?;
            let Some(invoker) = &state.invoker else {
                return Err(ApiError::service(
                    "this node runs no workers and cannot invoke synchronously yet",
                ));
            };
            let tail = headers
                .get("x-amz-log-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.eq_ignore_ascii_case("Tail"));
            let req = InvokeRequest {
                function: name.to_owned(),
                request_id: request_id.to_owned(),
                payload: body.to_vec(),
                trace_id,
            };
            match invoker.invoke(req).await {
                Ok(done) => {
                    let (payload, error) = match done.result {
                        FunctionResult::Ok(p) => (p, None),
                        FunctionResult::Err { payload, .. } => (payload, Some("Unhandled")),
                    };
                    let mut resp = Response::new(Body::from(payload));
                    let h = resp.headers_mut();
                    h.insert("content-type", HeaderValue::from_static("application/json"));
                    h.insert(
                        "x-amz-executed-version",
                        HeaderValue::from_static("$LATEST"),
                    );
                    if let Some(e) = error {
                        h.insert("x-amz-function-error", HeaderValue::from_static(e));
                    }
                    if tail {
                        // Lambda's LogType Tail: the last 4 KB of the log, base64.
                        use base64::Engine;
                        let log = &done.log[done.log.len().saturating_sub(4096)..];
                        let b64 = base64::engine::general_purpose::STANDARD.encode(log);
                        if let Ok(v) = HeaderValue::from_str(&b64) {
                            h.insert("x-amz-log-result", v);
                        }
                    }
                    Ok(resp)
                }
                Err(e) => Err(invoke_error(e)),
            }
        }
    }
}

fn too_large(len: usize, limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "RequestTooLargeException",
        message: format!(
            "Request must be smaller than {limit} bytes for the Invoke operation, got {len}"
        ),
    }
}

fn invoke_error(e: InvokeError) -> ApiError {
    match e {
        InvokeError::NotFound(arn) => ApiError::not_found(format!("Function not found: {arn}")),
        InvokeError::Throttled { reason, limit } => {
            metrics::counter!("sluice_api_throttles_total").increment(1);
            ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "TooManyRequestsException",
                message: format!("Rate Exceeded. Reason: {reason} (limit {limit})"),
            }
        }
        InvokeError::NoCapacity(m) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "TooManyRequestsException",
            message: format!("Rate Exceeded. Reason: no worker capacity ({m})"),
        },
        InvokeError::Config(m) => ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "InvalidRuntimeException",
            message: m,
        },
        InvokeError::Service(m) => ApiError::service(m),
    }
}
