//! The one consumer runtime behind the async queue, the delay topics and every stream mapping.
//!
//! Ownership is by Redis leases (see `balance`): the runtime consumes only the partitions this
//! node holds, tracks each record from fetch to completion ([`OffsetTracker`]), and commits per
//! partition the lowest unfinished offset. What happens to a record is the plug-in's business: the
//! runtime hands each owned partition's records, in order, to a partition worker that the async or
//! stream poller supplies, and the worker reports each record finished through its [`Partition`].
//!
//! Isolation: the receive loop never waits on a partition. Each partition has a budget of records
//! and bytes between fetch and finish; a partition over it is paused in librdkafka (its records
//! stay in Kafka) and resumed once its worker has caught up, so a stuck partition never holds back
//! another and memory is bounded by bytes as well as count. A plug-in whose running records are
//! bounded elsewhere (the async queue's slots) reports each record started
//! ([`Partition::started`]): from then on it counts against the partition's records but no longer
//! its bytes, so the bytes budget measures what waits. Streams count everything (a lane's batch is
//! the partition's buffer until it is done).
//!
//! Zombies: a record is worked on only while its partition's lease is valid under the ownership
//! epoch it was fetched in ([`Partition::is_owned`]); commits skip partitions whose lease is not
//! valid with a margin, so a node paused past its TTL neither invokes nor commits for what it lost.
//!
//! Threading: the receive loop and the workers are tokio tasks; blocking librdkafka calls (sync
//! commits, metadata, watermarks) run on the blocking pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::kafka::KafkaSettings;
use sluice_leasing::Lease;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::offsets::OffsetTracker;

/// A topic partition.
pub(crate) type Tp = (String, i32);

/// How often, by default, a commit that has not changed is sent again, so that Kafka never
/// expires the group's offsets of a quiet partition (`offsets.retention.minutes`, 7 days by
/// default). The pollers' `commit_refresh` setting.
pub(crate) const COMMIT_REFRESH: Duration = Duration::from_secs(3600);

/// How often the offset lag of the owned partitions is read from the brokers.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How long one partition's watermarks may take to read.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(1);

/// How soon after a partition's commit point moved it is committed, at most: one commit (of every
/// partition that moved) per this interval while records finish, so a finished batch is durable
/// within it rather than at the next [`RunConfig::commit_every`] (fewer redeliveries after a
/// failover, and a group lag that Kafka's tools show current). Idle loops send nothing.
const COMMIT_SOON: Duration = Duration::from_millis(50);

/// Shutdown deadlines, each shorter than the node's 10 s for all its tasks: drain (the plug-in's
/// `RunConfig::drain`, at most 5 s), then the final commit, then the lease releases.
pub(crate) const COMMIT_DEADLINE: Duration = Duration::from_secs(2);
/// See [`COMMIT_DEADLINE`].
pub(crate) const RELEASE_DEADLINE: Duration = Duration::from_secs(1);

/// How long a partition's lease must still hold for this node to commit it: a commit handed to
/// librdkafka then lands well before a holder paused at that moment could have lost the lease.
const COMMIT_LEASE_MARGIN: Duration = Duration::from_millis(500);

/// A partition's budget between fetch and finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Records fetched and not finished.
    pub(crate) records: usize,
    /// Bytes (key + value) fetched and neither finished nor started (see
    /// [`Partition::started`]).
    pub(crate) bytes: usize,
}

impl Budget {
    fn over(self, records: usize, bytes: usize) -> bool {
        records >= self.records || bytes >= self.bytes
    }

    /// Resume once at most half of the budget is used, so a partition does not flap.
    fn under_half(self, records: usize, bytes: usize) -> bool {
        records <= self.records / 2 && bytes <= self.bytes / 2
    }
}

/// One partition's records between fetch and finish: their offsets (for the commit point) and
/// the bytes that count against the partition's budget, and whether it is paused for being over
/// it. Pure bookkeeping: [`Trackers`] applies the pauses and resumes it asks for.
#[derive(Debug, Default)]
struct Buffer {
    tracker: OffsetTracker,
    /// Sizes of the records whose bytes count: fetched, and neither started nor finished.
    sizes: HashMap<i64, usize>,
    bytes: usize,
    paused: bool,
}

/// What a partition's flow in librdkafka must do after a change to its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Keep,
    Pause,
    Resume,
}

/// A partition's commit that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// The commit point moved to this offset.
    Moved(i64),
    /// Nothing moved; this (the last commit) is sent again before Kafka expires it.
    Refresh(i64),
}

impl Due {
    fn offset(self) -> i64 {
        match self {
            Due::Moved(o) | Due::Refresh(o) => o,
        }
    }
}

impl Buffer {
    /// Tracks a fetched record of `bytes`; `None` when it was fetched before (librdkafka
    /// re-fetches from the application's position after a resume).
    fn start(&mut self, offset: i64, bytes: usize, budget: Budget) -> Option<Flow> {
        if self.tracker.next().is_some_and(|n| offset < n) {
            return None;
        }
        self.tracker.start(offset);
        self.sizes.insert(offset, bytes);
        self.bytes += bytes;
        if !self.paused && budget.over(self.tracker.in_flight(), self.bytes) {
            self.paused = true;
            return Some(Flow::Pause);
        }
        Some(Flow::Keep)
    }

    /// A worker started the record: its bytes stop counting (it is still in flight).
    fn started(&mut self, offset: i64, budget: Budget) -> Flow {
        self.release(offset);
        self.resume_under_half(budget)
    }

    /// The record is done.
    fn finish(&mut self, offset: i64, budget: Budget) -> Flow {
        self.tracker.finish(offset);
        self.release(offset);
        self.resume_under_half(budget)
    }

    /// Whether finishing `offset` moves the commit point (it is the lowest record in flight).
    fn moves_on(&self, offset: i64) -> bool {
        self.tracker.lowest() == Some(offset)
    }

    fn release(&mut self, offset: i64) {
        if let Some(b) = self.sizes.remove(&offset) {
            self.bytes -= b;
        }
    }

    /// What to commit at `now`, given the last commit at `committed_at` (updated when something
    /// is due): the commit point when it moved, else the last one again once `refresh` has
    /// passed since, so that Kafka does not expire a quiet partition's offset.
    fn due_commit(
        &mut self,
        committed_at: &mut Option<Instant>,
        now: Instant,
        refresh: Duration,
    ) -> Option<Due> {
        let stale = committed_at.is_none_or(|at| now.duration_since(at) >= refresh);
        let due = match self.tracker.commit_point() {
            Some(p) => Due::Moved(p),
            None if stale => Due::Refresh(self.tracker.last_commit()?),
            None => return None,
        };
        *committed_at = Some(now);
        Some(due)
    }

    fn resume_under_half(&mut self, budget: Budget) -> Flow {
        if self.paused && budget.under_half(self.tracker.in_flight(), self.bytes) {
            self.paused = false;
            return Flow::Resume;
        }
        Flow::Keep
    }
}

/// The partitions this consumer owns (each under a Redis lease), with their offset trackers and
/// an epoch per ownership so that a record finishing after its partition moved is ignored.
pub(crate) struct Trackers {
    pub(crate) by_partition: HashMap<Tp, Owned>,
    epoch: u64,
    budget: Budget,
    /// How often an unchanged commit is sent again.
    commit_refresh: Duration,
    /// The `source` label of the metrics.
    source: String,
    /// Pauses and resumes partitions (none in unit tests).
    consumer: Option<Arc<StreamConsumer>>,
    /// Wakes the commit loop when a partition's commit point moved.
    moved: Arc<Notify>,
}

/// One owned partition.
pub(crate) struct Owned {
    epoch: u64,
    buffer: Buffer,
    /// The lease that makes this node the partition's only consumer.
    pub(crate) lease: Lease,
    /// When the last commit of this partition was handed to Kafka.
    committed_at: Option<Instant>,
}

impl Trackers {
    /// Trackers of the consume loop `source` that pause `consumer`'s partitions when they go
    /// over `budget`, and send an unchanged commit again every `commit_refresh`.
    pub(crate) fn new(
        source: &str,
        consumer: Option<Arc<StreamConsumer>>,
        budget: Budget,
        commit_refresh: Duration,
    ) -> Self {
        Self {
            by_partition: HashMap::new(),
            epoch: 0,
            budget,
            commit_refresh,
            source: source.to_owned(),
            consumer,
            moved: Arc::new(Notify::new()),
        }
    }

    /// Takes ownership of `tp` under `lease`; `committed` is the group's committed offset, if
    /// any, so that an idle partition's commit can be refreshed before Kafka expires it.
    pub(crate) fn own(&mut self, tp: Tp, lease: Lease, committed: Option<i64>) {
        self.epoch += 1;
        let mut buffer = Buffer::default();
        if let Some(c) = committed {
            buffer.tracker.resume_at(c);
        }
        self.by_partition.insert(
            tp,
            Owned {
                epoch: self.epoch,
                buffer,
                lease,
                committed_at: Some(Instant::now()),
            },
        );
    }

    /// Gives `tp` up; returns its lease.
    pub(crate) fn disown(&mut self, tp: &Tp) -> Option<Lease> {
        self.by_partition.remove(tp).map(|o| o.lease)
    }

    /// Starts tracking a fetched record of `bytes`; `None` when the partition is not (or no
    /// longer) owned, or when the record was already fetched in this ownership (librdkafka
    /// re-fetches from the application's position after a resume). Pauses the partition when it
    /// goes over its budget.
    pub(crate) fn start(&mut self, tp: &Tp, offset: i64, bytes: usize) -> Option<u64> {
        let budget = self.budget;
        let owned = self.by_partition.get_mut(tp)?;
        let flow = owned.buffer.start(offset, bytes, budget)?;
        let epoch = owned.epoch;
        self.apply(tp, flow);
        Some(epoch)
    }

    /// Notes that a worker started the record (async queue: it has its slot); its bytes stop
    /// counting against the partition's budget, which resumes once under half. Running records
    /// are bounded node-wide by the slots, and counting them let a slow function's running
    /// events keep a partition paused for good, holding back every other function's events.
    pub(crate) fn started(&mut self, tp: &Tp, offset: i64, epoch: u64) {
        let budget = self.budget;
        let Some(o) = self.by_partition.get_mut(tp) else {
            return;
        };
        if o.epoch != epoch {
            return;
        }
        let flow = o.buffer.started(offset, budget);
        self.apply(tp, flow);
    }

    /// Notes that a record is done; resumes its partition once under half its budget.
    pub(crate) fn finish(&mut self, tp: &Tp, offset: i64, epoch: u64) {
        let budget = self.budget;
        let Some(o) = self.by_partition.get_mut(tp) else {
            return;
        };
        if o.epoch != epoch {
            return;
        }
        let moves = o.buffer.moves_on(offset);
        let flow = o.buffer.finish(offset, budget);
        self.apply(tp, flow);
        if moves {
            self.moved.notify_one();
        }
    }

    /// Pauses or resumes `tp` in librdkafka.
    fn apply(&self, tp: &Tp, flow: Flow) {
        match flow {
            Flow::Keep => {}
            Flow::Pause => {
                if let Some(c) = &self.consumer {
                    if let Err(e) = c.pause(&one(tp, Offset::Invalid)) {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "pause failed");
                    }
                }
                metrics::counter!("sluice_poller_partition_pauses_total", "topic" => tp.0.clone())
                    .increment(1);
            }
            Flow::Resume => {
                if let Some(c) = &self.consumer {
                    if let Err(e) = c.resume(&one(tp, Offset::Invalid)) {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "resume failed");
                    }
                }
            }
        }
    }

    /// Whether `tp` is owned under `epoch` with a valid lease.
    pub(crate) fn is_owned(&self, tp: &Tp, epoch: u64) -> bool {
        self.by_partition
            .get(tp)
            .is_some_and(|o| o.epoch == epoch && o.lease.is_valid())
    }

    /// Records of `tp` started and not finished (0 when `tp` is not owned).
    pub(crate) fn in_flight(&self, tp: &Tp) -> usize {
        self.by_partition
            .get(tp)
            .map_or(0, |o| o.buffer.tracker.in_flight())
    }

    /// What the owned partitions hold: bytes counted against their budgets, records fetched and
    /// not finished, and partitions paused.
    fn buffered(&self) -> Buffered {
        let mut b = Buffered::default();
        for o in self.by_partition.values() {
            b.bytes += o.buffer.bytes;
            b.records += o.buffer.tracker.in_flight();
            b.paused += usize::from(o.buffer.paused);
        }
        b
    }

    /// Where each owned partition would resume now (see [`OffsetTracker::position`]).
    fn positions(&self) -> Vec<(Tp, Option<i64>)> {
        self.by_partition
            .iter()
            .map(|(tp, o)| (tp.clone(), o.buffer.tracker.position()))
            .collect()
    }

    /// The highest finished offset of every owned partition.
    pub(crate) fn max_finished(&self) -> Vec<(Tp, i64)> {
        self.by_partition
            .iter()
            .filter_map(|(tp, o)| Some((tp.clone(), o.buffer.tracker.max_finished()?)))
            .collect()
    }

    /// Offsets to commit: what moved, and what has not been committed for the refresh interval
    /// (counted in `sluice_poller_commit_refreshes_total`). Only partitions whose lease stays
    /// valid for a while yet: a holder that lost its lease (or is about to) must not move the
    /// group's offsets.
    pub(crate) fn commit_list(&mut self, only: Option<&Tp>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let now = Instant::now();
        let mut refreshes = 0u64;
        for ((topic, partition), o) in &mut self.by_partition {
            if only.is_some_and(|t| t.0 != *topic || t.1 != *partition) {
                continue;
            }
            if !o.lease.is_valid()
                || o.lease.deadline() < tokio::time::Instant::now() + COMMIT_LEASE_MARGIN
            {
                continue;
            }
            if let Some(due) = o
                .buffer
                .due_commit(&mut o.committed_at, now, self.commit_refresh)
            {
                refreshes += u64::from(matches!(due, Due::Refresh(_)));
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(due.offset()));
            }
        }
        if refreshes > 0 {
            metrics::counter!("sluice_poller_commit_refreshes_total", "source" => self.source.clone())
                .increment(refreshes);
        }
        tpl
    }
}

/// What a consume loop's owned partitions hold (see [`Trackers::buffered`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Buffered {
    bytes: usize,
    records: usize,
    paused: usize,
}

fn one(tp: &Tp, offset: Offset) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    let _ = tpl.add_partition_offset(&tp.0, tp.1, offset);
    tpl
}

/// Locks the trackers (a panic elsewhere does not poison them for good).
pub(crate) fn lock(trackers: &Mutex<Trackers>) -> MutexGuard<'_, Trackers> {
    trackers.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One fetched record as a partition worker gets it.
pub(crate) struct Item<T> {
    /// Its offset.
    pub(crate) offset: i64,
    /// What the plug-in decoded from it.
    pub(crate) value: T,
}

/// A partition worker's handle on its partition under one ownership epoch.
#[derive(Clone)]
pub(crate) struct Partition {
    pub(crate) tp: Tp,
    pub(crate) epoch: u64,
    trackers: Arc<Mutex<Trackers>>,
}

impl Partition {
    /// A handle for `tp` under `epoch`.
    pub(crate) fn new(tp: Tp, epoch: u64, trackers: Arc<Mutex<Trackers>>) -> Self {
        Self {
            tp,
            epoch,
            trackers,
        }
    }

    /// Whether this node still owns the partition under this epoch with a valid lease: checked
    /// before every invocation and every hand-on, so a zombie does nothing with what it lost.
    pub(crate) fn is_owned(&self) -> bool {
        lock(&self.trackers).is_owned(&self.tp, self.epoch)
    }

    /// Notes that a worker started the record at `offset`: its bytes no longer count against
    /// the partition's budget (see [`Trackers::started`]); it stays in flight until finished.
    pub(crate) fn started(&self, offset: i64) {
        lock(&self.trackers).started(&self.tp, offset, self.epoch);
    }

    /// Marks the record at `offset` done.
    pub(crate) fn finish(&self, offset: i64) {
        lock(&self.trackers).finish(&self.tp, offset, self.epoch);
    }
}

/// A partition's input in the receive loop: records go to its worker in order; those its channel
/// cannot take yet wait here (the partition is paused meanwhile).
struct Inbox<T> {
    epoch: u64,
    tx: mpsc::Sender<Item<T>>,
    parked: VecDeque<Item<T>>,
}

impl<T> Inbox<T> {
    /// Moves parked records to the worker; `false` when the worker is gone.
    fn flush(&mut self) -> bool {
        while let Some(item) = self.parked.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.parked.push_front(item);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }
}

/// Settings of one consume loop.
pub(crate) struct RunConfig {
    /// Names the loop in logs.
    pub(crate) name: String,
    /// How often, at least, finished offsets are committed (a moved commit point is committed
    /// within [`COMMIT_SOON`]), quiet partitions' commits refreshed and the buffer gauges set.
    pub(crate) commit_every: Duration,
    /// How long shutdown waits for work in flight before committing what is done.
    pub(crate) drain: Duration,
    /// Capacity of each partition worker's channel.
    pub(crate) channel: usize,
    /// The cluster the loop reads. The lag loop reads its watermarks there with a client of its
    /// own (see [`lag_loop`]).
    pub(crate) kafka: KafkaSettings,
}

/// Consumes `consumer` until `cancel`: each record of an owned partition is decoded with
/// `decode` and handed, in partition order, to that partition's worker (started with `worker` on
/// the partition's first record of an ownership). Commits within [`COMMIT_SOON`] of a move (see `commit_loop`); at the end stops
/// intake, waits up to `drain` for the workers, and commits what finished.
pub(crate) async fn run<T, D, W, Fut>(
    consumer: Arc<StreamConsumer>,
    trackers: Arc<Mutex<Trackers>>,
    cfg: RunConfig,
    cancel: CancellationToken,
    decode: D,
    worker: W,
) where
    T: Send + 'static,
    D: Fn(&BorrowedMessage<'_>, u64) -> T,
    W: Fn(Partition, mpsc::Receiver<Item<T>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let workers = TaskTracker::new();
    let moved = Arc::clone(&lock(&trackers).moved);
    let committer = tokio::spawn(commit_loop(
        Arc::clone(&consumer),
        Arc::clone(&trackers),
        moved,
        cfg.commit_every,
        cancel.clone(),
        cfg.name.clone(),
    ));
    let lag = tokio::spawn(lag_loop(
        cfg.kafka.clone(),
        Arc::clone(&trackers),
        cancel.clone(),
        cfg.name.clone(),
    ));
    let mut inboxes: HashMap<Tp, Inbox<T>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            _ = tick.tick() => {
                ticks += 1;
                inboxes.retain(|_, inbox| inbox.flush());
                if ticks % 50 == 0 {
                    // Workers of partitions this node gave up end once their channel closes.
                    let t = lock(&trackers);
                    inboxes.retain(|tp, inbox| t.by_partition.get(tp).is_some_and(|o| o.epoch == inbox.epoch));
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let m = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(source = %cfg.name, error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let tp: Tp = (
            rdkafka::Message::topic(&m).to_owned(),
            rdkafka::Message::partition(&m),
        );
        let offset = rdkafka::Message::offset(&m);
        let bytes = m.payload_len() + m.key().map_or(0, <[u8]>::len);
        let Some(epoch) = lock(&trackers).start(&tp, offset, bytes) else {
            // A partition this node gave up (its new owner reads it), or a re-fetch.
            continue;
        };
        let value = decode(&m, epoch);
        drop(m);
        let inbox = match inboxes.get_mut(&tp) {
            Some(inbox) if inbox.epoch == epoch => inbox,
            _ => {
                let (tx, rx) = mpsc::channel(cfg.channel.max(1));
                let part = Partition::new(tp.clone(), epoch, Arc::clone(&trackers));
                workers.spawn(worker(part, rx));
                inboxes.insert(
                    tp.clone(),
                    Inbox {
                        epoch,
                        tx,
                        parked: VecDeque::new(),
                    },
                );
                inboxes.get_mut(&tp).expect("just inserted")
            }
        };
        inbox.parked.push_back(Item { offset, value });
        if !inbox.flush() {
            inboxes.remove(&tp);
        }
    }
    // Stop intake: workers see their channel close, finish (or hand back) what they hold.
    drop(inboxes);
    workers.close();
    if tokio::time::timeout(cfg.drain, workers.wait())
        .await
        .is_err()
    {
        tracing::warn!(source = %cfg.name, "records still in flight at shutdown; they will be redelivered");
    }
    committer.abort();
    lag.abort();
    if let Err(e) = commit_blocking(&consumer, &trackers, None).await {
        tracing::warn!(source = %cfg.name, error = %e, "final offset commit failed; records since the last commit will be redelivered");
    }
}

/// Commits what finished soon after a commit point moved (at most every [`COMMIT_SOON`]), and
/// every `every` at least (refreshes of quiet partitions, and the buffer gauges).
async fn commit_loop(
    consumer: Arc<StreamConsumer>,
    trackers: Arc<Mutex<Trackers>>,
    moved: Arc<Notify>,
    every: Duration,
    cancel: CancellationToken,
    name: String,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = moved.notified() => {}
            () = tokio::time::sleep(every) => {}
        }
        // What finishes meanwhile goes in this commit.
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(COMMIT_SOON) => {}
        }
        let (tpl, buffered) = {
            let mut t = lock(&trackers);
            (t.commit_list(None), t.buffered())
        };
        metrics::gauge!("sluice_poller_buffered_bytes", "source" => name.clone())
            .set(buffered.bytes as f64);
        metrics::gauge!("sluice_poller_buffered_records", "source" => name.clone())
            .set(buffered.records as f64);
        metrics::gauge!("sluice_poller_paused_partitions", "source" => name.clone())
            .set(buffered.paused as f64);
        if tpl.count() == 0 {
            continue;
        }
        // An async commit only queues the request: it never blocks.
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(source = %name, error = %e, "offset commit failed; will retry");
        }
    }
}

/// Every [`LAG_EVERY`] sets `sluice_poller_offset_lag_records{source,topic,partition}` of each
/// owned partition: its high watermark minus where it would resume now (the lowest unfinished
/// record, else the next offset); a partition this node no longer owns is set to 0 (its owner
/// reports it).
///
/// The watermarks are read with a client of the lag loop's own (no group), on the blocking pool
/// one round at a time, never with the consume loop's consumer: that consumer serves the receive
/// loop, the commits and the balancer's lookups alone, and a slow broker's watermark reads never
/// queue on its connections. (The stall once blamed on this loop, a mapping receiving nothing,
/// was the broker: its offset storage failing, so the consumer's OffsetFetch for `Stored` never
/// answered; it happens with or without this loop.)
async fn lag_loop(
    kafka: KafkaSettings,
    trackers: Arc<Mutex<Trackers>>,
    cancel: CancellationToken,
    source: String,
) {
    // No group: the client reads watermarks only, and its events stay on its own main queue.
    let client: BaseConsumer = match kafka.client_config().create() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%source, error = %e, "no offset lag reported: could not create the watermark client");
            return;
        }
    };
    let client = Arc::new(client);
    let mut reported: HashSet<Tp> = HashSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(LAG_EVERY) => {}
        }
        let positions = lock(&trackers).positions();
        let c = Arc::clone(&client);
        let read = tokio::task::spawn_blocking(move || {
            // Serve (and drop) what the client queued: errors are logged by librdkafka.
            while c.poll(Duration::ZERO).is_some() {}
            positions
                .into_iter()
                .filter_map(|(tp, position)| {
                    let (low, high) = c.fetch_watermarks(&tp.0, tp.1, WATERMARKS_TIMEOUT).ok()?;
                    Some((tp, lag(low, high, position)))
                })
                .collect::<Vec<_>>()
        });
        let Ok(lags) = read.await else { continue };
        for (tp, lag) in lags {
            set_lag(&source, &tp, lag);
            reported.insert(tp);
        }
        let owned: HashSet<Tp> = lock(&trackers).by_partition.keys().cloned().collect();
        reported.retain(|tp| {
            let keep = owned.contains(tp);
            if !keep {
                set_lag(&source, tp, 0);
            }
            keep
        });
    }
}

/// A partition's offset lag: records from where it would resume (`position`, or the low
/// watermark when it has none: records before the low watermark are gone, a restart reads from
/// it) to the high watermark.
fn lag(low: i64, high: i64, position: Option<i64>) -> i64 {
    let from = position.map_or(low, |p| p.max(low));
    (high - from).max(0)
}

fn set_lag(source: &str, tp: &Tp, lag: i64) {
    metrics::gauge!(
        "sluice_poller_offset_lag_records",
        "source" => source.to_owned(),
        "topic" => tp.0.clone(),
        "partition" => tp.1.to_string()
    )
    .set(lag as f64);
}

/// Commits what is finished (of `only`, or of every owned partition) synchronously, on the
/// blocking pool so that a slow broker never stalls the runtime.
///
/// # Errors
/// The commit's Kafka error.
pub(crate) async fn commit_blocking(
    consumer: &Arc<StreamConsumer>,
    trackers: &Mutex<Trackers>,
    only: Option<&Tp>,
) -> rdkafka::error::KafkaResult<()> {
    let tpl = lock(trackers).commit_list(only);
    if tpl.count() == 0 {
        return Ok(());
    }
    let c = Arc::clone(consumer);
    let commit = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync));
    match tokio::time::timeout(COMMIT_DEADLINE, commit).await {
        Ok(r) => r.unwrap_or(Ok(())),
        // The blocking thread finishes on its own; the caller moves on (what is not committed is
        // redelivered, at least once).
        Err(_) => Err(rdkafka::error::KafkaError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_pauses_at_its_bound_and_resumes_at_half() {
        let b = Budget {
            records: 10,
            bytes: 1000,
        };
        assert!(!b.over(9, 999));
        assert!(b.over(10, 0), "count bound");
        assert!(
            b.over(1, 1000),
            "byte bound: ten 1 MB records do not fit a 1 KB budget"
        );
        assert!(!b.under_half(6, 0));
        assert!(!b.under_half(0, 501));
        assert!(b.under_half(5, 500));
    }

    const KB: usize = 1000;

    fn budget() -> Budget {
        Budget {
            records: 100,
            bytes: 3 * KB,
        }
    }

    #[test]
    fn a_partition_paused_by_bytes_resumes_once_its_records_are_started() {
        let mut b = Buffer::default();
        assert_eq!(b.start(10, KB, budget()), Some(Flow::Keep));
        assert_eq!(b.start(11, KB, budget()), Some(Flow::Keep));
        assert_eq!(b.start(12, KB, budget()), Some(Flow::Pause), "3 KB: full");
        assert_eq!(
            b.started(10, budget()),
            Flow::Keep,
            "2 KB waiting: over half"
        );
        assert_eq!(b.started(11, budget()), Flow::Resume, "1 KB waiting");
        assert_eq!(b.bytes, KB);
        assert_eq!(
            b.tracker.in_flight(),
            3,
            "started records are still in flight"
        );
        assert_eq!(
            b.tracker.commit_point(),
            Some(10),
            "nothing started is committed"
        );
        b.finish(11, budget());
        assert_eq!(b.tracker.commit_point(), None, "10 still holds the point");
        b.finish(10, budget());
        assert_eq!(b.bytes, KB, "a started record's bytes are released once");
        assert_eq!(b.tracker.commit_point(), Some(12));
        b.finish(12, budget());
        assert_eq!(b.bytes, 0);
        assert_eq!(b.tracker.commit_point(), Some(13));
    }

    #[test]
    fn records_never_started_count_until_they_finish() {
        // The stream lanes' way: a batch's records are the partition's buffer until done.
        let mut b = Buffer::default();
        for o in 0..3 {
            b.start(o, KB, budget());
        }
        assert!(b.paused);
        assert_eq!(b.finish(0, budget()), Flow::Keep);
        assert_eq!(b.finish(1, budget()), Flow::Resume);
        assert_eq!(b.bytes, KB);
    }

    #[test]
    fn a_record_fetched_again_is_not_tracked_twice() {
        let mut b = Buffer::default();
        assert_eq!(b.start(5, KB, budget()), Some(Flow::Keep));
        assert_eq!(b.start(5, KB, budget()), None);
        assert_eq!(b.start(4, KB, budget()), None);
        assert_eq!(b.bytes, KB);
    }

    #[test]
    fn an_idle_partitions_commit_is_sent_again_once_the_refresh_interval_passed() {
        let refresh = Duration::from_secs(2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = Buffer::default();
        b.tracker.resume_at(42);
        let mut committed_at = Some(t0);
        assert_eq!(b.due_commit(&mut committed_at, at(1000), refresh), None);
        assert_eq!(
            b.due_commit(&mut committed_at, at(2000), refresh),
            Some(Due::Refresh(42))
        );
        assert_eq!(
            b.due_commit(&mut committed_at, at(3500), refresh),
            None,
            "2 s from the refresh"
        );
        assert_eq!(
            b.due_commit(&mut committed_at, at(4000), refresh),
            Some(Due::Refresh(42))
        );
        b.start(42, KB, budget());
        b.finish(42, budget());
        assert_eq!(
            b.due_commit(&mut committed_at, at(4500), refresh),
            Some(Due::Moved(43)),
            "a move is not a refresh"
        );
        assert_eq!(b.due_commit(&mut committed_at, at(6000), refresh), None);
        assert_eq!(
            b.due_commit(&mut committed_at, at(6500), refresh),
            Some(Due::Refresh(43))
        );
    }

    #[test]
    fn only_finishing_the_lowest_record_moves_the_commit_point() {
        let mut b = Buffer::default();
        for o in 10..13 {
            b.start(o, KB, budget());
        }
        assert!(!b.moves_on(11), "10 still holds the point");
        b.finish(11, budget());
        assert!(b.moves_on(10));
        b.finish(10, budget());
        assert!(b.moves_on(12), "11 is done: 12 is the lowest now");
        assert!(!b.moves_on(11), "done already");
    }

    #[test]
    fn lag_counts_from_where_the_partition_would_resume_to_the_high_watermark() {
        assert_eq!(
            lag(0, 100, Some(40)),
            60,
            "40 is the lowest unfinished record"
        );
        assert_eq!(lag(0, 100, Some(100)), 0, "all done");
        assert_eq!(
            lag(0, 100, None),
            100,
            "nothing fetched yet: from the low watermark"
        );
        assert_eq!(
            lag(50, 100, Some(10)),
            50,
            "records before the low watermark are gone"
        );
        assert_eq!(
            lag(0, 100, Some(120)),
            0,
            "never negative (watermarks read late)"
        );
    }

    #[test]
    fn a_partition_with_nothing_committed_has_no_refresh() {
        let mut b = Buffer::default();
        let mut committed_at = None;
        assert_eq!(
            b.due_commit(&mut committed_at, Instant::now(), Duration::ZERO),
            None
        );
    }
}
