//! The account-level and resource-level operations tools call besides the function ones:
//! GetAccountSettings, TagResource / UntagResource / ListTags, ListFunctionEventInvokeConfigs,
//! and Lambda's answer to a path that is no operation.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::model::{parse_strict, Format, Validate};
use sluice_core::store::{ConfigObject, Expected, ObjectKey};

use crate::functions::model_error;
use crate::names::function_name;
use crate::settings::{body_text, eic_json, function};
use crate::{ApiError, ApiState};

/// Lambda's own figures for the limits Sluice enforces the same way (bytes).
const CODE_SIZE_ZIPPED: u64 = 50 * 1024 * 1024;
const CODE_SIZE_UNZIPPED: u64 = 250 * 1024 * 1024;
const TOTAL_CODE_SIZE: u64 = 75 * 1024 * 1024 * 1024;

/// GetAccountSettings: the account's limits and what its functions use.
pub(crate) async fn account_settings(State(state): State<ApiState>) -> Json<Value> {
    let functions = state.store.functions();
    let reserved: i64 = functions
        .iter()
        .filter_map(|f| f.object.reserved_concurrent_executions)
        .sum();
    let code_bytes: u64 = functions
        .iter()
        .filter_map(|f| f.object.code.stored.as_ref().map(|s| s.size))
        .sum();
    let limit = i64::from(state.account.concurrency_limit);
    Json(json!({
        "AccountLimit": {
            "TotalCodeSize": TOTAL_CODE_SIZE,
            "CodeSizeUnzipped": CODE_SIZE_UNZIPPED,
            "CodeSizeZipped": CODE_SIZE_ZIPPED,
            "ConcurrentExecutions": limit,
            "UnreservedConcurrentExecutions": (limit - reserved).max(0),
        },
        "AccountUsage": {
            "TotalCodeSize": code_bytes,
            "FunctionCount": functions.len(),
        },
    }))
}

/// The function a tagging call's resource ARN names (functions are the only taggable resource
/// Sluice has).
fn tagged_function(state: &ApiState, arn: &str) -> Result<String, ApiError> {
    if !arn.starts_with("arn:") || !arn.contains(":function:") {
        return Err(ApiError::invalid(format!(
            "Resource {arn:?} must be a function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME): \
             functions are the resources Sluice tags"
        )));
    }
    function_name(&state.account, arn)
}

/// ListTags.
pub(crate) async fn list_tags(
    State(state): State<ApiState>,
    Path(arn): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let name = tagged_function(&state, &arn)?;
    Ok(Json(
        json!({ "Tags": function(&state, &name)?.object.tags }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TagRequest {
    tags: BTreeMap<String, String>,
}

/// TagResource: adds or replaces tags.
pub(crate) async fn tag_resource(
    State(state): State<ApiState>,
    Path(arn): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let name = tagged_function(&state, &arn)?;
    let req: TagRequest = parse_strict(body_text(&body)?, Format::Json).map_err(model_error)?;
    change_tags(&state, &name, |tags| tags.extend(req.tags)).await
}

/// UntagResource: `?tagKeys=a&tagKeys=b`.
pub(crate) async fn untag_resource(
    State(state): State<ApiState>,
    Path(arn): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<StatusCode, ApiError> {
    let name = tagged_function(&state, &arn)?;
    let keys: Vec<String> = q
        .into_iter()
        .filter(|(k, _)| k == "tagKeys")
        .map(|(_, v)| v)
        .collect();
    if keys.is_empty() {
        return Err(ApiError::invalid(
            "UntagResource needs at least one tagKeys query parameter",
        ));
    }
    change_tags(&state, &name, |tags| {
        for k in &keys {
            tags.remove(k);
        }
    })
    .await
}

async fn change_tags(
    state: &ApiState,
    name: &str,
    change: impl FnOnce(&mut BTreeMap<String, String>),
) -> Result<StatusCode, ApiError> {
    let current = function(state, name)?;
    let mut f = current.object;
    change(&mut f.tags);
    f.validate().map_err(|v| ApiError::invalid(v.to_string()))?;
    state
        .store
        .write(
            &ObjectKey::function(name),
            Some(ConfigObject::Function(f)),
            Expected::Revision(current.revision),
        )
        .await
        .map_err(crate::settings::store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// ListFunctionEventInvokeConfigs: the function's one config (Sluice has only `$LATEST`).
pub(crate) async fn list_eics(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    function(&state, &name)?;
    let configs: Vec<Value> = state
        .store
        .event_invoke_config(&name)
        .iter()
        .map(|c| eic_json(&state, &name, c))
        .collect();
    Ok(Json(json!({ "FunctionEventInvokeConfigs": configs })))
}

/// Any path that is no operation: Lambda-shaped JSON, never an empty body.
pub(crate) async fn unknown_operation(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "UnknownOperationException",
        message: format!(
            "{method} {} is not a Lambda operation this endpoint serves (see the Lambda API \
             reference; Sluice serves functions, invocations, event-invoke configs, concurrency, \
             provisioned concurrency, event source mappings, tags and account settings)",
            uri.path()
        ),
    }
}
