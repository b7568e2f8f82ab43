//! Concurrency counting against a real `redis-server` (one per test): limits, throttle
//! reasons, 200 concurrent acquirers, slots of a killed process, renewal, and script recovery.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use sluice_leasing::{
    ConcurrencyCounter, CountError, FunctionLimit, ReleaseOutcome, Slot, ThrottleReason,
};
use sluice_tests::redis::RedisServer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

fn prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4())
}

/// Acquire must answer promptly, whatever the answer: throttling never waits for capacity.
async fn acquire_now(
    counter: &ConcurrencyCounter,
    function: &str,
    limit: FunctionLimit,
) -> Result<Slot, CountError> {
    timeout(Duration::from_secs(5), counter.acquire(function, limit))
        .await
        .expect("acquire never blocks")
}

fn assert_throttled(result: Result<Slot, CountError>, reason: ThrottleReason, limit: u32) {
    match result {
        Err(CountError::Throttled {
            reason: got,
            limit: got_limit,
            ..
        }) => {
            assert_eq!(got, reason);
            assert_eq!(got_limit, limit);
        }
        Err(other) => panic!("expected a throttle ({reason}), got {other:?}"),
        Ok(slot) => panic!("expected a throttle ({reason}), got slot {}", slot.id()),
    }
}

/// Redis server time in milliseconds.
async fn redis_now_ms(conn: &mut redis::aio::ConnectionManager) -> anyhow::Result<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_throttled_at_once_and_release_frees_capacity() -> anyhow::Result<()> {
    let server = RedisServer::start();
    let counter =
        ConcurrencyCounter::new(server.connect().await, prefix(), Duration::from_secs(5))?;
    let limit = FunctionLimit::Reserved(2);

    let first = acquire_now(&counter, "f", limit).await?;
    let second = acquire_now(&counter, "f", limit).await?;
    assert_ne!(first.id(), second.id());
    assert_throttled(
        acquire_now(&counter, "f", limit).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        2,
    );
    assert_eq!(counter.in_use("f").await?, 2);

    assert_eq!(first.release().await?, ReleaseOutcome::Released);
    assert_eq!(counter.in_use("f").await?, 1);
    let third = acquire_now(&counter, "f", limit).await?;
    assert_throttled(
        acquire_now(&counter, "f", limit).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        2,
    );

    // Reserved concurrency 0 turns a function off.
    assert_throttled(
        acquire_now(&counter, "off", FunctionLimit::Reserved(0)).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        0,
    );
    for slot in [second, third] {
        assert_eq!(slot.release().await?, ReleaseOutcome::Released);
    }
    assert_eq!(counter.in_use("f").await?, 0);
    assert_eq!(counter.account_in_use().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreserved_functions_share_the_pool_and_reserved_ones_do_not() -> anyhow::Result<()> {
    let server = RedisServer::start();
    let counter =
        ConcurrencyCounter::new(server.connect().await, prefix(), Duration::from_secs(5))?;
    // Account limit 5, one function with 2 reserved: the pool has 3.
    let pool = FunctionLimit::Unreserved {
        unreserved_limit: sluice_leasing::unreserved_limit(5, [2]),
    };
    let reserved = FunctionLimit::Reserved(2);

    let f1 = acquire_now(&counter, "f1", pool).await?;
    let _f1b = acquire_now(&counter, "f1", pool).await?;
    let _f2 = acquire_now(&counter, "f2", pool).await?;
    assert_throttled(
        acquire_now(&counter, "f2", pool).await,
        ThrottleReason::ConcurrentInvocationLimitExceeded,
        3,
    );
    // The reservation is untouched by the full pool...
    let _g1 = acquire_now(&counter, "g", reserved).await?;
    let _g2 = acquire_now(&counter, "g", reserved).await?;
    // ...and limited on its own.
    assert_throttled(
        acquire_now(&counter, "g", reserved).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        2,
    );

    assert_eq!(counter.in_use("f1").await?, 2);
    assert_eq!(counter.in_use("f2").await?, 1);
    assert_eq!(counter.in_use("g").await?, 2);
    assert_eq!(counter.unreserved_in_use().await?, 3);
    assert_eq!(counter.account_in_use().await?, 5);

    assert_eq!(f1.release().await?, ReleaseOutcome::Released);
    let _f2b = acquire_now(&counter, "f2", pool).await?;
    assert_eq!(counter.unreserved_in_use().await?, 3);
    Ok(())
}

/// 200 tasks on 4 connections hammer one limit of 10 for two seconds while a sampler reads the
/// count; neither the holders nor Redis may ever see more than 10.
async fn two_hundred_acquirers_against_a_limit_of_ten(
    limit: FunctionLimit,
    functions: &[&'static str],
) -> anyhow::Result<()> {
    const ACQUIRERS: usize = 200;
    const MAX: usize = 10;
    let server = RedisServer::start();
    let prefix = prefix();
    let mut counters = Vec::new();
    for _ in 0..4 {
        counters.push(ConcurrencyCounter::new(
            server.connect().await,
            &prefix,
            Duration::from_secs(10),
        )?);
    }

    let holding = Arc::new(AtomicUsize::new(0));
    let max_holding = Arc::new(AtomicUsize::new(0));
    let acquired = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();

    let mut tasks = Vec::new();
    for i in 0..ACQUIRERS {
        let counter = counters[i % counters.len()].clone();
        let function = functions[i % functions.len()];
        let (holding, max_holding, acquired, throttled, stop) = (
            Arc::clone(&holding),
            Arc::clone(&max_holding),
            Arc::clone(&acquired),
            Arc::clone(&throttled),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match counter.acquire(function, limit).await {
                    Ok(slot) => {
                        // Counted after Redis granted and uncounted before Redis frees it, so
                        // this is never above the Redis count.
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        max_holding.fetch_max(now, Ordering::SeqCst);
                        acquired.fetch_add(1, Ordering::Relaxed);
                        let hold = rand::rng().random_range(1..10);
                        tokio::time::sleep(Duration::from_millis(hold)).await;
                        holding.fetch_sub(1, Ordering::SeqCst);
                        slot.release().await?;
                    }
                    Err(CountError::Throttled { .. }) => {
                        throttled.fetch_add(1, Ordering::Relaxed);
                        let backoff = rand::rng().random_range(1..5);
                        tokio::time::sleep(Duration::from_millis(backoff)).await;
                    }
                    Err(err) => return Err(anyhow::Error::new(err)),
                }
            }
            anyhow::Ok(())
        }));
    }

    let sampler = {
        let counter =
            ConcurrencyCounter::new(server.connect().await, &prefix, Duration::from_secs(10))?;
        let pooled = matches!(limit, FunctionLimit::Unreserved { .. });
        let function = functions[0];
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut samples, mut max_seen) = (0_u64, 0_u64);
            while !stop.is_cancelled() {
                let n = if pooled {
                    counter.unreserved_in_use().await?
                } else {
                    counter.in_use(function).await?
                };
                samples += 1;
                max_seen = max_seen.max(n);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok((samples, max_seen))
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for task in tasks {
        task.await??;
    }
    let (samples, max_sampled) = sampler.await??;

    let max_holding = max_holding.load(Ordering::SeqCst);
    let (acquired, throttled) = (
        acquired.load(Ordering::SeqCst),
        throttled.load(Ordering::SeqCst),
    );
    println!(
        "acquired={acquired} throttled={throttled} max_holding={max_holding} \
         samples={samples} max_sampled={max_sampled}"
    );
    assert!(max_holding <= MAX, "{max_holding} holders at once");
    assert!(
        max_sampled <= MAX as u64,
        "Redis counted {max_sampled} slots"
    );
    assert!(
        acquired > 0 && throttled > 0,
        "the limit was never contended"
    );
    assert!(
        samples > 0 && max_sampled > 0,
        "the sampler saw no slot in use"
    );
    assert_eq!(
        counters[0].account_in_use().await?,
        0,
        "every slot released"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_acquirers_never_hold_more_than_ten_reserved_slots() -> anyhow::Result<()> {
    two_hundred_acquirers_against_a_limit_of_ten(FunctionLimit::Reserved(10), &["f"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_acquirers_never_hold_more_than_ten_pool_slots() -> anyhow::Result<()> {
    two_hundred_acquirers_against_a_limit_of_ten(
        FunctionLimit::Unreserved {
            unreserved_limit: 10,
        },
        &["f1", "f2", "f3", "f4"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_of_a_killed_process_comes_back_within_its_ttl() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(2);
    let server = RedisServer::start();
    let prefix = prefix();
    let mut conn = server.connect().await;
    let counter = ConcurrencyCounter::new(conn.clone(), &prefix, TTL)?;

    let mut holder = tokio::process::Command::new(env!("CARGO_BIN_EXE_slot-holder"))
        .arg(server.url())
        .arg(&prefix)
        .arg("f")
        .arg(TTL.as_millis().to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn slot-holder")?;
    let mut lines = BufReader::new(holder.stdout.take().context("piped stdout")?).lines();
    let first = timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("slot-holder did not report")??
        .context("slot-holder exited before acquiring")?;
    let mut expires_at_ms: u64 = first
        .strip_prefix("acquired ")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .context("`acquired ID EXPIRES_AT_MS`")?
        .parse()?;

    // Let it renew at least once, then check that its slot is taken.
    let renewed = timeout(TTL, lines.next_line())
        .await
        .context("slot-holder did not renew")??
        .context("slot-holder exited")?;
    assert!(renewed.starts_with("renewed "), "{renewed}");
    assert_throttled(
        acquire_now(&counter, "f", FunctionLimit::Reserved(1)).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        1,
    );

    holder.start_kill().context("SIGKILL slot-holder")?;
    holder.wait().await?;
    let killed = Instant::now();
    // The last expiry it reported is when the slot may come back (on the Redis clock).
    while let Some(line) = lines.next_line().await? {
        if let Some(ms) = line.strip_prefix("renewed ") {
            expires_at_ms = ms.parse()?;
        }
    }
    // A renewal may have reached Redis without being printed; it can only push the expiry
    // later, never earlier, and by at most one TTL from the kill.

    let slot = loop {
        match acquire_now(&counter, "f", FunctionLimit::Reserved(1)).await {
            Ok(slot) => break slot,
            Err(CountError::Throttled { .. }) => {}
            Err(err) => return Err(err.into()),
        }
        assert!(
            killed.elapsed() < TTL + Duration::from_secs(1),
            "the killed holder's slot did not come back within its {TTL:?} TTL"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let came_back_after = killed.elapsed();
    let now_ms = redis_now_ms(&mut conn).await?;
    println!("slot came back {came_back_after:?} after the kill");
    assert!(
        now_ms >= expires_at_ms,
        "the slot came back {} ms before its expiry",
        expires_at_ms - now_ms
    );
    assert_eq!(slot.release().await?, ReleaseOutcome::Released);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_slot_and_an_expired_slot_cannot_come_back() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(1);
    let server = RedisServer::start();
    let counter = ConcurrencyCounter::new(server.connect().await, prefix(), TTL)?;
    let limit = FunctionLimit::Reserved(1);

    let mut slot = acquire_now(&counter, "f", limit).await?;
    for _ in 0..3 {
        tokio::time::sleep(TTL * 2 / 5).await;
        slot.renew().await?;
    }
    // 1.2 TTLs after it was taken, the slot is still held thanks to the renewals.
    assert_throttled(
        acquire_now(&counter, "f", limit).await,
        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
        1,
    );

    tokio::time::sleep(TTL + TTL / 5).await;
    let renewed = slot.renew().await;
    assert!(
        matches!(renewed, Err(CountError::SlotExpired { .. })),
        "{renewed:?}"
    );
    let other = acquire_now(&counter, "f", limit).await?;
    assert_eq!(slot.release().await?, ReleaseOutcome::NotHeld);
    assert_eq!(counter.in_use("f").await?, 1);
    assert_eq!(other.release().await?, ReleaseOutcome::Released);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_recover_after_script_flush_and_restart() -> anyhow::Result<()> {
    let mut server = RedisServer::start();
    let counter =
        ConcurrencyCounter::new(server.connect().await, prefix(), Duration::from_secs(5))?;
    let limit = FunctionLimit::Reserved(2);
    let mut admin = server.connect().await;

    let mut slot = acquire_now(&counter, "f", limit).await?;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await?;
    slot.renew().await?;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await?;
    assert_eq!(counter.in_use("f").await?, 1);
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await?;
    assert_eq!(slot.release().await?, ReleaseOutcome::Released);

    server.restart();
    // Only connection errors while the client reconnects are acceptable; a NOSCRIPT error is
    // not retryable and fails the test.
    let give_up = Instant::now() + Duration::from_secs(10);
    let slot = loop {
        match counter.acquire("f", limit).await {
            Ok(slot) => break slot,
            Err(err) if err.is_retryable() && !matches!(err, CountError::Throttled { .. }) => {
                assert!(
                    Instant::now() < give_up,
                    "no slot after the restart: {err:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    assert_eq!(counter.in_use("f").await?, 1);
    assert_eq!(counter.account_in_use().await?, 1);
    assert_eq!(slot.release().await?, ReleaseOutcome::Released);
    Ok(())
}
