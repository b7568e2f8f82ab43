//! Event source mapping routes: Create/Get/List/Update/DeleteEventSourceMapping, with Lambda's
//! JSON and states.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};
use sluice_core::model::{
    parse, EventSourceMappingConfig, EventSourceMappingState, Format, KafkaEventSourceConfig,
    MappingState, Validate,
};
use sluice_core::store::{ConfigObject, Expected, ObjectKey, Versioned};

use crate::functions::model_error;
use crate::{ApiError, ApiState};

/// Fields UpdateEventSourceMapping may change; the others are create-only.
const UPDATABLE: &[&str] = &[
    "FunctionName",
    "Enabled",
    "BatchSize",
    "MaximumBatchingWindowInSeconds",
    "FilterCriteria",
    "DestinationConfig",
    "MaximumRetryAttempts",
    "MaximumRecordAgeInSeconds",
    "BisectBatchOnFunctionError",
    "ParallelizationFactor",
    "FunctionResponseTypes",
    "ProvisionedPollerConfig",
    "MetricsConfig",
    "SourceAccessConfigurations",
    "KMSKeyArn",
];

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Lambda's `EventSourceMappingConfiguration`.
pub(crate) fn mapping_json(state: &ApiState, m: &Versioned<EventSourceMappingState>) -> Value {
    let s = &m.object;
    let mut v = serde_json::to_value(&s.config).unwrap_or_default();
    let obj = v.as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut out = Map::new();
    for (k, val) in obj {
        if k != "FunctionName" && k != "Enabled" && k != "Tags" {
            out.insert(k, val);
        }
    }
    out.insert("UUID".into(), json!(s.uuid));
    out.insert(
        "FunctionArn".into(),
        json!(state.account.function_arn(&s.config.function_name)),
    );
    out.insert("State".into(), json!(s.state));
    out.insert(
        "StateTransitionReason".into(),
        json!(s.state_transition_reason),
    );
    out.insert("LastModified".into(), json!(s.last_modified));
    out.insert(
        "LastProcessingResult".into(),
        json!(s.last_processing_result),
    );
    out.insert(
        "MaximumBatchingWindowInSeconds".into(),
        json!(s.config.maximum_batching_window_in_seconds.unwrap_or(0)),
    );
    Value::Object(out)
}

fn find(state: &ApiState, uuid: &str) -> Result<Versioned<EventSourceMappingState>, ApiError> {
    state
        .store
        .event_source_mappings()
        .into_iter()
        .find(|m| m.object.uuid == uuid)
        .ok_or_else(|| ApiError::not_found(format!("The resource you requested does not exist. (Service: Lambda; Status Code: 404; Event source mapping {uuid})")))
}

fn check_function(state: &ApiState, config: &EventSourceMappingConfig) -> Result<(), ApiError> {
    if state.store.function(&config.function_name).is_none() {
        return Err(ApiError::invalid(format!(
            "Function does not exist: {}",
            state.account.function_arn(&config.function_name)
        )));
    }
    Ok(())
}

/// Consumer groups Sluice's nodes use that do not carry the topic prefix.
const OWN_GROUP_PREFIXES: &[&str] = &["sluice-config-view-"];

/// Whether the mapping reads the node's own Kafka cluster (no `SelfManagedEventSource`, or one
/// that names a broker of the node's cluster).
fn on_node_cluster(state: &ApiState, config: &EventSourceMappingConfig) -> bool {
    let Some(servers) = config
        .self_managed_event_source
        .as_ref()
        .and_then(|s| s.endpoints.get("KAFKA_BOOTSTRAP_SERVERS"))
    else {
        return true;
    };
    let Some(kafka) = &state.kafka else {
        return true;
    };
    let own: Vec<&str> = kafka.bootstrap_servers.split(',').map(str::trim).collect();
    servers.iter().any(|s| own.contains(&s.trim()))
}

/// Refuses a mapping that would read Sluice's own topics or groups, or share its consumer group
/// with another mapping (their commits would overwrite each other's and skip records).
fn check_isolation(
    state: &ApiState,
    config: &EventSourceMappingConfig,
    group: &str,
) -> Result<(), ApiError> {
    if on_node_cluster(state, config) && !state.topic_prefix.is_empty() {
        if let Some(t) = config
            .topics
            .iter()
            .find(|t| t.starts_with(&state.topic_prefix))
        {
            return Err(ApiError::invalid(format!(
                "Topics: {t:?} is one of Sluice's own topics (every topic named {:?}… on this                  cluster holds Sluice's queues, code or configuration); map a topic of your own",
                state.topic_prefix
            )));
        }
        if group.starts_with(&state.topic_prefix)
            || OWN_GROUP_PREFIXES.iter().any(|p| group.starts_with(p))
        {
            return Err(ApiError::invalid(format!(
                "ConsumerGroupId: {group:?} is one of Sluice's own consumer groups (names                  starting with {:?} or {}); choose another",
                state.topic_prefix,
                OWN_GROUP_PREFIXES.join(", ")
            )));
        }
    }
    if let Some(other) = state.store.event_source_mappings().into_iter().find(|m| {
        m.object
            .config
            .consumer_group_id()
            .unwrap_or(&m.object.uuid)
            == group
    }) {
        return Err(ApiError::invalid(format!(
            "ConsumerGroupId: {group:?} is already used by event source mapping {}; each mapping              needs a consumer group of its own",
            other.object.uuid
        )));
    }
    Ok(())
}

pub(crate) async fn create(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("request body must be UTF-8 JSON"))?;
    let text = crate::functions::bare_function_name_field(&state, text)?;
    let mut config: EventSourceMappingConfig = parse(&text, Format::Json).map_err(model_error)?;
    check_function(&state, &config)?;
    let uuid = uuid::Uuid::new_v4().to_string();
    let group = config.consumer_group_id().unwrap_or(&uuid).to_owned();
    // Two creates with the same ConsumerGroupId on two nodes must not both pass the check: the
    // check and the write run under the group's lock, on a view caught up after taking it.
    let resource = format!("consumer-group/{group}");
    state
        .store
        .exclusive(&resource, || async {
            check_isolation(&state, &config, &group)?;
            if config.consumer_group_id().is_none() {
                // Lambda's default consumer group is the mapping's UUID.
                config.self_managed_kafka_event_source_config = Some(KafkaEventSourceConfig {
                    consumer_group_id: Some(uuid.clone()),
                });
            }
            let enabled = config.enabled;
            let mapping = EventSourceMappingState {
                uuid: uuid.clone(),
                config,
                state: if enabled {
                    MappingState::Creating
                } else {
                    MappingState::Disabled
                },
                state_transition_reason: "USER_INITIATED".into(),
                last_modified: now_secs(),
                last_processing_result: "No records processed".into(),
            };
            state
                .store
                .write(
                    &ObjectKey::event_source_mapping(&uuid),
                    Some(ConfigObject::EventSourceMapping(Box::new(mapping))),
                    Expected::Absent,
                )
                .await?;
            Ok::<(), ApiError>(())
        })
        .await??;
    tracing::info!(uuid = %uuid, "event source mapping created");
    Ok((
        StatusCode::ACCEPTED,
        Json(mapping_json(&state, &find(&state, &uuid)?)),
    ))
}

pub(crate) async fn get(
    State(state): State<ApiState>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(mapping_json(&state, &find(&state, &uuid)?)))
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Json<Value> {
    let function = q
        .get("FunctionName")
        .map(|f| f.rsplit(':').next().unwrap_or(f).to_owned());
    let all: Vec<Value> = state
        .store
        .event_source_mappings()
        .iter()
        .filter(|m| {
            function
                .as_ref()
                .is_none_or(|f| &m.object.config.function_name == f)
        })
        .map(|m| mapping_json(&state, m))
        .collect();
    Json(json!({ "EventSourceMappings": all }))
}

pub(crate) async fn update(
    State(state): State<ApiState>,
    Path(uuid): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The tracker moves states on (e.g. Updating → Enabled) concurrently; re-apply the change to
    // the latest revision a few times before reporting ResourceInUseException.
    let mut attempt = 0;
    loop {
        match update_once(&state, &uuid, &body).await {
            Err(e) if e.kind == "ResourceInUseException" && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
            }
            other => return other,
        }
    }
}

async fn update_once(
    state: &ApiState,
    uuid: &str,
    body: &Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let state = state.clone();
    let uuid = uuid.to_owned();
    let current = find(&state, &uuid)?;
    let patch: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON: {e}")))?;
    let mut merged = serde_json::to_value(&current.object.config)
        .map_err(|e| ApiError::service(e.to_string()))?;
    for (k, mut v) in patch {
        if k == "UUID" {
            continue;
        }
        if k == "FunctionName" {
            if let Some(name) = v.as_str().filter(|n| n.contains(':')) {
                v = Value::String(crate::names::function_name(&state.account, name)?);
            }
        }
        if !UPDATABLE.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!(
                "{k} cannot be changed after the mapping is created; updatable fields: {}",
                UPDATABLE.join(", ")
            )));
        }
        merged[k] = v;
    }
    let config: EventSourceMappingConfig =
        parse(&merged.to_string(), Format::Json).map_err(model_error)?;
    config
        .validate()
        .map_err(|v| ApiError::invalid(v.to_string()))?;
    check_function(&state, &config)?;
    let mut next = current.object.clone();
    let was_enabled = current.object.config.enabled;
    next.state = match (was_enabled, config.enabled) {
        (false, true) => MappingState::Enabling,
        (true, false) => MappingState::Disabling,
        (true, true) => MappingState::Updating,
        (false, false) => MappingState::Disabled,
    };
    next.config = config;
    next.state_transition_reason = "USER_INITIATED".into();
    next.last_modified = now_secs();
    state
        .store
        .write(
            &ObjectKey::event_source_mapping(&uuid),
            Some(ConfigObject::EventSourceMapping(Box::new(next))),
            Expected::Revision(current.revision),
        )
        .await
        .map_err(|e| match e {
            sluice_core::store::StoreError::Conflict { .. } => ApiError {
                status: StatusCode::CONFLICT,
                kind: "ResourceInUseException",
                message: format!("the mapping {uuid} changed concurrently; get it and try again"),
            },
            other => other.into(),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(mapping_json(&state, &find(&state, &uuid)?)),
    ))
}

pub(crate) async fn delete(
    State(state): State<ApiState>,
    Path(uuid): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let current = find(&state, &uuid)?;
    state
        .store
        .write(
            &ObjectKey::event_source_mapping(&uuid),
            None,
            Expected::Exists,
        )
        .await?;
    let mut out = mapping_json(&state, &current);
    out["State"] = json!("Deleting");
    tracing::info!(uuid = %uuid, "event source mapping deleted");
    Ok((StatusCode::ACCEPTED, Json(out)))
}
