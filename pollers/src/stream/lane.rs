//! One partition's processing: records are routed to `ParallelizationFactor` lanes by key, so
//! each key's records stay in order; each lane builds batches and delivers them.
//!
//! The delivery loop (`deliver`) runs over [`LaneIo`], the lane's I/O: the invoke, the on-failure
//! destination, the partition's lease, the runtime's offset tracking and the clock. The mapping
//! poller's [`MappingCtx`] is the real one; the tests at the bottom drive the loop with a
//! scripted fake under paused time. Every decision is `policy::RetryPolicy`'s.
//!
//! A panic never ends a lane. A panicking invoke fails the batch like a function error (retries,
//! bisection and the on-failure destination apply); a panic anywhere else while handling a batch
//! (filters, failure records, …) is caught per batch: the batch's unfinished records go to the
//! on-failure destination (`RetryAttemptsExhausted`, error type `Sluice.HandlerPanic`) and are
//! finished, so the partition's commit point moves on, and the lane takes the next batch.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use sluice_core::events::now_ms;
use sluice_core::invoke::{FunctionResult, InvokeError, InvokeRequest, Invoked};
use sluice_core::model::EventSourceMappingConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::event::{failure_record, kafka_event, partial_failures, Partial, Rec, MAX_BATCH_BYTES};
use super::policy::{self, Outcome, RetryPolicy, Step};
use super::poller::MappingCtx;
use crate::filter::FilterSet;
use crate::runtime::{self, Item};

/// The error body of records failed because handling their batch panicked.
const HANDLER_PANIC_BODY: &[u8] =
    br#"{"errorType":"Sluice.HandlerPanic","errorMessage":"handling the batch panicked"}"#;

/// What a lane knows about its mapping.
pub(crate) struct LaneSettings {
    /// The mapping's UUID (the `mapping` label of the metrics).
    pub(crate) uuid: String,
    /// The mapping's configuration.
    pub(crate) config: EventSourceMappingConfig,
    /// The mapping's compiled `FilterCriteria`.
    pub(crate) filters: FilterSet,
    /// Bootstrap servers, as the event names them.
    pub(crate) bootstrap: String,
}

/// A lane's I/O. Implemented by [`MappingCtx`]; a fake in the tests.
pub(crate) trait LaneIo: Send + Sync {
    /// The mapping.
    fn settings(&self) -> &LaneSettings;

    /// Runs the function on one batch.
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> impl Future<Output = Result<Invoked, InvokeError>> + Send;

    /// Writes one failure record per record of `recs` to the on-failure destination (discards
    /// them with a warning when there is none): `condition`, the invocations made, the error.
    fn fail(
        &self,
        recs: &[&Rec],
        condition: &str,
        invokes: u32,
        error: Option<&[u8]>,
    ) -> impl Future<Output = ()> + Send;

    /// Whether `rec`'s partition is still this node's under the epoch it was fetched in.
    fn owns(&self, rec: &Rec) -> bool;

    /// Marks `rec` done in the runtime (its offset may be committed).
    fn finish(&self, rec: &Rec);

    /// Now, Unix ms (records' age).
    fn now_ms(&self) -> i64;
}

impl LaneIo for MappingCtx {
    fn settings(&self) -> &LaneSettings {
        &self.lane
    }

    async fn invoke(&self, request: InvokeRequest) -> Result<Invoked, InvokeError> {
        self.invoker.invoke(request).await
    }

    async fn fail(&self, recs: &[&Rec], condition: &str, invokes: u32, error: Option<&[u8]>) {
        let uuid = &self.lane.uuid;
        metrics::counter!("sluice_records_failed_total", "mapping" => uuid.clone(), "condition" => condition.to_owned())
            .increment(recs.len() as u64);
        let Some(topic) = self.lane.config.on_failure_topic() else {
            tracing::warn!(mapping = %uuid, condition, records = recs.len(), "records discarded (no on-failure destination)");
            return;
        };
        let now = sluice_destinations::record::iso8601(self.now_ms());
        for r in recs {
            let value = failure_record(
                &uuid_like(),
                &self.function_arn,
                condition,
                invokes,
                error,
                &self.lane.bootstrap,
                r,
                &now,
            );
            let key = r
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            self.destinations
                .write(
                    &topic.topic,
                    &key,
                    &serde_json::to_vec(&value)
                        .expect("a failure record of strings and JSON values always encodes"),
                    &[("sluice-mapping", uuid)],
                )
                .await;
        }
    }

    fn owns(&self, r: &Rec) -> bool {
        runtime::lock(&self.trackers).is_owned(&(r.topic.clone(), r.partition), r.epoch)
    }

    fn finish(&self, r: &Rec) {
        runtime::lock(&self.trackers).finish(&(r.topic.clone(), r.partition), r.offset, r.epoch);
    }

    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// Routes a partition's records to its lanes; records at or below `seen` (the highest offset
/// finished by an earlier owner) are counted as duplicates. The runtime bounds what a partition
/// holds, so the lanes' channels never fill past the partition's budget.
pub(crate) async fn partition_worker<L: LaneIo + 'static>(
    io: Arc<L>,
    mut rx: mpsc::Receiver<Item<Rec>>,
    seen: i64,
    cancel: CancellationToken,
) {
    let n = usize::try_from(io.settings().config.parallelization_factor)
        .unwrap_or(1)
        .max(1);
    let mut lanes = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, lrx) = mpsc::channel(1024);
        lanes.push(tx);
        handles.push(tokio::spawn(lane(Arc::clone(&io), lrx, cancel.clone())));
    }
    while let Some(Item { value: rec, .. }) = rx.recv().await {
        if rec.offset <= seen {
            metrics::counter!("sluice_stream_duplicates_total", "mapping" => io.settings().uuid.clone())
                .increment(1);
        }
        let i = if n == 1 {
            0
        } else {
            let mut h = DefaultHasher::new();
            rec.key.hash(&mut h);
            usize::try_from(h.finish() % n as u64).unwrap_or(0)
        };
        if lanes[i].send(rec).await.is_err() {
            break;
        }
    }
    drop(lanes);
    for h in handles {
        let _ = h.await;
    }
}

/// Builds batches: up to BatchSize records or 6 MiB, waiting at most the batching window after
/// the first record.
async fn lane<L: LaneIo>(io: Arc<L>, mut rx: mpsc::Receiver<Rec>, cancel: CancellationToken) {
    let config = &io.settings().config;
    let batch_size = usize::try_from(config.batch_size).unwrap_or(100);
    let window = config.batching_window();
    let mut carry: Option<Rec> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => tokio::select! {
                () = cancel.cancelled() => return,
                r = rx.recv() => match r { Some(r) => r, None => return },
            },
        };
        let deadline = tokio::time::Instant::now() + window;
        let mut bytes = first.encoded_size();
        let mut batch = vec![first];
        while batch.len() < batch_size {
            let next = tokio::select! {
                () = tokio::time::sleep_until(deadline) => None,
                r = rx.recv() => r,
            };
            let Some(r) = next else { break };
            if bytes + r.encoded_size() > MAX_BATCH_BYTES {
                carry = Some(r);
                break;
            }
            bytes += r.encoded_size();
            batch.push(r);
        }
        if cancel.is_cancelled() {
            return;
        }
        run_batch(&*io, batch, &cancel).await;
    }
}

/// What became of a batch's records so far: those done (processed, filtered out, or written to
/// the on-failure destination), of which the first `finished` are marked done in the runtime,
/// and the invocations made.
#[derive(Default)]
struct BatchState<'a> {
    done: Vec<&'a Rec>,
    finished: usize,
    invokes: u32,
}

impl BatchState<'_> {
    /// Marks in the runtime the records done since the last call.
    fn finish_done<L: LaneIo>(&mut self, io: &L) {
        for r in &self.done[self.finished..] {
            io.finish(r);
        }
        self.finished = self.done.len();
    }
}

/// Handles one batch; a panic while handling it fails its unfinished records (see the module
/// doc) instead of ending the lane with them in flight.
async fn run_batch<L: LaneIo>(io: &L, batch: Vec<Rec>, cancel: &CancellationToken) {
    let mut state = BatchState::default();
    let handled = AssertUnwindSafe(handle_batch(io, &batch, cancel, &mut state))
        .catch_unwind()
        .await;
    if handled.is_err() {
        fail_panicked(io, &batch, &mut state).await;
    }
    state.finish_done(io);
}

/// After handling `batch` panicked: its records not done yet go to the on-failure destination
/// and are done. A zombie leaves them to the partition's next owner.
async fn fail_panicked<'a, L: LaneIo>(io: &L, batch: &'a [Rec], state: &mut BatchState<'a>) {
    let uuid = &io.settings().uuid;
    metrics::counter!("sluice_stream_handler_panics_total", "mapping" => uuid.clone()).increment(1);
    let done: HashSet<i64> = state.done.iter().map(|r| r.offset).collect();
    let rest: Vec<&Rec> = batch.iter().filter(|r| !done.contains(&r.offset)).collect();
    let Some(first) = rest.first() else {
        tracing::error!(mapping = %uuid, "handling a batch panicked after its records were done");
        return;
    };
    if !io.owns(first) {
        tracing::error!(mapping = %uuid, records = rest.len(), "handling a batch panicked after the partition was lost; the next owner has its records");
        return;
    }
    tracing::error!(mapping = %uuid, records = rest.len(), first_offset = first.offset, "handling a batch panicked; its unfinished records go to the on-failure destination");
    let written = AssertUnwindSafe(io.fail(
        &rest,
        "RetryAttemptsExhausted",
        state.invokes,
        Some(HANDLER_PANIC_BODY),
    ))
    .catch_unwind()
    .await;
    if written.is_err() {
        tracing::error!(mapping = %uuid, records = rest.len(), first_offset = first.offset, "writing the failure records of a panicked batch panicked too; the records are discarded");
    }
    state.done.extend(rest);
}

async fn handle_batch<'a, L: LaneIo>(
    io: &L,
    batch: &'a [Rec],
    cancel: &CancellationToken,
    state: &mut BatchState<'a>,
) {
    let s = io.settings();
    let labels = [("mapping", s.uuid.clone())];
    metrics::histogram!("sluice_batch_records", &labels).record(batch.len() as f64);
    // Filtered-out records are committed without an invoke, as in Lambda.
    let (pass, dropped): (Vec<&Rec>, Vec<&Rec>) = if s.filters.is_empty() {
        (batch.iter().collect(), Vec::new())
    } else {
        batch
            .iter()
            .partition(|r| s.filters.matches(r.key.as_deref(), r.value.as_deref()))
    };
    if !dropped.is_empty() {
        metrics::counter!("sluice_records_filtered_total", &labels).increment(dropped.len() as u64);
    }
    state.done.extend(dropped);
    state.finish_done(io);
    if pass.is_empty() {
        return;
    }
    if let Some(oldest) = pass.iter().map(|r| r.timestamp_ms).min() {
        metrics::gauge!("sluice_iterator_age_milliseconds", &labels)
            .set((io.now_ms() - oldest).max(0) as f64);
    }
    let policy = RetryPolicy::new(
        s.config.effective_maximum_retry_attempts(),
        s.config.bisect_batch_on_function_error,
        0,
    );
    deliver(io, pass, policy, cancel, state).await;
}

/// Delivers `recs` (one lane's, in order) until each is processed or sent to the on-failure
/// destination, adding each to `state` once it is. Records are left undone when the partition's
/// lease is lost or the poller stops: they are redelivered to the next owner. Every decision is
/// the batch's [`RetryPolicy`]'s; this function does the I/O through `io`.
async fn deliver<'a, L: LaneIo>(
    io: &L,
    recs: Vec<&'a Rec>,
    mut policy: RetryPolicy,
    cancel: &CancellationToken,
    state: &mut BatchState<'a>,
) {
    let s = io.settings();
    let labels = [("mapping", s.uuid.clone())];
    let max_age_ms = s.config.maximum_record_age_in_seconds.saturating_mul(1000);
    let mut pending = recs;
    loop {
        if pending.is_empty() {
            return;
        }
        // A zombie (paused past its lease, or the partition moved) invokes nothing, not even
        // records fetched before the pause: the new owner has them from the committed offset.
        if cancel.is_cancelled() || !io.owns(pending[0]) {
            return;
        }
        let (old, young) = policy::split_expired(pending, io.now_ms(), max_age_ms);
        if !old.is_empty() {
            io.fail(&old, "RecordAgeExceeded", policy.invokes, None)
                .await;
            state.done.extend(old);
        }
        pending = young;
        if pending.is_empty() {
            return;
        }
        if policy::too_big(&pending) {
            io.fail(&pending, "MaximumPayloadSizeExceeded", policy.invokes, None)
                .await;
            state.done.append(&mut pending);
            return;
        }
        let event = kafka_event(&s.bootstrap, &pending);
        let started = Instant::now();
        let invocation = io.invoke(InvokeRequest {
            function: s.config.function_name.clone(),
            request_id: uuid_like(),
            payload: event.to_string().into_bytes(),
            // Each invocation of a batch is its own trace, as Lambda starts one per invoke.
            trace_id: sluice_core::invoke::new_trace_id(),
        });
        // A panic while invoking fails the batch like a function error (retries, bisection and
        // the on-failure destination apply) instead of killing the lane with its records in
        // flight, which would hold the partition's commit point for good.
        let result = match AssertUnwindSafe(invocation).catch_unwind().await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!("sluice_stream_handler_panics_total", &labels).increment(1);
                tracing::error!(mapping = %s.uuid, "invoking a batch panicked; failing it like a function error");
                Ok(Invoked {
                    result: FunctionResult::Err {
                        error_type: "Sluice.HandlerPanic".into(),
                        payload: br#"{"errorType":"Sluice.HandlerPanic","errorMessage":"invoking the batch panicked"}"#.to_vec(),
                    },
                    duration: started.elapsed(),
                    cold_start: false,
                    init_duration: None,
                    log: Vec::new(),
                })
            }
        };
        let (outcome, error) = match result {
            Ok(done) => {
                metrics::histogram!("sluice_stream_invoke_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                match done.result {
                    FunctionResult::Ok(payload) if s.config.reports_batch_item_failures() => {
                        match partial_failures(&payload, &pending) {
                            Partial::AllOk => (Outcome::Ok, Vec::new()),
                            Partial::FailedFrom(lowest) => {
                                let (ok, rest): (Vec<&Rec>, Vec<&Rec>) =
                                    pending.into_iter().partition(|r| r.offset < lowest);
                                state.done.extend(ok);
                                pending = rest;
                                (Outcome::Partial, payload)
                            }
                            Partial::Invalid(why) => {
                                tracing::warn!(mapping = %s.uuid, %why, "partial batch response fails the whole batch");
                                (Outcome::Partial, payload)
                            }
                        }
                    }
                    FunctionResult::Ok(_) => (Outcome::Ok, Vec::new()),
                    FunctionResult::Err { payload, .. } => {
                        metrics::counter!("sluice_stream_function_errors_total", &labels)
                            .increment(1);
                        (Outcome::FunctionError, payload)
                    }
                }
            }
            Err(e) if !e.is_retryable() => {
                // The function cannot run as configured: the user's doing, counted as a function
                // error (retries, bisection and the on-failure destination apply).
                tracing::info!(mapping = %s.uuid, error = %e, "function cannot run; counted as a function error");
                metrics::counter!("sluice_stream_function_errors_total", &labels).increment(1);
                (Outcome::FunctionError, e.function_error_body())
            }
            Err(e) => {
                // Throttles and capacity problems are not retries: wait and try again.
                tracing::debug!(mapping = %s.uuid, error = %e, "could not invoke; backing off");
                (Outcome::NotInvoked, Vec::new())
            }
        };
        if outcome != Outcome::NotInvoked {
            state.invokes += 1;
        }
        match policy.after(outcome, pending.len()) {
            Step::Done => {
                state.done.append(&mut pending);
                return;
            }
            Step::Bisect => {
                let right = pending.split_off(pending.len() / 2);
                let left = pending;
                let (l, r) = (policy.half(), policy.half());
                Box::pin(deliver(io, left, l, cancel, state)).await;
                Box::pin(deliver(io, right, r, cancel, state)).await;
                return;
            }
            Step::Fail { condition } => {
                io.fail(&pending, condition, policy.invokes, Some(&error))
                    .await;
                state.done.append(&mut pending);
                return;
            }
            Step::Invoke { after } => {
                // Back off instead of re-invoking at once.
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(after) => {}
                }
            }
        }
    }
}

fn uuid_like() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::*;

    /// Unix ms when each test starts; the fake's clock follows tokio's paused time from here.
    const T0_MS: i64 = 1_750_000_000_000;

    /// What the fake function does with one invocation.
    enum Reply {
        Ok,
        /// A `batchItemFailures` response naming these offsets.
        Failures(Vec<i64>),
        FunctionError,
        Err(InvokeError),
        Panic,
    }

    /// One invocation: when (since the test started) and the batch's offsets.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Call {
        at_ms: u128,
        offsets: Vec<i64>,
    }

    /// One failure write.
    #[derive(Debug, Clone)]
    struct Failure {
        at_ms: u128,
        condition: String,
        offsets: Vec<i64>,
        invokes: u32,
        error: Option<Value>,
    }

    type Script = Box<dyn Fn(usize, &[i64]) -> Reply + Send + Sync>;

    /// A scripted `LaneIo`: the function answers call `n` on `offsets` with `script(n, offsets)`,
    /// and every invocation, failure write and finish is recorded.
    struct Fake {
        settings: LaneSettings,
        start: tokio::time::Instant,
        script: Script,
        calls: Mutex<Vec<Call>>,
        failures: Mutex<Vec<Failure>>,
        finished: Mutex<Vec<i64>>,
        /// The lease holds for this many invocations (then `owns` is false).
        lease_for_invokes: Option<usize>,
        owned: AtomicBool,
        /// `fail` panics this many times before it writes.
        fail_panics: AtomicUsize,
        /// A panicking `fail` loses the lease first.
        lose_lease_on_fail_panic: bool,
    }

    impl Fake {
        fn new(
            config: Value,
            script: impl Fn(usize, &[i64]) -> Reply + Send + Sync + 'static,
        ) -> Self {
            let mut c = json!({ "FunctionName": "f", "Topics": ["t"] });
            if let (Some(c), Some(extra)) = (c.as_object_mut(), config.as_object()) {
                c.extend(extra.clone());
            }
            let config: EventSourceMappingConfig =
                serde_json::from_value(c).expect("a valid mapping");
            Self {
                settings: LaneSettings {
                    uuid: "m".into(),
                    config,
                    filters: FilterSet::default(),
                    bootstrap: "b:9092".into(),
                },
                start: tokio::time::Instant::now(),
                script: Box::new(script),
                calls: Mutex::default(),
                failures: Mutex::default(),
                finished: Mutex::default(),
                lease_for_invokes: None,
                owned: AtomicBool::new(true),
                fail_panics: AtomicUsize::new(0),
                lose_lease_on_fail_panic: false,
            }
        }

        fn since_start(&self) -> u128 {
            self.start.elapsed().as_millis()
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("calls").clone()
        }

        fn call_times(&self) -> Vec<u128> {
            self.calls().iter().map(|c| c.at_ms).collect()
        }

        fn failures(&self) -> Vec<Failure> {
            self.failures.lock().expect("failures").clone()
        }

        fn finished(&self) -> Vec<i64> {
            let mut f = self.finished.lock().expect("finished").clone();
            f.sort_unstable();
            f
        }
    }

    fn invoked(result: FunctionResult) -> Invoked {
        Invoked {
            result,
            duration: Duration::from_millis(1),
            cold_start: false,
            init_duration: None,
            log: Vec::new(),
        }
    }

    impl LaneIo for Fake {
        fn settings(&self) -> &LaneSettings {
            &self.settings
        }

        async fn invoke(&self, request: InvokeRequest) -> Result<Invoked, InvokeError> {
            let event: Value = serde_json::from_slice(&request.payload).expect("a JSON event");
            let offsets: Vec<i64> = event["records"]["t-0"]
                .as_array()
                .expect("records of t-0")
                .iter()
                .map(|r| r["offset"].as_i64().expect("an offset"))
                .collect();
            let n = {
                let mut calls = self.calls.lock().expect("calls");
                calls.push(Call {
                    at_ms: self.since_start(),
                    offsets: offsets.clone(),
                });
                calls.len() - 1
            };
            match (self.script)(n, &offsets) {
                Reply::Ok => Ok(invoked(FunctionResult::Ok(b"null".to_vec()))),
                Reply::Failures(failed) => {
                    let items: Vec<Value> = failed
                        .iter()
                        .map(|o| json!({ "itemIdentifier": { "topic-partition": "t-0", "offset": o } }))
                        .collect();
                    let body = json!({ "batchItemFailures": items }).to_string();
                    Ok(invoked(FunctionResult::Ok(body.into_bytes())))
                }
                Reply::FunctionError => Ok(invoked(FunctionResult::Err {
                    error_type: "Boom".into(),
                    payload: br#"{"errorType":"Boom","errorMessage":"boom"}"#.to_vec(),
                })),
                Reply::Err(e) => Err(e),
                Reply::Panic => panic!("the fake invoker panics"),
            }
        }

        async fn fail(&self, recs: &[&Rec], condition: &str, invokes: u32, error: Option<&[u8]>) {
            if self
                .fail_panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                if self.lose_lease_on_fail_panic {
                    self.owned.store(false, Ordering::SeqCst);
                }
                panic!("the fake failure write panics");
            }
            self.failures.lock().expect("failures").push(Failure {
                at_ms: self.since_start(),
                condition: condition.to_owned(),
                offsets: recs.iter().map(|r| r.offset).collect(),
                invokes,
                error: error.map(|e| serde_json::from_slice(e).expect("a JSON error body")),
            });
        }

        fn owns(&self, _rec: &Rec) -> bool {
            self.owned.load(Ordering::SeqCst)
                && self
                    .lease_for_invokes
                    .is_none_or(|n| self.calls.lock().expect("calls").len() < n)
        }

        fn finish(&self, rec: &Rec) {
            self.finished.lock().expect("finished").push(rec.offset);
        }

        fn now_ms(&self) -> i64 {
            T0_MS + i64::try_from(self.since_start()).expect("a short test")
        }
    }

    fn rec(offset: i64, timestamp_ms: i64) -> Rec {
        Rec {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(br#"{"n":1}"#.to_vec()),
            timestamp_ms,
            timestamp_type: "CREATE_TIME",
            headers: Vec::new(),
            epoch: 1,
        }
    }

    fn recs(offsets: std::ops::Range<i64>) -> Vec<Rec> {
        offsets.map(|o| rec(o, T0_MS)).collect()
    }

    /// Runs one batch to its end; a loop that never ends fails after an hour of paused time.
    async fn run(fake: &Fake, batch: Vec<Rec>) {
        tokio::time::timeout(
            Duration::from_secs(3600),
            run_batch(fake, batch, &CancellationToken::new()),
        )
        .await
        .expect("the batch ends within an hour");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_batch_backs_off_from_100_ms_doubling_to_5_s_until_its_retries_run_out() {
        let fake = Fake::new(json!({ "MaximumRetryAttempts": 8 }), |_, _| {
            Reply::FunctionError
        });
        run(&fake, recs(0..3)).await;
        assert_eq!(
            fake.call_times(),
            [0, 100, 300, 700, 1500, 3100, 6300, 11_300, 16_300],
            "waits of 100, 200, 400, 800, 1600, 3200, then 5000 ms"
        );
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        let f = &failures[0];
        assert_eq!(f.condition, "RetryAttemptsExhausted");
        assert_eq!(f.at_ms, 16_300, "right after the last attempt");
        assert_eq!(f.offsets, [0, 1, 2]);
        assert_eq!(f.invokes, 9, "the first attempt and 8 retries");
        assert_eq!(
            f.error.as_ref().map(|e| e["errorType"].clone()),
            Some(json!("Boom"))
        );
        assert_eq!(fake.finished(), [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn bisection_isolates_a_poison_record_without_using_retries() {
        let fake = Fake::new(
            json!({ "MaximumRetryAttempts": 2, "BisectBatchOnFunctionError": true }),
            |_, offsets| {
                if offsets.contains(&5) {
                    Reply::FunctionError
                } else {
                    Reply::Ok
                }
            },
        );
        run(&fake, recs(0..8)).await;
        let call = |at_ms, offsets: &[i64]| Call {
            at_ms,
            offsets: offsets.to_vec(),
        };
        assert_eq!(
            fake.calls(),
            [
                call(0, &[0, 1, 2, 3, 4, 5, 6, 7]),
                call(0, &[0, 1, 2, 3]),
                call(0, &[4, 5, 6, 7]),
                call(0, &[4, 5]),
                call(0, &[4]),
                // Bisecting used no retries: the poison record alone gets all of them.
                call(0, &[5]),
                call(100, &[5]),
                call(300, &[5]),
                call(300, &[6, 7]),
            ]
        );
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].offsets, [5], "only the poison record fails");
        assert_eq!(failures[0].condition, "RetryAttemptsExhausted");
        assert_eq!(failures[0].invokes, 3);
        assert_eq!(fake.finished(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_response_retries_from_the_lowest_failed_record() {
        let fake = Fake::new(
            json!({ "FunctionResponseTypes": ["ReportBatchItemFailures"] }),
            |n, _| match n {
                0 => Reply::Failures(vec![4, 2]),
                _ => Reply::Ok,
            },
        );
        run(&fake, recs(0..5)).await;
        assert_eq!(
            fake.calls(),
            [
                Call {
                    at_ms: 0,
                    offsets: vec![0, 1, 2, 3, 4]
                },
                // From the lowest failure on, 3 included: the checkpoint is an offset.
                Call {
                    at_ms: 100,
                    offsets: vec![2, 3, 4]
                },
            ]
        );
        assert!(fake.failures().is_empty());
        assert_eq!(fake.finished(), [0, 1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn records_past_their_maximum_age_fail_as_record_age_exceeded_without_an_invoke() {
        // Infinite retries (no destination): only age ends them.
        let fake = Fake::new(json!({ "MaximumRecordAgeInSeconds": 60 }), |_, _| {
            Reply::FunctionError
        });
        run(&fake, vec![rec(0, T0_MS - 30_000), rec(1, T0_MS)]).await;
        let calls = fake.calls();
        let times: Vec<u128> = calls.iter().map(|c| c.at_ms).collect();
        assert_eq!(
            times,
            [
                0, 100, 300, 700, 1500, 3100, 6300, 11_300, 16_300, 21_300, 26_300, 31_300, 36_300,
                41_300, 46_300, 51_300, 56_300
            ]
        );
        for c in &calls {
            let want: &[i64] = if c.at_ms < 31_300 { &[0, 1] } else { &[1] };
            assert_eq!(c.offsets, want, "at {} ms", c.at_ms);
        }
        let failures = fake.failures();
        let summary: Vec<(u128, &str, Vec<i64>, u32)> = failures
            .iter()
            .map(|f| (f.at_ms, f.condition.as_str(), f.offsets.clone(), f.invokes))
            .collect();
        assert_eq!(
            summary,
            [
                // Record 0 is 61.3 s old at the 12th attempt: it fails, record 1 is invoked.
                (31_300, "RecordAgeExceeded", vec![0], 11),
                // Record 1 is 61.3 s old at the 18th: it fails, with no 18th invoke.
                (61_300, "RecordAgeExceeded", vec![1], 17),
            ]
        );
        assert!(failures.iter().all(|f| f.error.is_none()));
        assert_eq!(fake.finished(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_and_missing_capacity_are_not_retries() {
        // No retries at all: a single function error would fail the batch.
        let fake = Fake::new(json!({ "MaximumRetryAttempts": 0 }), |n, _| match n {
            0 => Reply::Err(InvokeError::Throttled {
                reason: "ReservedFunctionConcurrentInvocationLimitExceeded".into(),
                limit: 1,
            }),
            1 => Reply::Err(InvokeError::NoCapacity("full".into())),
            2 => Reply::Err(InvokeError::Service("redis".into())),
            _ => Reply::Ok,
        });
        run(&fake, recs(0..2)).await;
        assert_eq!(fake.call_times(), [0, 100, 300, 700], "their own back-off");
        assert!(fake.failures().is_empty(), "{:?}", fake.failures());
        assert_eq!(fake.finished(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_function_that_cannot_run_counts_as_a_function_error() {
        let fake = Fake::new(json!({ "MaximumRetryAttempts": 1 }), |_, _| {
            Reply::Err(InvokeError::Config("no code on this worker".into()))
        });
        run(&fake, recs(0..2)).await;
        assert_eq!(fake.call_times(), [0, 100], "one retry, not a throttle");
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].condition, "RetryAttemptsExhausted");
        assert_eq!(failures[0].invokes, 2);
        assert_eq!(
            failures[0].error.as_ref().map(|e| e["errorType"].clone()),
            Some(json!("Runtime.ConfigurationError"))
        );
        assert_eq!(fake.finished(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_too_big_for_any_batch_fails_without_an_invoke() {
        let fake = Fake::new(json!({}), |_, _| Reply::Ok);
        let mut big = rec(0, T0_MS);
        big.value = Some(vec![b'x'; MAX_BATCH_BYTES]);
        run(&fake, vec![big]).await;
        assert!(fake.calls().is_empty());
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].condition, "MaximumPayloadSizeExceeded");
        assert_eq!(failures[0].invokes, 0);
        assert_eq!(fake.finished(), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_stops_the_batch_with_nothing_finished() {
        let mut fake = Fake::new(json!({ "MaximumRetryAttempts": 5 }), |_, _| {
            Reply::FunctionError
        });
        fake.lease_for_invokes = Some(1);
        run(&fake, recs(0..3)).await;
        assert_eq!(fake.call_times(), [0], "no invoke after the lease is gone");
        assert!(fake.failures().is_empty(), "nor a failure record");
        assert!(
            fake.finished().is_empty(),
            "the next owner has the records from the committed offset"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_during_the_back_off_stops_at_once_with_nothing_finished() {
        let fake = Arc::new(Fake::new(json!({}), |_, _| Reply::FunctionError));
        let cancel = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn({
            let (fake, cancel) = (Arc::clone(&fake), cancel.clone());
            async move { run_batch(&*fake, recs(0..3), &cancel).await }
        });
        // The first retry is due at 100 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        task.await.expect("the batch task");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(fake.call_times(), [0]);
        assert!(fake.failures().is_empty());
        assert!(fake.finished().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_invoke_fails_like_a_function_error() {
        let fake = Fake::new(json!({ "MaximumRetryAttempts": 1 }), |_, _| Reply::Panic);
        run(&fake, recs(0..2)).await;
        assert_eq!(fake.call_times(), [0, 100], "retried like a function error");
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].condition, "RetryAttemptsExhausted");
        assert_eq!(failures[0].invokes, 2);
        assert_eq!(
            failures[0].error.as_ref().map(|e| e["errorType"].clone()),
            Some(json!("Sluice.HandlerPanic"))
        );
        assert_eq!(fake.finished(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_outside_the_invoke_fails_only_the_batchs_unfinished_records() {
        let fake = Fake::new(
            json!({ "FunctionResponseTypes": ["ReportBatchItemFailures"], "MaximumRetryAttempts": 0 }),
            |_, _| Reply::Failures(vec![2]),
        );
        // Writing record 2's failure record panics (outside the invoke).
        fake.fail_panics.store(1, Ordering::SeqCst);
        run(&fake, recs(0..3)).await;
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        let f = &failures[0];
        assert_eq!(f.offsets, [2], "0 and 1 had succeeded");
        assert_eq!(f.condition, "RetryAttemptsExhausted");
        assert_eq!(f.invokes, 1);
        assert_eq!(
            f.error.as_ref().map(|e| e["errorType"].clone()),
            Some(json!("Sluice.HandlerPanic"))
        );
        assert_eq!(fake.finished(), [0, 1, 2], "the commit point moves on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_keeps_running_after_a_batch_panics() {
        let fake = Arc::new(Fake::new(
            json!({ "BatchSize": 1, "MaximumBatchingWindowInSeconds": 0, "MaximumRecordAgeInSeconds": 60 }),
            |_, _| Reply::Ok,
        ));
        // Record 0 is too old; writing its RecordAgeExceeded record panics.
        fake.fail_panics.store(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(8);
        let lane = tokio::spawn(lane(Arc::clone(&fake), rx, CancellationToken::new()));
        tx.send(rec(0, T0_MS - 120_000)).await.expect("lane");
        tx.send(rec(1, T0_MS)).await.expect("lane");
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), lane)
            .await
            .expect("the lane ends with its channel")
            .expect("the lane did not panic");
        let failures = fake.failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].offsets, [0]);
        assert_eq!(failures[0].condition, "RetryAttemptsExhausted");
        assert_eq!(
            failures[0].error.as_ref().map(|e| e["errorType"].clone()),
            Some(json!("Sluice.HandlerPanic"))
        );
        assert_eq!(
            fake.calls(),
            [Call {
                at_ms: 0,
                offsets: vec![1]
            }],
            "the next batch ran"
        );
        assert_eq!(fake.finished(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_whose_failure_write_panics_twice_is_still_finished() {
        let fake = Fake::new(json!({ "MaximumRetryAttempts": 0 }), |_, _| {
            Reply::FunctionError
        });
        fake.fail_panics.store(2, Ordering::SeqCst);
        run(&fake, recs(0..2)).await;
        assert!(fake.failures().is_empty(), "nothing could be written");
        assert_eq!(
            fake.finished(),
            [0, 1],
            "discarded (logged), not left in flight for good"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicked_batch_of_a_lost_partition_is_left_to_the_next_owner() {
        let mut fake = Fake::new(json!({ "MaximumRetryAttempts": 0 }), |_, _| {
            Reply::FunctionError
        });
        fake.fail_panics.store(1, Ordering::SeqCst);
        fake.lose_lease_on_fail_panic = true;
        run(&fake, recs(0..2)).await;
        assert!(fake.failures().is_empty());
        assert!(fake.finished().is_empty());
    }
}
