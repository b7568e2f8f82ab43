//! UpdateFunctionCode, UpdateFunctionConfiguration, Put/Update/Get/DeleteFunctionEventInvokeConfig
//! and Put/Get/DeleteFunctionConcurrency.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::code::CodePathRoots;
use sluice_core::model::{
    parse, parse_strict, Environment, EventInvokeConfig, Format, FunctionConfig, Validate,
};
use sluice_core::store::{ConfigObject, Expected, ObjectKey, StoreError, Versioned};

use crate::functions::{check_code_path, check_reservation, configuration, model_error};
use crate::{ApiError, ApiState};

/// The body as text; Lambda's bodies are UTF-8 JSON.
pub(crate) fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::invalid("request body must be UTF-8 JSON"))
}

/// Function `name`, or Lambda's 404 naming its ARN.
pub(crate) fn function(
    state: &ApiState,
    name: &str,
) -> Result<Versioned<FunctionConfig>, ApiError> {
    state.store.function(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "Function not found: {}",
            state.account.function_arn(name)
        ))
    })
}

fn expected(revision_id: Option<&str>, current: u64) -> Result<Expected, ApiError> {
    match revision_id {
        None => Ok(Expected::Revision(current)),
        Some(r) => {
            let wanted: u64 = r.parse().map_err(|_| {
                ApiError::invalid(format!("RevisionId must be a number, got {r:?}"))
            })?;
            if wanted != current {
                return Err(precondition(wanted, current));
            }
            Ok(Expected::Revision(wanted))
        }
    }
}

fn precondition(wanted: u64, current: u64) -> ApiError {
    ApiError {
        status: StatusCode::PRECONDITION_FAILED,
        kind: "PreconditionFailedException",
        message: format!("The Revision Id provided does not match the latest Revision Id ({current}); got {wanted}. Call GetFunction to get the latest."),
    }
}

/// A store error as the API answers it (a revision conflict is Lambda's precondition error).
pub(crate) fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict {
            expected, actual, ..
        } => precondition(expected, actual),
        other => other.into(),
    }
}

async fn write_function(
    state: &ApiState,
    f: FunctionConfig,
    expect: Expected,
) -> Result<Json<Value>, ApiError> {
    f.validate().map_err(|v| ApiError::invalid(v.to_string()))?;
    let name = f.function_name.clone();
    state
        .store
        .write(
            &ObjectKey::function(&name),
            Some(ConfigObject::Function(f)),
            expect,
        )
        .await
        .map_err(store_error)?;
    let stored = function(state, &name)?;
    Ok(Json(configuration(state, &stored)))
}

/// UpdateFunctionCode's body (Sluice takes `Path`, an unpacked bundle directory).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct UpdateCode {
    path: Option<String>,
    zip_file: Option<String>,
    revision_id: Option<String>,
    #[serde(default)]
    publish: bool,
    #[serde(default)]
    dry_run: bool,
    architectures: Option<Vec<String>>,
}

pub(crate) async fn update_code(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    roots: Option<Extension<CodePathRoots>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UpdateCode = parse_strict(body_text(&body)?, Format::Json).map_err(model_error)?;
    let current = function(&state, &name)?;
    let expect = expected(req.revision_id.as_deref(), current.revision)?;
    let _ = req.publish;
    let mut f = current.object;
    match (req.path, req.zip_file) {
        (Some(path), None) => {
            let path = check_code_path(roots.as_deref(), &path)?;
            f.code = sluice_core::model::FunctionCode {
                path: Some(path),
                zip_file: None,
                stored: None,
            };
        }
        (None, Some(zip)) => {
            let stored = crate::functions::store_zip(&state, &zip).await?;
            f.code = sluice_core::model::FunctionCode {
                path: None,
                zip_file: None,
                stored: Some(Box::new(stored)),
            };
        }
        _ => return Err(ApiError::invalid("give exactly one of ZipFile or Path")),
    }
    if let Some(a) = req.architectures {
        f.architectures = a;
    }
    if req.dry_run {
        f.validate().map_err(|v| ApiError::invalid(v.to_string()))?;
        return Ok(Json(configuration(
            &state,
            &Versioned {
                revision: current.revision,
                modified_ms: current.modified_ms,
                object: f,
            },
        )));
    }
    write_function(&state, f, expect).await
}

/// UpdateFunctionConfiguration's body.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct UpdateConfiguration {
    memory_size: Option<i64>,
    timeout: Option<i64>,
    environment: Option<Environment>,
    handler: Option<String>,
    runtime: Option<String>,
    description: Option<String>,
    role: Option<String>,
    ephemeral_storage: Option<sluice_core::model::EphemeralStorage>,
    tracing_config: Option<sluice_core::model::TracingConfig>,
    layers: Option<Vec<String>>,
    revision_id: Option<String>,
}

pub(crate) async fn update_configuration(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UpdateConfiguration =
        parse_strict(body_text(&body)?, Format::Json).map_err(model_error)?;
    let current = function(&state, &name)?;
    let expect = expected(req.revision_id.as_deref(), current.revision)?;
    let mut f = current.object;
    if let Some(v) = req.memory_size {
        f.memory_size = v;
    }
    if let Some(v) = req.timeout {
        f.timeout = v;
    }
    if let Some(v) = req.environment {
        f.environment = Some(v);
    }
    if let Some(v) = req.handler {
        f.handler = v;
    }
    if let Some(v) = req.runtime {
        f.runtime = v;
    }
    if let Some(v) = req.description {
        f.description = v;
    }
    if let Some(v) = req.role {
        f.role = Some(v);
    }
    if let Some(v) = req.ephemeral_storage {
        f.ephemeral_storage = Some(v);
    }
    if let Some(v) = req.tracing_config {
        f.tracing_config = Some(v);
    }
    if let Some(v) = req.layers {
        f.layers = v;
    }
    write_function(&state, f, expect).await
}

pub(crate) fn eic_json(state: &ApiState, name: &str, c: &Versioned<EventInvokeConfig>) -> Value {
    let dest = c.object.destination_config.clone().unwrap_or_default();
    let side = |d: Option<sluice_core::model::Destination>| match d.and_then(|d| d.destination) {
        Some(uri) => json!({ "Destination": uri }),
        None => json!({}),
    };
    json!({
        "LastModified": c.modified_ms as f64 / 1000.0,
        "FunctionArn": format!("{}:$LATEST", state.account.function_arn(name)),
        "MaximumRetryAttempts": c.object.maximum_retry_attempts,
        "MaximumEventAgeInSeconds": c.object.maximum_event_age_in_seconds,
        "DestinationConfig": { "OnSuccess": side(dest.on_success), "OnFailure": side(dest.on_failure) },
    })
}

async fn write_eic(
    state: &ApiState,
    name: &str,
    config: EventInvokeConfig,
) -> Result<Json<Value>, ApiError> {
    let key = ObjectKey::event_invoke_config(name);
    let expect = match state.store.event_invoke_config(name) {
        Some(c) => Expected::Revision(c.revision),
        None => Expected::Absent,
    };
    state
        .store
        .write(&key, Some(ConfigObject::EventInvokeConfig(config)), expect)
        .await?;
    let stored = state
        .store
        .event_invoke_config(name)
        .ok_or_else(|| ApiError::service("event invoke config vanished"))?;
    Ok(Json(eic_json(state, name, &stored)))
}

/// PutFunctionEventInvokeConfig: replaces the whole configuration.
pub(crate) async fn put_eic(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    function(&state, &name)?;
    let mut config: EventInvokeConfig =
        parse(body_text(&body)?, Format::Json).map_err(model_error)?;
    config.function_name = None;
    write_eic(&state, &name, config).await
}

/// UpdateFunctionEventInvokeConfig: changes only the fields given.
pub(crate) async fn update_eic(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    function(&state, &name)?;
    let patch: BTreeMap<String, Value> =
        serde_json::from_str(body_text(&body)?).map_err(|e| ApiError::invalid(e.to_string()))?;
    let current = state
        .store
        .event_invoke_config(&name)
        .map(|c| c.object)
        .unwrap_or_default();
    let mut merged =
        serde_json::to_value(&current).map_err(|e| ApiError::service(e.to_string()))?;
    for (k, v) in patch {
        merged[k] = v;
    }
    let config: EventInvokeConfig =
        parse(&merged.to_string(), Format::Json).map_err(model_error)?;
    write_eic(&state, &name, config).await
}

pub(crate) async fn get_eic(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    function(&state, &name)?;
    let c = state.store.event_invoke_config(&name).ok_or_else(|| {
        ApiError::not_found(format!(
            "The function {} doesn't have an EventInvokeConfig",
            state.account.function_arn(&name)
        ))
    })?;
    Ok(Json(eic_json(&state, &name, &c)))
}

pub(crate) async fn delete_eic(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    function(&state, &name)?;
    state
        .store
        .write(
            &ObjectKey::event_invoke_config(&name),
            None,
            Expected::Exists,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Concurrency {
    reserved_concurrent_executions: i64,
}

pub(crate) async fn put_concurrency(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: Concurrency = parse_strict(body_text(&body)?, Format::Json).map_err(model_error)?;
    let current = function(&state, &name)?;
    let mut f = current.object;
    f.reserved_concurrent_executions = Some(req.reserved_concurrent_executions);
    f.validate().map_err(|v| ApiError::invalid(v.to_string()))?;
    check_reservation(&state, &f)?;
    if let Some(p) = state.store.provisioned_concurrency(&name) {
        let provisioned = p.object.requested_provisioned_concurrent_executions;
        if req.reserved_concurrent_executions < i64::from(provisioned) {
            return Err(ApiError::invalid(format!(
                "ReservedConcurrentExecutions must be at least the function's provisioned \
                 concurrency ({provisioned}), got {}; lower or delete the provisioned concurrency \
                 first (PutProvisionedConcurrencyConfig / DeleteProvisionedConcurrencyConfig)",
                req.reserved_concurrent_executions
            )));
        }
    }
    let _configuration = write_function(&state, f, Expected::Revision(current.revision)).await?;
    Ok(Json(
        json!({ "ReservedConcurrentExecutions": req.reserved_concurrent_executions }),
    ))
}

pub(crate) async fn get_concurrency(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let f = function(&state, &name)?;
    Ok(Json(match f.object.reserved_concurrent_executions {
        Some(r) => json!({ "ReservedConcurrentExecutions": r }),
        None => json!({}),
    }))
}

pub(crate) async fn delete_concurrency(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let current = function(&state, &name)?;
    let mut f = current.object;
    f.reserved_concurrent_executions = None;
    let _configuration = write_function(&state, f, Expected::Revision(current.revision)).await?;
    Ok(StatusCode::NO_CONTENT)
}
