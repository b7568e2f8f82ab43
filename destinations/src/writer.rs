//! Writes records to destination topics, creating them on first use and retrying until Kafka has
//! them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_core::kafka::{ensure_topic, KafkaSettings, TopicSpec};

/// Writes destination records. Cheap to clone.
#[derive(Clone)]
pub struct DestinationWriter {
    kafka: KafkaSettings,
    producer: FutureProducer,
    created: Arc<Mutex<HashSet<String>>>,
    partitions: i32,
}

impl DestinationWriter {
    /// A writer sharing `producer` (idempotent, `acks=all`); topics it creates get `partitions`.
    #[must_use]
    pub fn new(kafka: KafkaSettings, producer: FutureProducer, partitions: i32) -> Self {
        Self {
            kafka,
            producer,
            created: Arc::new(Mutex::new(HashSet::new())),
            partitions,
        }
    }

    /// Writes `value` under `key` to `topic`, retrying with back-off (1 s doubling to 1 min) until
    /// Kafka acknowledges it; every failed try is counted in
    /// `sluice_destination_delivery_failures_total`. Returns `(partition, offset)`.
    pub async fn write(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.try_write(topic, key, value, headers).await {
                Ok(at) => return at,
                Err(e) => {
                    metrics::counter!("sluice_destination_delivery_failures_total", "topic" => topic.to_owned()).increment(1);
                    tracing::warn!(topic, error = %e, retry_in = ?backoff, "destination write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn try_write(
        &self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(i32, i64), String> {
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
            ensure_topic(&self.kafka, &spec)
                .await
                .map_err(|e| format!("create topic {topic}: {e}"))?;
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
            .map_err(|(e, _)| e.to_string())
    }
}
