//! The per-node warm pool over real jails.

use std::sync::Arc;
use std::time::Duration;

use sluice_tests::functions::Bundle;
use sluice_workers::jail::{JailBackend, JailConfig};
use sluice_workers::{FunctionSpec, InvokeOutcome, Pool, PoolConfig, PoolError, PoolEvent};

fn pool(budget_mb: u64, idle_timeout: Duration) -> Pool {
    let backend = JailBackend::new(JailConfig::detect()).expect("jail backend");
    Pool::new(
        Arc::new(backend),
        PoolConfig {
            memory_budget_mb: budget_mb,
            idle_timeout,
            init_timeout: Duration::from_secs(10),
        },
        None,
    )
}

fn spec(name: &str, bundle: &Bundle, timeout: Duration) -> Arc<FunctionSpec> {
    let mut s = FunctionSpec::new(name, bundle.path());
    s.timeout = timeout;
    Arc::new(s)
}

#[tokio::test]
async fn warm_sandboxes_are_reused_and_broken_ones_replaced() {
    let pool = pool(1024, Duration::from_secs(60));
    let bundle = Bundle::of("fn-misbehave");
    let f = spec("f", &bundle, Duration::from_secs(2));
    let first = pool
        .invoke(&f, "r1", br#"{"action":"echo"}"#.to_vec())
        .await
        .expect("invoke");
    assert!(first.cold_start);
    assert!(first.init_duration.is_some());
    let second = pool
        .invoke(&f, "r2", br#"{"action":"echo"}"#.to_vec())
        .await
        .expect("invoke");
    assert!(!second.cold_start, "the warm sandbox is reused");
    assert_eq!(pool.idle_count(), 1);

    let crash = pool
        .invoke(&f, "r3", br#"{"action":"exit"}"#.to_vec())
        .await
        .expect("invoke");
    assert!(
        matches!(crash.outcome, InvokeOutcome::Crashed { .. }),
        "{:?}",
        crash.outcome
    );
    assert_eq!(pool.idle_count(), 0, "a crashed sandbox is not kept");
    assert_eq!(pool.used_mb(), 0);
    let after = pool
        .invoke(&f, "r4", br#"{"action":"echo","ok":true}"#.to_vec())
        .await
        .expect("invoke");
    assert!(after.cold_start, "a fresh sandbox replaces the crashed one");
    assert!(matches!(after.outcome, InvokeOutcome::Response(_)));

    // A new configuration revision gets its own sandboxes.
    let mut f2 = (*f).clone();
    f2.revision = 2;
    let updated = pool
        .invoke(&Arc::new(f2), "r5", b"{}".to_vec())
        .await
        .expect("invoke");
    assert!(updated.cold_start);
    assert_eq!(pool.idle_count(), 2);
    pool.shutdown().await;
    assert_eq!(pool.used_mb(), 0);
}

#[tokio::test]
async fn the_memory_budget_evicts_idle_sandboxes_and_refuses_when_all_are_busy() {
    let pool = pool(256, Duration::from_secs(60));
    let bundle = Bundle::of("fn-misbehave");
    let (a, b, c) = (
        spec("a", &bundle, Duration::from_secs(3)),
        spec("b", &bundle, Duration::from_secs(3)),
        spec("c", &bundle, Duration::from_secs(3)),
    );
    pool.invoke(&a, "1", b"{}".to_vec()).await.expect("a");
    pool.invoke(&b, "2", b"{}".to_vec()).await.expect("b");
    assert_eq!(pool.used_mb(), 256);
    // c needs room: the least recently used idle sandbox (a's) goes.
    let out = pool.invoke(&c, "3", b"{}".to_vec()).await.expect("c");
    assert!(out.cold_start);
    assert_eq!(pool.used_mb(), 256);
    assert!(
        pool.invoke(&b, "4", b"{}".to_vec())
            .await
            .expect("b")
            .cold_start
            .eq(&false),
        "b stayed warm"
    );
    assert!(
        pool.invoke(&a, "5", b"{}".to_vec())
            .await
            .expect("a")
            .cold_start,
        "a was evicted"
    );

    // Two busy sandboxes fill the budget: a third function is refused, not queued.
    let p1 = pool.clone();
    let hang = spec("hang", &bundle, Duration::from_secs(2));
    let h1 = Arc::clone(&hang);
    let busy1 =
        tokio::spawn(async move { p1.invoke(&h1, "h1", br#"{"action":"hang"}"#.to_vec()).await });
    let p2 = pool.clone();
    let h2 = Arc::clone(&hang);
    let busy2 =
        tokio::spawn(async move { p2.invoke(&h2, "h2", br#"{"action":"hang"}"#.to_vec()).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = pool
        .invoke(&c, "6", b"{}".to_vec())
        .await
        .expect_err("no capacity");
    assert!(
        matches!(
            err,
            PoolError::NoCapacity {
                needed_mb: 128,
                budget_mb: 256,
                ..
            }
        ),
        "{err}"
    );
    for h in [busy1, busy2] {
        let inv = h.await.expect("task").expect("invoke");
        assert!(matches!(inv.outcome, InvokeOutcome::Timeout { .. }));
    }
    assert_eq!(
        pool.used_mb(),
        0,
        "timed-out sandboxes are destroyed and their memory returned"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn idle_sandboxes_are_reaped() {
    let pool = pool(1024, Duration::from_millis(300));
    let bundle = Bundle::of("fn-echo");
    let f = spec("f", &bundle, Duration::from_secs(3));
    let inv = pool.invoke(&f, "1", b"{}".to_vec()).await.expect("invoke");
    assert!(
        matches!(inv.outcome, InvokeOutcome::Response(_)),
        "{:?}",
        inv.outcome
    );
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(pool.reap_idle().await, 0, "not idle long enough yet");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.reap_idle().await, 1);
    assert_eq!(pool.idle_count(), 0);
    assert_eq!(pool.used_mb(), 0);
}

#[tokio::test]
async fn an_init_error_is_the_invocations_outcome() {
    let pool = pool(1024, Duration::from_secs(60));
    let bundle = Bundle::of("fn-init-error");
    let f = spec("broken", &bundle, Duration::from_secs(3));
    let inv = pool.invoke(&f, "1", b"{}".to_vec()).await.expect("invoke");
    let InvokeOutcome::InitError { error_type, .. } = &inv.outcome else {
        panic!("{:?}", inv.outcome)
    };
    assert_eq!(error_type, "Runtime.ConfigError");
    assert_eq!(pool.used_mb(), 0);
}

#[tokio::test]
async fn provisioned_sandboxes_outlive_the_idle_timeout_serve_first_and_are_never_evicted() {
    let pool = pool(256, Duration::from_millis(200));
    let bundle = Bundle::of("fn-misbehave");
    let f = spec("pc", &bundle, Duration::from_secs(3));
    let key = ("pc".to_owned(), f.revision);
    pool.provision(&f).await.expect("provision");
    pool.provision(&f).await.expect("provision");
    assert_eq!(pool.stats().provisioned, vec![(key.clone(), 2, 0)]);
    assert_eq!(pool.used_mb(), 256);

    // Past the idle timeout the reaper keeps them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.reap_idle().await, 0);
    assert_eq!(pool.idle_count(), 2);

    // They serve without a cold start.
    let out = pool.invoke(&f, "r1", b"{}".to_vec()).await.expect("invoke");
    assert!(!out.cold_start);

    // A budget full of provisioned sandboxes refuses another function rather than evict them.
    let other = spec("other", &bundle, Duration::from_secs(3));
    assert!(matches!(
        pool.invoke(&other, "r2", b"{}".to_vec()).await,
        Err(PoolError::NoCapacity { .. })
    ));
    assert_eq!(pool.stats().provisioned, vec![(key.clone(), 2, 0)]);

    // Released, they become ordinary idle sandboxes and the reaper takes them.
    assert_eq!(pool.unprovision(&key, 5), 2);
    assert!(pool.stats().provisioned.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.reap_idle().await, 2);
    assert_eq!(pool.used_mb(), 0);
}

#[tokio::test]
async fn pool_events_tell_the_index_which_sandboxes_are_idle() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let pool = pool(1024, Duration::from_secs(60)).with_events(tx);
    let bundle = Bundle::of("fn-misbehave");
    let f = spec("ev", &bundle, Duration::from_secs(3));
    let key = ("ev".to_owned(), f.revision);
    pool.invoke(&f, "r1", b"{}".to_vec()).await.expect("invoke");
    let Some(PoolEvent::Idle { function, sandbox }) = rx.recv().await else {
        panic!("the booted sandbox is announced idle")
    };
    assert_eq!(function, key);

    // Taken as the claimed sandbox: it was already out of the index, so only its return shows.
    let request = sluice_core::invoke::InvokeRequest {
        function: "ev".into(),
        request_id: "r2".into(),
        payload: b"{}".to_vec(),
        trace_id: String::new(),
    };
    pool.invoke_preferring(&f, Some(sandbox), request)
        .await
        .expect("invoke");
    assert_eq!(
        rx.recv().await,
        Some(PoolEvent::Idle {
            function: key.clone(),
            sandbox
        })
    );

    // Taken without a claim: withdrawn first, offered again after.
    pool.invoke(&f, "r3", b"{}".to_vec()).await.expect("invoke");
    assert_eq!(
        rx.recv().await,
        Some(PoolEvent::Gone {
            function: key.clone(),
            sandbox
        })
    );
    assert_eq!(
        rx.recv().await,
        Some(PoolEvent::Idle {
            function: key.clone(),
            sandbox
        })
    );

    // A crash takes it away for good.
    pool.invoke(&f, "r4", br#"{"action":"exit"}"#.to_vec())
        .await
        .expect("invoke");
    assert_eq!(
        rx.recv().await,
        Some(PoolEvent::Gone {
            function: key.clone(),
            sandbox
        })
    );
    assert!(rx.try_recv().is_err(), "no Idle for a dead sandbox");
    pool.shutdown().await;
}
