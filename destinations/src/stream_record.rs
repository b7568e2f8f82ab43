//! Lambda's failure record of a Kafka event source mapping, as a Kafka-topic on-failure
//! destination gets it: one message per failed record, carrying that record inside a one-record
//! Kafka event (`payload`), so the record can be inspected and redriven to its topic byte for
//! byte.
//!
//! Shape (lambda-reference.md §3.7): `requestContext` {`requestId`, `functionArn`, `condition`,
//! `approximateInvokeCount`}, `responseContext` (absent when the function never ran), the
//! function's error as `responsePayload` (a Sluice addition, as in async records), `version`,
//! `timestamp`, `KafkaBatchInfo` {`batchSize`, `bootstrapServers`, `payloadSize`, `recordInfo`
//! {`offset`, `timestamp`}}, and `payload`: the event as the function got it, one record.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::ResponseContext;

/// Why a stream record went to the on-failure destination (Lambda's strings for Kafka sources).
pub mod condition {
    /// Every retry failed (or bisection isolated it and it still failed).
    pub const RETRY_ATTEMPTS_EXHAUSTED: &str = "RetryAttemptsExhausted";
    /// Older than `MaximumRecordAgeInSeconds` before it could be processed.
    pub const RECORD_AGE_EXCEEDED: &str = "RecordAgeExceeded";
    /// Bigger than a function's 6 MiB payload on its own.
    pub const MAXIMUM_PAYLOAD_SIZE_EXCEEDED: &str = "MaximumPayloadSizeExceeded";
}

/// `requestContext` of a stream failure record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamRequestContext {
    /// Id of this failure record (the batch's invocations have their own).
    pub request_id: String,
    /// `arn:…:function:<name>:$LATEST`.
    pub function_arn: String,
    /// One of [`condition`]'s strings.
    pub condition: String,
    /// Invocations made of the batch the record was in.
    pub approximate_invoke_count: u32,
}

/// `KafkaBatchInfo.recordInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordInfo {
    /// The record's offset, as a decimal string (Lambda's type).
    pub offset: String,
    /// The record's timestamp (Unix ms), as a decimal string.
    pub timestamp: String,
}

/// `KafkaBatchInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchInfo {
    /// Always 1: one message per failed record.
    pub batch_size: u32,
    /// The mapping's cluster.
    pub bootstrap_servers: String,
    /// Bytes of the record as the function gets it.
    pub payload_size: usize,
    /// Where the record is.
    pub record_info: RecordInfo,
}

/// The failure record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamFailureRecord {
    /// Which record, and why.
    #[serde(rename = "requestContext")]
    pub request_context: StreamRequestContext,
    /// How the function answered the last time, when it ran.
    #[serde(rename = "responseContext", default)]
    pub response_context: Option<ResponseContext>,
    /// The function's error body the last time, when it failed.
    #[serde(rename = "responsePayload", default)]
    pub response_payload: Option<Value>,
    /// `1.0`.
    pub version: String,
    /// When the record was written, ISO 8601 UTC with milliseconds.
    pub timestamp: String,
    /// The batch (of one) and the record's position.
    #[serde(rename = "KafkaBatchInfo")]
    pub kafka_batch_info: KafkaBatchInfo,
    /// The Kafka event with this one record, as the function got it (`records` keyed by
    /// `<topic>-<partition>`, key and value base64).
    pub payload: Value,
}

/// One Kafka record carried by a failure record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecord {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, when it had one.
    pub key: Option<Vec<u8>>,
    /// Its value (empty for a null value).
    pub value: Vec<u8>,
}

impl StreamFailureRecord {
    /// The record for `event` (a one-record Kafka event, as the function got it) at `offset`
    /// with `timestamp_ms` and `payload_size` bytes, written at `now_iso`; `error` is the
    /// function's last error body, when it ran and failed.
    #[allow(clippy::too_many_arguments)] // each is one field of Lambda's record
    #[must_use]
    pub fn new(
        request_id: &str,
        function_arn: &str,
        condition: &str,
        invoke_count: u32,
        error: Option<&[u8]>,
        bootstrap_servers: &str,
        (offset, timestamp_ms, payload_size): (i64, i64, usize),
        event: Value,
        now_iso: &str,
    ) -> Self {
        Self {
            request_context: StreamRequestContext {
                request_id: request_id.to_owned(),
                function_arn: format!("{function_arn}:$LATEST"),
                condition: condition.to_owned(),
                approximate_invoke_count: invoke_count,
            },
            response_context: error.map(|_| ResponseContext {
                status_code: 200,
                executed_version: "$LATEST".to_owned(),
                function_error: Some("Unhandled".to_owned()),
            }),
            response_payload: error.map(crate::record::json_or_string),
            version: "1.0".to_owned(),
            timestamp: now_iso.to_owned(),
            kafka_batch_info: KafkaBatchInfo {
                batch_size: 1,
                bootstrap_servers: bootstrap_servers.to_owned(),
                payload_size,
                record_info: RecordInfo {
                    offset: offset.to_string(),
                    timestamp: timestamp_ms.to_string(),
                },
            },
            payload: event,
        }
    }

    /// The function's name, from its ARN.
    #[must_use]
    pub fn function_name(&self) -> Option<&str> {
        self.request_context
            .function_arn
            .trim_end_matches(":$LATEST")
            .rsplit(':')
            .next()
    }

    /// The Kafka records the failure record carries (one, as Sluice writes them), decoded from
    /// the event; `None` when the event is not a Kafka event with base64 keys and values.
    #[must_use]
    pub fn records(&self) -> Option<Vec<FailedRecord>> {
        let mut out = Vec::new();
        for recs in self.payload.get("records")?.as_object()?.values() {
            for r in recs.as_array()? {
                let decode = |v: &Value| match v {
                    Value::Null => Some(None),
                    Value::String(s) => B64.decode(s).ok().map(Some),
                    _ => None,
                };
                out.push(FailedRecord {
                    topic: r.get("topic")?.as_str()?.to_owned(),
                    partition: i32::try_from(r.get("partition")?.as_i64()?).ok()?,
                    offset: r.get("offset")?.as_i64()?,
                    key: decode(r.get("key").unwrap_or(&Value::Null))?,
                    value: decode(r.get("value").unwrap_or(&Value::Null))?.unwrap_or_default(),
                });
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        json!({ "eventSource": "SelfManagedKafka", "bootstrapServers": "b:9092",
            "records": { "my-topic-0": [ { "topic": "my-topic", "partition": 0, "offset": 100,
                "timestamp": 1_749_116_692_330_i64, "timestampType": "CREATE_TIME",
                "key": "dGVzdC1rZXk=", "value": "dGVzdC12YWx1ZQ==", "headers": [] } ] } })
    }

    #[test]
    fn the_record_has_lambdas_kafka_topic_shape() {
        let r = StreamFailureRecord::new(
            "id",
            "arn:aws:lambda:us-east-1:1:function:f",
            condition::RETRY_ATTEMPTS_EXHAUSTED,
            3,
            Some(br#"{"errorMessage":"x"}"#),
            "b:9092",
            (100, 1_749_116_692_330, 120),
            event(),
            "2026-01-01T00:00:00.000Z",
        );
        let v = serde_json::to_value(&r).expect("encode");
        assert_eq!(v["requestContext"]["condition"], "RetryAttemptsExhausted");
        assert_eq!(
            v["requestContext"]["functionArn"],
            "arn:aws:lambda:us-east-1:1:function:f:$LATEST"
        );
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
        assert_eq!(v["responsePayload"]["errorMessage"], "x");
        assert_eq!(v["version"], "1.0");
        assert_eq!(v["KafkaBatchInfo"]["batchSize"], 1);
        assert_eq!(v["KafkaBatchInfo"]["recordInfo"]["offset"], "100");
        assert_eq!(
            v["payload"]["records"]["my-topic-0"][0]["value"],
            "dGVzdC12YWx1ZQ=="
        );
        assert_eq!(r.function_name(), Some("f"));
    }

    #[test]
    fn a_record_that_never_ran_has_no_response_and_its_kafka_record_decodes() {
        let r = StreamFailureRecord::new(
            "id",
            "arn:f",
            condition::RECORD_AGE_EXCEEDED,
            0,
            None,
            "b:9092",
            (100, 0, 10),
            event(),
            "t",
        );
        let text = serde_json::to_string(&r).expect("encode");
        let back: StreamFailureRecord = serde_json::from_str(&text).expect("decode");
        assert!(back.response_context.is_none());
        assert_eq!(
            back.records(),
            Some(vec![FailedRecord {
                topic: "my-topic".into(),
                partition: 0,
                offset: 100,
                key: Some(b"test-key".to_vec()),
                value: b"test-value".to_vec(),
            }])
        );
    }

    #[test]
    fn an_async_invocation_record_is_not_a_stream_failure_record() {
        let async_record = json!({ "version": "1.0", "timestamp": "t",
            "requestContext": { "requestId": "r", "functionArn": "a", "condition": "RetriesExhausted", "approximateInvokeCount": 1 },
            "requestPayload": {} });
        assert!(serde_json::from_value::<StreamFailureRecord>(async_record).is_err());
    }
}
