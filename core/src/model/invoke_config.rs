//! Asynchronous invocation settings (PutFunctionEventInvokeConfig) and Kafka destinations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::validate::{check_function_name, check_topic_name, Validate, Violations};

/// How Sluice handles a function's asynchronous (`Event`) invocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventInvokeConfig {
    /// The function this applies to. Optional in the API (the path names it); required in files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_name: Option<String>,
    /// Retries after a function error: 0–2, default 2. Sluice waits 1 min before the second
    /// attempt and 2 min before the third, as Lambda does.
    #[serde(default = "default_maximum_retry_attempts")]
    pub maximum_retry_attempts: i64,
    /// Oldest an event may be when it is (re)tried, in seconds: 60–21600, default 21600 (6 h).
    /// Older events go to the on-failure destination with condition `EventAgeExceeded`.
    #[serde(default = "default_maximum_event_age_in_seconds")]
    pub maximum_event_age_in_seconds: i64,
    /// Where invocation records go on success and on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_config: Option<DestinationConfig>,
}

impl Default for EventInvokeConfig {
    fn default() -> Self {
        Self {
            function_name: None,
            maximum_retry_attempts: default_maximum_retry_attempts(),
            maximum_event_age_in_seconds: default_maximum_event_age_in_seconds(),
            destination_config: None,
        }
    }
}

fn default_maximum_retry_attempts() -> i64 {
    2
}
fn default_maximum_event_age_in_seconds() -> i64 {
    21_600
}

/// On-success and on-failure destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfig {
    /// Where records of successful invocations go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<Destination>,
    /// Where records of failed or discarded invocations go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Destination>,
}

/// One destination. Lambda writes `{}` for "none"; an absent `Destination` means the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Destination {
    /// `kafka://<topic>`: a topic on the node's Kafka cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

impl DestinationConfig {
    /// Checks both destinations; `prefix` is the path of this object (`DestinationConfig`).
    pub(crate) fn check(&self, v: &mut Violations, prefix: &str) {
        for (name, dest) in [
            ("OnSuccess", &self.on_success),
            ("OnFailure", &self.on_failure),
        ] {
            if let Some(uri) = dest.as_ref().and_then(|d| d.destination.as_deref()) {
                KafkaTopicUri::check(uri, v, &format!("{prefix}.{name}.Destination"));
            }
        }
    }

    /// The on-failure topic, when one is configured.
    #[must_use]
    pub fn on_failure_topic(&self) -> Option<KafkaTopicUri> {
        topic_of(self.on_failure.as_ref())
    }

    /// The on-success topic, when one is configured.
    #[must_use]
    pub fn on_success_topic(&self) -> Option<KafkaTopicUri> {
        topic_of(self.on_success.as_ref())
    }
}

fn topic_of(dest: Option<&Destination>) -> Option<KafkaTopicUri> {
    dest.and_then(|d| d.destination.as_deref())
        .and_then(|s| s.parse().ok())
}

/// A destination on the node's Kafka cluster, written `kafka://<topic>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KafkaTopicUri {
    /// The topic name.
    pub topic: String,
}

impl KafkaTopicUri {
    const SCHEME: &'static str = "kafka://";

    /// Checks `uri`, recording violations against `field`; the topic when it is well-formed.
    pub(crate) fn check(uri: &str, v: &mut Violations, field: &str) -> Option<Self> {
        let Some(topic) = uri.strip_prefix(Self::SCHEME) else {
            v.push(field, format!("must be kafka://<topic>, got {uri:?}"));
            return None;
        };
        let before = v.0.len();
        check_topic_name(v, field, topic);
        (v.0.len() == before).then(|| Self {
            topic: topic.to_owned(),
        })
    }
}

impl FromStr for KafkaTopicUri {
    type Err = Violations;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut v = Violations::default();
        Self::check(s, &mut v, "Destination").ok_or(v)
    }
}

impl fmt::Display for KafkaTopicUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::SCHEME, self.topic)
    }
}

impl Validate for EventInvokeConfig {
    fn validate(&self) -> Result<(), Violations> {
        let mut v = Violations::default();
        if let Some(name) = &self.function_name {
            check_function_name(&mut v, "FunctionName", name);
        }
        v.range("MaximumRetryAttempts", self.maximum_retry_attempts, 0, 2);
        v.range(
            "MaximumEventAgeInSeconds",
            self.maximum_event_age_in_seconds,
            60,
            21_600,
        );
        if let Some(d) = &self.destination_config {
            d.check(&mut v, "DestinationConfig");
        }
        v.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse, Format};

    #[test]
    fn defaults_are_two_retries_and_six_hours() {
        let c: EventInvokeConfig = parse("{}", Format::Json).expect("valid");
        assert_eq!(c.maximum_retry_attempts, 2);
        assert_eq!(c.maximum_event_age_in_seconds, 21_600);
    }

    #[test]
    fn destinations_must_be_kafka_topics() {
        let err = parse::<EventInvokeConfig>(
            r#"{"MaximumRetryAttempts":3,"MaximumEventAgeInSeconds":59,
                "DestinationConfig":{"OnSuccess":{"Destination":"arn:aws:sqs:us-east-1:1:q"},
                                     "OnFailure":{"Destination":"kafka://bad topic"}}}"#,
            Format::Json,
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("MaximumRetryAttempts must be 0..=2, got 3"),
            "{text}"
        );
        assert!(
            text.contains("MaximumEventAgeInSeconds must be 60..=21600, got 59"),
            "{text}"
        );
        assert!(
            text.contains("DestinationConfig.OnSuccess.Destination must be kafka://<topic>"),
            "{text}"
        );
        assert!(
            text.contains("DestinationConfig.OnFailure.Destination must be a Kafka topic name"),
            "{text}"
        );
    }

    #[test]
    fn empty_destination_objects_mean_none() {
        let c: EventInvokeConfig = parse(
            r#"{"DestinationConfig":{"OnSuccess":{},"OnFailure":{"Destination":"kafka://failed"}}}"#,
            Format::Json,
        )
        .expect("valid");
        let d = c.destination_config.expect("set");
        assert_eq!(d.on_success_topic(), None);
        assert_eq!(
            d.on_failure_topic().map(|t| t.topic),
            Some("failed".to_owned())
        );
    }

    #[test]
    fn topic_uri_round_trips() {
        let uri: KafkaTopicUri = "kafka://orders.failed".parse().expect("valid");
        assert_eq!(uri.to_string(), "kafka://orders.failed");
        assert!("kafka://".parse::<KafkaTopicUri>().is_err());
        assert!("kafka://..".parse::<KafkaTopicUri>().is_err());
    }
}
