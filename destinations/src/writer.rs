//! Writes records to destination topics, creating them on first use.
//!
//! Every Kafka error is classified once, by [`sluice_core::kafka::is_retryable`]: a retryable
//! one (timeouts, transport, a full queue) is retried with back-off until Kafka has the record,
//! so nothing is lost on the way out; a permanent one ends the write. A record too large for the
//! producer or the broker is handled here: its payloads are replaced by a marker with their sizes
//! and the source position, the truncated record is delivered and
//! `sluice_destination_records_truncated_total` counts it. Any other permanent error (an
//! authorization error, an invalid topic) is returned as [`DestinationError`] for the caller to
//! decide (count the delivery failure and move on, as Lambda does with
//! `DestinationDeliveryFailures`), instead of wedging its partition's commit point.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use sluice_core::kafka::{ensure_topic, is_retryable, is_too_large, KafkaSettings, TopicSpec};
use sluice_core::producer::DurableProducer;

/// The fields of a destination record that carry payloads (Lambda's invocation record and the
/// Kafka failure record); truncation replaces these and keeps the envelope.
const PAYLOAD_FIELDS: [&str; 3] = ["requestPayload", "responsePayload", "payload"];

/// Why a destination record was not written.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The destination topic could not be created.
    #[error("create destination topic {topic}: {source}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: KafkaError,
    },
    /// Kafka did not take the record.
    #[error("write to destination topic {topic}: {source}")]
    Produce {
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: KafkaError,
    },
}

impl DestinationError {
    /// Whether a later try can succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            DestinationError::CreateTopic { source, .. }
            | DestinationError::Produce { source, .. } => is_retryable(source),
        }
    }
}

/// Where a destination record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Whether its payloads were replaced by a marker to fit.
    pub truncated: bool,
}

/// Writes destination records. Cheap to clone.
#[derive(Clone)]
pub struct DestinationWriter {
    kafka: KafkaSettings,
    producer: DurableProducer,
    created: Arc<Mutex<HashSet<String>>>,
    partitions: i32,
}

impl DestinationWriter {
    /// A writer sharing `producer` (idempotent, `acks=all`; a [`DurableProducer`] is rebuilt
    /// after a fatal error, a bare `FutureProducer` is used as is); topics it creates get
    /// `partitions`.
    #[must_use]
    pub fn new(
        kafka: KafkaSettings,
        producer: impl Into<DurableProducer>,
        partitions: i32,
    ) -> Self {
        Self {
            kafka,
            producer: producer.into(),
            created: Arc::new(Mutex::new(HashSet::new())),
            partitions,
        }
    }

    /// As [`DestinationWriter::deliver`], for callers that cannot act on a permanent error:
    /// that is logged (ERROR) and counted, and `(-1, -1)` returned. Prefer `deliver`.
    pub async fn write(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        match self.deliver(topic, key, value, headers).await {
            Ok(d) => (d.partition, d.offset),
            Err(e) => {
                tracing::error!(topic, error = %e, "destination record not delivered: permanent error");
                (-1, -1)
            }
        }
    }

    /// Writes `value` under `key` to `topic`. Retryable errors are retried with back-off (1 s
    /// doubling to 1 min) until Kafka acknowledges the record; a record too large is truncated
    /// (see the module doc) and delivered. Every failed try is counted in
    /// `sluice_destination_delivery_failures_total`.
    ///
    /// # Errors
    /// A permanent [`DestinationError`] (never a retryable one): authorization, an invalid
    /// topic, a record that is too large even truncated.
    pub async fn deliver(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Delivered, DestinationError> {
        let mut backoff = Duration::from_secs(1);
        let mut truncated: Option<Vec<u8>> = None;
        loop {
            let body = truncated.as_deref().unwrap_or(value);
            let mut h: Vec<(&str, &str)> = headers.to_vec();
            if truncated.is_some() {
                h.push(("sluice-truncated", "true"));
            }
            let e = match self.try_write(topic, key, body, &h).await {
                Ok((partition, offset)) => {
                    return Ok(Delivered {
                        partition,
                        offset,
                        truncated: truncated.is_some(),
                    })
                }
                Err(e) => e,
            };
            metrics::counter!("sluice_destination_delivery_failures_total", "topic" => topic.to_owned()).increment(1);
            if let DestinationError::Produce { source, .. } = &e {
                if is_too_large(source) && truncated.is_none() {
                    tracing::warn!(topic, bytes = value.len(), error = %source, "destination record too large; delivering it with its payloads replaced by a marker");
                    metrics::counter!("sluice_destination_records_truncated_total", "topic" => topic.to_owned()).increment(1);
                    truncated = Some(truncate(value, headers, &source.to_string()));
                    continue;
                }
            }
            if !e.is_retryable() {
                return Err(e);
            }
            tracing::warn!(topic, error = %e, retry_in = ?backoff, "destination write failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }

    async fn try_write(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(i32, i64), DestinationError> {
        let known = self
            .created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(topic);
        if !known {
            let spec = TopicSpec {
                name: topic.to_owned(),
                partitions: self.partitions,
                config: Vec::new(),
            };
            ensure_topic(&self.kafka, &spec).await.map_err(|source| {
                DestinationError::CreateTopic {
                    topic: topic.to_owned(),
                    source,
                }
            })?;
            self.created
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(topic.to_owned());
        }
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let record = FutureRecord::to(topic).key(key).payload(value).headers(h);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(source, _)| DestinationError::Produce {
                topic: topic.to_owned(),
                source,
            })
    }
}

/// `value` with every payload field replaced by a marker
/// `{"sluiceTruncated": {"bytes", "reason", "source"}}`; the envelope (request context, batch
/// info) stays. `source` is where the payload came from: the request id, and each record's
/// topic, partition and offset for a Kafka failure record. A value that is not a JSON object
/// becomes the marker alone.
#[must_use]
pub fn truncate(value: &[u8], headers: &[(&str, &str)], reason: &str) -> Vec<u8> {
    let parsed: Option<serde_json::Map<String, Value>> = serde_json::from_slice(value).ok();
    let request_id = headers
        .iter()
        .find(|(k, _)| *k == "sluice-request-id")
        .map(|(_, v)| (*v).to_owned());
    let Some(mut obj) = parsed else {
        let marker = json!({ "sluiceTruncated": {
            "bytes": value.len(),
            "reason": reason,
            "source": { "requestId": request_id, "headers": headers.iter().map(|(k, v)| json!({ *k: *v })).collect::<Vec<_>>() },
        }});
        return marker.to_string().into_bytes();
    };
    let request_id = obj
        .get("requestContext")
        .and_then(|c| c.get("requestId"))
        .cloned()
        .or(request_id.map(Value::String));
    let records: Vec<Value> = obj
        .get("payload")
        .and_then(|p| p.get("records"))
        .and_then(Value::as_object)
        .map(|by_partition| {
            by_partition
                .values()
                .filter_map(Value::as_array)
                .flatten()
                .map(|r| json!({ "topic": r.get("topic"), "partition": r.get("partition"), "offset": r.get("offset") }))
                .collect()
        })
        .unwrap_or_default();
    let source = json!({ "requestId": request_id, "records": records });
    for field in PAYLOAD_FIELDS {
        if let Some(v) = obj.get_mut(field) {
            if v.is_null() {
                continue;
            }
            let bytes = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
            *v = json!({ "sluiceTruncated": { "bytes": bytes, "reason": reason, "source": source } });
        }
    }
    Value::Object(obj).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn truncation_keeps_the_envelope_and_says_what_was_cut() {
        let big = "x".repeat(10_000);
        let record = json!({
            "requestContext": { "requestId": "r-1", "condition": "RetriesExhausted" },
            "requestPayload": { "data": big },
            "responsePayload": null,
            "payload": { "records": { "t-0": [ { "topic": "t", "partition": 0, "offset": 42, "value": big } ] } },
        });
        let out = truncate(record.to_string().as_bytes(), &[], "too large");
        assert!(out.len() < 2_000);
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["requestContext"]["requestId"], "r-1");
        let m = &v["requestPayload"]["sluiceTruncated"];
        assert!(m["bytes"].as_u64().expect("bytes") > 10_000);
        assert_eq!(m["source"]["requestId"], "r-1");
        assert_eq!(
            v["payload"]["sluiceTruncated"]["source"]["records"][0]["offset"],
            42
        );
        assert!(v["responsePayload"].is_null());
    }

    #[test]
    fn a_value_that_is_not_json_becomes_the_marker() {
        let out = truncate(&[0xff; 100], &[("sluice-request-id", "r-2")], "too large");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["sluiceTruncated"]["bytes"], 100);
        assert_eq!(v["sluiceTruncated"]["source"]["requestId"], "r-2");
    }

    #[test]
    fn authorization_and_size_are_permanent_timeouts_are_not() {
        let e = |code| DestinationError::Produce {
            topic: "t".into(),
            source: KafkaError::MessageProduction(code),
        };
        assert!(!e(RDKafkaErrorCode::TopicAuthorizationFailed).is_retryable());
        assert!(!e(RDKafkaErrorCode::MessageSizeTooLarge).is_retryable());
        assert!(e(RDKafkaErrorCode::MessageTimedOut).is_retryable());
        assert!(e(RDKafkaErrorCode::QueueFull).is_retryable());
    }
}
