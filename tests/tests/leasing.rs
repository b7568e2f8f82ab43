//! Leases against a real `redis-server` (one per test): contention, takeover after the TTL,
//! fencing, loss detection before the TTL, and recovery after `FLUSHALL`, a restart and
//! `SCRIPT FLUSH`.

use std::time::Duration;

use anyhow::Context;
use sluice_leasing::{Lease, LeaseError, Leaser, LostReason, ReleaseOutcome};
use sluice_tests::redis::RedisServer;
use tokio::time::Instant;

fn prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4())
}

/// Polls `acquire` until it succeeds, retrying Redis errors that a retry can fix (a restart in
/// progress). Panics on any other error, or when `within` passes.
async fn acquire_within(leaser: &Leaser, name: &str, within: Duration) -> Lease {
    let give_up = Instant::now() + within;
    loop {
        match leaser.acquire(name).await {
            Ok(Some(lease)) => return lease,
            Ok(None) => {}
            Err(err) if err.is_retryable() => {}
            Err(err) => panic!("acquire {name}: {err:?}"),
        }
        assert!(
            Instant::now() < give_up,
            "lease {name} not acquired within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_holders_contend_for_one_lease_one_wins_and_tokens_increase() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(2);
    let server = RedisServer::start();
    let prefix = prefix();
    // Separate connections, as two nodes would have.
    let a = Leaser::new(server.connect().await, &prefix, "holder-a", TTL)?;
    let b = Leaser::new(server.connect().await, &prefix, "holder-b", TTL)?;

    let mut last_token = 0;
    let mut wins = [0_u32; 2];
    for round in 0..30 {
        let (from_a, from_b) = tokio::join!(a.acquire("unit"), b.acquire("unit"));
        let (lease, loser) = match (from_a?, from_b?) {
            (Some(lease), None) => {
                wins[0] += 1;
                (lease, &b)
            }
            (None, Some(lease)) => {
                wins[1] += 1;
                (lease, &a)
            }
            (a_got, b_got) => panic!(
                "round {round}: exactly one holder must win, got a={} b={}",
                a_got.is_some(),
                b_got.is_some()
            ),
        };
        assert!(
            lease.token() > last_token,
            "round {round}: token {} after {last_token}",
            lease.token()
        );
        last_token = lease.token();
        assert!(lease.is_valid());
        assert!(loser.acquire("unit").await?.is_none(), "round {round}");
        assert!(loser.check_token("unit", lease.token()).await?);
        assert_eq!(lease.release().await?, ReleaseOutcome::Released);
        assert!(!a.check_token("unit", last_token).await?);
    }
    // Not an assertion on fairness, only that the loop exercised a real race.
    println!("wins: a={} b={}", wins[0], wins[1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_that_stops_renewing_is_replaced_after_the_ttl_and_its_writes_are_fenced(
) -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(1);
    let server = RedisServer::start();
    let prefix = prefix();
    let a = Leaser::new(server.connect().await, &prefix, "holder-a", TTL)?;
    let b = Leaser::new(server.connect().await, &prefix, "holder-b", TTL)?;

    let lease_a = a.acquire("unit").await?.context("the lease is free")?;
    let token_a = lease_a.token();
    let data_key = format!("{}:data", a.lease_key("unit"));
    a.fenced_set(&data_key, b"from-a", "unit", token_a).await?;

    // A stops renewing (stalled or crashed) without releasing.
    drop(lease_a);
    let stopped = Instant::now();
    assert!(
        b.acquire("unit").await?.is_none(),
        "taken before the TTL passed"
    );

    let lease_b = acquire_within(&b, "unit", TTL * 3).await;
    let waited = stopped.elapsed();
    // A's last renewal was at most ttl/3 before it stopped, so the lease outlived it by at
    // least 2/3 of the TTL; a takeover before that would break exclusivity.
    assert!(
        waited >= TTL / 2,
        "B took the lease {waited:?} after A stopped"
    );
    assert!(lease_b.token() > token_a);

    let late = a
        .fenced_set(&data_key, b"late-from-a", "unit", token_a)
        .await;
    assert!(
        matches!(&late, Err(LeaseError::Fenced { token, .. }) if *token == token_a),
        "A's late write must be fenced, got {late:?}"
    );
    assert!(!a.check_token("unit", token_a).await?);
    b.fenced_set(&data_key, b"from-b", "unit", lease_b.token())
        .await?;

    let mut conn = server.connect().await;
    let value: String = redis::cmd("GET")
        .arg(&data_key)
        .query_async(&mut conn)
        .await?;
    assert_eq!(value, "from-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_learns_it_lost_the_lease_before_another_can_take_it() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(3);
    let server = RedisServer::start();
    let prefix = prefix();
    let a = Leaser::new(server.connect().await, &prefix, "holder-a", TTL)?;
    let b = Leaser::new(server.connect().await, &prefix, "holder-b", TTL)?;

    // Redis started the TTL after this instant, so nobody can take the lease before
    // `before_acquire + TTL`.
    let before_acquire = Instant::now();
    let lease = a.acquire("unit").await?.context("the lease is free")?;
    let token = lease.token();
    assert!(lease.deadline() < before_acquire + TTL);

    // Redis stalls: renewals get no answer.
    server.pause();
    let lost = tokio::time::timeout(TTL * 2, lease.lost()).await;
    let lost_at = Instant::now();
    server.resume();

    assert_eq!(
        lost.context("lease not lost while Redis stalled")?,
        LostReason::Expired
    );
    assert!(!lease.is_valid());
    assert!(
        lost_at < before_acquire + TTL,
        "the holder noticed {:?} after acquiring, not before the {TTL:?} TTL",
        lost_at - before_acquire
    );
    assert!(
        matches!(lease.renew_now().await, Err(LeaseError::Lost { .. })),
        "a lost lease stays lost"
    );

    // Another holder gets it only once Redis lets the key expire.
    let lease_b = acquire_within(&b, "unit", TTL * 3).await;
    assert!(Instant::now() >= before_acquire + TTL);
    assert!(lease_b.token() > token);
    let late = a.fenced_set("{x}", b"late", "unit", token).await;
    assert!(matches!(late, Err(LeaseError::Fenced { .. })), "{late:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_redis_makes_holders_notice_and_reacquire_with_larger_tokens() -> anyhow::Result<()>
{
    const TTL: Duration = Duration::from_secs(1);
    let server = RedisServer::start();
    let a = Leaser::new(server.connect().await, prefix(), "holder-a", TTL)?;

    let first = a.acquire("first").await?.context("free")?;
    let second = a.acquire("second").await?.context("free")?;
    let old_tokens = [first.token(), second.token()];

    let mut conn = server.connect().await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;

    for lease in [&first, &second] {
        let reason = tokio::time::timeout(TTL * 2, lease.lost())
            .await
            .context("flush not noticed")?;
        assert_eq!(reason, LostReason::Missing);
        assert!(!lease.is_valid());
    }
    // The fence counters are gone too; tokens keep increasing because they are re-seeded from
    // the Redis clock.
    for (name, old) in [("first", old_tokens[0]), ("second", old_tokens[1])] {
        let again = acquire_within(&a, name, TTL).await;
        assert!(again.token() > old, "{name}: {} after {old}", again.token());
        assert_eq!(again.release().await?, ReleaseOutcome::Released);
    }
    assert_eq!(first.release().await?, ReleaseOutcome::NotHeld);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_redis_makes_holders_notice_and_reacquire_and_scripts_reload(
) -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(1);
    let mut server = RedisServer::start();
    let a = Leaser::new(server.connect().await, prefix(), "holder-a", TTL)?;

    let lease = a.acquire("unit").await?.context("free")?;
    let old = lease.token();
    server.restart();

    let reason = tokio::time::timeout(TTL * 3, lease.lost())
        .await
        .context("restart not noticed")?;
    assert!(
        matches!(reason, LostReason::Missing | LostReason::Expired),
        "{reason}"
    );

    // The new server has no scripts and no fence counter: every script must load again (a
    // NOSCRIPT error would fail `acquire_within`) and tokens must still increase.
    let again = acquire_within(&a, "unit", Duration::from_secs(10)).await;
    assert!(again.token() > old, "{} after {old}", again.token());
    again.renew_now().await?;
    assert!(a.check_token("unit", again.token()).await?);
    let key = format!("{}:data", a.lease_key("unit"));
    a.fenced_set(&key, b"v", "unit", again.token()).await?;
    assert_eq!(again.release().await?, ReleaseOutcome::Released);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flush_is_recovered_without_error() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(2);
    let server = RedisServer::start();
    let a = Leaser::new(server.connect().await, prefix(), "holder-a", TTL)?;
    let mut conn = server.connect().await;
    let flush = || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async::<()>(&mut conn)
                .await
        }
    };

    let lease = a.acquire("unit").await?.context("free")?;
    flush().await?;
    lease.renew_now().await?;
    flush().await?;
    assert!(a.check_token("unit", lease.token()).await?);
    flush().await?;
    let key = format!("{}:data", a.lease_key("unit"));
    a.fenced_set(&key, b"v", "unit", lease.token()).await?;
    flush().await?;
    assert_eq!(lease.release().await?, ReleaseOutcome::Released);
    flush().await?;
    let again = a.acquire("unit").await?.context("free after release")?;
    assert!(again.is_valid());
    let scripts: i64 = redis::cmd("INFO")
        .arg("memory")
        .query_async::<String>(&mut conn)
        .await?
        .lines()
        .find_map(|line| line.strip_prefix("number_of_cached_scripts:"))
        .context("INFO memory lists cached scripts")?
        .trim()
        .parse()?;
    assert!(scripts >= 1, "the acquire script was loaded again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reacquiring_an_own_lease_issues_a_new_token_and_fences_the_old_one() -> anyhow::Result<()>
{
    const TTL: Duration = Duration::from_secs(2);
    let server = RedisServer::start();
    let a = Leaser::new(server.connect().await, prefix(), "holder-a", TTL)?;

    let old = a.acquire("unit").await?.context("free")?;
    let new = a.acquire("unit").await?.context("own lease")?;
    assert!(new.token() > old.token());
    let renewed = old.renew_now().await;
    assert!(
        matches!(
            renewed,
            Err(LeaseError::Lost {
                reason: LostReason::Taken,
                ..
            })
        ),
        "{renewed:?}"
    );
    assert!(!old.is_valid());
    assert_eq!(old.release().await?, ReleaseOutcome::NotHeld);
    assert!(new.is_valid());
    assert!(a.check_token("unit", new.token()).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaser_settings_are_validated() -> anyhow::Result<()> {
    let server = RedisServer::start();
    let conn = server.connect().await;
    let err = Leaser::new(conn.clone(), "p", "h", Duration::from_millis(5)).expect_err("short");
    assert!(
        err.to_string().contains("lease_ttl must be at least"),
        "{err}"
    );
    let err = Leaser::new(conn.clone(), "p", "", Duration::from_secs(1)).expect_err("no holder");
    assert!(err.to_string().contains("holder id"), "{err}");
    let a = Leaser::new(conn, "p", "h", Duration::from_secs(1))?;
    assert!(matches!(
        a.acquire("bad{name}").await,
        Err(LeaseError::InvalidName { .. })
    ));
    Ok(())
}
