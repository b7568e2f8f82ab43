//! Lambda-shaped API errors.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_core::store::StoreError;

/// An error as the Lambda API reports it.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The exception name (`x-amzn-ErrorType`), e.g. `ResourceNotFoundException`.
    pub kind: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// 400 `InvalidParameterValueException`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidParameterValueException",
            message: message.into(),
        }
    }
    /// 404 `ResourceNotFoundException`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "ResourceNotFoundException",
            message: message.into(),
        }
    }
    /// 409 `ResourceConflictException`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            kind: "ResourceConflictException",
            message: message.into(),
        }
    }
    /// 500 `ServiceException` (with a retryable hint in the message).
    pub fn service(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "ServiceException",
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::AlreadyExists { .. }
            | StoreError::Conflict { .. }
            | StoreError::Busy { .. } => ApiError::conflict(e.to_string()),
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            _ => ApiError::service(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "Type": "User", "message": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        resp.headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(self.kind));
        resp
    }
}
