//! Asynchronous (`Event`) invocations as Kafka records, and the producer that writes them.
//!
//! The record has no key, so librdkafka's sticky partitioner spreads one function's events over
//! every partition of the queue (and every poller node) instead of landing them all on one (Lambda
//! does not order async events), while still batching the events of a few milliseconds into one
//! partition (a key per event, e.g. the request id, spreads too but makes one batch per event and
//! cut front-end throughput to a third in `scripts/bench.sh ingest`); its value is the event
//! payload as the caller sent it (so Kafka's own tools show it), and Sluice's bookkeeping travels
//! in headers: `sluice-request-id`, `sluice-function`, `sluice-enqueued-ms`, `sluice-attempts` (invocations
//! already made), `sluice-throttles`, `sluice-not-before-ms` (for delayed re-delivery) and
//! `sluice-trace-id` (the invocation's X-Ray trace header, passed to the function).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;

use crate::kafka::KafkaSettings;
use crate::producer::DurableProducer;

const H_REQUEST_ID: &str = "sluice-request-id";
const H_FUNCTION: &str = "sluice-function";
const H_ENQUEUED: &str = "sluice-enqueued-ms";
const H_ATTEMPTS: &str = "sluice-attempts";
const H_THROTTLES: &str = "sluice-throttles";
const H_NOT_BEFORE: &str = "sluice-not-before-ms";
const H_TRACE_ID: &str = "sluice-trace-id";

/// Lambda's payload limit for asynchronous invocations (1 MiB since October 2025).
pub const MAX_ASYNC_PAYLOAD_BYTES: usize = 1024 * 1024;

/// One asynchronous invocation, with its delivery history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncEvent {
    /// The request id returned with the 202.
    pub request_id: String,
    /// Function name.
    pub function: String,
    /// The event.
    pub payload: Vec<u8>,
    /// When the front end accepted it, Unix ms (the event's age counts from here).
    pub enqueued_ms: i64,
    /// Invocations made so far.
    pub attempts: u32,
    /// Times it was throttled (not attempts).
    pub throttles: u32,
    /// Not to be processed before this time, Unix ms (0: now).
    pub not_before_ms: i64,
    /// The X-Ray trace header (`Root=1-…;Parent=…;Sampled=…`) the function gets as
    /// `Lambda-Runtime-Trace-Id`; empty when none was given.
    pub trace_id: String,
}

impl AsyncEvent {
    /// A new event accepted now.
    #[must_use]
    pub fn new(function: &str, request_id: &str, payload: Vec<u8>) -> Self {
        Self {
            request_id: request_id.to_owned(),
            function: function.to_owned(),
            payload,
            enqueued_ms: now_ms(),
            attempts: 0,
            throttles: 0,
            not_before_ms: 0,
            trace_id: String::new(),
        }
    }

    /// The same event with trace header `trace_id`.
    #[must_use]
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = trace_id.into();
        self
    }

    /// Its age at `now_ms`.
    #[must_use]
    pub fn age(&self, now_ms: i64) -> Duration {
        Duration::from_millis(u64::try_from(now_ms - self.enqueued_ms).unwrap_or(0))
    }

    /// Decodes a record of the async queue.
    ///
    /// # Errors
    /// A description of what is missing or malformed.
    pub fn from_message(m: &BorrowedMessage<'_>) -> Result<Self, String> {
        let headers = m.headers().ok_or("no headers")?;
        let get = |name: &str| -> Option<String> {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let num = |name: &str| -> Result<i64, String> {
            get(name)
                .unwrap_or_else(|| "0".into())
                .parse()
                .map_err(|_| format!("header {name} is not a number"))
        };
        Ok(Self {
            request_id: get(H_REQUEST_ID).ok_or("no request id")?,
            function: get(H_FUNCTION).ok_or("no function")?,
            payload: m.payload().unwrap_or_default().to_vec(),
            enqueued_ms: num(H_ENQUEUED)?,
            attempts: u32::try_from(num(H_ATTEMPTS)?).map_err(|_| "bad attempts")?,
            throttles: u32::try_from(num(H_THROTTLES)?).map_err(|_| "bad throttles")?,
            not_before_ms: num(H_NOT_BEFORE)?,
            trace_id: get(H_TRACE_ID).unwrap_or_default(),
        })
    }

    /// Its bookkeeping as Kafka headers, as [`AsyncEvent::from_message`] reads them (for
    /// writers that choose their own key or partition, e.g. the pollers' re-queues).
    #[must_use]
    pub fn headers(&self) -> OwnedHeaders {
        let enq = self.enqueued_ms.to_string();
        let att = self.attempts.to_string();
        let thr = self.throttles.to_string();
        let nb = self.not_before_ms.to_string();
        OwnedHeaders::new()
            .insert(Header {
                key: H_REQUEST_ID,
                value: Some(self.request_id.as_bytes()),
            })
            .insert(Header {
                key: H_FUNCTION,
                value: Some(self.function.as_bytes()),
            })
            .insert(Header {
                key: H_ENQUEUED,
                value: Some(enq.as_bytes()),
            })
            .insert(Header {
                key: H_ATTEMPTS,
                value: Some(att.as_bytes()),
            })
            .insert(Header {
                key: H_THROTTLES,
                value: Some(thr.as_bytes()),
            })
            .insert(Header {
                key: H_NOT_BEFORE,
                value: Some(nb.as_bytes()),
            })
            .insert(Header {
                key: H_TRACE_ID,
                value: Some(self.trace_id.as_bytes()),
            })
    }
}

/// Writes async events durably (idempotent producer, `acks=all`).
#[derive(Clone)]
pub struct EventProducer {
    producer: DurableProducer,
}

impl EventProducer {
    /// A producer for `kafka`.
    ///
    /// # Errors
    /// When the client cannot be created.
    pub fn new(kafka: &KafkaSettings) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: DurableProducer::new(kafka.durable_producer_config(), "events")?,
        })
    }

    /// Writes `event` to `topic` and returns once the broker has acknowledged it:
    /// `(partition, offset)`.
    ///
    /// # Errors
    /// The delivery error.
    pub async fn send(&self, topic: &str, event: &AsyncEvent) -> Result<(i32, i64), KafkaError> {
        let record = FutureRecord::<(), [u8]>::to(topic)
            .payload(&event.payload)
            .headers(event.headers());
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }

    /// The underlying producer (for other record kinds on the same connection; it rebuilds
    /// itself after a fatal error, see [`DurableProducer`]).
    #[must_use]
    pub fn producer(&self) -> &DurableProducer {
        &self.producer
    }
}

pub use crate::time::now_ms;
