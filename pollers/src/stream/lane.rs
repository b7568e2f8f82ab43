//! One partition's processing: records are routed to `ParallelizationFactor` lanes by key, so
//! each key's records stay in order; each lane builds batches and delivers them.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use sluice_core::events::now_ms;
use sluice_core::invoke::{FunctionResult, InvokeRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::event::{failure_record, kafka_event, partial_failures, Partial, Rec, MAX_BATCH_BYTES};
use super::policy::{self, Outcome, RetryPolicy, Step};
use super::poller::MappingCtx;
use crate::runtime::Item;

/// Routes a partition's records to its lanes; records at or below `seen` (the highest offset
/// finished by an earlier owner) are counted as duplicates. The runtime bounds what a partition
/// holds, so the lanes' channels never fill past the partition's budget.
pub(crate) async fn partition_worker(
    ctx: Arc<MappingCtx>,
    mut rx: mpsc::Receiver<Item<Rec>>,
    seen: i64,
    cancel: CancellationToken,
) {
    let n = usize::try_from(ctx.config.parallelization_factor)
        .unwrap_or(1)
        .max(1);
    let mut lanes = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, lrx) = mpsc::channel(1024);
        lanes.push(tx);
        handles.push(tokio::spawn(lane(Arc::clone(&ctx), lrx, cancel.clone())));
    }
    while let Some(Item { value: rec, .. }) = rx.recv().await {
        if rec.offset <= seen {
            metrics::counter!("sluice_stream_duplicates_total", "mapping" => ctx.uuid.clone())
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
async fn lane(ctx: Arc<MappingCtx>, mut rx: mpsc::Receiver<Rec>, cancel: CancellationToken) {
    let batch_size = usize::try_from(ctx.config.batch_size).unwrap_or(100);
    let window = ctx.config.batching_window();
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
        handle_batch(&ctx, batch, &cancel).await;
    }
}

async fn handle_batch(ctx: &MappingCtx, batch: Vec<Rec>, cancel: &CancellationToken) {
    let labels = [("mapping", ctx.uuid.clone())];
    metrics::histogram!("sluice_batch_records", &labels).record(batch.len() as f64);
    // Filtered-out records are committed without an invoke, as in Lambda.
    let (pass, dropped): (Vec<Rec>, Vec<Rec>) = if ctx.filters.is_empty() {
        (batch, Vec::new())
    } else {
        batch
            .into_iter()
            .partition(|r| ctx.filters.matches(r.key.as_deref(), r.value.as_deref()))
    };
    if !dropped.is_empty() {
        metrics::counter!("sluice_records_filtered_total", &labels).increment(dropped.len() as u64);
    }
    for r in &dropped {
        ctx.finish(r);
    }
    if pass.is_empty() {
        return;
    }
    if let Some(oldest) = pass.iter().map(|r| r.timestamp_ms).min() {
        metrics::gauge!("sluice_iterator_age_milliseconds", &labels)
            .set((now_ms() - oldest).max(0) as f64);
    }
    let policy = RetryPolicy::new(
        ctx.config.effective_maximum_retry_attempts(),
        ctx.config.bisect_batch_on_function_error,
        0,
    );
    let done = deliver(ctx, pass, policy, cancel).await;
    for r in &done {
        ctx.finish(r);
    }
}

/// Delivers `recs` (one lane's, in order) until each is processed or sent to the on-failure
/// destination; returns the records that are finished. Records are not finished when the
/// partition's lease is lost or the poller stops: they are redelivered to the next owner. Every
/// decision is the batch's [`RetryPolicy`]'s; this function does the I/O.
async fn deliver(
    ctx: &MappingCtx,
    recs: Vec<Rec>,
    mut policy: RetryPolicy,
    cancel: &CancellationToken,
) -> Vec<Rec> {
    let labels = [("mapping", ctx.uuid.clone())];
    let max_age_ms = ctx
        .config
        .maximum_record_age_in_seconds
        .saturating_mul(1000);
    let mut pending = recs;
    let mut finished = Vec::new();
    loop {
        if pending.is_empty() {
            return finished;
        }
        // A zombie (paused past its lease, or the partition moved) invokes nothing, not even
        // records fetched before the pause: the new owner has them from the committed offset.
        if cancel.is_cancelled() || !ctx.owns(&pending[0]) {
            return finished;
        }
        let (old, young) = policy::split_expired(pending, now_ms(), max_age_ms);
        if !old.is_empty() {
            to_failure(ctx, &old, "RecordAgeExceeded", policy.invokes, None).await;
            finished.extend(old);
        }
        pending = young;
        if pending.is_empty() {
            return finished;
        }
        if policy::too_big(&pending) {
            to_failure(
                ctx,
                &pending,
                "MaximumPayloadSizeExceeded",
                policy.invokes,
                None,
            )
            .await;
            finished.append(&mut pending);
            return finished;
        }
        let event = kafka_event(&ctx.bootstrap, &pending);
        let started = Instant::now();
        let invocation = ctx.invoker.invoke(InvokeRequest {
            function: ctx.config.function_name.clone(),
            request_id: uuid_like(),
            payload: event.to_string().into_bytes(),
            trace_id: String::new(),
        });
        // A panic while invoking fails the batch like a function error (retries, bisection and
        // the on-failure destination apply) instead of killing the lane with its records in
        // flight, which would hold the partition's commit point for good.
        let result = match std::panic::AssertUnwindSafe(invocation)
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!("sluice_stream_handler_panics_total", &labels).increment(1);
                tracing::error!(mapping = %ctx.uuid, "invoking a batch panicked; failing it like a function error");
                Ok(sluice_core::invoke::Invoked {
                    result: FunctionResult::Err {
                        error_type: "Sluice.HandlerPanic".into(),
                        payload: br#"{"errorType":"Sluice.HandlerPanic","errorMessage":"invoking the batch panicked"}"#.to_vec(),
                    },
                    duration: started.elapsed(),
                    cold_start: false,
                })
            }
        };
        let (outcome, error) = match result {
            Ok(done) => {
                metrics::histogram!("sluice_stream_invoke_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                match done.result {
                    FunctionResult::Ok(payload) if ctx.config.reports_batch_item_failures() => {
                        match partial_failures(&payload, &pending) {
                            Partial::AllOk => (Outcome::Ok, Vec::new()),
                            Partial::FailedFrom(lowest) => {
                                let (ok, rest): (Vec<Rec>, Vec<Rec>) =
                                    pending.into_iter().partition(|r| r.offset < lowest);
                                finished.extend(ok);
                                pending = rest;
                                (Outcome::Partial, payload)
                            }
                            Partial::Invalid(why) => {
                                tracing::warn!(mapping = %ctx.uuid, %why, "partial batch response fails the whole batch");
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
                tracing::info!(mapping = %ctx.uuid, error = %e, "function cannot run; counted as a function error");
                metrics::counter!("sluice_stream_function_errors_total", &labels).increment(1);
                (Outcome::FunctionError, e.function_error_body())
            }
            Err(e) => {
                // Throttles and capacity problems are not retries: wait and try again.
                tracing::debug!(mapping = %ctx.uuid, error = %e, "could not invoke; backing off");
                (Outcome::NotInvoked, Vec::new())
            }
        };
        match policy.after(outcome, pending.len()) {
            Step::Done => {
                finished.append(&mut pending);
                return finished;
            }
            Step::Bisect => {
                let right = pending.split_off(pending.len() / 2);
                let left = pending;
                let (l, r) = (policy.half(), policy.half());
                finished.extend(Box::pin(deliver(ctx, left, l, cancel)).await);
                finished.extend(Box::pin(deliver(ctx, right, r, cancel)).await);
                return finished;
            }
            Step::Fail { condition } => {
                to_failure(ctx, &pending, condition, policy.invokes, Some(&error)).await;
                finished.append(&mut pending);
                return finished;
            }
            Step::Invoke { after } => {
                // Back off instead of re-invoking at once.
                tokio::select! {
                    () = cancel.cancelled() => return finished,
                    () = tokio::time::sleep(after) => {}
                }
            }
        }
    }
}

async fn to_failure(
    ctx: &MappingCtx,
    recs: &[Rec],
    condition: &str,
    invokes: u32,
    error: Option<&[u8]>,
) {
    metrics::counter!("sluice_records_failed_total", "mapping" => ctx.uuid.clone(), "condition" => condition.to_owned())
        .increment(recs.len() as u64);
    let Some(topic) = ctx.config.on_failure_topic() else {
        tracing::warn!(mapping = %ctx.uuid, condition, records = recs.len(), "records discarded (no on-failure destination)");
        return;
    };
    let now = sluice_destinations::record::iso8601(now_ms());
    for r in recs {
        let value = failure_record(
            &uuid_like(),
            &ctx.function_arn,
            condition,
            invokes,
            error,
            &ctx.bootstrap,
            r,
            &now,
        );
        let key = r
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        ctx.destinations
            .write(
                &topic.topic,
                &key,
                value.to_string().as_bytes(),
                &[("sluice-mapping", &ctx.uuid)],
            )
            .await;
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
