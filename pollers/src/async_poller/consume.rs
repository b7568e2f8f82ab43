//! A consume loop over leased partitions that processes records concurrently (bounded) and
//! commits, per partition, the lowest unfinished offset.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};
use sluice_leasing::Lease;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::offsets::OffsetTracker;

pub(crate) type Tp = (String, i32);

/// The partitions this consumer owns (each under a Redis lease), with their offset trackers and
/// an epoch per ownership so that a record finishing after its partition moved is ignored.
#[derive(Default)]
pub(crate) struct Trackers {
    pub(crate) by_partition: HashMap<Tp, Owned>,
    epoch: u64,
}

/// One owned partition.
pub(crate) struct Owned {
    epoch: u64,
    tracker: OffsetTracker,
    /// The lease that makes this node the partition's only consumer.
    pub(crate) lease: Lease,
}

impl Trackers {
    /// Takes ownership of `tp` under `lease`.
    pub(crate) fn own(&mut self, tp: Tp, lease: Lease) {
        self.epoch += 1;
        self.by_partition.insert(
            tp,
            Owned {
                epoch: self.epoch,
                tracker: OffsetTracker::default(),
                lease,
            },
        );
    }

    /// Gives `tp` up; returns its lease.
    pub(crate) fn disown(&mut self, tp: &Tp) -> Option<Lease> {
        self.by_partition.remove(tp).map(|o| o.lease)
    }

    /// Starts tracking a record (for the stream pollers); `None` when the partition is not owned.
    pub(crate) fn start_record(&mut self, tp: &Tp, offset: i64) -> Option<u64> {
        self.start(tp, offset)
    }

    /// Starts tracking a record; `None` when the partition is not (or no longer) owned.
    fn start(&mut self, tp: &Tp, offset: i64) -> Option<u64> {
        let owned = self.by_partition.get_mut(tp)?;
        owned.tracker.start(offset);
        Some(owned.epoch)
    }

    pub(crate) fn finish(&mut self, tp: &Tp, offset: i64, epoch: u64) {
        if let Some(o) = self.by_partition.get_mut(tp) {
            if o.epoch == epoch {
                o.tracker.finish(offset);
            }
        }
    }

    /// The highest finished offset of every owned partition.
    pub(crate) fn max_finished(&self) -> Vec<(Tp, i64)> {
        self.by_partition
            .iter()
            .filter_map(|(tp, o)| Some((tp.clone(), o.tracker.max_finished()?)))
            .collect()
    }

    /// Offsets to commit; only partitions whose lease is still valid (a holder that lost its
    /// lease must not move the group's offsets).
    pub(crate) fn commit_list(&mut self, only: Option<&Tp>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), o) in &mut self.by_partition {
            if only.is_some_and(|t| t.0 != *topic || t.1 != *partition) || !o.lease.is_valid() {
                continue;
            }
            if let Some(point) = o.tracker.commit_point() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
            }
        }
        tpl
    }
}

/// Consumes `consumer` until `cancel`, running `handle` on each record of an owned partition (at
/// most `capacity` at once); a record counts as done when `handle` returns. Commits every
/// `commit_every` and at the end (after waiting up to `drain` for records in flight).
pub(crate) async fn run<H, Fut>(
    consumer: Arc<StreamConsumer>,
    trackers: Arc<Mutex<Trackers>>,
    capacity: usize,
    commit_every: Duration,
    drain: Duration,
    cancel: CancellationToken,
    handle: H,
) where
    H: Fn(&BorrowedMessage<'_>) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(capacity));
    let tasks = TaskTracker::new();
    let committer = {
        let consumer = Arc::clone(&consumer);
        let trackers = Arc::clone(&trackers);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(commit_every) => {}
                }
                if let Err(e) = commit_finished(&consumer, &trackers, CommitMode::Async) {
                    tracing::warn!(error = %e, "offset commit failed; will retry");
                }
            }
        })
    };
    loop {
        let permit = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            p = Arc::clone(&sem).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let Some(message) = next_message(&consumer, &cancel, "async").await else {
            break;
        };
        let tp: Tp = (
            rdkafka::Message::topic(&message).to_owned(),
            rdkafka::Message::partition(&message),
        );
        let offset = rdkafka::Message::offset(&message);
        let Some(epoch) = trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start(&tp, offset)
        else {
            // A partition this node just gave up: its new owner reads it.
            continue;
        };
        let work = handle(&message);
        drop(message);
        let trackers = Arc::clone(&trackers);
        tasks.spawn(async move {
            if let Some(work) = work {
                work.await;
            }
            trackers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .finish(&tp, offset, epoch);
            drop(permit);
        });
    }
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        tracing::warn!("records still in flight at shutdown; they will be redelivered");
    }
    committer.abort();
    if let Err(e) = commit_finished(&consumer, &trackers, CommitMode::Sync) {
        tracing::warn!(error = %e, "final offset commit failed; records since the last commit will be redelivered");
    }
}

/// The next message of `consumer`, or `None` once `cancel` fires. Consume errors are logged
/// (with `source` naming the loop) and retried after a pause.
pub(crate) async fn next_message<'c>(
    consumer: &'c StreamConsumer,
    cancel: &CancellationToken,
    source: &str,
) -> Option<BorrowedMessage<'c>> {
    loop {
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match message {
            Ok(m) => return Some(m),
            Err(e) => {
                tracing::warn!(source, error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Commits each owned partition's lowest unfinished offset; nothing when no partition has one.
///
/// # Errors
/// The commit's Kafka error.
pub(crate) fn commit_finished(
    consumer: &StreamConsumer,
    trackers: &Mutex<Trackers>,
    mode: CommitMode,
) -> rdkafka::error::KafkaResult<()> {
    let tpl = trackers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .commit_list(None);
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(&tpl, mode)
}
