//! [`ConfigStore`]: the tail task that keeps a node's [`View`] current, and the write path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::record::{ConfigObject, ConfigRecord, ObjectKey, ObjectKind};
use super::view::{Outcome, Versioned, View};
use crate::kafka::{ensure_topic, KafkaSettings, TopicSpec};
use crate::model::{
    EventInvokeConfig, EventSourceMappingState, FunctionConfig, ProvisionedConcurrencyConfig,
};
use crate::producer::DurableProducer;
use crate::time::now_ms;

/// Settings of the configuration store.
#[derive(Debug, Clone)]
pub struct ConfigStoreConfig {
    /// The compacted topic that holds the configuration.
    pub topic: String,
    /// This node's name, recorded with each write.
    pub node_id: String,
    /// Prefix of the store's Redis keys (write locks).
    pub redis_prefix: String,
    /// How long a per-object write lock lives if its holder dies.
    pub lock_ttl: Duration,
    /// Longest a write or a catch-up may take.
    pub write_timeout: Duration,
    /// Fault injection: the tail applies a record no sooner than this long after the broker
    /// stamped it, as a view on a slow link or a busy node would. Zero (the default) in
    /// production; the fault tests use it to make a view lag on demand.
    pub view_lag: Duration,
}

impl ConfigStoreConfig {
    /// Defaults: topic `sluice.config`, 10 s locks, 15 s writes.
    #[must_use]
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            topic: "sluice.config".to_owned(),
            node_id: node_id.into(),
            redis_prefix: "sluice:".to_owned(),
            lock_ttl: Duration::from_secs(10),
            write_timeout: Duration::from_secs(15),
            view_lag: Duration::ZERO,
        }
    }
}

/// What a write expects of the object it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Create: the object must not exist.
    Absent,
    /// Update or delete: the object must exist (at whatever revision is current when the write
    /// is checked).
    Exists,
    /// Update or delete exactly this revision (optimistic concurrency for read-modify-write).
    Revision(u64),
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration topic could not be created.
    #[error("create configuration topic {topic}: {source}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        #[source]
        source: KafkaError,
    },
    /// A Kafka client could not be created.
    #[error("create Kafka client: {0}")]
    CreateClient(#[source] KafkaError),
    /// The write could not be produced.
    #[error("write {key} to Kafka: {source}")]
    Produce {
        /// The object.
        key: String,
        /// The delivery error.
        #[source]
        source: KafkaError,
    },
    /// The topic's end offset could not be read.
    #[error("read the configuration topic's end offset: {0}")]
    Watermarks(#[source] KafkaError),
    /// Redis refused the write lock.
    #[error("lock {key} in Redis: {source}")]
    Lock {
        /// The object.
        key: String,
        /// The Redis error.
        #[source]
        source: redis::RedisError,
    },
    /// Another writer held the object's lock for the whole write timeout.
    #[error("{key} is being changed by another writer; try again")]
    Busy {
        /// The object.
        key: String,
    },
    /// The object changed since the writer read it.
    #[error("{key} changed concurrently: expected revision {expected}, found {actual}")]
    Conflict {
        /// The object.
        key: String,
        /// The revision the write was based on.
        expected: u64,
        /// The revision it has now.
        actual: u64,
    },
    /// Create of an object that exists.
    #[error("{key} already exists")]
    AlreadyExists {
        /// The object.
        key: String,
    },
    /// Update or delete of an object that does not exist.
    #[error("{key} does not exist")]
    NotFound {
        /// The object.
        key: String,
    },
    /// The view did not catch up (or see the write) in time.
    #[error("timed out after {0:?} waiting for the configuration view")]
    Timeout(Duration),
    /// The store is shutting down.
    #[error("the configuration store is shut down")]
    Closed,
    /// The object could not be encoded.
    #[error("encode configuration record: {0}")]
    Encode(#[source] serde_json::Error),
}

impl StoreError {
    /// Whether trying the same operation again can succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Produce { .. }
                | StoreError::Watermarks(_)
                | StoreError::Lock { .. }
                | StoreError::Busy { .. }
                | StoreError::Timeout(_)
        )
    }
}

struct Inner {
    cfg: ConfigStoreConfig,
    producer: DurableProducer,
    consumer: Arc<StreamConsumer>,
    view: RwLock<View>,
    applied: watch::Sender<i64>,
    pending: Mutex<HashMap<uuid::Uuid, oneshot::Sender<Outcome>>>,
    redis: Option<redis::aio::ConnectionManager>,
    cancel: CancellationToken,
}

/// A node's handle on the shared configuration. Cheap to clone.
#[derive(Clone)]
pub struct ConfigStore {
    inner: Arc<Inner>,
}

impl ConfigStore {
    /// Creates the topic if needed, starts tailing it, and returns once the view holds everything
    /// written before this call.
    ///
    /// `redis` enables the per-object write lock; without it conflicts are still detected (the log
    /// decides) but may reach the topic.
    ///
    /// # Errors
    /// When the topic cannot be created, a client cannot be made, or the view cannot catch up
    /// within `write_timeout`.
    pub async fn open(
        kafka: &KafkaSettings,
        cfg: ConfigStoreConfig,
        redis: Option<redis::aio::ConnectionManager>,
        cancel: CancellationToken,
    ) -> Result<Self, StoreError> {
        let spec = TopicSpec {
            name: cfg.topic.clone(),
            partitions: 1,
            config: vec![
                ("cleanup.policy", "compact".to_owned()),
                ("min.compaction.lag.ms", "3600000".to_owned()),
            ],
        };
        ensure_topic(kafka, &spec)
            .await
            .map_err(|source| StoreError::CreateTopic {
                topic: cfg.topic.clone(),
                source,
            })?;

        let mut producer_config = kafka.durable_producer_config();
        producer_config.set("linger.ms", "0");
        let producer =
            DurableProducer::new(producer_config, "config").map_err(StoreError::CreateClient)?;
        let consumer: StreamConsumer = kafka
            .client_config()
            .set("group.id", format!("sluice-config-view-{}", cfg.node_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "20")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(StoreError::CreateClient)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&cfg.topic, 0, Offset::Beginning)
            .map_err(StoreError::CreateClient)?;
        consumer.assign(&tpl).map_err(StoreError::CreateClient)?;

        let (applied, _) = watch::channel(0);
        let store = Self {
            inner: Arc::new(Inner {
                cfg,
                producer,
                consumer: Arc::new(consumer),
                view: RwLock::new(View::default()),
                applied,
                pending: Mutex::new(HashMap::new()),
                redis,
                cancel,
            }),
        };
        tokio::spawn(tail(Arc::clone(&store.inner)));
        store.catch_up().await?;
        info!(
            topic = %store.inner.cfg.topic,
            offset = store.inner.applied.borrow().to_owned(),
            "configuration view caught up"
        );
        Ok(store)
    }

    /// Waits until the view holds every record written before this call.
    ///
    /// # Errors
    /// [`StoreError::Watermarks`] when the end offset cannot be read, [`StoreError::Timeout`].
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let consumer = Arc::clone(&self.inner.consumer);
        let topic = self.inner.cfg.topic.clone();
        let (_, high) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5))
        })
        .await
        .map_err(|_| StoreError::Closed)?
        .map_err(StoreError::Watermarks)?;
        let mut rx = self.inner.applied.subscribe();
        let timeout = self.inner.cfg.write_timeout;
        tokio::select! {
            r = tokio::time::timeout(timeout, rx.wait_for(|&next| next >= high)) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(StoreError::Closed),
                Err(_) => Err(StoreError::Timeout(timeout)),
            },
            () = self.inner.cancel.cancelled() => Err(StoreError::Closed),
        }
    }

    /// Writes `object` at `key` (`None` deletes it) if `expected` holds, and returns the new
    /// revision once this node's view has applied it.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`], [`StoreError::NotFound`] or [`StoreError::Conflict`] when
    /// `expected` does not hold (checked before writing, and again by the log's order);
    /// [`StoreError::Busy`] when another writer keeps the object locked; Kafka and Redis errors.
    pub async fn write(
        &self,
        key: &ObjectKey,
        object: Option<ConfigObject>,
        expected: Expected,
    ) -> Result<u64, StoreError> {
        let name = key.to_string();
        let lock = self.lock(&name).await?;
        let result = self.write_locked(key, object, expected).await;
        self.unlock(&name, lock).await;
        result
    }

    /// Runs `f` holding the write lock of `resource`, a name that is not an object (e.g.
    /// `consumer-group/<id>`), on a view caught up after the lock was taken. A check that spans
    /// objects and the write that follows it (a value that must be unique across them) are then
    /// atomic among writers that take the same lock; without Redis there is no lock and `f` just
    /// runs on a caught-up view.
    ///
    /// # Errors
    /// [`StoreError::Busy`] when another writer keeps `resource` locked, Redis errors, and the
    /// catch-up's errors; `f`'s own result is returned inside `Ok`.
    pub async fn exclusive<R, Fut>(
        &self,
        resource: &str,
        f: impl FnOnce() -> Fut,
    ) -> Result<R, StoreError>
    where
        Fut: std::future::Future<Output = R>,
    {
        let lock = self.lock(resource).await?;
        let result = match self.catch_up().await {
            Ok(()) => Ok(f().await),
            Err(e) => Err(e),
        };
        self.unlock(resource, lock).await;
        result
    }

    async fn write_locked(
        &self,
        key: &ObjectKey,
        object: Option<ConfigObject>,
        expected: Expected,
    ) -> Result<u64, StoreError> {
        self.catch_up().await?;
        let (current, exists) = {
            let view = self.read_view();
            (view.revision(key), view.get(key).is_some())
        };
        let name = key.to_string();
        match expected {
            Expected::Absent if exists => return Err(StoreError::AlreadyExists { key: name }),
            Expected::Exists | Expected::Revision(_) if !exists => {
                return Err(StoreError::NotFound { key: name })
            }
            Expected::Revision(r) if r != current => {
                return Err(StoreError::Conflict {
                    key: name,
                    expected: r,
                    actual: current,
                })
            }
            _ => {}
        }
        if object.is_none() && !exists {
            return Err(StoreError::NotFound { key: name });
        }
        let record = ConfigRecord {
            revision: current + 1,
            base_revision: current,
            write_id: uuid::Uuid::new_v4(),
            writer: self.inner.cfg.node_id.clone(),
            written_at_ms: now_ms(),
            object,
        };
        let payload = serde_json::to_vec(&record).map_err(StoreError::Encode)?;
        let record_key = key.record_key(record.write_id);
        let (tx, rx) = oneshot::channel();
        self.pending().insert(record.write_id, tx);
        let delivery = self
            .inner
            .producer
            .send(
                FutureRecord::to(&self.inner.cfg.topic)
                    .key(&record_key)
                    .payload(&payload),
                self.inner.cfg.write_timeout,
            )
            .await;
        if let Err((source, _)) = delivery {
            self.pending().remove(&record.write_id);
            return Err(StoreError::Produce { key: name, source });
        }
        let timeout = self.inner.cfg.write_timeout;
        let outcome = tokio::time::timeout(timeout, rx).await;
        self.pending().remove(&record.write_id);
        if matches!(outcome, Ok(Ok(_))) {
            // Decided: whatever this object's log holds besides its current record (the one this
            // write superseded, or this write itself if it lost) can go.
            self.tombstone_stale(key).await;
        }
        match outcome {
            Ok(Ok(Outcome::Applied { revision })) => Ok(revision),
            Ok(Ok(Outcome::Conflict { current: actual })) => Err(StoreError::Conflict {
                key: name,
                expected: current,
                actual,
            }),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Tombstones `key`'s superseded and refused records, so that the log cleaner drops them.
    /// Best effort: a record left behind only costs space (the view's rule ignores it), and the
    /// object's next writer tries again.
    async fn tombstone_stale(&self, key: &ObjectKey) {
        let stale = self.read_view().stale(key);
        for record_key in &stale {
            let tombstone =
                FutureRecord::<str, [u8]>::to(&self.inner.cfg.topic).key(record_key.as_str());
            if let Err((e, _)) = self
                .inner
                .producer
                .send(tombstone, self.inner.cfg.write_timeout)
                .await
            {
                warn!(key = %record_key, error = %e, "could not tombstone a superseded configuration record");
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, oneshot::Sender<Outcome>>> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        self.inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.inner
            .view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the current view.
    pub fn read<R>(&self, f: impl FnOnce(&View) -> R) -> R {
        f(&self.read_view())
    }

    /// A receiver that changes whenever the view advances (its value: the next offset to read).
    #[must_use]
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.inner.applied.subscribe()
    }

    /// The function `name`, if it exists.
    #[must_use]
    pub fn function(&self, name: &str) -> Option<Versioned<FunctionConfig>> {
        self.read_view()
            .get(&ObjectKey::function(name))?
            .try_map(|o| match o {
                ConfigObject::Function(f) => Some(f),
                _ => None,
            })
    }

    /// Every function, ordered by name.
    #[must_use]
    pub fn functions(&self) -> Vec<Versioned<FunctionConfig>> {
        self.list(ObjectKind::Function, |o| match o {
            ConfigObject::Function(f) => Some(f),
            _ => None,
        })
    }

    /// Function `name`'s event-invoke config, if one was put.
    #[must_use]
    pub fn event_invoke_config(&self, name: &str) -> Option<Versioned<EventInvokeConfig>> {
        self.read_view()
            .get(&ObjectKey::event_invoke_config(name))?
            .try_map(|o| match o {
                ConfigObject::EventInvokeConfig(c) => Some(c),
                _ => None,
            })
    }

    /// Every event source mapping.
    #[must_use]
    pub fn event_source_mappings(&self) -> Vec<Versioned<EventSourceMappingState>> {
        self.list(ObjectKind::EventSourceMapping, |o| match o {
            ConfigObject::EventSourceMapping(m) => Some(*m),
            _ => None,
        })
    }

    /// Function `name`'s provisioned-concurrency configuration, if one was put.
    #[must_use]
    pub fn provisioned_concurrency(
        &self,
        name: &str,
    ) -> Option<Versioned<ProvisionedConcurrencyConfig>> {
        self.read_view()
            .get(&ObjectKey::provisioned_concurrency(name))?
            .try_map(as_provisioned)
    }

    /// Every provisioned-concurrency configuration with its function's name, ordered by name.
    #[must_use]
    pub fn provisioned_concurrency_configs(
        &self,
    ) -> Vec<(String, Versioned<ProvisionedConcurrencyConfig>)> {
        self.list_named(ObjectKind::ProvisionedConcurrency, as_provisioned)
    }

    fn list<T>(
        &self,
        kind: ObjectKind,
        f: impl Fn(ConfigObject) -> Option<T>,
    ) -> Vec<Versioned<T>> {
        self.list_named(kind, f)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    fn list_named<T>(
        &self,
        kind: ObjectKind,
        f: impl Fn(ConfigObject) -> Option<T>,
    ) -> Vec<(String, Versioned<T>)> {
        self.read_view()
            .list(kind)
            .into_iter()
            .filter_map(|(name, v)| Some((name, v.try_map(&f)?)))
            .collect()
    }

    async fn lock(&self, key: &str) -> Result<Option<String>, StoreError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(None);
        };
        let mut conn = redis.clone();
        let lock_key = format!("{}config-lock:{key}", self.inner.cfg.redis_prefix);
        let token = uuid::Uuid::new_v4().to_string();
        let ttl_ms = u64::try_from(self.inner.cfg.lock_ttl.as_millis()).unwrap_or(u64::MAX);
        let deadline = tokio::time::Instant::now() + self.inner.cfg.write_timeout;
        loop {
            let got: Option<String> = redis::cmd("SET")
                .arg(&lock_key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(|source| StoreError::Lock {
                    key: key.to_string(),
                    source,
                })?;
            if got.is_some() {
                return Ok(Some(token));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Busy {
                    key: key.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn unlock(&self, key: &str, token: Option<String>) {
        let (Some(redis), Some(token)) = (&self.inner.redis, token) else {
            return;
        };
        let mut conn = redis.clone();
        let lock_key = format!("{}config-lock:{key}", self.inner.cfg.redis_prefix);
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        if let Err(e) = script
            .key(&lock_key)
            .arg(&token)
            .invoke_async::<i64>(&mut conn)
            .await
        {
            // The lock expires on its own; the next writer waits at most lock_ttl.
            warn!(key = %key, error = %e, "could not release configuration write lock");
        }
    }
}

fn as_provisioned(o: ConfigObject) -> Option<ProvisionedConcurrencyConfig> {
    match o {
        ConfigObject::ProvisionedConcurrency(c) => Some(c),
        _ => None,
    }
}

async fn tail(inner: Arc<Inner>) {
    loop {
        let message = tokio::select! {
            biased;
            () = inner.cancel.cancelled() => break,
            m = inner.consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "configuration topic read failed; retrying");
                metrics::counter!("sluice_config_read_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if !inner.cfg.view_lag.is_zero() {
            if let Some(stamped) = message.timestamp().to_millis() {
                let due = stamped.saturating_add(
                    i64::try_from(inner.cfg.view_lag.as_millis()).unwrap_or(i64::MAX),
                );
                let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                if wait > 0 {
                    tokio::select! {
                        () = inner.cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    }
                }
            }
        }
        let offset = message.offset();
        let record_key = message.key().and_then(|k| std::str::from_utf8(k).ok());
        let key = record_key.map(ObjectKey::from_record_key);
        let record = message
            .payload()
            .map(serde_json::from_slice::<ConfigRecord>);
        let outcome = {
            let mut view = inner
                .view
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match (record_key, key, record) {
                (Some(rk), Some(Ok((key, _))), Some(Ok(record))) => {
                    let outcome = view.apply(rk, key.clone(), &record, offset);
                    debug!(key = %rk, offset, ?outcome, "configuration record");
                    Some((record.write_id, outcome))
                }
                (Some(rk), Some(Ok((key, _))), None) => {
                    view.tombstone(rk, &key, offset);
                    None
                }
                (_, key, record) => {
                    // Every node skips the same record, so views stay identical.
                    warn!(
                        offset,
                        ?key,
                        error = ?record.as_ref().and_then(|r| r.as_ref().err()),
                        "skipping undecodable configuration record"
                    );
                    metrics::counter!("sluice_config_records_skipped_total").increment(1);
                    view.skip(offset);
                    None
                }
            }
        };
        if let Some((write_id, outcome)) = outcome {
            if matches!(outcome, Outcome::Conflict { .. }) {
                metrics::counter!("sluice_config_conflicts_total").increment(1);
            }
            let waiter = inner
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&write_id);
            if let Some(tx) = waiter {
                let _ = tx.send(outcome);
            }
        }
        metrics::counter!("sluice_config_records_total").increment(1);
        inner.applied.send_replace(offset + 1);
    }
    debug!("configuration tail stopped");
}
