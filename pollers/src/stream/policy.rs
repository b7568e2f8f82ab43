//! The retry policy of a stream batch as a pure state machine: what a lane does after each
//! invocation (retry, bisect, give up to the on-failure destination), and which records are too
//! old or too big to invoke at all. The lane (`lane`) does the I/O; everything it decides comes
//! from here, so the policy is tested alone.

use std::borrow::Borrow;
use std::time::Duration;

use super::event::{Rec, MAX_BATCH_BYTES};

/// First wait before a failed batch is invoked again; it doubles up to [`RETRY_BACKOFF_MAX`].
pub(crate) const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between invocations of a failing batch.
pub(crate) const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First wait after a throttle (or no capacity); doubles up to [`THROTTLE_BACKOFF_MAX`].
const THROTTLE_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait after a throttle.
const THROTTLE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How an invocation of the pending records went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every record succeeded.
    Ok,
    /// A partial-batch response (or an invalid one, which fails the whole batch): the records
    /// still pending failed. Never bisected.
    Partial,
    /// A function error for the whole batch.
    FunctionError,
    /// Not invoked: throttled or no capacity. Not a retry.
    NotInvoked,
}

/// What the lane does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The pending records are done.
    Done,
    /// Invoke the pending records again after waiting.
    Invoke {
        /// The back-off.
        after: Duration,
    },
    /// Split the pending records in two halves, each delivered on its own; bisecting uses no
    /// retries (Lambda).
    Bisect,
    /// Write the pending records to the on-failure destination, then they are done.
    Fail {
        /// The destination record's condition.
        condition: &'static str,
    },
}

/// The retry state of one batch (or one half of a bisected batch).
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    /// `None`: retry until the records expire.
    max_retries: Option<i64>,
    bisect: bool,
    /// Retries used so far (inherited by the halves of a bisected batch).
    pub(crate) retries: i64,
    /// Invocations made (for the failure record).
    pub(crate) invokes: u32,
    retry_backoff: Duration,
    throttle_backoff: Duration,
}

impl RetryPolicy {
    /// A batch's policy: `max_retries` (`None` = until expiry), bisection on function error,
    /// and the retries already used (by the batch a half came from).
    pub(crate) fn new(max_retries: Option<i64>, bisect: bool, retries: i64) -> Self {
        Self {
            max_retries,
            bisect,
            retries,
            invokes: 0,
            retry_backoff: RETRY_BACKOFF_MIN,
            throttle_backoff: THROTTLE_BACKOFF_MIN,
        }
    }

    /// The policy of one half of a bisected batch.
    pub(crate) fn half(&self) -> Self {
        Self::new(self.max_retries, self.bisect, self.retries)
    }

    /// The next step after `outcome` with `pending` records still pending.
    pub(crate) fn after(&mut self, outcome: Outcome, pending: usize) -> Step {
        if outcome != Outcome::NotInvoked {
            self.invokes += 1;
            self.throttle_backoff = THROTTLE_BACKOFF_MIN;
        }
        match outcome {
            Outcome::Ok => Step::Done,
            Outcome::NotInvoked => {
                let after = self.throttle_backoff;
                self.throttle_backoff = (after * 2).min(THROTTLE_BACKOFF_MAX);
                Step::Invoke { after }
            }
            Outcome::FunctionError if self.bisect && pending > 1 => Step::Bisect,
            Outcome::FunctionError | Outcome::Partial => {
                self.retries += 1;
                if self.max_retries.is_some_and(|m| self.retries > m) {
                    return Step::Fail {
                        condition: "RetryAttemptsExhausted",
                    };
                }
                let after = self.retry_backoff;
                self.retry_backoff = (after * 2).min(RETRY_BACKOFF_MAX);
                Step::Invoke { after }
            }
        }
    }
}

/// Splits `recs` into those older than `max_age_ms` at `now_ms` (`max_age_ms < 0`: never) and
/// the rest, keeping order.
pub(crate) fn split_expired<R: Borrow<Rec>>(
    recs: Vec<R>,
    now_ms: i64,
    max_age_ms: i64,
) -> (Vec<R>, Vec<R>) {
    if max_age_ms < 0 {
        return (Vec::new(), recs);
    }
    recs.into_iter()
        .partition(|r| now_ms - r.borrow().timestamp_ms > max_age_ms)
}

/// Whether `recs` is a single record too big for any batch (`MaximumPayloadSizeExceeded`).
pub(crate) fn too_big<R: Borrow<Rec>>(recs: &[R]) -> bool {
    recs.len() == 1 && recs[0].borrow().encoded_size() > MAX_BATCH_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, ts: i64, bytes: usize) -> Rec {
        Rec {
            topic: "t".into(),
            partition: 0,
            offset,
            key: None,
            value: Some(vec![0; bytes]),
            timestamp_ms: ts,
            timestamp_type: "CREATE_TIME",
            headers: Vec::new(),
            epoch: 1,
        }
    }

    #[test]
    fn a_failing_batch_backs_off_doubling_to_five_seconds() {
        let mut p = RetryPolicy::new(None, false, 0);
        let waits: Vec<Duration> = (0..8)
            .map(|_| match p.after(Outcome::FunctionError, 10) {
                Step::Invoke { after } => after,
                other => panic!("retry expected, got {other:?}"),
            })
            .collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(*waits.last().expect("some"), Duration::from_secs(5));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(p.invokes, 8);
    }

    #[test]
    fn retries_are_counted_until_exhausted() {
        let mut p = RetryPolicy::new(Some(2), false, 0);
        assert!(matches!(
            p.after(Outcome::FunctionError, 3),
            Step::Invoke { .. }
        ));
        assert!(matches!(p.after(Outcome::Partial, 2), Step::Invoke { .. }));
        assert_eq!(
            p.after(Outcome::FunctionError, 2),
            Step::Fail {
                condition: "RetryAttemptsExhausted"
            }
        );
        assert_eq!(p.invokes, 3, "the first attempt and two retries");
    }

    #[test]
    fn zero_retries_fail_after_the_first_attempt() {
        let mut p = RetryPolicy::new(Some(0), false, 0);
        assert!(matches!(
            p.after(Outcome::FunctionError, 1),
            Step::Fail { .. }
        ));
    }

    #[test]
    fn bisection_uses_no_retries_and_stops_at_one_record() {
        let mut p = RetryPolicy::new(Some(1), true, 0);
        assert_eq!(p.after(Outcome::FunctionError, 4), Step::Bisect);
        assert_eq!(p.retries, 0);
        let mut half = p.half();
        assert_eq!(half.after(Outcome::FunctionError, 2), Step::Bisect);
        let mut single = half.half();
        assert!(matches!(
            single.after(Outcome::FunctionError, 1),
            Step::Invoke { .. }
        ));
        assert!(matches!(
            single.after(Outcome::FunctionError, 1),
            Step::Fail { .. }
        ));
    }

    #[test]
    fn a_partial_batch_is_retried_not_bisected() {
        let mut p = RetryPolicy::new(None, true, 0);
        assert!(matches!(p.after(Outcome::Partial, 5), Step::Invoke { .. }));
        assert_eq!(p.retries, 1);
    }

    #[test]
    fn throttles_are_not_retries_and_back_off_on_their_own() {
        let mut p = RetryPolicy::new(Some(0), false, 0);
        for want in [100, 200, 400, 800, 1600, 3200, 5000, 5000] {
            assert_eq!(
                p.after(Outcome::NotInvoked, 1),
                Step::Invoke {
                    after: Duration::from_millis(want)
                }
            );
        }
        assert_eq!(p.retries, 0);
        assert_eq!(p.invokes, 0);
        assert_eq!(p.after(Outcome::Ok, 1), Step::Done);
        assert_eq!(p.invokes, 1);
    }

    #[test]
    fn records_older_than_the_maximum_age_expire_in_order() {
        let recs = vec![rec(1, 0, 1), rec(2, 500, 1), rec(3, 1000, 1)];
        let (old, young) = split_expired(recs.clone(), 1600, 1000);
        assert_eq!(old.iter().map(|r| r.offset).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(young.iter().map(|r| r.offset).collect::<Vec<_>>(), [3]);
        let (old, young) = split_expired(recs, 1_000_000, -1);
        assert!(old.is_empty(), "-1: records never expire");
        assert_eq!(young.len(), 3);
    }

    #[test]
    fn only_a_lone_record_over_the_batch_cap_is_too_big() {
        assert!(too_big(&[rec(1, 0, MAX_BATCH_BYTES)]));
        assert!(!too_big(&[rec(1, 0, 10)]));
        assert!(!too_big(&[rec(1, 0, MAX_BATCH_BYTES), rec(2, 0, 1)]));
    }
}
