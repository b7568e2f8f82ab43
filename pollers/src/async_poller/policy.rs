//! Lambda's async retry policy as pure decisions: event age, reserved concurrency 0,
//! function-error retries and throttle back-off. The poller does the I/O; what it decides comes
//! from here, so the policy is tested alone.

use std::time::Duration;

/// Lambda's default `MaximumEventAgeInSeconds` (6 h), used when the configured one is invalid.
const DEFAULT_MAX_EVENT_AGE_S: u64 = 21_600;
/// Lambda's default `MaximumRetryAttempts`.
const DEFAULT_RETRIES: u32 = 2;

/// What to do with an event before invoking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Invoke it.
    Run,
    /// Older than `MaximumEventAgeInSeconds`: on-failure with `EventAgeExceeded`, no invoke.
    Expired,
    /// Reserved concurrency 0: on-failure with `ZeroReservedConcurrency`, no retries.
    ZeroReserved,
}

/// Whether an event of `age` may run, given its function's `MaximumEventAgeInSeconds` and
/// reserved concurrency. Age is checked first: an expired event is `EventAgeExceeded` even for a
/// function that is turned off.
pub(crate) fn admit(age: Duration, max_age_s: i64, reserved: Option<i64>) -> Admit {
    let max_age = Duration::from_secs(u64::try_from(max_age_s).unwrap_or(DEFAULT_MAX_EVENT_AGE_S));
    if age > max_age {
        Admit::Expired
    } else if reserved == Some(0) {
        Admit::ZeroReserved
    } else {
        Admit::Run
    }
}

/// After a function error on attempt `attempts` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterError {
    /// Run again after this delay.
    Retry(Duration),
    /// Retries spent: on-failure with `RetriesExhausted`.
    Exhausted,
}

/// The retry decision after attempt `attempts` failed, with `MaximumRetryAttempts` `max_retries`
/// and the delay before each retry (`delays[0]` before the 2nd attempt, …; there are never more
/// retries than delays).
pub(crate) fn after_function_error(
    attempts: u32,
    max_retries: i64,
    delays: &[Duration],
) -> AfterError {
    let retries = u32::try_from(max_retries)
        .unwrap_or(DEFAULT_RETRIES)
        .min(u32::try_from(delays.len()).unwrap_or(u32::MAX));
    if attempts >= 1 && attempts <= retries {
        let i = usize::try_from(attempts - 1).expect("u32 fits usize");
        AfterError::Retry(delays[i])
    } else {
        AfterError::Exhausted
    }
}

/// The back-off after the `n`th throttle (n ≥ 1): from `min` doubling to `max`.
pub(crate) fn throttle_backoff(n: u32, min: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
    (min * factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAMBDA: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(120)];

    #[test]
    fn lambdas_defaults_retry_after_one_then_two_minutes_then_give_up() {
        assert_eq!(
            after_function_error(1, 2, &LAMBDA),
            AfterError::Retry(LAMBDA[0])
        );
        assert_eq!(
            after_function_error(2, 2, &LAMBDA),
            AfterError::Retry(LAMBDA[1])
        );
        assert_eq!(after_function_error(3, 2, &LAMBDA), AfterError::Exhausted);
    }

    #[test]
    fn every_retry_setting_gives_one_plus_retries_attempts() {
        for retries in 0..=2 {
            let attempts = (1..=5)
                .take_while(|&a| after_function_error(a, retries, &LAMBDA) != AfterError::Exhausted)
                .count();
            assert_eq!(
                attempts,
                usize::try_from(retries).expect("small"),
                "{retries} retries"
            );
        }
    }

    #[test]
    fn retries_never_outnumber_the_configured_delays() {
        let one = [Duration::from_secs(1)];
        assert_eq!(after_function_error(1, 2, &one), AfterError::Retry(one[0]));
        assert_eq!(after_function_error(2, 2, &one), AfterError::Exhausted);
        assert_eq!(
            after_function_error(1, -1, &LAMBDA),
            AfterError::Retry(LAMBDA[0]),
            "invalid: default"
        );
    }

    #[test]
    fn age_comes_before_reserved_concurrency() {
        let s = Duration::from_secs;
        assert_eq!(admit(s(10), 60, None), Admit::Run);
        assert_eq!(admit(s(61), 60, Some(0)), Admit::Expired);
        assert_eq!(admit(s(10), 60, Some(0)), Admit::ZeroReserved);
        assert_eq!(admit(s(10), 60, Some(5)), Admit::Run);
        assert_eq!(
            admit(s(21_601), -1, None),
            Admit::Expired,
            "invalid: the 6 h default"
        );
    }

    #[test]
    fn throttle_backoff_doubles_from_the_minimum_to_the_maximum() {
        let steps: Vec<u64> = (1..=11)
            .map(|n| {
                throttle_backoff(n, Duration::from_secs(1), Duration::from_secs(300)).as_secs()
            })
            .collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(
            throttle_backoff(u32::MAX, Duration::from_secs(1), Duration::from_secs(300)).as_secs(),
            300
        );
    }
}
