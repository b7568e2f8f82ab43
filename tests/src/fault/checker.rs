//! The checker: from a [`Ledger`], the figures of one run, after Jepsen's queue checker.
//!
//! - **lost**: acknowledged, never run to completion (stream: a successful invocation reported
//!   it; Event: its on-success record) and never in a failure destination.
//! - **duplicates**: successful invocations beyond the first of an id (and, apart, destination
//!   records beyond the first), against the bound the case states.
//! - **inversions**: per key, in the order the invocations started, the first delivery of a record after a later record of the same key
//!   was already delivered (a redelivery of something delivered before is a duplicate, not an
//!   inversion: replays after a crash start again from the committed offset, in order).
//! - **stalled**: partitions whose committed offset stayed below their end, without moving, for
//!   longer than the case's stall bound, or that never reached their end.
//! - **backwards**: consecutive samples of one partition's committed offset that decreased.
//! - **peak concurrency**: the most invocations running at once (from the function's own start
//!   and end times), overall and on any one partition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use super::ledger::{Invocation, Ledger, RecordId, Source};

/// What a case allows and where its partitions must end.
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    /// Duplicates the case allows (successful invocations beyond the first).
    pub duplicates: u64,
    /// Longest a partition behind its end may go without its committed offset moving.
    pub stall: Duration,
    /// Each mapped partition's end offset (the high watermark once producing is done); empty
    /// when the case has no stream.
    pub end_offsets: BTreeMap<i32, i64>,
    /// Most invocations one partition may have running at once (1 without
    /// ParallelizationFactor: no two pollers on one partition); 0 leaves it unchecked.
    pub partition_concurrency: usize,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The case's name (`T01`…).
    pub case: String,
    /// Acknowledged ids.
    pub acked: usize,
    /// Acknowledged, never completed, never in a failure destination.
    pub lost: Vec<RecordId>,
    /// Successful invocations beyond the first of an id.
    pub duplicates: u64,
    /// What the case allows.
    pub duplicate_bound: u64,
    /// Destination records beyond the first of an id.
    pub destination_duplicates: u64,
    /// Ids that reached the failure destination.
    pub failed: usize,
    /// Per-key order inversions.
    pub inversions: u64,
    /// Partitions stalled past the bound, or not drained, with the longest stall seen (ms).
    pub stalled: Vec<(i32, u64)>,
    /// `(partition, from, to)` for every committed offset that moved backwards.
    pub backwards: Vec<(i32, i64, i64)>,
    /// Most invocations at once, overall.
    pub peak_concurrency: usize,
    /// Most invocations at once on one partition.
    pub peak_per_partition: usize,
    /// What the case allows on one partition (0: unchecked).
    pub partition_concurrency: usize,
    /// Observations of ids never produced.
    pub unknown: u64,
}

/// Checks a run.
#[must_use]
pub fn check(case: &str, ledger: &Ledger, bounds: &Bounds) -> Report {
    let mut r = Report {
        case: case.to_owned(),
        duplicate_bound: bounds.duplicates,
        partition_concurrency: bounds.partition_concurrency,
        unknown: ledger.unknown,
        ..Report::default()
    };
    for (id, e) in &ledger.entries {
        if e.acked.is_some() {
            r.acked += 1;
            let completed = match e.source {
                Source::Stream => e.invoked > 0,
                Source::Async => e.on_success > 0,
            };
            if !completed && e.on_failure == 0 {
                r.lost.push(id.clone());
            }
        }
        if e.on_failure > 0 {
            r.failed += 1;
        }
        r.duplicates += u64::from(e.invoked.saturating_sub(1));
        r.destination_duplicates += u64::from((e.on_success + e.on_failure).saturating_sub(1));
    }
    r.inversions = inversions(ledger);
    r.stalled = stalls(ledger, bounds);
    r.backwards = backwards(ledger);
    r.peak_concurrency = peak(ledger.invocations.iter());
    let mut by_partition: HashMap<i32, Vec<&Invocation>> = HashMap::new();
    for inv in &ledger.invocations {
        let parts: BTreeSet<i32> = inv.records.iter().filter_map(|(p, _, _)| *p).collect();
        for p in parts {
            by_partition.entry(p).or_default().push(inv);
        }
    }
    r.peak_per_partition = by_partition
        .values()
        .map(|v| peak(v.iter().copied()))
        .max()
        .unwrap_or(0);
    r
}

fn inversions(ledger: &Ledger) -> u64 {
    let mut delivered: HashMap<&str, (BTreeSet<u64>, Option<u64>)> = HashMap::new();
    let mut n = 0;
    // An invocation without an end line has no place in time (its node died); its records are
    // redelivered anyway.
    for inv in ledger.invocations.iter().filter(|i| i.end_cs > 0) {
        for (_, _, id) in &inv.records {
            if ledger.entries.get(id).map(|e| e.source) != Some(Source::Stream) {
                continue;
            }
            let (seen, max) = delivered.entry(&id.key).or_default();
            if seen.insert(id.seq) {
                if max.is_some_and(|m| id.seq < m) {
                    n += 1;
                }
                *max = Some(max.map_or(id.seq, |m| m.max(id.seq)));
            }
        }
    }
    n
}

fn stalls(ledger: &Ledger, bounds: &Bounds) -> Vec<(i32, u64)> {
    let bound_ms = u64::try_from(bounds.stall.as_millis()).unwrap_or(u64::MAX);
    let mut out = Vec::new();
    for (&partition, &end) in &bounds.end_offsets {
        let mut last: Option<(i64, u64)> = None;
        let mut longest = 0;
        for s in ledger.commits.iter().filter(|s| s.partition == partition) {
            match last {
                Some((offset, since)) if offset == s.offset => {
                    if offset < end {
                        longest = longest.max(s.at_ms - since);
                    }
                }
                _ => last = Some((s.offset, s.at_ms)),
            }
        }
        let drained = last.is_some_and(|(offset, _)| offset >= end) || end == 0;
        if !drained || longest > bound_ms {
            out.push((partition, longest));
        }
    }
    out
}

fn backwards(ledger: &Ledger) -> Vec<(i32, i64, i64)> {
    let mut last: HashMap<i32, i64> = HashMap::new();
    let mut out = Vec::new();
    for s in &ledger.commits {
        if let Some(prev) = last.insert(s.partition, s.offset) {
            if s.offset < prev {
                out.push((s.partition, prev, s.offset));
            }
        }
    }
    out
}

/// The most intervals open at once (an end at the same tick as a start does not overlap it).
fn peak<'a>(invocations: impl Iterator<Item = &'a Invocation>) -> usize {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for inv in invocations.filter(|i| i.end_cs > 0) {
        edges.push((inv.start_cs, 1));
        edges.push((inv.end_cs.max(inv.start_cs), -1));
    }
    // Ends sort before starts at the same tick.
    edges.sort_unstable();
    let (mut open, mut most) = (0_i32, 0_i32);
    for (_, d) in edges {
        open += d;
        most = most.max(open);
    }
    usize::try_from(most).unwrap_or(0)
}

impl Report {
    /// The header of [`Report::row`].
    pub const HEADER: &'static str =
        "| case | acked | lost | duplicates / bound | dest dups | failed | inversions | stalled | backwards | peak conc. (per partition) |";

    /// One Markdown table row of the figures, for the note.
    #[must_use]
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} ({}) |",
            self.case,
            self.acked,
            self.lost.len(),
            self.duplicates,
            self.duplicate_bound,
            self.destination_duplicates,
            self.failed,
            self.inversions,
            self.stalled.len(),
            self.backwards.len(),
            self.peak_concurrency,
            self.peak_per_partition,
        )
    }

    /// What broke the case's guarantees (lost, duplicates over the bound, inversions, stalls,
    /// backwards commits, unknown ids), or `None` when they all held.
    #[must_use]
    pub fn violations(&self) -> Option<String> {
        let mut v = String::new();
        if !self.lost.is_empty() {
            let _ = write!(
                v,
                "{} lost (first: {:?}); ",
                self.lost.len(),
                &self.lost[..self.lost.len().min(5)]
            );
        }
        if self.duplicates > self.duplicate_bound {
            let _ = write!(
                v,
                "{} duplicates over the bound of {}; ",
                self.duplicates, self.duplicate_bound
            );
        }
        if self.inversions > 0 {
            let _ = write!(v, "{} per-key inversions; ", self.inversions);
        }
        if !self.stalled.is_empty() {
            let _ = write!(
                v,
                "stalled partitions (partition, longest ms): {:?}; ",
                self.stalled
            );
        }
        if !self.backwards.is_empty() {
            let _ = write!(
                v,
                "committed offsets moved backwards (partition, from, to): {:?}; ",
                self.backwards
            );
        }
        if self.partition_concurrency > 0 && self.peak_per_partition > self.partition_concurrency {
            let _ = write!(
                v,
                "{} invocations ran at once on one partition (allowed: {}); ",
                self.peak_per_partition, self.partition_concurrency
            );
        }
        if self.unknown > 0 {
            let _ = write!(v, "{} observations of ids never produced; ", self.unknown);
        }
        (!v.is_empty()).then_some(v)
    }

    /// Prints the row and panics with the violations, if any.
    ///
    /// # Panics
    /// When a guarantee did not hold.
    pub fn assert_holds(&self) {
        eprintln!("{}\n{}", Self::HEADER, self.row());
        if let Some(v) = self.violations() {
            panic!("{}: {v}", self.case);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::ledger::CommitSample;

    fn id(k: &str, s: u64) -> RecordId {
        RecordId::new(k, s)
    }

    fn inv(node: usize, start: u64, end: u64, recs: &[(i32, i64, RecordId)]) -> Invocation {
        Invocation {
            node,
            start_cs: start,
            end_cs: end,
            records: recs
                .iter()
                .map(|(p, o, id)| (Some(*p), Some(*o), id.clone()))
                .collect(),
        }
    }

    /// Key `k`, records 0..4 on partition 0 at offsets 0..4, acknowledged.
    fn ledger() -> Ledger {
        let mut l = Ledger::new();
        for s in 0..4 {
            l.acked(
                id("k", s),
                Source::Stream,
                Some((0, i64::try_from(s).expect("small"))),
            );
        }
        l
    }

    fn bounds() -> Bounds {
        Bounds {
            duplicates: 0,
            stall: Duration::from_secs(5),
            end_offsets: [(0, 4)].into(),
            partition_concurrency: 1,
        }
    }

    fn drained(l: &mut Ledger) {
        l.commits([CommitSample {
            at_ms: 0,
            partition: 0,
            offset: 4,
        }]);
    }

    #[test]
    fn a_clean_run_holds() {
        let mut l = ledger();
        l.invoked(inv(0, 0, 5, &[(0, 0, id("k", 0)), (0, 1, id("k", 1))]));
        l.invoked(inv(0, 5, 9, &[(0, 2, id("k", 2)), (0, 3, id("k", 3))]));
        drained(&mut l);
        let r = check("clean", &l, &bounds());
        assert_eq!(r.violations(), None, "{r:?}");
        assert_eq!(
            (r.acked, r.peak_concurrency, r.peak_per_partition),
            (4, 1, 1)
        );
    }

    #[test]
    fn a_dropped_ledger_entry_is_lost_unless_it_failed() {
        let mut l = ledger();
        l.invoked(inv(0, 0, 5, &[(0, 0, id("k", 0)), (0, 1, id("k", 1))]));
        l.on_failure(&id("k", 3));
        drained(&mut l);
        let r = check("lost", &l, &bounds());
        assert_eq!(r.lost, vec![id("k", 2)]);
        assert_eq!(r.failed, 1);
        assert!(r.violations().is_some_and(|v| v.contains("1 lost")));
    }

    #[test]
    fn an_event_is_complete_only_with_its_on_success_record() {
        let mut l = Ledger::new();
        l.acked(id("a", 0), Source::Async, None);
        l.acked(id("a", 1), Source::Async, None);
        l.invoked(Invocation {
            node: 0,
            start_cs: 0,
            end_cs: 1,
            records: vec![(None, None, id("a", 0)), (None, None, id("a", 1))],
        });
        l.on_success(&id("a", 0));
        let r = check("async", &l, &Bounds::default());
        assert_eq!(r.lost, vec![id("a", 1)]);
    }

    #[test]
    fn duplicates_are_counted_against_the_bound() {
        let mut l = ledger();
        let all: Vec<_> = (0..4)
            .map(|s| (0, i64::try_from(s).expect("small"), id("k", s)))
            .collect();
        l.invoked(inv(0, 0, 5, &all));
        // A crash replays 2 and 3 from the committed offset: duplicates, not inversions.
        l.invoked(inv(1, 10, 15, &all[2..]));
        drained(&mut l);
        let r = check("dups", &l, &bounds());
        assert_eq!((r.duplicates, r.inversions), (2, 0));
        assert!(r.violations().is_some_and(|v| v.contains("over the bound")));
        let r = check(
            "dups",
            &l,
            &Bounds {
                duplicates: 2,
                ..bounds()
            },
        );
        assert_eq!(r.violations(), None);
    }

    #[test]
    fn a_record_first_delivered_after_a_later_one_of_its_key_is_an_inversion() {
        let mut l = ledger();
        l.invoked(inv(0, 0, 5, &[(0, 0, id("k", 0)), (0, 2, id("k", 2))]));
        l.invoked(inv(0, 5, 9, &[(0, 1, id("k", 1)), (0, 3, id("k", 3))]));
        drained(&mut l);
        let r = check("inv", &l, &bounds());
        assert_eq!(r.inversions, 1);
        assert!(r.violations().is_some_and(|v| v.contains("inversions")));
    }

    #[test]
    fn a_commit_that_moves_backwards_is_reported() {
        let mut l = ledger();
        l.invoked(inv(0, 0, 5, &[(0, 0, id("k", 0)), (0, 1, id("k", 1))]));
        l.invoked(inv(0, 5, 9, &[(0, 2, id("k", 2)), (0, 3, id("k", 3))]));
        for (at_ms, offset) in [(0, 2), (100, 3), (200, 1), (300, 4)] {
            l.commits([CommitSample {
                at_ms,
                partition: 0,
                offset,
            }]);
        }
        let r = check("back", &l, &bounds());
        assert_eq!(r.backwards, vec![(0, 3, 1)]);
    }

    #[test]
    fn a_partition_behind_its_end_without_progress_is_stalled() {
        let mut l = ledger();
        for s in 0..4 {
            l.invoked(inv(
                0,
                s,
                s + 1,
                &[(0, i64::try_from(s).expect("small"), id("k", s))],
            ));
        }
        for (at_ms, offset) in [(0, 1), (3_000, 1), (7_000, 1), (7_500, 4)] {
            l.commits([CommitSample {
                at_ms,
                partition: 0,
                offset,
            }]);
        }
        let r = check("stall", &l, &bounds());
        assert_eq!(r.stalled, vec![(0, 7_000)]);
        // Never reaching the end is a stall however short the waits.
        let mut l = ledger();
        l.commits([CommitSample {
            at_ms: 0,
            partition: 0,
            offset: 3,
        }]);
        assert_eq!(check("stuck", &l, &bounds()).stalled, vec![(0, 0)]);
    }

    #[test]
    fn overlapping_invocations_of_one_partition_are_its_peak() {
        let mut l = ledger();
        l.invoked(inv(0, 0, 10, &[(0, 0, id("k", 0))]));
        l.invoked(inv(1, 5, 12, &[(0, 1, id("k", 1))]));
        // Back to back is not overlap.
        l.invoked(inv(1, 12, 14, &[(0, 2, id("k", 2))]));
        l.invoked(inv(0, 6, 8, &[(1, 0, id("k", 3))]));
        let r = check("peak", &l, &bounds());
        assert_eq!((r.peak_concurrency, r.peak_per_partition), (3, 2));
        let one = Bounds {
            partition_concurrency: 1,
            ..bounds()
        };
        assert!(check("peak", &l, &one)
            .violations()
            .is_some_and(|v| v.contains("2 invocations ran at once")));
    }
}
