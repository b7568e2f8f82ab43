//! The async-queue poller.
//!
//! Two consumer groups per cluster:
//! - the **queue** group reads the async queue and runs each event: drop to on-failure when older
//!   than `MaximumEventAgeInSeconds`; straight to on-failure with `ZeroReservedConcurrency`;
//!   invoke (a concurrency slot is taken by the invoker); on success write the on-success record;
//!   on a function error re-queue after the next retry delay (1 min, 2 min) up to
//!   `MaximumRetryAttempts`, then write the on-failure record (`RetriesExhausted`); when throttled
//!   (or no worker has room) re-queue with back-off from 1 s doubling to 5 min, not counted as an
//!   attempt;
//! - the **delay** group reads the delay topics (one per delay, so each is ordered by due time),
//!   waits until each record is due and writes it back to the queue.
//!
//! Re-queueing and destination writes complete in Kafka before the source offset can be
//! committed, so nothing acknowledged is lost on a crash; events run concurrently, so one
//! function's delays or throttling never hold back another's.
//!
//! Both groups run on the shared consumer runtime (`crate::runtime`): the queue plugs in one task
//! per event under a node-wide slot pool in which every active function gets a fair share (an
//! event over its function's share while the pool is busy goes back through the shortest delay
//! tier, not counted as an attempt); the delay group plugs in one sequential worker per delay
//! partition, so a delayed event waits in Kafka (its partition paused) rather than in memory.
//! Re-queued events are keyed by request id, so a hot function's retries spread over every
//! partition and node. A panic while handling an event fails it like a function error.
//!
//! What one attempt at an event comes to (`attempt::Attempt`: the policy around the invoke) is
//! decided apart from the I/O it implies (destination records, re-queues, metrics: here).

mod attempt;
mod fair;
mod policy;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::producer::FutureRecord;

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use sluice_core::events::{now_ms, AsyncEvent, EventProducer};
use sluice_core::invoke::Invoker;
use sluice_core::kafka::{ensure_topic, KafkaSettings, TopicSpec};
use sluice_core::model::EventInvokeConfig;
use sluice_core::store::ConfigStore;
use sluice_destinations::{Condition, DestinationWriter, InvocationRecord};
use tokio_util::sync::CancellationToken;

use redis::aio::ConnectionManager;
use sluice_leasing::Leaser;

use self::attempt::{Attempt, Decision, RequeueCause};
use self::fair::FairShare;
use crate::balance::Balancer;
use crate::runtime::{self, Budget, Item, Partition, RunConfig, Trackers};

/// Settings of the async poller.
#[derive(Debug, Clone)]
pub struct AsyncPollerConfig {
    /// The async queue topic.
    pub queue_topic: String,
    /// Delay topics are `<prefix><milliseconds>`.
    pub delay_topic_prefix: String,
    /// Consumer group of the queue (the delay group is `<group>-delay`).
    pub group_id: String,
    /// Waits before the 2nd, 3rd, … attempt after a function error (Lambda: 1 min, 2 min).
    pub retry_delays: Vec<Duration>,
    /// First throttling back-off (Lambda: 1 s); it doubles up to `throttle_backoff_max`.
    pub throttle_backoff_min: Duration,
    /// Longest throttling back-off (Lambda: 5 min).
    pub throttle_backoff_max: Duration,
    /// Events run at once by this node (shared fairly by the functions that have events).
    pub max_in_flight: usize,
    /// Slots of `max_in_flight` kept for functions that have none running, so a busy node still
    /// starts a newcomer's events at once.
    pub fair_reserve: usize,
    /// Delayed events this node holds in memory per delay partition; the rest wait in Kafka.
    pub max_delayed: usize,
    /// Partitions of the queue topic when Sluice creates it.
    pub queue_partitions: i32,
    /// Partitions of each delay topic when Sluice creates it.
    pub delay_partitions: i32,
    /// `arn:aws:lambda:<region>:<account>:function:` (a name is appended).
    pub function_arn_prefix: String,
    /// Partition leases: a dead node's partitions move after this long.
    pub lease_ttl: Duration,
    /// Prefix of the poller's Redis keys.
    pub redis_prefix: String,
    /// How often a partition's unchanged commit is sent again, so that Kafka never expires the
    /// group's offsets of a quiet partition (default 1 h; `offsets.retention.minutes` is 7 days
    /// by default).
    pub commit_refresh: Duration,
}

impl AsyncPollerConfig {
    /// Lambda's policy, with topics under `topic_prefix` (e.g. `sluice.`).
    #[must_use]
    pub fn new(topic_prefix: &str, function_arn_prefix: &str) -> Self {
        Self {
            queue_topic: format!("{topic_prefix}async"),
            delay_topic_prefix: format!("{topic_prefix}async.delay."),
            group_id: format!("{topic_prefix}async-pollers"),
            retry_delays: vec![Duration::from_secs(60), Duration::from_secs(120)],
            throttle_backoff_min: Duration::from_secs(1),
            throttle_backoff_max: Duration::from_secs(300),
            max_in_flight: 256,
            fair_reserve: 64,
            max_delayed: 32,
            queue_partitions: 8,
            delay_partitions: 2,
            function_arn_prefix: function_arn_prefix.to_owned(),
            lease_ttl: Duration::from_secs(10),
            redis_prefix: "sluice:".to_owned(),
            commit_refresh: runtime::COMMIT_REFRESH,
        }
    }

    /// Every delay in use: the retry delays and each step of the throttling back-off.
    #[must_use]
    pub fn tiers(&self) -> Vec<Duration> {
        let mut tiers: BTreeSet<Duration> = self.retry_delays.iter().copied().collect();
        let mut d = self.throttle_backoff_min;
        while d < self.throttle_backoff_max {
            tiers.insert(d);
            d *= 2;
        }
        tiers.insert(self.throttle_backoff_max);
        tiers.into_iter().filter(|d| !d.is_zero()).collect()
    }

    /// The delay topic of `delay`.
    #[must_use]
    pub fn delay_topic(&self, delay: Duration) -> String {
        format!("{}{}", self.delay_topic_prefix, delay.as_millis())
    }

    /// The back-off after the `n`th throttle (n ≥ 1).
    #[must_use]
    pub fn throttle_backoff(&self, n: u32) -> Duration {
        policy::throttle_backoff(n, self.throttle_backoff_min, self.throttle_backoff_max)
    }
}

/// Why the poller could not start.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// A topic could not be created.
    #[error("create topic {topic}: {source}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The cause.
        #[source]
        source: KafkaError,
    },
    /// A consumer could not be created.
    #[error("create consumer: {0}")]
    Consumer(#[source] KafkaError),
    /// The partition leaser could not be set up.
    #[error("set up partition leases: {0}")]
    Leases(String),
}

/// The async poller of one node.
#[derive(Clone)]
pub struct AsyncPoller {
    cfg: Arc<AsyncPollerConfig>,
    kafka: KafkaSettings,
    store: ConfigStore,
    invoker: Arc<dyn Invoker>,
    events: EventProducer,
    destinations: DestinationWriter,
    redis: ConnectionManager,
    node_id: String,
}

enum Next {
    Done,
    /// The partition moved to another node before the event ran: nothing done here.
    Abandoned,
    Requeue {
        delay: Duration,
        event: AsyncEvent,
    },
}

/// Bytes of queue events one partition holds between fetch and the start of their run (running
/// ones are bounded by `max_in_flight`).
const QUEUE_PARTITION_BYTES: usize = 32 * 1024 * 1024;
/// The queue loop's `source` label (and name in logs).
const QUEUE_SOURCE: &str = "async-queue";
/// The delay loop's `source` label (and name in logs).
const DELAY_SOURCE: &str = "async-delay";
/// Bytes of delayed events one delay partition holds in memory.
const DELAY_PARTITION_BYTES: usize = 8 * 1024 * 1024;
/// Shutdown: how long events in flight may finish (the node allows all its tasks 10 s; the
/// commit and the lease releases follow, each with its own shorter deadline).
const QUEUE_DRAIN: Duration = Duration::from_secs(5);
/// Shutdown: delayed events are not waited for; they stay in Kafka.
const DELAY_DRAIN: Duration = Duration::from_secs(1);

impl AsyncPoller {
    /// A poller; nothing runs until [`AsyncPoller::run`].
    #[must_use]
    #[allow(clippy::too_many_arguments)] // each is a distinct shared service the node wires in
    pub fn new(
        cfg: AsyncPollerConfig,
        kafka: KafkaSettings,
        store: ConfigStore,
        invoker: Arc<dyn Invoker>,
        events: EventProducer,
        destinations: DestinationWriter,
        redis: ConnectionManager,
        node_id: String,
    ) -> Self {
        Self {
            cfg: Arc::new(cfg),
            kafka,
            store,
            invoker,
            events,
            destinations,
            redis,
            node_id,
        }
    }

    /// Creates the queue and delay topics if missing.
    ///
    /// # Errors
    /// When a topic cannot be created.
    pub async fn ensure_topics(&self) -> Result<(), PollerError> {
        let mut specs = vec![TopicSpec {
            name: self.cfg.queue_topic.clone(),
            partitions: self.cfg.queue_partitions,
            config: Vec::new(),
        }];
        for tier in self.cfg.tiers() {
            specs.push(TopicSpec {
                name: self.cfg.delay_topic(tier),
                partitions: self.cfg.delay_partitions,
                config: Vec::new(),
            });
        }
        for spec in specs {
            ensure_topic(&self.kafka, &spec)
                .await
                .map_err(|source| PollerError::CreateTopic {
                    topic: spec.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    fn consumer(&self, group: &str) -> Result<Arc<StreamConsumer>, PollerError> {
        let consumer: StreamConsumer = self
            .kafka
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            // librdkafka's prefetch over every partition; the rest waits in Kafka.
            .set("queued.max.messages.kbytes", "16384")
            .create()
            .map_err(PollerError::Consumer)?;
        Ok(Arc::new(consumer))
    }

    fn balancer(
        &self,
        name: &str,
        consumer: &Arc<StreamConsumer>,
        trackers: &Arc<Mutex<Trackers>>,
        topics: Vec<String>,
    ) -> Result<Balancer, PollerError> {
        let leaser = Leaser::new(
            self.redis.clone(),
            self.cfg.redis_prefix.clone(),
            self.node_id.clone(),
            self.cfg.lease_ttl,
        )
        .map_err(|e| PollerError::Leases(e.to_string()))?;
        Ok(Balancer {
            consumer: Arc::clone(consumer),
            trackers: Arc::clone(trackers),
            leaser,
            redis: self.redis.clone(),
            members_key: format!("{}pollers:{name}", self.cfg.redis_prefix),
            unit_prefix: format!("{name}:"),
            topics,
            holder: self.node_id.clone(),
            ttl: self.cfg.lease_ttl,
            units_cache: Arc::default(),
        })
    }

    /// Runs both loops until `cancel`, then drains, commits and hands the partitions back.
    ///
    /// # Errors
    /// When topics, consumers or leases cannot be set up.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), PollerError> {
        self.ensure_topics().await?;
        let queue = self.consumer(&self.cfg.group_id)?;
        let queue_trackers = Arc::new(Mutex::new(Trackers::new(
            QUEUE_SOURCE,
            Some(Arc::clone(&queue)),
            // Running events count against their partition's records until they finish, and a
            // stuck function may hold up to `max_in_flight` of them in one partition; the budget
            // is twice that and more, so that once only stuck events remain the partition is
            // under half and resumes (at `max_in_flight` it could stay paused for good, holding
            // back every other function's events behind it). Their bytes stop counting once they
            // start (`Partition::started`), for the same reason: the bytes budget bounds what
            // waits.
            Budget {
                records: 2 * self.cfg.max_in_flight.max(1) + 2,
                bytes: QUEUE_PARTITION_BYTES,
            },
            self.cfg.commit_refresh,
        )));
        let queue_balancer = self.balancer(
            "async-queue",
            &queue,
            &queue_trackers,
            vec![self.cfg.queue_topic.clone()],
        )?;
        let delay_topics: Vec<String> = self
            .cfg
            .tiers()
            .into_iter()
            .map(|t| self.cfg.delay_topic(t))
            .collect();
        let delay = self.consumer(&format!("{}-delay", self.cfg.group_id))?;
        let delay_trackers = Arc::new(Mutex::new(Trackers::new(
            DELAY_SOURCE,
            Some(Arc::clone(&delay)),
            Budget {
                records: self.cfg.max_delayed.max(1),
                bytes: DELAY_PARTITION_BYTES,
            },
            self.cfg.commit_refresh,
        )));
        let delay_balancer =
            self.balancer("async-delay", &delay, &delay_trackers, delay_topics.clone())?;
        tracing::info!(queue = %self.cfg.queue_topic, delay_topics = delay_topics.len(), "async poller started");
        // Intake stops at `cancel`; the balancers (lease renewal and hand-over) run until the
        // consume loops have drained and committed, then release every lease.
        let balancing = CancellationToken::new();
        let balancers = tokio::spawn({
            let (q, d, stop) = (
                queue_balancer.clone(),
                delay_balancer.clone(),
                balancing.clone(),
            );
            async move {
                tokio::join!(q.run(stop.clone()), d.run(stop));
            }
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_in_flight.max(1)));
        let fair = Arc::new(FairShare::new(
            self.cfg.max_in_flight.max(1),
            self.cfg.fair_reserve,
        ));
        let me = self.clone();
        let queue_cancel = cancel.clone();
        let queue_loop = runtime::run(
            queue,
            queue_trackers,
            RunConfig {
                name: QUEUE_SOURCE.into(),
                commit_every: Duration::from_millis(500),
                drain: QUEUE_DRAIN,
                channel: self.cfg.max_in_flight.max(1),
                kafka: self.kafka.clone(),
            },
            cancel.clone(),
            |m, _| event_or_drop(m),
            move |part, rx| {
                me.clone().queue_worker(
                    part,
                    rx,
                    Arc::clone(&slots),
                    Arc::clone(&fair),
                    queue_cancel.clone(),
                )
            },
        );
        let me = self.clone();
        let delay_cancel = cancel.clone();
        let delay_loop = runtime::run(
            delay,
            delay_trackers,
            RunConfig {
                name: DELAY_SOURCE.into(),
                commit_every: Duration::from_millis(500),
                drain: DELAY_DRAIN,
                channel: self.cfg.max_delayed.max(1),
                kafka: self.kafka.clone(),
            },
            cancel.clone(),
            |m, _| event_or_drop(m),
            move |part, rx| me.clone().delay_worker(part, rx, delay_cancel.clone()),
        );
        tokio::join!(queue_loop, delay_loop);
        balancing.cancel();
        let _ = balancers.await;
        tokio::join!(queue_balancer.release_all(), delay_balancer.release_all());
        tracing::info!("async poller stopped");
        Ok(())
    }

    /// Runs one queue partition's events: each in its own task under a node-wide slot, within
    /// its function's fair share.
    async fn queue_worker(
        self,
        part: Partition,
        mut rx: tokio::sync::mpsc::Receiver<Item<Option<AsyncEvent>>>,
        slots: Arc<tokio::sync::Semaphore>,
        fair: Arc<FairShare>,
        cancel: CancellationToken,
    ) {
        let tasks = tokio_util::task::TaskTracker::new();
        while let Some(item) = rx.recv().await {
            let slot = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                s = Arc::clone(&slots).acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            };
            // Running, it is bounded by the slots: its bytes stop counting against the partition,
            // so a slow function's running events never keep the partition paused.
            part.started(item.offset);
            let me = self.clone();
            let part = part.clone();
            let fair = Arc::clone(&fair);
            tasks.spawn(async move {
                if let Some(event) = item.value {
                    let work = async {
                        match fair.try_acquire(&event.function) {
                            Some(share) => {
                                me.process(event, &part).await;
                                drop(share);
                            }
                            None => me.defer(event, &part).await,
                        }
                    };
                    // `process` fails a panicking invocation like a function error; a panic
                    // anywhere else is counted here, and the offset still moves on.
                    if AssertUnwindSafe(work).catch_unwind().await.is_err() {
                        metrics::counter!("sluice_async_handler_panics_total", "function" => "")
                            .increment(1);
                        tracing::error!(offset = item.offset, "handling an event panicked");
                    }
                }
                part.finish(item.offset);
                drop(slot);
            });
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Runs one delay partition in order: waits for the head event to be due (the partition is
    /// paused meanwhile, so the rest waits in Kafka), then writes it back to the queue.
    async fn delay_worker(
        self,
        part: Partition,
        mut rx: tokio::sync::mpsc::Receiver<Item<Option<AsyncEvent>>>,
        cancel: CancellationToken,
    ) {
        while let Some(item) = rx.recv().await {
            let Some(mut event) = item.value else {
                part.finish(item.offset);
                continue;
            };
            let wait =
                Duration::from_millis(u64::try_from(event.not_before_ms - now_ms()).unwrap_or(0));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // Not done: the offset stays uncommitted and the record comes back.
                () = cancel.cancelled() => return,
            }
            if !part.is_owned() {
                // Another node owns the partition now and re-queues this event itself.
                return;
            }
            event.not_before_ms = 0;
            self.send_durably(&self.cfg.queue_topic, &event).await;
            part.finish(item.offset);
        }
    }

    /// An event over its function's fair share of a busy node: back to the queue through the
    /// delay topics, not counted as an attempt.
    async fn defer(&self, mut event: AsyncEvent, part: &Partition) {
        if !part.is_owned() {
            return;
        }
        metrics::counter!("sluice_async_events_deferred_total", "function" => event.function.clone())
            .increment(1);
        // Backs off like a throttle (1 s doubling to 5 min), so a function kept over its share
        // does not cycle its events through Kafka at full speed.
        event.throttles += 1;
        let delay = self.cfg.throttle_backoff(event.throttles);
        event.not_before_ms = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let topic = self.cfg.delay_topic(delay);
        self.send_durably(&topic, &event).await;
    }

    /// Writes `event` to `topic`, retrying until Kafka has it. Keyed by request id: Lambda does
    /// not order async events, so one function's re-queued events spread over every partition.
    async fn send_durably(&self, topic: &str, event: &AsyncEvent) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.send(topic, event).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "could not re-queue an event; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn send(&self, topic: &str, event: &AsyncEvent) -> Result<(), KafkaError> {
        let headers = event.headers();
        let record = FutureRecord::to(topic)
            .key(&event.request_id)
            .payload(&event.payload)
            .headers(headers);
        self.events
            .producer()
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// Redis key marking an event as finished (success, or its final failure record written).
    fn done_key(&self, event: &AsyncEvent) -> String {
        format!(
            "{}async-done:{}:{}",
            self.cfg.redis_prefix, event.request_id, event.attempts
        )
    }

    async fn process(&self, event: AsyncEvent, part: &Partition) {
        let function = event.function.clone();
        // A redelivery after a crash (the offset was not committed yet): skip what already
        // finished, and count it. Only a redelivery of an event that was still running repeats.
        let mut conn = self.redis.clone();
        let seen: redis::RedisResult<bool> = redis::cmd("EXISTS")
            .arg(self.done_key(&event))
            .query_async(&mut conn)
            .await;
        if matches!(seen, Ok(true)) {
            metrics::counter!("sluice_async_duplicates_skipped_total", "function" => function)
                .increment(1);
            return;
        }
        let key = self.done_key(&event);
        let copy = event.clone();
        let next = match AssertUnwindSafe(self.decide(event, part))
            .catch_unwind()
            .await
        {
            Ok(next) => next,
            Err(_) => {
                // Fail the event like a function error instead of leaving its offset in flight.
                metrics::counter!("sluice_async_handler_panics_total", "function" => function.clone())
                    .increment(1);
                tracing::error!(function = %function, request_id = %copy.request_id, "handling an event panicked; failing it like a function error");
                let config = self.invoke_config(&copy.function);
                let mut event = copy;
                event.attempts += 1;
                let payload = br#"{"errorMessage":"the poller failed while handling the event","errorType":"Sluice.PollerPanic"}"#;
                let decision =
                    attempt::after_function_error(&self.cfg, &config, event, payload.to_vec());
                self.carry_out(decision, &config).await
            }
        };
        match next {
            Next::Done => {
                let _: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("EX")
                    .arg(86_400)
                    .query_async(&mut conn)
                    .await;
            }
            Next::Abandoned => {}
            Next::Requeue { delay, mut event } => {
                event.not_before_ms =
                    now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                let topic = self.cfg.delay_topic(delay);
                tracing::debug!(function = %function, request_id = %event.request_id, ?delay, "re-queued");
                self.send_durably(&topic, &event).await;
            }
        }
    }

    fn arn(&self, function: &str) -> String {
        format!("{}{function}", self.cfg.function_arn_prefix)
    }

    async fn to_destination(
        &self,
        uri: Option<String>,
        event: &AsyncEvent,
        condition: Condition,
        response: Option<(Option<String>, &[u8])>,
    ) {
        let Some(topic) = uri.and_then(|u| u.strip_prefix("kafka://").map(str::to_owned)) else {
            return;
        };
        let record = InvocationRecord::new(
            &event.request_id,
            &self.arn(&event.function),
            condition,
            event.attempts,
            &event.payload,
            response,
            now_ms(),
        );
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an invocation record");
                return;
            }
        };
        self.destinations
            .write(
                &topic,
                &event.function,
                &value,
                &[("sluice-request-id", &event.request_id)],
            )
            .await;
    }

    fn invoke_config(&self, function: &str) -> EventInvokeConfig {
        self.store
            .event_invoke_config(function)
            .map(|c| c.object)
            .unwrap_or_default()
    }

    /// The function's configuration; when this node's view does not know it, waits for the view
    /// to catch up with the log first (a function created a moment ago is not a deleted one).
    async fn function(&self, name: &str) -> Option<sluice_core::model::FunctionConfig> {
        if let Some(f) = self.store.function(name) {
            return Some(f.object);
        }
        if let Err(e) = self.store.catch_up().await {
            tracing::warn!(function = %name, error = %e, "configuration view did not catch up");
        }
        self.store.function(name).map(|f| f.object)
    }

    async fn decide(&self, event: AsyncEvent, part: &Partition) -> Next {
        let Some(function) = self.function(&event.function).await else {
            tracing::warn!(function = %event.function, request_id = %event.request_id, "dropping an event of a deleted function");
            metrics::counter!("sluice_async_events_dropped_total", "reason" => "FunctionDeleted")
                .increment(1);
            return Next::Done;
        };
        let config = self.invoke_config(&event.function);
        let now = now_ms();
        metrics::histogram!("sluice_async_event_age_seconds", "function" => event.function.clone())
            .record(event.age(now).as_secs_f64());
        let attempt = Attempt {
            invoker: &*self.invoker,
            cfg: &self.cfg,
            invoke_config: &config,
            reserved: function.reserved_concurrent_executions,
        };
        let decision = attempt.run(event, now, || part.is_owned()).await;
        self.carry_out(decision, &config).await
    }

    /// Writes the destination record and counts what `decision` says; returns what is left to do
    /// with the event.
    async fn carry_out(&self, decision: Decision, config: &EventInvokeConfig) -> Next {
        let dest = config.destination_config.clone().unwrap_or_default();
        match decision {
            Decision::Success { event, response } => {
                let on_success = dest.on_success.and_then(|d| d.destination);
                self.to_destination(
                    on_success,
                    &event,
                    Condition::Success,
                    Some((None, &response)),
                )
                .await;
                Next::Done
            }
            Decision::Requeue {
                delay,
                event,
                cause,
            } => {
                if cause == RequeueCause::Throttled {
                    metrics::counter!("sluice_throttles_total", "function" => event.function.clone())
                        .increment(1);
                }
                Next::Requeue { delay, event }
            }
            Decision::Failure {
                event,
                condition,
                error,
            } => {
                metrics::counter!("sluice_async_events_dropped_total", "reason" => reason(condition))
                    .increment(1);
                if condition == Condition::ZeroReservedConcurrency {
                    metrics::counter!("sluice_throttles_total", "function" => event.function.clone())
                        .increment(1);
                }
                let on_failure = dest.on_failure.and_then(|d| d.destination);
                let response = error.as_deref().map(|e| (Some("Unhandled".to_owned()), e));
                self.to_destination(on_failure, &event, condition, response)
                    .await;
                Next::Done
            }
            Decision::Drop { reason } => {
                metrics::counter!("sluice_async_events_dropped_total", "reason" => reason)
                    .increment(1);
                Next::Done
            }
            Decision::Abandoned => {
                // A zombie (paused past its lease, or the partition moved): the new owner runs it.
                metrics::counter!("sluice_poller_zombie_skips_total", "source" => QUEUE_SOURCE)
                    .increment(1);
                Next::Abandoned
            }
        }
    }
}

/// The `reason` label of a failure record's condition.
fn reason(condition: Condition) -> &'static str {
    match condition {
        Condition::Success => "Success",
        Condition::RetriesExhausted => "RetriesExhausted",
        Condition::EventAgeExceeded => "EventAgeExceeded",
        Condition::ZeroReservedConcurrency => "ZeroReservedConcurrency",
    }
}

/// The event in `m`; a record that is not one (on the queue or a delay topic) is logged,
/// counted as dropped (`Malformed`) and skipped.
fn event_or_drop(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<AsyncEvent> {
    match AsyncEvent::from_message(m) {
        Ok(event) => Some(event),
        Err(e) => {
            tracing::warn!(topic = rdkafka::Message::topic(m), error = %e, "skipping a record that is not an async event");
            metrics::counter!("sluice_async_events_dropped_total", "reason" => "Malformed")
                .increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambdas_delays_become_tiers() {
        let c = AsyncPollerConfig::new("sluice.", "arn:");
        let tiers: Vec<u64> = c.tiers().iter().map(Duration::as_secs).collect();
        assert_eq!(tiers, [1, 2, 4, 8, 16, 32, 60, 64, 120, 128, 256, 300]);
        assert_eq!(
            c.delay_topic(Duration::from_secs(60)),
            "sluice.async.delay.60000"
        );
    }

    #[test]
    fn throttle_backoff_doubles_from_one_second_to_five_minutes() {
        let c = AsyncPollerConfig::new("sluice.", "arn:");
        let steps: Vec<u64> = (1..=11).map(|n| c.throttle_backoff(n).as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert!(c.tiers().contains(&c.throttle_backoff(40)));
    }
}
