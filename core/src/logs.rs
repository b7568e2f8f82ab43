//! Function logs: every worker writes each invocation's log (Lambda's `START`, the function's
//! output, `END`, `REPORT`) as one record to the logs topic (`<prefix>logs`), keyed by function
//! name with the request id in a header, so `sluice logs FUNCTION` can read every worker's
//! output from one place, as `sam logs` reads CloudWatch.
//!
//! Logs are not acknowledged data: a record the producer cannot queue (the broker down for long)
//! is dropped and counted (`sluice_function_logs_dropped_total`), never waited for on the
//! invocation's path.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::kafka::{ensure_topic, KafkaSettings, TopicSpec};

/// The header holding a log record's request id.
pub const REQUEST_ID_HEADER: &str = "sluice-request-id";

/// The logs topic: keyed by function, deleted after `retention`.
#[must_use]
pub fn logs_topic_spec(topic: &str, retention: Duration) -> TopicSpec {
    TopicSpec {
        name: topic.to_owned(),
        partitions: 4,
        config: vec![
            ("cleanup.policy", "delete".to_owned()),
            ("retention.ms", retention.as_millis().to_string()),
        ],
    }
}

/// Writes invocation logs to the logs topic.
#[derive(Clone)]
pub struct LogShipper {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for LogShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogShipper")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl LogShipper {
    /// Creates (or corrects) the logs topic and a producer for it.
    ///
    /// # Errors
    /// When the topic cannot be created or the producer cannot be made.
    pub async fn open(
        kafka: &KafkaSettings,
        topic: &str,
        retention: Duration,
    ) -> Result<Self, KafkaError> {
        ensure_topic(kafka, &logs_topic_spec(topic, retention)).await?;
        let producer: FutureProducer = kafka
            .client_config()
            .set("acks", "1")
            .set("linger.ms", "20")
            .set("compression.type", "none")
            .set("queue.buffering.max.kbytes", "65536")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Queues `log` of invocation `request_id` of `function`; never waits. A record the producer
    /// cannot queue is dropped and counted.
    pub fn ship(&self, function: &str, request_id: &str, log: &[u8]) {
        if log.is_empty() {
            return;
        }
        let record = FutureRecord::to(&self.topic)
            .key(function)
            .payload(log)
            .headers(OwnedHeaders::new().insert(Header {
                key: REQUEST_ID_HEADER,
                value: Some(request_id),
            }));
        match self.producer.send_result(record) {
            // The delivery report is not awaited: a lost log line must not slow an invocation.
            Ok(_delivery) => {
                metrics::counter!("sluice_function_logs_total").increment(1);
            }
            Err((e, _)) => {
                metrics::counter!("sluice_function_logs_dropped_total").increment(1);
                tracing::debug!(function, request_id, error = %e, "dropped a function log record");
            }
        }
    }

    /// Waits up to `timeout` for queued records to be written (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
