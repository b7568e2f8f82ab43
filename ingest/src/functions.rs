//! Function control routes: CreateFunction, GetFunction, GetFunctionConfiguration, ListFunctions,
//! DeleteFunction.
//!
//! Code given as `Code.ZipFile` is inflated in full before it is stored (`check_zip`), so a zip
//! bomb is refused here with `InvalidZipFileException`. `Code.Path` is allowed only under the
//! node's `--code-path-root` directories, handed to the router as an `Extension` of
//! `CodePathRoots`; without it no `Code.Path` is allowed.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};
use sluice_core::code::CodePathRoots;
use sluice_core::model::{parse, Format, FunctionConfig, ModelError};
use sluice_core::store::{ConfigObject, Expected, ObjectKey, Versioned};

use crate::{ApiError, ApiState};

pub(crate) fn model_error(e: ModelError) -> ApiError {
    match e {
        ModelError::Invalid(v) => ApiError::invalid(v.to_string()),
        other => ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidRequestContentException",
            message: other.to_string(),
        },
    }
}

/// Lambda's `FunctionConfiguration` for a stored function.
pub(crate) fn configuration(state: &ApiState, f: &Versioned<FunctionConfig>) -> Value {
    let c = &f.object;
    let mut v = json!({
        "FunctionName": c.function_name,
        "FunctionArn": state.account.function_arn(&c.function_name),
        "Runtime": c.runtime,
        "Handler": c.handler,
        "Description": c.description,
        "Timeout": c.timeout,
        "MemorySize": c.memory_size,
        "LastModified": iso8601_ms(f.modified_ms),
        "Version": "$LATEST",
        "RevisionId": f.revision.to_string(),
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": [c.architecture()],
        "EphemeralStorage": { "Size": c.ephemeral_storage_mb() },
        "TracingConfig": {
            "Mode": c.tracing_config.as_ref().map_or("PassThrough", |t| t.mode.as_str())
        },
    });
    if let Some(role) = &c.role {
        v["Role"] = json!(role);
    }
    if let Some(env) = &c.environment {
        v["Environment"] = json!({ "Variables": env.variables });
    }
    if let Some(stored) = &c.code.stored {
        use base64::Engine;
        let raw: Vec<u8> = (0..stored.sha256.len() / 2)
            .filter_map(|i| u8::from_str_radix(&stored.sha256[2 * i..2 * i + 2], 16).ok())
            .collect();
        v["CodeSha256"] = json!(base64::engine::general_purpose::STANDARD.encode(raw));
        v["CodeSize"] = json!(stored.size);
    }
    v
}

pub(crate) async fn create_function(
    State(state): State<ApiState>,
    roots: Option<Extension<CodePathRoots>>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("request body must be UTF-8 JSON"))?;
    let text = bare_function_name_field(&state, text)?;
    let config: FunctionConfig = parse(&text, Format::Json).map_err(model_error)?;
    let mut config = config;
    if config.code.stored.is_some() {
        return Err(ApiError::invalid(
            "Code.SluiceStoredCode is set by Sluice; give ZipFile or Path",
        ));
    }
    if let Some(path) = config.code.path.take() {
        config.code.path = Some(check_code_path(roots.as_deref(), &path)?);
    }
    if let Some(zip) = config.code.zip_file.take() {
        config.code.stored = Some(Box::new(store_zip(&state, &zip).await?));
    }
    check_reservation(&state, &config)?;
    let key = ObjectKey::function(&config.function_name);
    let revision = state
        .store
        .write(
            &key,
            Some(ConfigObject::Function(config.clone())),
            Expected::Absent,
        )
        .await
        .map_err(|e| match e {
            sluice_core::store::StoreError::AlreadyExists { .. } => ApiError::conflict(format!(
                "Function already exist: {}",
                state.account.function_arn(&config.function_name)
            )),
            other => other.into(),
        })?;
    tracing::info!(function = %config.function_name, revision, "function created");
    let stored = state
        .store
        .function(&config.function_name)
        .unwrap_or(Versioned {
            revision,
            modified_ms: 0,
            object: config,
        });
    Ok((StatusCode::CREATED, Json(configuration(&state, &stored))))
}

/// Decodes, checks and stores an inline zip (`Code.ZipFile`) in the code topic.
pub(crate) async fn store_zip(
    state: &ApiState,
    b64: &str,
) -> Result<sluice_core::model::StoredCode, ApiError> {
    use base64::Engine;
    let zip = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::invalid(format!("Code.ZipFile is not valid base64: {e}")))?;
    // Inflates every entry (up to 250 MiB of CPU work): off the async threads.
    let zip = tokio::task::spawn_blocking(move || sluice_core::code::check_zip(&zip).map(|()| zip))
        .await
        .map_err(|e| ApiError::service(format!("the zip check stopped: {e}")))?
        .map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidZipFileException",
            message: e.to_string(),
        })?;
    let (Some(kafka), Some(events)) = (&state.kafka, &state.events) else {
        return Err(ApiError::service(
            "this node cannot store code (no Kafka producer)",
        ));
    };
    sluice_core::code::store(
        kafka,
        &events.producer().producer(),
        &state.code_topic,
        &zip,
    )
    .await
    .map_err(|e| ApiError::service(format!("could not store the code: {e}")))
}

/// Checks a `Code.Path` against the node's roots; returns the directory to store (canonical, so
/// a symlink changed later cannot move the function out of its root).
pub(crate) fn check_code_path(
    roots: Option<&CodePathRoots>,
    path: &str,
) -> Result<String, ApiError> {
    let none = CodePathRoots::default();
    roots
        .unwrap_or(&none)
        .check(path)
        .map(|p| p.display().to_string())
        .map_err(|e| ApiError::invalid(e.to_string()))
}

/// What Lambda keeps unreserved in every account.
const MIN_UNRESERVED: i64 = 100;

/// The most concurrency `function` may set aside (reserve, or provision) while the account keeps
/// [`MIN_UNRESERVED`] unreserved: the account limit less what every other function sets aside,
/// which is its reservation, or its provisioned concurrency when it has no reservation.
pub(crate) fn reservable(state: &ApiState, function: &str) -> i64 {
    let provisioned: HashMap<String, i64> = state
        .store
        .provisioned_concurrency_configs()
        .into_iter()
        .map(|(name, c)| {
            let requested = c.object.requested_provisioned_concurrent_executions;
            (name, i64::from(requested))
        })
        .collect();
    let others: i64 = state
        .store
        .functions()
        .iter()
        .filter(|f| f.object.function_name != function)
        .map(|f| {
            f.object
                .reserved_concurrent_executions
                .or_else(|| provisioned.get(&f.object.function_name).copied())
                .unwrap_or(0)
        })
        .sum();
    i64::from(state.account.concurrency_limit) - MIN_UNRESERVED - others
}

pub(crate) fn check_reservation(state: &ApiState, config: &FunctionConfig) -> Result<(), ApiError> {
    let Some(wanted) = config.reserved_concurrent_executions else {
        return Ok(());
    };
    let max = reservable(state, &config.function_name);
    if wanted > max {
        return Err(ApiError::invalid(format!(
            "Specified ReservedConcurrentExecutions for function decreases account's \
             UnreservedConcurrentExecution below its minimum value of [100]: at most {max} can be \
             reserved, got {wanted}"
        )));
    }
    Ok(())
}

pub(crate) async fn list_functions(State(state): State<ApiState>) -> Json<Value> {
    let functions: Vec<Value> = state
        .store
        .functions()
        .iter()
        .map(|f| configuration(&state, f))
        .collect();
    Json(json!({ "Functions": functions }))
}

fn find(state: &ApiState, name: &str) -> Result<Versioned<FunctionConfig>, ApiError> {
    state.store.function(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "Function not found: {}",
            state.account.function_arn(name)
        ))
    })
}

pub(crate) async fn get_function(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let f = find(&state, &name)?;
    let mut out = json!({
        "Configuration": configuration(&state, &f),
        "Code": { "RepositoryType": "Local", "Location": f.object.code.path },
    });
    if let Some(r) = f.object.reserved_concurrent_executions {
        out["Concurrency"] = json!({ "ReservedConcurrentExecutions": r });
    }
    if !f.object.tags.is_empty() {
        out["Tags"] = json!(f.object.tags);
    }
    Ok(Json(out))
}

pub(crate) async fn get_function_configuration(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let f = find(&state, &name)?;
    Ok(Json(configuration(&state, &f)))
}

pub(crate) async fn delete_function(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    find(&state, &name)?;
    state
        .store
        .write(&ObjectKey::function(&name), None, Expected::Exists)
        .await?;
    // The event-invoke and provisioned-concurrency configs go with the function, as in Lambda.
    let eic = ObjectKey::event_invoke_config(&name);
    if state.store.event_invoke_config(&name).is_some() {
        state.store.write(&eic, None, Expected::Exists).await?;
    }
    let provisioned = ObjectKey::provisioned_concurrency(&name);
    if state.store.provisioned_concurrency(&name).is_some() {
        state
            .store
            .write(&provisioned, None, Expected::Exists)
            .await?;
    }
    tracing::info!(function = %name, "function deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Lambda's `LastModified` format: `2019-11-14T18:16:05.568+0000`.
fn iso8601_ms(ms: i64) -> String {
    sluice_core::time::iso8601(ms, "+0000")
}

/// The request body with its `FunctionName` given as a name, whatever form (name, partial or
/// full ARN) the caller used.
pub(crate) fn bare_function_name_field(state: &ApiState, text: &str) -> Result<String, ApiError> {
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return Ok(text.to_owned()); // the parser reports what is wrong with it
    };
    if let Some(Value::String(name)) = v.get("FunctionName") {
        if name.contains(':') {
            let bare = crate::names::function_name(&state.account, name)?;
            v["FunctionName"] = Value::String(bare);
            return Ok(v.to_string());
        }
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::iso8601_ms;

    #[test]
    fn last_modified_is_lambdas_format() {
        assert_eq!(iso8601_ms(0), "1970-01-01T00:00:00.000+0000");
        assert_eq!(
            iso8601_ms(1_573_755_365_568),
            "2019-11-14T18:16:05.568+0000"
        );
        assert_eq!(iso8601_ms(951_782_400_000), "2000-02-29T00:00:00.000+0000");
    }
}
