//! A consumer-group loop that processes records concurrently (bounded) and commits, per
//! partition, the lowest unfinished offset.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::offsets::OffsetTracker;

type Tp = (String, i32);

/// Offset trackers of the partitions this consumer owns, with an epoch per assignment so that a
/// record finishing after its partition was revoked (and maybe re-assigned) is ignored.
#[derive(Default)]
pub(crate) struct Trackers {
    by_partition: HashMap<Tp, (u64, OffsetTracker)>,
    epoch: u64,
}

impl Trackers {
    fn start(&mut self, tp: &Tp, offset: i64) -> u64 {
        let epoch = self.epoch;
        let entry = self
            .by_partition
            .entry(tp.clone())
            .or_insert_with(|| (epoch, OffsetTracker::default()));
        entry.1.start(offset);
        entry.0
    }

    fn finish(&mut self, tp: &Tp, offset: i64, epoch: u64) {
        if let Some((e, t)) = self.by_partition.get_mut(tp) {
            if *e == epoch {
                t.finish(offset);
            }
        }
    }

    fn commit_list(&mut self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), (_, t)) in &mut self.by_partition {
            if let Some(only) = only {
                if only.find_partition(topic, *partition).is_none() {
                    continue;
                }
            }
            if let Some(point) = t.commit_point() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(point));
            }
        }
        tpl
    }
}

/// Commits what is done of revoked partitions before they move, and forgets them.
pub(crate) struct RebalanceContext {
    pub(crate) trackers: Arc<Mutex<Trackers>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let mut t = self
                .trackers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tpl = t.commit_list(Some(revoked));
            if tpl.count() > 0 {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revoke failed; records since the last commit will be redelivered");
                }
            }
            for el in revoked.elements() {
                t.by_partition
                    .remove(&(el.topic().to_owned(), el.partition()));
            }
            t.epoch += 1;
        }
    }
}

/// Consumes `consumer` until `cancel`, running `handle` on each record (at most `capacity` at
/// once); a record counts as done when `handle` returns. Commits every `commit_every`, on revoke
/// and at the end (after waiting up to `drain` for records in flight).
pub(crate) async fn run<H, Fut>(
    consumer: Arc<StreamConsumer<RebalanceContext>>,
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
                let tpl = trackers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .commit_list(None);
                if tpl.count() > 0 {
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                        tracing::warn!(error = %e, "offset commit failed; will retry");
                    }
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
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consume failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let tp: Tp = (
            rdkafka::Message::topic(&message).to_owned(),
            rdkafka::Message::partition(&message),
        );
        let offset = rdkafka::Message::offset(&message);
        let epoch = trackers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start(&tp, offset);
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
    let tpl = trackers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .commit_list(None);
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "final offset commit failed; records since the last commit will be redelivered");
        }
    }
}
