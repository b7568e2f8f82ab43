//! Offsets of one partition's records in flight, for at-least-once processing out of order.

use std::collections::BTreeSet;

/// Tracks a partition's records from fetch to completion.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The last offset handed out for commit.
    committed: Option<i64>,
    /// The highest offset finished so far.
    max_finished: Option<i64>,
}

impl OffsetTracker {
    /// Notes that the record at `offset` is being processed.
    pub fn start(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Notes that the record at `offset` is done (processed, or durably handed on).
    pub fn finish(&mut self, offset: i64) {
        if self.in_flight.remove(&offset) {
            self.max_finished = Some(self.max_finished.map_or(offset, |m| m.max(offset)));
        }
    }

    /// The highest offset finished so far (records at or below it that come again after a
    /// failover are duplicates).
    #[must_use]
    pub fn max_finished(&self) -> Option<i64> {
        self.max_finished
    }

    /// The offset to commit (Kafka's "next record to read"): the lowest unfinished record, or one
    /// past the highest seen when all are done. `None` when nothing new can be committed.
    pub fn commit_point(&mut self) -> Option<i64> {
        let point = self.in_flight.first().copied().or(self.next)?;
        // Never backwards (a record before the resume point fetched again is not a reason).
        if self.committed.is_some_and(|c| point <= c) {
            return None;
        }
        self.committed = Some(point);
        Some(point)
    }

    /// Starts an ownership at the group's committed offset `offset`: nothing before it will be
    /// processed, and [`OffsetTracker::last_commit`] has a value to refresh before any record.
    pub fn resume_at(&mut self, offset: i64) {
        self.committed = Some(offset);
    }

    /// The lowest record in flight: finishing it moves the commit point.
    #[must_use]
    pub fn lowest(&self) -> Option<i64> {
        self.in_flight.first().copied()
    }

    /// One past the highest offset started, if any.
    #[must_use]
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// The last commit point handed out (or the offset the ownership resumed at).
    #[must_use]
    pub fn last_commit(&self) -> Option<i64> {
        self.committed
    }

    /// Where processing would resume now (read-only): the lowest unfinished record, else one
    /// past the highest seen, else the offset the ownership resumed at.
    #[must_use]
    pub fn position(&self) -> Option<i64> {
        self.in_flight
            .first()
            .copied()
            .or(self.next)
            .or(self.committed)
    }

    /// Records in flight.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_never_passes_the_lowest_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.start(o);
        }
        t.finish(11);
        t.finish(12);
        assert_eq!(t.commit_point(), Some(10));
        assert_eq!(t.commit_point(), None, "nothing new");
        t.finish(10);
        assert_eq!(t.commit_point(), Some(13));
        t.finish(14);
        t.finish(13);
        assert_eq!(t.commit_point(), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn the_highest_finished_offset_is_remembered() {
        let mut t = OffsetTracker::default();
        t.start(5);
        t.start(6);
        assert_eq!(t.max_finished(), None);
        t.finish(6);
        t.finish(5);
        t.finish(99); // never started: ignored
        assert_eq!(t.max_finished(), Some(6));
    }

    #[test]
    fn an_idle_partition_keeps_the_offset_it_resumed_at() {
        let mut t = OffsetTracker::default();
        t.resume_at(42);
        assert_eq!(t.commit_point(), None, "nothing moved");
        assert_eq!(
            t.last_commit(),
            Some(42),
            "but there is a commit to refresh"
        );
        t.start(42);
        t.finish(42);
        assert_eq!(t.commit_point(), Some(43));
        assert_eq!(t.last_commit(), Some(43));
    }

    #[test]
    fn nothing_to_commit_before_any_record() {
        assert_eq!(OffsetTracker::default().commit_point(), None);
    }

    #[test]
    fn the_position_is_the_lowest_unfinished_record_or_the_next_one() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.position(), None);
        t.resume_at(7);
        assert_eq!(t.position(), Some(7), "the resume point before any record");
        t.start(7);
        t.start(8);
        t.finish(8);
        assert_eq!(t.position(), Some(7));
        t.finish(7);
        assert_eq!(t.position(), Some(9));
        assert_eq!(t.last_commit(), Some(7), "reading it commits nothing");
    }
}
