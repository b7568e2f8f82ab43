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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sluice_leasing::Lease;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::offsets::OffsetTracker;

/// A topic partition.
pub(crate) type Tp = (String, i32);

/// How often a commit that has not changed is sent again, so that Kafka never expires the
/// group's offsets of a quiet partition (`offsets.retention.minutes`, 7 days by default).
pub(crate) const COMMIT_REFRESH: Duration = Duration::from_secs(3600);

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

    fn release(&mut self, offset: i64) {
        if let Some(b) = self.sizes.remove(&offset) {
            self.bytes -= b;
        }
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
    /// Pauses and resumes partitions (none in unit tests).
    consumer: Option<Arc<StreamConsumer>>,
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
    /// Trackers that pause `consumer`'s partitions when they go over `budget`.
    pub(crate) fn new(consumer: Option<Arc<StreamConsumer>>, budget: Budget) -> Self {
        Self {
            by_partition: HashMap::new(),
            epoch: 0,
            budget,
            consumer,
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
        let flow = o.buffer.finish(offset, budget);
        self.apply(tp, flow);
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

    /// Bytes fetched and not finished, over every owned partition.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.by_partition.values().map(|o| o.buffer.bytes).sum()
    }

    /// The highest finished offset of every owned partition.
    pub(crate) fn max_finished(&self) -> Vec<(Tp, i64)> {
        self.by_partition
            .iter()
            .filter_map(|(tp, o)| Some((tp.clone(), o.buffer.tracker.max_finished()?)))
            .collect()
    }

    /// Offsets to commit: what moved, and what has not been committed for [`COMMIT_REFRESH`].
    /// Only partitions whose lease stays valid for a while yet: a holder that lost its lease (or
    /// is about to) must not move the group's offsets.
    pub(crate) fn commit_list(&mut self, only: Option<&Tp>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let now = Instant::now();
        for ((topic, partition), o) in &mut self.by_partition {
            if only.is_some_and(|t| t.0 != *topic || t.1 != *partition) {
                continue;
            }
            if !o.lease.is_valid()
                || o.lease.deadline() < tokio::time::Instant::now() + COMMIT_LEASE_MARGIN
            {
                continue;
            }
            let stale = o
                .committed_at
                .is_none_or(|at| now.duration_since(at) >= COMMIT_REFRESH);
            let point = match o.buffer.tracker.commit_point() {
                Some(p) => Some(p),
                None if stale => o.buffer.tracker.last_commit(),
                None => None,
            };
            if let Some(point) = point {
                o.committed_at = Some(now);
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
            }
        }
        tpl
    }
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
    /// How often finished offsets are committed.
    pub(crate) commit_every: Duration,
    /// How long shutdown waits for work in flight before committing what is done.
    pub(crate) drain: Duration,
    /// Capacity of each partition worker's channel.
    pub(crate) channel: usize,
}

/// Consumes `consumer` until `cancel`: each record of an owned partition is decoded with
/// `decode` and handed, in partition order, to that partition's worker (started with `worker` on
/// the partition's first record of an ownership). Commits every `commit_every`; at the end stops
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
    let committer = tokio::spawn(commit_loop(
        Arc::clone(&consumer),
        Arc::clone(&trackers),
        cfg.commit_every,
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
    if let Err(e) = commit_blocking(&consumer, &trackers, None).await {
        tracing::warn!(source = %cfg.name, error = %e, "final offset commit failed; records since the last commit will be redelivered");
    }
}

async fn commit_loop(
    consumer: Arc<StreamConsumer>,
    trackers: Arc<Mutex<Trackers>>,
    every: Duration,
    cancel: CancellationToken,
    name: String,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        let (tpl, buffered) = {
            let mut t = lock(&trackers);
            (t.commit_list(None), t.buffered_bytes())
        };
        metrics::gauge!("sluice_poller_buffered_bytes", "source" => name.clone())
            .set(buffered as f64);
        if tpl.count() == 0 {
            continue;
        }
        // An async commit only queues the request: it never blocks.
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(source = %name, error = %e, "offset commit failed; will retry");
        }
    }
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
}
