//! [`DurableProducer`]: the producer of records that must not be lost (async events, delayed
//! retries, destination records, configuration), which replaces its librdkafka instance when that
//! instance reports a fatal error.
//!
//! An idempotent producer whose sequence state the broker no longer accepts raises a *fatal*
//! error (librdkafka's `rd_kafka_fatal_error`): from then on every send of that instance fails, so
//! a node that kept it would answer every later Event invoke with 500 until restarted. Here the
//! send that met the fatal error fails (its caller retries or reports, as for any retryable
//! error), the instance is rebuilt from the same configuration once, and later sends go to the
//! new one. `sluice_kafka_producer_rebuilds_total{producer}` counts rebuilds.
//!
//! Threading: cheap to clone; sends run concurrently on the current instance (a read lock held
//! only to clone it); a rebuild takes the write lock briefly.

use std::sync::{Arc, RwLock};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{OwnedMessage, ToBytes};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tracing::error;

struct Current {
    /// Increases by one per rebuild, so that concurrent senders that met the same fatal error
    /// rebuild once.
    generation: u64,
    producer: FutureProducer,
}

struct Inner {
    /// What a rebuild creates the producer from; `None` for a producer made elsewhere (it is
    /// used as is and never rebuilt).
    config: Option<ClientConfig>,
    current: RwLock<Current>,
    name: &'static str,
}

/// A producer that survives fatal errors. Cheap to clone.
#[derive(Clone)]
pub struct DurableProducer {
    inner: Arc<Inner>,
}

impl DurableProducer {
    /// Creates a producer from `config`; `name` labels its metrics and logs (`events`, `config`).
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn new(config: ClientConfig, name: &'static str) -> Result<Self, KafkaError> {
        let producer = config.create()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: Some(config),
                current: RwLock::new(Current {
                    generation: 0,
                    producer,
                }),
                name,
            }),
        })
    }

    /// The current librdkafka producer (for APIs that take one; it is not rebuilt under them).
    pub fn producer(&self) -> FutureProducer {
        self.read().producer.clone()
    }

    /// How many times the producer was rebuilt.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Sends `record` on the current producer; when the send fails and the producer reports a
    /// fatal error, rebuilds it for the next sends.
    ///
    /// # Errors
    /// The delivery error, as [`FutureProducer::send`].
    pub async fn send<K, P, T>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: T,
    ) -> Result<Delivery, (KafkaError, OwnedMessage)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
        T: Into<Timeout>,
    {
        let (generation, producer) = {
            let c = self.read();
            (c.generation, c.producer.clone())
        };
        let result = producer.send(record, queue_timeout).await;
        if result.is_err() {
            if let Some((code, reason)) = producer.client().fatal_error() {
                self.rebuild(generation, &format!("{code:?}: {reason}"));
            }
        }
        result
    }

    /// Replaces the producer of `generation` (no-op when another sender replaced it already, or
    /// for a producer made elsewhere). Public for tests that check how concurrent senders
    /// rebuild.
    #[doc(hidden)]
    pub fn rebuild(&self, generation: u64, reason: &str) {
        let Some(config) = &self.inner.config else {
            error!(producer = self.inner.name, reason, "Kafka producer failed fatally and cannot be rebuilt (made elsewhere); restart the node");
            return;
        };
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.generation != generation {
            return;
        }
        match config.create::<FutureProducer>() {
            Ok(producer) => {
                error!(
                    producer = self.inner.name,
                    reason, "Kafka producer failed fatally; rebuilt it"
                );
                metrics::counter!("sluice_kafka_producer_rebuilds_total", "producer" => self.inner.name)
                    .increment(1);
                *current = Current {
                    generation: generation + 1,
                    producer,
                };
            }
            Err(e) => {
                error!(producer = self.inner.name, reason, error = %e, "Kafka producer failed fatally and could not be rebuilt; the next failing send tries again");
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        // A panic while holding the lock cannot leave `Current` half-written (one assignment).
        self.inner
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl From<FutureProducer> for DurableProducer {
    /// Wraps a producer made elsewhere: used as is, never rebuilt.
    fn from(producer: FutureProducer) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: None,
                current: RwLock::new(Current {
                    generation: 0,
                    producer,
                }),
                name: "external",
            }),
        }
    }
}
