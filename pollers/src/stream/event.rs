//! Lambda's Kafka event, partial-batch responses, and the Kafka-topic failure record.

use std::borrow::Borrow;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

/// Lambda's batch payload cap.
pub const MAX_BATCH_BYTES: usize = 6 * 1024 * 1024;

/// One record, owned, as the poller carries it from fetch to completion.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
    /// Timestamp, Unix ms.
    pub timestamp_ms: i64,
    /// `CREATE_TIME` or `LOG_APPEND_TIME`.
    pub timestamp_type: &'static str,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The ownership epoch the record was fetched under.
    pub epoch: u64,
}

impl Rec {
    /// Bytes it adds to an event (base64 grows data by a third).
    #[must_use]
    pub fn encoded_size(&self) -> usize {
        let raw = self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len);
        raw * 4 / 3
            + 256
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() * 4)
                .sum::<usize>()
    }

    fn json(&self) -> Value {
        let headers: Vec<Value> = self
            .headers
            .iter()
            .map(|(k, v)| json!({ k.clone(): v }))
            .collect();
        json!({
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp_ms,
            "timestampType": self.timestamp_type,
            "key": self.key.as_ref().map(|k| B64.encode(k)),
            "value": self.value.as_ref().map(|v| B64.encode(v)),
            "headers": headers,
        })
    }
}

/// `<topic>-<partition>`, Lambda's key for a partition's records.
#[must_use]
pub fn tp_key(topic: &str, partition: i32) -> String {
    format!("{topic}-{partition}")
}

/// The event the function receives for `batch` (records of one partition, owned or borrowed).
#[must_use]
pub fn kafka_event<R: Borrow<Rec>>(bootstrap_servers: &str, batch: &[R]) -> Value {
    let mut records = serde_json::Map::new();
    for r in batch {
        let r: &Rec = r.borrow();
        records
            .entry(tp_key(&r.topic, r.partition))
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("inserted as an array")
            .push(r.json());
    }
    json!({ "eventSource": "SelfManagedKafka", "bootstrapServers": bootstrap_servers, "records": records })
}

/// What a `ReportBatchItemFailures` response says.
#[derive(Debug, PartialEq, Eq)]
pub enum Partial {
    /// Everything succeeded (no list, `null`, or an empty list).
    AllOk,
    /// Records from this offset on must be retried.
    FailedFrom(i64),
    /// The response names something not in the batch, or is malformed: the whole batch failed.
    Invalid(String),
}

/// Reads a partial-batch response for `batch` (owned or borrowed records).
#[must_use]
pub fn partial_failures<R: Borrow<Rec>>(response: &[u8], batch: &[R]) -> Partial {
    let Ok(v) = serde_json::from_slice::<Value>(response) else {
        return Partial::AllOk;
    };
    let failures = match &v["batchItemFailures"] {
        Value::Null => return Partial::AllOk,
        Value::Array(a) if a.is_empty() => return Partial::AllOk,
        Value::Array(a) => a,
        other => return Partial::Invalid(format!("batchItemFailures is not a list: {other}")),
    };
    let mut lowest: Option<i64> = None;
    for f in failures {
        let id = &f["itemIdentifier"];
        let (Some(tp), Some(offset)) = (id["topic-partition"].as_str(), id["offset"].as_i64())
        else {
            return Partial::Invalid(format!("malformed itemIdentifier {id}"));
        };
        if !batch
            .iter()
            .map(Borrow::borrow)
            .any(|r: &Rec| r.offset == offset && tp_key(&r.topic, r.partition) == tp)
        {
            return Partial::Invalid(format!("itemIdentifier {tp}@{offset} is not in the batch"));
        }
        lowest = Some(lowest.map_or(offset, |l| l.min(offset)));
    }
    lowest.map_or(Partial::AllOk, Partial::FailedFrom)
}

/// Lambda's Kafka-topic failure record for one record (§3.7 of the reference): batch metadata,
/// the record itself as a one-record event, so it can be inspected and replayed. The record's
/// type is `sluice_destinations::StreamFailureRecord`, which `sluice destinations tail` and
/// `sluice redrive` read back.
#[must_use]
#[allow(clippy::too_many_arguments)]
pub fn failure_record(
    request_id: &str,
    function_arn: &str,
    condition: &str,
    invoke_count: u32,
    error: Option<&[u8]>,
    bootstrap_servers: &str,
    rec: &Rec,
    now_iso: &str,
) -> sluice_destinations::StreamFailureRecord {
    sluice_destinations::StreamFailureRecord::new(
        request_id,
        function_arn,
        condition,
        invoke_count,
        error,
        bootstrap_servers,
        (rec.offset, rec.timestamp_ms, rec.encoded_size()),
        kafka_event(bootstrap_servers, std::slice::from_ref(rec)),
        now_iso,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64) -> Rec {
        Rec {
            topic: "my-topic".into(),
            partition: 0,
            offset,
            key: Some(b"test-key".to_vec()),
            value: Some(b"test-value".to_vec()),
            timestamp_ms: 1_749_116_692_330,
            timestamp_type: "CREATE_TIME",
            headers: vec![("headerKey".into(), b"hv".to_vec())],
            epoch: 0,
        }
    }

    #[test]
    fn the_event_has_lambdas_kafka_shape() {
        let e = kafka_event("b1:9092", &[rec(100), rec(101)]);
        assert_eq!(e["eventSource"], "SelfManagedKafka");
        let r = &e["records"]["my-topic-0"][0];
        assert_eq!(r["offset"], 100);
        assert_eq!(r["key"], "dGVzdC1rZXk=");
        assert_eq!(r["value"], "dGVzdC12YWx1ZQ==");
        assert_eq!(r["timestampType"], "CREATE_TIME");
        assert_eq!(r["headers"][0]["headerKey"], json!([104, 118]));
        assert_eq!(e["records"]["my-topic-0"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn partial_responses_checkpoint_at_the_lowest_failure() {
        let batch = [rec(100), rec(101), rec(102)];
        let ok = |s: &str| partial_failures(s.as_bytes(), &batch);
        assert_eq!(ok(r#"{"batchItemFailures":[]}"#), Partial::AllOk);
        assert_eq!(ok(r#"{"batchItemFailures":null}"#), Partial::AllOk);
        assert_eq!(ok("null"), Partial::AllOk);
        assert_eq!(
            ok(
                r#"{"batchItemFailures":[{"itemIdentifier":{"topic-partition":"my-topic-0","offset":102}},{"itemIdentifier":{"topic-partition":"my-topic-0","offset":101}}]}"#
            ),
            Partial::FailedFrom(101)
        );
        assert!(matches!(
            ok(
                r#"{"batchItemFailures":[{"itemIdentifier":{"topic-partition":"my-topic-0","offset":7}}]}"#
            ),
            Partial::Invalid(_)
        ));
        assert!(matches!(
            ok(r#"{"batchItemFailures":[{"itemIdentifier":"101"}]}"#),
            Partial::Invalid(_)
        ));
    }

    #[test]
    fn failure_records_carry_the_record() {
        let f = failure_record(
            "id",
            "arn:f",
            "RetriesExhausted",
            3,
            Some(br#"{"errorMessage":"x"}"#),
            "b:9092",
            &rec(100),
            "2026-01-01T00:00:00.000Z",
        );
        let f = serde_json::to_value(&f).expect("encode");
        assert_eq!(f["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(f["KafkaBatchInfo"]["recordInfo"]["offset"], "100");
        assert_eq!(
            f["payload"]["records"]["my-topic-0"][0]["value"],
            "dGVzdC12YWx1ZQ=="
        );
        assert_eq!(f["responseContext"]["functionError"], "Unhandled");
        let back: sluice_destinations::StreamFailureRecord =
            serde_json::from_value(f).expect("the typed record reads it back");
        assert_eq!(back.records().map(|r| r.len()), Some(1));
    }
}
