//! The per-record ledger: what happened to every record and Event invoke of a run.
//!
//! Every record the suite produces, and every Event it invokes, carries a unique `(key, seq)`
//! ([`RecordId`]). The ledger notes, per id, whether ingest acknowledged it (the produce ack with
//! its partition and offset, or the 202), how often the function reported running it
//! (`invoked`, from the node logs), how often it reached the on-success and on-failure
//! destinations, and, beside the ids, every invocation (which node, when) in the order the nodes
//! logged them, and the committed offsets sampled during the run. The checker
//! ([`super::checker`]) reads nothing else.

use std::collections::BTreeMap;

/// A record's identity: its key and its sequence number within the key (from 0, in produce
/// order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    /// The record's key (for Event invokes, a key of the suite's own).
    pub key: String,
    /// Its position among the key's records.
    pub seq: u64,
}

impl RecordId {
    /// `key`/`seq` as one id.
    #[must_use]
    pub fn new(key: &str, seq: u64) -> Self {
        Self {
            key: key.to_owned(),
            seq,
        }
    }

    /// What the suite puts in the record's value (or the event's `fault` field): `KEY SEQ`,
    /// with ` poison` appended when the function must fail on it.
    #[must_use]
    pub fn value(&self, poison: bool) -> String {
        if poison {
            format!("{} {} poison", self.key, self.seq)
        } else {
            format!("{} {}", self.key, self.seq)
        }
    }

    /// The id in a value written by [`RecordId::value`].
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let mut words = value.split_whitespace();
        let key = words.next()?;
        let seq = words.next()?.parse().ok()?;
        Some(Self::new(key, seq))
    }
}

/// How a record entered the pipeline, which decides what "completed" means for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Produced to a mapped topic: completed once the function ran it (or it is in the failure
    /// destination); per-key order applies.
    Stream,
    /// An Event invoke: completed once its on-success (or on-failure) record is written.
    Async,
}

/// What happened to one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Stream record or Event invoke.
    pub source: Source,
    /// Acknowledged at ingest; for stream records with the `(partition, offset)` it got.
    pub acked: Option<Option<(i32, i64)>>,
    /// Invocations that reported it and succeeded.
    pub invoked: u32,
    /// On-success destination records for it.
    pub on_success: u32,
    /// On-failure destination records for it.
    pub on_failure: u32,
}

/// One invocation as the function reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Which node logged it (the case's index of the node).
    pub node: usize,
    /// Start and end on the host's uptime clock, 1/100 s (0 when the end line was never logged).
    pub start_cs: u64,
    /// See `start_cs`.
    pub end_cs: u64,
    /// What it got, in batch order: `(partition, offset, id)`; partition and offset are `None`
    /// for an Event invoke.
    pub records: Vec<(Option<i32>, Option<i64>, RecordId)>,
}

/// A committed offset read during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitSample {
    /// Milliseconds since the sampler started.
    pub at_ms: u64,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset for it.
    pub offset: i64,
}

/// The ledger of one run.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Every id the suite acknowledged or saw.
    pub entries: BTreeMap<RecordId, Entry>,
    /// Every invocation, in the order they started.
    pub invocations: Vec<Invocation>,
    /// Committed offsets, in sampling order.
    pub commits: Vec<CommitSample>,
    /// Observations of ids the suite never produced (a corrupt record would show here).
    pub unknown: u64,
}

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes `id` acknowledged at ingest (`at`: its partition and offset, for stream records).
    pub fn acked(&mut self, id: RecordId, source: Source, at: Option<(i32, i64)>) {
        self.entries
            .entry(id)
            .or_insert_with(|| Entry {
                source,
                acked: None,
                invoked: 0,
                on_success: 0,
                on_failure: 0,
            })
            .acked = Some(at);
    }

    /// Notes an invocation and every id it ran.
    pub fn invoked(&mut self, invocation: Invocation) {
        for (_, _, id) in &invocation.records {
            match self.entries.get_mut(id) {
                Some(e) => e.invoked += 1,
                None => self.unknown += 1,
            }
        }
        self.invocations.push(invocation);
    }

    /// Notes an on-success destination record for `id`.
    pub fn on_success(&mut self, id: &RecordId) {
        match self.entries.get_mut(id) {
            Some(e) => e.on_success += 1,
            None => self.unknown += 1,
        }
    }

    /// Notes an on-failure destination record for `id`.
    pub fn on_failure(&mut self, id: &RecordId) {
        match self.entries.get_mut(id) {
            Some(e) => e.on_failure += 1,
            None => self.unknown += 1,
        }
    }

    /// Adds what `other` noted (a ledger kept by a task of its own).
    pub fn merge(&mut self, other: Ledger) {
        self.entries.extend(other.entries);
        self.invocations.extend(other.invocations);
        self.commits.extend(other.commits);
        self.unknown += other.unknown;
    }

    /// Adds committed-offset samples.
    pub fn commits(&mut self, samples: impl IntoIterator<Item = CommitSample>) {
        self.commits.extend(samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_names_its_id_and_poison_does_not_change_it() {
        let id = RecordId::new("k07", 12);
        assert_eq!(RecordId::parse(&id.value(false)), Some(id.clone()));
        assert_eq!(RecordId::parse(&id.value(true)), Some(id));
        assert_eq!(RecordId::parse("k07"), None);
    }

    #[test]
    fn observations_of_unproduced_ids_are_counted_apart() {
        let mut l = Ledger::new();
        l.acked(RecordId::new("k", 0), Source::Stream, Some((0, 0)));
        l.on_failure(&RecordId::new("k", 1));
        l.invoked(Invocation {
            node: 0,
            start_cs: 1,
            end_cs: 2,
            records: vec![(Some(0), Some(0), RecordId::new("k", 0))],
        });
        assert_eq!(l.unknown, 1);
        assert_eq!(l.entries[&RecordId::new("k", 0)].invoked, 1);
    }
}
