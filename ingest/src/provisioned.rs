//! Put/Get/Delete/ListProvisionedConcurrencyConfigs
//! (`/2019-09-30/functions/{name}/provisioned-concurrency`).
//!
//! Sluice has no published versions or aliases: a function has at most one configuration, for
//! its current code. `Qualifier` may be omitted or `$LATEST` (botocore requires one, so `$LATEST`
//! must work); anything else is refused rather than silently applied to `$LATEST`.
//!
//! The store holds what was requested; how much is allocated is the fleet's answer
//! ([`sluice_core::invoke::Invoker::provisioned_ready`]), asked on every read.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::model::ProvisionedConcurrencyConfig;
use sluice_core::store::{ConfigObject, Expected, ObjectKey, StoreError, Versioned};

use crate::functions::reservable;
use crate::settings::{body_text, function};
use crate::{ApiError, ApiState};

/// The only qualifier Sluice has.
const LATEST: &str = "$LATEST";

/// Lambda's bound on `MaxItems` for ListProvisionedConcurrencyConfigs.
const MAX_LIST_ITEMS: i64 = 50;

/// The query string of the provisioned-concurrency routes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ProvisionedQuery {
    qualifier: Option<String>,
    /// `ALL` selects ListProvisionedConcurrencyConfigs on the GET route.
    list: Option<String>,
    marker: Option<String>,
    max_items: Option<String>,
}

/// PutProvisionedConcurrencyConfig's body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PutBody {
    /// Read as `i64` so that 0 and negatives get a message naming the bound.
    provisioned_concurrent_executions: i64,
}

/// Refuses any qualifier but a missing one or `$LATEST`.
fn check_qualifier(qualifier: Option<&str>) -> Result<(), ApiError> {
    match qualifier {
        None | Some(LATEST) => Ok(()),
        Some(q) => Err(ApiError::invalid(format!(
            "Qualifier {q:?} does not exist: Sluice has no published versions or aliases, so \
             provisioned concurrency applies to the function itself; use Qualifier=$LATEST or \
             omit it"
        ))),
    }
}

/// Checks a requested count against Lambda's rules and returns it.
///
/// `reserved` is the function's ReservedConcurrentExecutions; `max_reservable` the most the
/// function may set aside while the account keeps 100 unreserved ([`reservable`]).
fn check_requested(
    requested: i64,
    reserved: Option<i64>,
    max_reservable: i64,
) -> Result<u32, ApiError> {
    if requested < 1 {
        return Err(ApiError::invalid(format!(
            "ProvisionedConcurrentExecutions must be at least 1, got {requested}"
        )));
    }
    if let Some(reserved) = reserved.filter(|&r| requested > r) {
        return Err(ApiError::invalid(format!(
            "ProvisionedConcurrentExecutions must not exceed the function's \
             ReservedConcurrentExecutions ({reserved}), got {requested}; raise the reservation \
             (PutFunctionConcurrency) or provision fewer"
        )));
    }
    if requested > max_reservable {
        return Err(ApiError::invalid(format!(
            "Specified ProvisionedConcurrentExecutions for function decreases account's \
             UnreservedConcurrentExecution below its minimum value of [100]: at most \
             {max_reservable} can be provisioned, got {requested}"
        )));
    }
    u32::try_from(requested).map_err(|_| {
        ApiError::invalid(format!(
            "ProvisionedConcurrentExecutions must be at most {}, got {requested}",
            u32::MAX
        ))
    })
}

/// Lambda's allocation fields for `requested` when the fleet has `ready` sandboxes booted:
/// (allocated = available, `Status`).
fn allocation(requested: u32, ready: Option<u32>) -> (u32, &'static str) {
    let allocated = ready.unwrap_or(0).min(requested);
    let status = if allocated >= requested {
        "READY"
    } else {
        "IN_PROGRESS"
    };
    (allocated, status)
}

/// The response body of Put/Get (and, with `FunctionArn`, one list item).
async fn config_json(
    state: &ApiState,
    name: &str,
    config: &Versioned<ProvisionedConcurrencyConfig>,
) -> Value {
    let requested = config.object.requested_provisioned_concurrent_executions;
    let ready = match &state.invoker {
        Some(invoker) => invoker.provisioned_ready(name).await,
        None => None,
    };
    let (allocated, status) = allocation(requested, ready);
    json!({
        "RequestedProvisionedConcurrentExecutions": requested,
        "AvailableProvisionedConcurrentExecutions": allocated,
        "AllocatedProvisionedConcurrentExecutions": allocated,
        "Status": status,
        "LastModified": config.object.last_modified,
    })
}

fn missing(state: &ApiState, name: &str) -> String {
    format!(
        "No Provisioned Concurrency Config found for function: {}",
        state.account.function_arn(name)
    )
}

/// GetProvisionedConcurrencyConfig's 404 (DeleteProvisionedConcurrencyConfig answers
/// `ResourceNotFoundException`, as Lambda's error list for it has no other).
fn not_found(state: &ApiState, name: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "ProvisionedConcurrencyConfigNotFoundException",
        message: missing(state, name),
    }
}

/// PutProvisionedConcurrencyConfig: 202 with the stored request and what the fleet has booted.
pub(crate) async fn put(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<ProvisionedQuery>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_qualifier(query.qualifier.as_deref())?;
    let req: PutBody =
        serde_json::from_str(body_text(&body)?).map_err(|e| ApiError::invalid(e.to_string()))?;
    let f = function(&state, &name)?;
    let max = reservable(&state, &name);
    let requested = check_requested(
        req.provisioned_concurrent_executions,
        f.object.reserved_concurrent_executions,
        max,
    )?;
    let key = ObjectKey::provisioned_concurrency(&name);
    let expect = match state.store.provisioned_concurrency(&name) {
        Some(current) => Expected::Revision(current.revision),
        None => Expected::Absent,
    };
    let config = ProvisionedConcurrencyConfig {
        requested_provisioned_concurrent_executions: requested,
        last_modified: sluice_core::time::iso8601(sluice_core::time::now_ms(), "+0000"),
    };
    state
        .store
        .write(
            &key,
            Some(ConfigObject::ProvisionedConcurrency(config)),
            expect,
        )
        .await?;
    tracing::info!(function = %name, requested, "provisioned concurrency put");
    let stored = state
        .store
        .provisioned_concurrency(&name)
        .ok_or_else(|| ApiError::service("provisioned concurrency config vanished"))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(config_json(&state, &name, &stored).await),
    ))
}

/// GetProvisionedConcurrencyConfig, or ListProvisionedConcurrencyConfigs with `List=ALL`.
pub(crate) async fn get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<ProvisionedQuery>,
) -> Result<Response, ApiError> {
    if let Some(list) = query.list.as_deref() {
        return list_configs(&state, &name, list, &query).await;
    }
    check_qualifier(query.qualifier.as_deref())?;
    function(&state, &name)?;
    let stored = state
        .store
        .provisioned_concurrency(&name)
        .ok_or_else(|| not_found(&state, &name))?;
    Ok(Json(config_json(&state, &name, &stored).await).into_response())
}

async fn list_configs(
    state: &ApiState,
    name: &str,
    list: &str,
    query: &ProvisionedQuery,
) -> Result<Response, ApiError> {
    if list != "ALL" {
        return Err(ApiError::invalid(format!("List must be ALL, got {list:?}")));
    }
    if let Some(raw) = query.max_items.as_deref() {
        let n: i64 = raw
            .parse()
            .map_err(|_| ApiError::invalid(format!("MaxItems must be a number, got {raw:?}")))?;
        if !(1..=MAX_LIST_ITEMS).contains(&n) {
            return Err(ApiError::invalid(format!(
                "MaxItems must be 1..={MAX_LIST_ITEMS}, got {n}"
            )));
        }
    }
    if let Some(marker) = query.marker.as_deref() {
        // A function has at most one configuration, so no list is ever paged.
        return Err(ApiError::invalid(format!(
            "Marker {marker:?} was not issued by this API (lists of provisioned concurrency \
             configs have one page)"
        )));
    }
    function(state, name)?;
    let mut items = Vec::new();
    if let Some(stored) = state.store.provisioned_concurrency(name) {
        let mut item = config_json(state, name, &stored).await;
        item["FunctionArn"] = json!(state.account.function_arn(name));
        items.push(item);
    }
    Ok(Json(json!({ "ProvisionedConcurrencyConfigs": items })).into_response())
}

/// DeleteProvisionedConcurrencyConfig: 204.
pub(crate) async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<ProvisionedQuery>,
) -> Result<StatusCode, ApiError> {
    check_qualifier(query.qualifier.as_deref())?;
    function(&state, &name)?;
    state
        .store
        .write(
            &ObjectKey::provisioned_concurrency(&name),
            None,
            Expected::Exists,
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => ApiError::not_found(missing(&state, &name)),
            other => other.into(),
        })?;
    tracing::info!(function = %name, "provisioned concurrency deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifier_may_be_absent_or_latest_only() {
        assert!(check_qualifier(None).is_ok());
        assert!(check_qualifier(Some("$LATEST")).is_ok());
        for q in ["1", "live", "", "$latest"] {
            let e = check_qualifier(Some(q)).expect_err(q);
            assert_eq!(e.kind, "InvalidParameterValueException");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(
                e.message.contains("no published versions or aliases"),
                "{e}"
            );
            assert!(e.message.contains("$LATEST or omit it"), "{e}");
        }
    }

    #[test]
    fn requested_must_be_at_least_one() {
        for n in [0, -3] {
            let e = check_requested(n, None, 900).expect_err("below 1");
            assert_eq!(e.kind, "InvalidParameterValueException");
            assert!(e.message.contains("must be at least 1"), "{e}");
            assert!(e.message.contains(&format!("got {n}")), "{e}");
        }
        assert_eq!(check_requested(1, None, 900).expect("valid"), 1);
    }

    #[test]
    fn requested_must_fit_in_the_reservation() {
        assert_eq!(check_requested(5, Some(5), 900).expect("equal is fine"), 5);
        let e = check_requested(6, Some(5), 900).expect_err("over the reservation");
        assert_eq!(e.kind, "InvalidParameterValueException");
        assert!(
            e.message
                .contains("must not exceed the function's ReservedConcurrentExecutions (5)"),
            "{e}"
        );
        assert!(e.message.contains("got 6"), "{e}");
        let e = check_requested(1, Some(0), 900).expect_err("a zero reservation allows none");
        assert!(
            e.message.contains("ReservedConcurrentExecutions (0)"),
            "{e}"
        );
    }

    #[test]
    fn requested_must_leave_the_account_one_hundred_unreserved() {
        assert_eq!(check_requested(400, None, 400).expect("at the bound"), 400);
        let e = check_requested(401, None, 400).expect_err("over the bound");
        assert!(e.message.contains("minimum value of [100]"), "{e}");
        assert!(
            e.message
                .contains("at most 400 can be provisioned, got 401"),
            "{e}"
        );
        let e = check_requested(1, None, 0).expect_err("nothing left to provision");
        assert!(e.message.contains("at most 0"), "{e}");
    }

    #[test]
    fn requested_beyond_u32_is_refused_not_truncated() {
        let big = i64::from(u32::MAX) + 1;
        let e = check_requested(big, None, i64::MAX).expect_err("too big");
        assert!(e.message.contains("must be at most"), "{e}");
    }

    #[test]
    fn status_is_ready_only_when_every_requested_sandbox_is_booted() {
        assert_eq!(allocation(3, None), (0, "IN_PROGRESS"));
        assert_eq!(allocation(3, Some(0)), (0, "IN_PROGRESS"));
        assert_eq!(allocation(3, Some(2)), (2, "IN_PROGRESS"));
        assert_eq!(allocation(3, Some(3)), (3, "READY"));
        // More booted than requested (a decrease not yet applied) reports the request.
        assert_eq!(allocation(3, Some(7)), (3, "READY"));
    }

    #[test]
    fn put_body_takes_only_the_count() {
        let ok: PutBody =
            serde_json::from_str(r#"{"ProvisionedConcurrentExecutions":2}"#).expect("valid");
        assert_eq!(ok.provisioned_concurrent_executions, 2);
        assert!(serde_json::from_str::<PutBody>(
            r#"{"ProvisionedConcurrentExecutions":2,"Qualifier":"1"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<PutBody>("{}").is_err());
    }
}
