//! Committed offsets and end offsets, read from the broker the case runs on (shared or private),
//! and a sampler that reads a group's committed offsets every few hundred milliseconds for the
//! whole run, so the checker sees stalls and commits that moved backwards.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::ledger::CommitSample;

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("create a consumer")
}

fn read_committed(c: &BaseConsumer, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(5)) else {
        return BTreeMap::new();
    };
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// `group`'s committed offsets on `topic`'s partitions `0..partitions` (those it has).
pub async fn committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let (b, g, t) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_committed(&consumer(&b, &g), &t, partitions))
        .await
        .expect("committed offsets task")
}

/// The high watermark of each of `topic`'s partitions `0..partitions`.
///
/// # Panics
/// When the broker does not answer.
pub async fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c = consumer(&b, &format!("fault-watermarks-{}", uuid::Uuid::new_v4()));
        (0..partitions)
            .map(|p| {
                let (_, high) = c
                    .fetch_watermarks(&t, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    })
    .await
    .expect("watermarks task")
}

/// Samples a group's committed offsets on its own thread until finished.
pub struct CommitSampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<CommitSample>>>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CommitSampler {
    /// Starts sampling `group` on `topic` every `every`.
    #[must_use]
    pub fn start(
        bootstrap: &str,
        group: &str,
        topic: &str,
        partitions: i32,
        every: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let (b, g, t) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
        let (stop2, samples2) = (Arc::clone(&stop), Arc::clone(&samples));
        let thread = std::thread::spawn(move || {
            let c = consumer(&b, &g);
            while !stop2.load(Ordering::Relaxed) {
                let at_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let now = read_committed(&c, &t, partitions);
                samples2
                    .lock()
                    .expect("samples lock")
                    .extend(now.into_iter().map(|(partition, offset)| CommitSample {
                        at_ms,
                        partition,
                        offset,
                    }));
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            samples,
            started,
            thread: Some(thread),
        }
    }

    /// Milliseconds since sampling started (the clock of [`CommitSample::at_ms`]).
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The latest sample of each partition so far.
    #[must_use]
    pub fn latest(&self) -> BTreeMap<i32, i64> {
        self.samples
            .lock()
            .expect("samples lock")
            .iter()
            .map(|s| (s.partition, s.offset))
            .collect()
    }

    /// Stops sampling; every sample, in order.
    #[must_use]
    pub fn finish(mut self) -> Vec<CommitSample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().expect("samples lock"))
    }
}

impl Drop for CommitSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
