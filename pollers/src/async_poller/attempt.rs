//! One attempt at an async event: Lambda's policy (`policy`) around one invoke, as a
//! [`Decision`] for the poller to carry out. The only I/O here is the invoke, through the
//! [`Invoker`] interface; destinations, re-queues and metrics stay with the poller. The tests
//! drive an event through its whole life (re-queue, wait, attempt again) under paused time with
//! a scripted invoker.

use std::time::Duration;

use sluice_core::events::AsyncEvent;
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoker};
use sluice_core::model::EventInvokeConfig;
use sluice_destinations::Condition;

use super::policy::{self, Admit, AfterError};
use super::AsyncPollerConfig;

/// Why an event is re-queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequeueCause {
    /// A function error with retries left.
    Retry,
    /// Throttled (a concurrency limit): not an attempt.
    Throttled,
    /// No capacity or a service error: not an attempt.
    NotInvoked,
}

/// What to do with an event after one attempt.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The function succeeded: the on-success record, with its response.
    Success {
        /// The event, its attempts counted.
        event: AsyncEvent,
        /// The function's response.
        response: Vec<u8>,
    },
    /// Run it again after `delay`.
    Requeue {
        /// The wait (a retry delay, or the throttling back-off).
        delay: Duration,
        /// The event, its attempts and throttles counted.
        event: AsyncEvent,
        /// Why.
        cause: RequeueCause,
    },
    /// Give up: the on-failure record.
    Failure {
        /// The event, its attempts counted.
        event: AsyncEvent,
        /// `RetriesExhausted`, `EventAgeExceeded` or `ZeroReservedConcurrency`.
        condition: Condition,
        /// The last function error's body, when the function ran.
        error: Option<Vec<u8>>,
    },
    /// Dropped without a record.
    Drop {
        /// The `reason` label of `sluice_async_events_dropped_total`.
        reason: &'static str,
    },
    /// The partition moved to another node before the event ran: nothing done here.
    Abandoned,
}

/// An attempt's setting: the poller's delays and the function's configuration.
pub(crate) struct Attempt<'a> {
    /// Runs the function.
    pub(crate) invoker: &'a dyn Invoker,
    /// Retry delays and throttling back-off.
    pub(crate) cfg: &'a AsyncPollerConfig,
    /// The function's `MaximumRetryAttempts` and `MaximumEventAgeInSeconds`.
    pub(crate) invoke_config: &'a EventInvokeConfig,
    /// The function's reserved concurrency.
    pub(crate) reserved: Option<i64>,
}

impl Attempt<'_> {
    /// Attempts `event` at `now_ms`: too old or turned off, it fails without an invoke; else,
    /// when `owned()` (checked right before the invoke) says the partition is still this node's,
    /// it is invoked and the result decided.
    pub(crate) async fn run(
        &self,
        mut event: AsyncEvent,
        now_ms: i64,
        owned: impl FnOnce() -> bool,
    ) -> Decision {
        let age = event.age(now_ms);
        match policy::admit(
            age,
            self.invoke_config.maximum_event_age_in_seconds,
            self.reserved,
        ) {
            Admit::Run => {}
            Admit::Expired => {
                tracing::info!(function = %event.function, request_id = %event.request_id, ?age, "event too old");
                return Decision::Failure {
                    event,
                    condition: Condition::EventAgeExceeded,
                    error: None,
                };
            }
            Admit::ZeroReserved => {
                return Decision::Failure {
                    event,
                    condition: Condition::ZeroReservedConcurrency,
                    error: None,
                };
            }
        }
        if !owned() {
            return Decision::Abandoned;
        }
        let request = InvokeRequest {
            function: event.function.clone(),
            request_id: event.request_id.clone(),
            payload: event.payload.clone(),
            trace_id: event.trace_id.clone(),
        };
        match self.invoker.invoke(request).await {
            Ok(done) => {
                event.attempts += 1;
                match done.result {
                    FunctionResult::Ok(response) => Decision::Success { event, response },
                    FunctionResult::Err {
                        error_type,
                        payload,
                    } => {
                        tracing::info!(function = %event.function, request_id = %event.request_id, attempt = event.attempts, %error_type, "function error");
                        after_function_error(self.cfg, self.invoke_config, event, payload)
                    }
                }
            }
            Err(InvokeError::NotFound(_)) => Decision::Drop {
                reason: "FunctionDeleted",
            },
            Err(e) if !e.is_retryable() => {
                // The function's configuration cannot run here (InvokeError::Config): the user's
                // doing, so Lambda counts it as a function error (an attempt), never a throttle.
                event.attempts += 1;
                tracing::info!(function = %event.function, request_id = %event.request_id, attempt = event.attempts, error = %e, "function cannot run; counted as a function error");
                let payload = e.function_error_body();
                after_function_error(self.cfg, self.invoke_config, event, payload)
            }
            Err(e) => {
                // Throttled, no capacity or a service error: not an attempt; back off.
                event.throttles += 1;
                let delay = self.cfg.throttle_backoff(event.throttles);
                tracing::debug!(function = %event.function, request_id = %event.request_id, error = %e, ?delay, "could not invoke; backing off");
                let cause = if matches!(e, InvokeError::Throttled { .. }) {
                    RequeueCause::Throttled
                } else {
                    RequeueCause::NotInvoked
                };
                Decision::Requeue {
                    delay,
                    event,
                    cause,
                }
            }
        }
    }
}

/// After attempt `event.attempts` failed with `error`: re-queue after the next retry delay, or
/// give up (`RetriesExhausted`) once the retries are spent.
pub(crate) fn after_function_error(
    cfg: &AsyncPollerConfig,
    invoke_config: &EventInvokeConfig,
    event: AsyncEvent,
    error: Vec<u8>,
) -> Decision {
    match policy::after_function_error(
        event.attempts,
        invoke_config.maximum_retry_attempts,
        &cfg.retry_delays,
    ) {
        AfterError::Retry(delay) => Decision::Requeue {
            delay,
            event,
            cause: RequeueCause::Retry,
        },
        AfterError::Exhausted => Decision::Failure {
            event,
            condition: Condition::RetriesExhausted,
            error: Some(error),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    use serde_json::{json, Value};
    use sluice_core::invoke::Invoked;

    use super::*;

    /// Unix ms when each test starts; the clock follows tokio's paused time from here.
    const T0_MS: i64 = 1_750_000_000_000;
    /// The events' X-Ray trace header.
    const TRACE: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1";

    enum Reply {
        Ok,
        FunctionError,
        Err(InvokeError),
    }

    /// An invoker that answers call `n` with `script(n)` and records when each call came (ms
    /// since the test started) and for which request.
    struct FakeInvoker {
        start: tokio::time::Instant,
        script: Box<dyn Fn(usize) -> Reply + Send + Sync>,
        /// (ms since the start, request id, trace id) of each call.
        calls: Mutex<Vec<(u128, String, String)>>,
    }

    impl FakeInvoker {
        fn new(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
            Self {
                start: tokio::time::Instant::now(),
                script: Box::new(script),
                calls: Mutex::default(),
            }
        }

        fn now_ms(&self) -> i64 {
            T0_MS + i64::try_from(self.start.elapsed().as_millis()).expect("a short test")
        }

        /// When each invoke came, in seconds since the start.
        fn call_secs(&self) -> Vec<u64> {
            let calls = self.calls.lock().expect("calls");
            assert!(
                calls
                    .iter()
                    .all(|(_, id, trace)| id == "req-1" && trace == TRACE),
                "every attempt carries the event's request and trace ids: {calls:?}"
            );
            calls
                .iter()
                .map(|(ms, _, _)| u64::try_from(ms / 1000).expect("small"))
                .collect()
        }
    }

    impl Invoker for FakeInvoker {
        // `#[async_trait]`'s expansion written out: this crate does not depend on the macro.
        fn invoke<'life0, 'async_trait>(
            &'life0 self,
            request: InvokeRequest,
        ) -> Pin<Box<dyn Future<Output = Result<Invoked, InvokeError>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let n = {
                let mut calls = self.calls.lock().expect("calls");
                calls.push((
                    self.start.elapsed().as_millis(),
                    request.request_id,
                    request.trace_id,
                ));
                calls.len() - 1
            };
            let result = match (self.script)(n) {
                Reply::Ok => Ok(FunctionResult::Ok(br#"{"ok":true}"#.to_vec())),
                Reply::FunctionError => Ok(FunctionResult::Err {
                    error_type: "Boom".into(),
                    payload: br#"{"errorType":"Boom","errorMessage":"boom"}"#.to_vec(),
                }),
                Reply::Err(e) => Err(e),
            };
            Box::pin(async move {
                result.map(|result| Invoked {
                    result,
                    duration: Duration::from_millis(1),
                    cold_start: false,
                    init_duration: None,
                    log: Vec::new(),
                })
            })
        }
    }

    /// Runs an event enqueued at the start through its life as the poller does: each re-queue
    /// waits its delay, then the event is attempted again at the paused clock's time. Returns the
    /// final decision and the causes of the re-queues.
    async fn life(
        invoker: &FakeInvoker,
        invoke_config: EventInvokeConfig,
        reserved: Option<i64>,
    ) -> (Decision, Vec<RequeueCause>) {
        let cfg = AsyncPollerConfig::new("sluice.", "arn:");
        let attempt = Attempt {
            invoker,
            cfg: &cfg,
            invoke_config: &invoke_config,
            reserved,
        };
        let mut event = AsyncEvent::new("f", "req-1", br#"{"n":1}"#.to_vec()).with_trace_id(TRACE);
        event.enqueued_ms = T0_MS;
        let mut causes = Vec::new();
        let lifetime = async {
            loop {
                match attempt.run(event, invoker.now_ms(), || true).await {
                    Decision::Requeue {
                        delay,
                        event: next,
                        cause,
                    } => {
                        causes.push(cause);
                        tokio::time::sleep(delay).await;
                        event = next;
                    }
                    last => return last,
                }
            }
        };
        let last = tokio::time::timeout(Duration::from_secs(86_400), lifetime)
            .await
            .expect("the event's life ends within a day");
        (last, causes)
    }

    fn config(max_retries: i64, max_age_s: i64) -> EventInvokeConfig {
        EventInvokeConfig {
            maximum_retry_attempts: max_retries,
            maximum_event_age_in_seconds: max_age_s,
            ..EventInvokeConfig::default()
        }
    }

    fn error_type(error: Option<&[u8]>) -> Value {
        error.map_or(Value::Null, |e| {
            serde_json::from_slice::<Value>(e).expect("a JSON body")["errorType"].clone()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn lambdas_defaults_invoke_a_failing_function_at_0_60_and_180_s_then_give_up() {
        let invoker = FakeInvoker::new(|_| Reply::FunctionError);
        let (last, causes) = life(&invoker, EventInvokeConfig::default(), None).await;
        assert_eq!(invoker.call_secs(), [0, 60, 180]);
        assert_eq!(causes, [RequeueCause::Retry, RequeueCause::Retry]);
        let Decision::Failure {
            event,
            condition,
            error,
        } = last
        else {
            panic!("a failure expected, got {last:?}");
        };
        assert_eq!(condition, Condition::RetriesExhausted);
        assert_eq!(event.attempts, 3);
        assert_eq!(error_type(error.as_deref()), json!("Boom"));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_retries_invoke_once() {
        let invoker = FakeInvoker::new(|_| Reply::FunctionError);
        let (last, _) = life(&invoker, config(0, 21_600), None).await;
        assert_eq!(invoker.call_secs(), [0]);
        assert!(
            matches!(&last, Decision::Failure { event, condition: Condition::RetriesExhausted, .. } if event.attempts == 1),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_back_off_1_2_4_s_and_are_not_attempts() {
        let invoker = FakeInvoker::new(|n| {
            if n < 3 {
                Reply::Err(InvokeError::Throttled {
                    reason: "ConcurrentInvocationLimitExceeded".into(),
                    limit: 1000,
                })
            } else {
                Reply::Ok
            }
        });
        let (last, causes) = life(&invoker, EventInvokeConfig::default(), None).await;
        assert_eq!(invoker.call_secs(), [0, 1, 3, 7]);
        assert_eq!(causes, [RequeueCause::Throttled; 3]);
        let Decision::Success { event, response } = last else {
            panic!("a success expected, got {last:?}");
        };
        assert_eq!(event.attempts, 1, "throttles are not attempts");
        assert_eq!(event.throttles, 3);
        assert_eq!(response, br#"{"ok":true}"#);
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttling_back_off_is_capped_at_5_min() {
        let invoker = FakeInvoker::new(|n| {
            if n < 12 {
                Reply::Err(InvokeError::Throttled {
                    reason: "ConcurrentInvocationLimitExceeded".into(),
                    limit: 1000,
                })
            } else {
                Reply::Ok
            }
        });
        let (last, _) = life(&invoker, EventInvokeConfig::default(), None).await;
        let gaps: Vec<u64> = invoker
            .call_secs()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(matches!(last, Decision::Success { .. }), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_and_service_errors_back_off_but_are_not_throttles() {
        let invoker = FakeInvoker::new(|n| match n {
            0 => Reply::Err(InvokeError::NoCapacity("no worker has room".into())),
            1 => Reply::Err(InvokeError::Service("redis".into())),
            _ => Reply::Ok,
        });
        let (last, causes) = life(&invoker, config(0, 21_600), None).await;
        assert_eq!(invoker.call_secs(), [0, 1, 3]);
        assert_eq!(causes, [RequeueCause::NotInvoked; 2]);
        assert!(
            matches!(&last, Decision::Success { event, .. } if event.attempts == 1),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_too_old_for_its_next_retry_fails_as_event_age_exceeded_without_an_invoke() {
        let invoker = FakeInvoker::new(|_| Reply::FunctionError);
        let (last, _) = life(&invoker, config(2, 100), None).await;
        assert_eq!(invoker.call_secs(), [0, 60], "no third invoke");
        assert_eq!(
            invoker.start.elapsed(),
            Duration::from_secs(180),
            "decided when the third attempt was due"
        );
        let Decision::Failure {
            event,
            condition,
            error,
        } = last
        else {
            panic!("a failure expected, got {last:?}");
        };
        assert_eq!(condition, Condition::EventAgeExceeded);
        assert_eq!(event.attempts, 2);
        assert!(error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_reserved_concurrency_fails_without_an_invoke() {
        let invoker = FakeInvoker::new(|_| Reply::Ok);
        let (last, _) = life(&invoker, EventInvokeConfig::default(), Some(0)).await;
        assert!(invoker.call_secs().is_empty());
        assert!(
            matches!(&last, Decision::Failure { event, condition: Condition::ZeroReservedConcurrency, error: None } if event.attempts == 0),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_function_that_cannot_run_counts_as_an_attempt() {
        let invoker =
            FakeInvoker::new(|_| Reply::Err(InvokeError::Config("no code on this worker".into())));
        let (last, causes) = life(&invoker, EventInvokeConfig::default(), None).await;
        assert_eq!(invoker.call_secs(), [0, 60, 180], "retried, not throttled");
        assert_eq!(causes, [RequeueCause::Retry; 2]);
        let Decision::Failure {
            event,
            condition,
            error,
        } = last
        else {
            panic!("a failure expected, got {last:?}");
        };
        assert_eq!(condition, Condition::RetriesExhausted);
        assert_eq!(event.attempts, 3);
        assert_eq!(
            error_type(error.as_deref()),
            json!("Runtime.ConfigurationError")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_of_a_function_the_invoker_does_not_know_is_dropped() {
        let invoker = FakeInvoker::new(|_| Reply::Err(InvokeError::NotFound("f".into())));
        let (last, _) = life(&invoker, EventInvokeConfig::default(), None).await;
        assert_eq!(invoker.call_secs(), [0]);
        assert!(
            matches!(
                last,
                Decision::Drop {
                    reason: "FunctionDeleted"
                }
            ),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zombie_abandons_the_event_without_an_invoke() {
        let invoker = FakeInvoker::new(|_| Reply::Ok);
        let cfg = AsyncPollerConfig::new("sluice.", "arn:");
        let invoke_config = EventInvokeConfig::default();
        let attempt = Attempt {
            invoker: &invoker,
            cfg: &cfg,
            invoke_config: &invoke_config,
            reserved: None,
        };
        let mut event = AsyncEvent::new("f", "req-1", Vec::new()).with_trace_id(TRACE);
        event.enqueued_ms = T0_MS;
        let last = attempt.run(event, invoker.now_ms(), || false).await;
        assert!(matches!(last, Decision::Abandoned), "{last:?}");
        assert!(invoker.call_secs().is_empty());
    }
}
