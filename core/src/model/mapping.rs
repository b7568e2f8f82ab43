//! Kafka event source mappings (CreateEventSourceMapping with Lambda's names, ranges and
//! defaults, plus Sluice's `ParallelizationFactor` for Kafka).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::invoke_config::{DestinationConfig, KafkaTopicUri};
use super::validate::{check_function_name, check_topic_name, Validate, Violations};

/// Lambda's batching window for Kafka when `MaximumBatchingWindowInSeconds` is not set.
pub const DEFAULT_KAFKA_BATCHING_WINDOW: Duration = Duration::from_millis(500);
/// Lambda caps retries at this when retries are infinite and an on-failure destination is set.
pub const INFINITE_RETRIES_CAP_WITH_DESTINATION: i64 = 10;

/// A mapping from Kafka topic(s) to a function, as CreateEventSourceMapping takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventSourceMappingConfig {
    /// The function that receives the batches.
    pub function_name: String,
    /// The topic to read (Lambda takes exactly one).
    pub topics: Vec<String>,
    /// The cluster to read from; absent: the node's own Kafka cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_managed_event_source: Option<SelfManagedEventSource>,
    /// Consumer group for a self-managed cluster. Create-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_managed_kafka_event_source_config: Option<KafkaEventSourceConfig>,
    /// Consumer group, as Amazon MSK mappings name it. Create-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amazon_managed_kafka_event_source_config: Option<KafkaEventSourceConfig>,
    /// An MSK cluster ARN (accepted for compatibility; Sluice reads the node's cluster or
    /// `SelfManagedEventSource`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source_arn: Option<String>,
    /// Where to start when the consumer group has no committed offset: `TRIM_HORIZON`, `LATEST`
    /// or `AT_TIMESTAMP`. Required. Create-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_position: Option<StartingPosition>,
    /// With `AT_TIMESTAMP`: Unix time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starting_position_timestamp: Option<f64>,
    /// Most records per batch: 1–10000, default 100.
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    /// Longest wait to fill a batch, in seconds: 0–300. Absent: 500 ms, Lambda's Kafka default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_batching_window_in_seconds: Option<i64>,
    /// Whether the mapping polls. Disabling pauses; enabling resumes from the last checkpoint.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Concurrent batches per partition: 1–10, default 1. Order is kept per record key.
    #[serde(default = "default_parallelization_factor")]
    pub parallelization_factor: i64,
    /// On a function error, split the batch in two and retry the halves (does not use retries).
    #[serde(default)]
    pub bisect_batch_on_function_error: bool,
    /// Retries of a failing batch: -1 (infinite, default) or 0–10000.
    #[serde(default = "default_infinite")]
    pub maximum_retry_attempts: i64,
    /// Oldest record to process, in seconds: -1 (infinite, default) or 60–604800.
    #[serde(default = "default_infinite")]
    pub maximum_record_age_in_seconds: i64,
    /// `["ReportBatchItemFailures"]` lets the function return partial-batch failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub function_response_types: Vec<FunctionResponseType>,
    /// Up to 5 filters, ORed; records no filter matches are skipped (and committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_criteria: Option<FilterCriteria>,
    /// Where failed batches go (`OnFailure` only, `kafka://<topic>`, never the source topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_config: Option<DestinationConfig>,
    /// Provisioned mode: the fleet keeps between MinimumPollers and MaximumPollers pollers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned_poller_config: Option<ProvisionedPollerConfig>,
    /// Extra per-mapping metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_config: Option<MetricsConfig>,
    /// Authentication and TLS settings for a self-managed cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_access_configurations: Vec<SourceAccessConfiguration>,
    /// Accepted for compatibility (Lambda encrypts filter criteria with it).
    #[serde(default, rename = "KMSKeyArn", skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

fn default_batch_size() -> i64 {
    100
}
fn default_enabled() -> bool {
    true
}
fn default_parallelization_factor() -> i64 {
    1
}
fn default_infinite() -> i64 {
    -1
}

/// Where to start reading when the consumer group has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StartingPosition {
    /// The oldest record still in the partition.
    TrimHorizon,
    /// Only records produced after the mapping starts.
    Latest,
    /// The first record at or after `StartingPositionTimestamp`.
    AtTimestamp,
}

/// A self-managed Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SelfManagedEventSource {
    /// `{"KAFKA_BOOTSTRAP_SERVERS": ["host:port", …]}`.
    pub endpoints: BTreeMap<String, Vec<String>>,
}

/// Consumer group settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KafkaEventSourceConfig {
    /// The consumer group: 1–200 characters of `[a-zA-Z0-9-/*:_+=.@-]`. If it already has
    /// committed offsets, `StartingPosition` is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group_id: Option<String>,
}

/// The response types a function may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FunctionResponseType {
    /// The function returns `{"batchItemFailures":[…]}`; retries resume from the lowest failure.
    ReportBatchItemFailures,
}

/// Event filtering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FilterCriteria {
    /// The filters; a record passes when any one matches.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

/// One filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Filter {
    /// An EventBridge-style pattern as a JSON string, on the record's `key` and/or `value`.
    pub pattern: String,
}

/// Provisioned mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProvisionedPollerConfig {
    /// Pollers always running: 1–200, default 1.
    #[serde(default = "default_minimum_pollers")]
    pub minimum_pollers: i64,
    /// Most pollers: 1–2000, default 200.
    #[serde(default = "default_maximum_pollers")]
    pub maximum_pollers: i64,
    /// Mappings in one group share pollers (up to 100 mappings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poller_group_name: Option<String>,
}

fn default_minimum_pollers() -> i64 {
    1
}
fn default_maximum_pollers() -> i64 {
    200
}

/// Per-mapping metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MetricsConfig {
    /// Which metric groups to publish.
    #[serde(default)]
    pub metrics: Vec<MetricsKind>,
}

/// A per-mapping metric group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricsKind {
    /// Records received, filtered, processed.
    EventCount,
    /// Errors by kind.
    ErrorCount,
    /// Offset lag and consumer metrics.
    KafkaMetrics,
}

/// One authentication or TLS setting of a self-managed cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde()]
pub struct SourceAccessConfiguration {
    /// BASIC_AUTH, SASL_SCRAM_256_AUTH, SASL_SCRAM_512_AUTH, CLIENT_CERTIFICATE_TLS_AUTH,
    /// SERVER_ROOT_CA_CERTIFICATE, VPC_SUBNET or VPC_SECURITY_GROUP.
    #[serde(rename = "Type")]
    pub kind: String,
    /// The secret or resource it refers to.
    #[serde(rename = "URI")]
    pub uri: String,
}

const ACCESS_TYPES: &[&str] = &[
    "BASIC_AUTH",
    "SASL_SCRAM_256_AUTH",
    "SASL_SCRAM_512_AUTH",
    "CLIENT_CERTIFICATE_TLS_AUTH",
    "SERVER_ROOT_CA_CERTIFICATE",
    "VPC_SUBNET",
    "VPC_SECURITY_GROUP",
];

impl EventSourceMappingConfig {
    /// The batching window: the configured seconds, or Lambda's 500 ms Kafka default.
    #[must_use]
    pub fn batching_window(&self) -> Duration {
        match self.maximum_batching_window_in_seconds {
            Some(s) => Duration::from_secs(u64::try_from(s).unwrap_or(0)),
            None => DEFAULT_KAFKA_BATCHING_WINDOW,
        }
    }

    /// Retries as Sluice applies them: `None` is infinite. Infinite retries with an on-failure
    /// destination are capped at 10, as Lambda does.
    #[must_use]
    pub fn effective_maximum_retry_attempts(&self) -> Option<i64> {
        match self.maximum_retry_attempts {
            -1 if self.on_failure_topic().is_some() => Some(INFINITE_RETRIES_CAP_WITH_DESTINATION),
            -1 => None,
            n => Some(n),
        }
    }

    /// The on-failure topic, when configured.
    #[must_use]
    pub fn on_failure_topic(&self) -> Option<KafkaTopicUri> {
        self.destination_config
            .as_ref()
            .and_then(DestinationConfig::on_failure_topic)
    }

    /// The consumer group from either event source config, when one was given.
    #[must_use]
    pub fn consumer_group_id(&self) -> Option<&str> {
        self.self_managed_kafka_event_source_config
            .as_ref()
            .or(self.amazon_managed_kafka_event_source_config.as_ref())
            .and_then(|c| c.consumer_group_id.as_deref())
    }

    /// Whether the function reports partial-batch failures.
    #[must_use]
    pub fn reports_batch_item_failures(&self) -> bool {
        self.function_response_types
            .contains(&FunctionResponseType::ReportBatchItemFailures)
    }
}

impl Validate for EventSourceMappingConfig {
    fn validate(&self) -> Result<(), Violations> {
        let mut v = Violations::default();
        check_function_name(&mut v, "FunctionName", &self.function_name);
        if self.topics.len() == 1 {
            check_topic_name(&mut v, "Topics[0]", &self.topics[0]);
        } else {
            v.push(
                "Topics",
                format!("must hold exactly 1 topic, got {}", self.topics.len()),
            );
        }
        if let Some(src) = &self.self_managed_event_source {
            match src.endpoints.get("KAFKA_BOOTSTRAP_SERVERS") {
                Some(servers) if !servers.is_empty() && servers.len() <= 10 => {
                    for (i, s) in servers.iter().enumerate() {
                        let ok = s.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                        });
                        if !ok {
                            v.push(
                                format!(
                                    "SelfManagedEventSource.Endpoints.KAFKA_BOOTSTRAP_SERVERS[{i}]"
                                ),
                                format!("must be host:port, got {s:?}"),
                            );
                        }
                    }
                }
                Some(servers) => v.push(
                    "SelfManagedEventSource.Endpoints.KAFKA_BOOTSTRAP_SERVERS",
                    format!("must hold 1..=10 servers, got {}", servers.len()),
                ),
                None => v.push(
                    "SelfManagedEventSource.Endpoints",
                    "must have KAFKA_BOOTSTRAP_SERVERS",
                ),
            }
            for key in src
                .endpoints
                .keys()
                .filter(|k| *k != "KAFKA_BOOTSTRAP_SERVERS")
            {
                v.push(
                    format!("SelfManagedEventSource.Endpoints.{key}"),
                    "is not allowed; the only endpoint type is KAFKA_BOOTSTRAP_SERVERS",
                );
            }
        }
        if self.self_managed_kafka_event_source_config.is_some()
            && self.amazon_managed_kafka_event_source_config.is_some()
        {
            v.push(
                "AmazonManagedKafkaEventSourceConfig",
                "must not be given together with SelfManagedKafkaEventSourceConfig",
            );
        }
        if let Some(group) = self.consumer_group_id() {
            let ok = (1..=200).contains(&group.len())
                && group
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-/*:_+=.@".contains(&b));
            if !ok {
                v.push(
                    "ConsumerGroupId",
                    format!(
                        "must be 1..=200 characters of letters, digits and -/*:_+=.@, got {group:?}"
                    ),
                );
            }
        }
        match (self.starting_position, self.starting_position_timestamp) {
            (None, _) => v.push(
                "StartingPosition",
                "is required for Kafka: one of TRIM_HORIZON, LATEST, AT_TIMESTAMP",
            ),
            (Some(StartingPosition::AtTimestamp), None) => v.push(
                "StartingPositionTimestamp",
                "is required when StartingPosition is AT_TIMESTAMP",
            ),
            (Some(StartingPosition::AtTimestamp), Some(ts)) if !(ts.is_finite() && ts >= 0.0) => {
                v.push(
                    "StartingPositionTimestamp",
                    format!("must be Unix seconds >= 0, got {ts}"),
                );
            }
            (Some(p), Some(_)) if p != StartingPosition::AtTimestamp => v.push(
                "StartingPositionTimestamp",
                "is only allowed when StartingPosition is AT_TIMESTAMP",
            ),
            _ => {}
        }
        v.range("BatchSize", self.batch_size, 1, 10_000);
        if let Some(w) = self.maximum_batching_window_in_seconds {
            v.range("MaximumBatchingWindowInSeconds", w, 0, 300);
        }
        v.range("ParallelizationFactor", self.parallelization_factor, 1, 10);
        if self.maximum_retry_attempts != -1 {
            v.range(
                "MaximumRetryAttempts",
                self.maximum_retry_attempts,
                -1,
                10_000,
            );
        }
        let age = self.maximum_record_age_in_seconds;
        if age != -1 && !(60..=604_800).contains(&age) {
            v.push(
                "MaximumRecordAgeInSeconds",
                format!("must be -1 (infinite) or 60..=604800, got {age}"),
            );
        }
        if let Some(fc) = &self.filter_criteria {
            if fc.filters.len() > 5 {
                v.push(
                    "FilterCriteria.Filters",
                    format!("must hold at most 5 filters, got {}", fc.filters.len()),
                );
            }
            for (i, f) in fc.filters.iter().enumerate() {
                check_filter_pattern(
                    &mut v,
                    &format!("FilterCriteria.Filters[{i}].Pattern"),
                    &f.pattern,
                );
            }
        }
        if let Some(d) = &self.destination_config {
            if d.on_success
                .as_ref()
                .is_some_and(|s| s.destination.is_some())
            {
                v.push(
                    "DestinationConfig.OnSuccess",
                    "is not supported for Kafka event source mappings; use OnFailure",
                );
            }
            d.check(&mut v, "DestinationConfig");
            if let (Some(dest), Some(src)) = (d.on_failure_topic(), self.topics.first()) {
                if &dest.topic == src {
                    v.push(
                        "DestinationConfig.OnFailure.Destination",
                        format!("must not be the source topic {src:?}"),
                    );
                }
            }
        }
        if let Some(p) = &self.provisioned_poller_config {
            v.range(
                "ProvisionedPollerConfig.MinimumPollers",
                p.minimum_pollers,
                1,
                200,
            );
            v.range(
                "ProvisionedPollerConfig.MaximumPollers",
                p.maximum_pollers,
                1,
                2_000,
            );
            if p.minimum_pollers > p.maximum_pollers {
                v.push(
                    "ProvisionedPollerConfig.MinimumPollers",
                    format!(
                        "must be at most MaximumPollers ({}), got {}",
                        p.maximum_pollers, p.minimum_pollers
                    ),
                );
            }
            if let Some(g) = &p.poller_group_name {
                if g.is_empty() || g.len() > 128 {
                    v.push(
                        "ProvisionedPollerConfig.PollerGroupName",
                        format!("must be 1..=128 characters, got {}", g.len()),
                    );
                }
            }
        }
        for (i, sac) in self.source_access_configurations.iter().enumerate() {
            if !ACCESS_TYPES.contains(&sac.kind.as_str()) {
                v.push(
                    format!("SourceAccessConfigurations[{i}].Type"),
                    format!(
                        "must be one of {}, got {:?}",
                        ACCESS_TYPES.join(", "),
                        sac.kind
                    ),
                );
            }
        }
        v.into_result()
    }
}

/// Checks one pattern with the compiler the pollers run, so that a pattern the API accepts can
/// never fail later in a poller.
fn check_filter_pattern(v: &mut Violations, field: &str, pattern: &str) {
    if pattern.len() > 4096 {
        v.push(
            field,
            format!("must be at most 4096 characters, got {}", pattern.len()),
        );
        return;
    }
    match crate::filter::FilterSet::compile(&[pattern.to_owned()]) {
        Ok(_) => {}
        Err(crate::filter::FilterError::ParsePattern { source, .. }) => {
            v.push(field, format!("must be a JSON object: {source}"));
        }
        Err(crate::filter::FilterError::InvalidPattern { path, reason, .. }) => {
            v.push(field, format!("at {path}: {reason}"));
        }
    }
}

/// The lifecycle states Lambda reports for a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MappingState {
    /// Just created; the tracker has not picked it up yet.
    Creating,
    /// The tracker is starting its pollers.
    Enabling,
    /// Polling.
    Enabled,
    /// The tracker is stopping its pollers.
    Disabling,
    /// Paused; resumes from the last checkpoint when enabled.
    Disabled,
    /// An update is being applied.
    Updating,
    /// Being deleted.
    Deleting,
}

/// A mapping as the store persists it: the user's configuration plus what Sluice adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventSourceMappingState {
    /// The mapping's identifier.
    #[serde(rename = "UUID")]
    pub uuid: String,
    /// What the user asked for.
    pub config: EventSourceMappingConfig,
    /// Where it is in its lifecycle.
    pub state: MappingState,
    /// Why it got there ("User action", or an error such as `ESM_CONFIG_NOT_VALID`).
    pub state_transition_reason: String,
    /// Last change, Unix seconds.
    pub last_modified: f64,
    /// E.g. "No records processed", "OK", "PROBLEM: Function call failed".
    pub last_processing_result: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse, Format, ModelError};

    const MINIMAL: &str = r#"{"FunctionName":"f","Topics":["orders"],"StartingPosition":"LATEST"}"#;

    #[test]
    fn defaults_follow_lambda_kafka() {
        let m: EventSourceMappingConfig = parse(MINIMAL, Format::Json).expect("valid");
        assert_eq!(m.batch_size, 100);
        assert_eq!(m.batching_window(), Duration::from_millis(500));
        assert_eq!(m.parallelization_factor, 1);
        assert_eq!(m.maximum_retry_attempts, -1);
        assert_eq!(m.maximum_record_age_in_seconds, -1);
        assert!(m.enabled);
        assert!(!m.bisect_batch_on_function_error);
        assert_eq!(m.effective_maximum_retry_attempts(), None);
    }

    #[test]
    fn infinite_retries_with_destination_are_capped_at_ten() {
        let m: EventSourceMappingConfig = parse(
            r#"{"FunctionName":"f","Topics":["orders"],"StartingPosition":"TRIM_HORIZON",
                "DestinationConfig":{"OnFailure":{"Destination":"kafka://orders-failed"}}}"#,
            Format::Json,
        )
        .expect("valid");
        assert_eq!(m.effective_maximum_retry_attempts(), Some(10));
    }

    #[test]
    fn every_range_is_checked() {
        let err = parse::<EventSourceMappingConfig>(
            r#"{"FunctionName":"f","Topics":["orders"],"StartingPosition":"AT_TIMESTAMP",
                "BatchSize":0,"MaximumBatchingWindowInSeconds":301,"ParallelizationFactor":11,
                "MaximumRetryAttempts":10001,"MaximumRecordAgeInSeconds":59,
                "ProvisionedPollerConfig":{"MinimumPollers":300,"MaximumPollers":2},
                "DestinationConfig":{"OnFailure":{"Destination":"kafka://orders"}}}"#,
            Format::Json,
        )
        .expect_err("invalid");
        let ModelError::Invalid(v) = err else {
            panic!("expected violations")
        };
        let text = v.to_string();
        for expected in [
            "StartingPositionTimestamp is required when StartingPosition is AT_TIMESTAMP",
            "BatchSize must be 1..=10000, got 0",
            "MaximumBatchingWindowInSeconds must be 0..=300, got 301",
            "ParallelizationFactor must be 1..=10, got 11",
            "MaximumRetryAttempts must be -1..=10000, got 10001",
            "MaximumRecordAgeInSeconds must be -1 (infinite) or 60..=604800, got 59",
            "ProvisionedPollerConfig.MinimumPollers must be 1..=200, got 300",
            "ProvisionedPollerConfig.MinimumPollers must be at most MaximumPollers (2), got 300",
            "DestinationConfig.OnFailure.Destination must not be the source topic",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        assert_eq!(v.0.len(), 9, "{text}");
    }

    #[test]
    fn starting_position_is_required_and_named() {
        let err = parse::<EventSourceMappingConfig>(
            r#"{"FunctionName":"f","Topics":["t"]}"#,
            Format::Json,
        )
        .expect_err("missing");
        assert!(err.to_string().contains("StartingPosition is required"));
        let err = parse::<EventSourceMappingConfig>(
            r#"{"FunctionName":"f","Topics":["t"],"StartingPosition":"EARLIEST"}"#,
            Format::Json,
        )
        .expect_err("bad variant");
        assert!(err.to_string().contains("TRIM_HORIZON"), "{err}");
    }

    #[test]
    fn filters_are_checked() {
        let err = parse::<EventSourceMappingConfig>(
            r#"{"FunctionName":"f","Topics":["t"],"StartingPosition":"LATEST",
                "FilterCriteria":{"Filters":[{"Pattern":"{\"data\":{\"a\":[1]}}"},{"Pattern":"nope"}]}}"#,
            Format::Json,
        )
        .expect_err("bad filters");
        let text = err.to_string();
        assert!(
            text.contains("FilterCriteria.Filters[0].Pattern at $: unknown field `data`"),
            "{text}"
        );
        assert!(
            text.contains("FilterCriteria.Filters[1].Pattern must be a JSON object"),
            "{text}"
        );
    }

    #[test]
    fn filters_are_checked_by_the_compiler_the_pollers_run() {
        // Well-formed JSON objects on key/value that the old shape check let through and the
        // poller's compiler refuses: each used to be accepted, then failed the mapping's poller.
        for pattern in [
            r#"{"value":{"a":"x"}}"#,
            r#"{"value":{"a":[{"bogus-operator":1}]}}"#,
            r#"{"value":{"price":[{"numeric":[">"]}]}}"#,
            r#"{"value":{"a":[]}}"#,
        ] {
            let doc = serde_json::json!({"FunctionName":"f","Topics":["t"],"StartingPosition":"LATEST",
                "FilterCriteria":{"Filters":[{"Pattern":pattern}]}});
            let err = parse::<EventSourceMappingConfig>(&doc.to_string(), Format::Json)
                .expect_err(pattern);
            let text = err.to_string();
            assert!(
                text.contains("FilterCriteria.Filters[0].Pattern at $."),
                "{pattern}: {text}"
            );
            assert!(crate::filter::FilterSet::compile(&[pattern.to_owned()]).is_err());
        }
    }

    #[test]
    fn yaml_like_a_sam_template_parses() {
        let m: EventSourceMappingConfig = parse(
            "FunctionName: f\nTopics: [orders]\nStartingPosition: TRIM_HORIZON\nBatchSize: 500\n\
             SelfManagedEventSource:\n  Endpoints:\n    KAFKA_BOOTSTRAP_SERVERS: [\"k1:9092\"]\n\
             SelfManagedKafkaEventSourceConfig:\n  ConsumerGroupId: orders-fn\n\
             FunctionResponseTypes: [ReportBatchItemFailures]\n",
            Format::Yaml,
        )
        .expect("valid");
        assert_eq!(m.batch_size, 500);
        assert_eq!(m.consumer_group_id(), Some("orders-fn"));
        assert!(m.reports_batch_item_failures());
    }
}
