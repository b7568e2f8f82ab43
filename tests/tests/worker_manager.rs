//! The worker registry and the worker manager's idle-sandbox index against a real
//! `redis-server`: exclusive claims under contention, dropping a worker that stops
//! heartbeating (and its sandboxes), clean deregistration, and re-registration after FLUSHALL.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sluice_fleet::registry::{WorkerInfo, WorkerRegistry};
use sluice_fleet::worker_manager::{Claim, IdleIndex};
use sluice_tests::redis::RedisServer;

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        addr: "127.0.0.1:1".into(),
        backend: "jail".into(),
        budget_mb: 1024,
        used_mb: 0,
        reclaimable_mb: 0,
        busy: 0,
        idle: 0,
        provisioned: BTreeMap::new(),
        heartbeat_ms: sluice_core::time::unix_ms(),
    }
}

async fn parts(server: &RedisServer, ttl: Duration) -> (WorkerRegistry, IdleIndex) {
    let prefix = format!("t-{}:", uuid::Uuid::new_v4());
    let registry = WorkerRegistry::new(server.connect().await, prefix.clone(), ttl);
    let index = IdleIndex::new(server.connect().await, prefix, registry.worker_key_prefix());
    (registry, index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_callers_claim_twenty_idle_sandboxes_each_exactly_once() {
    let server = RedisServer::start();
    let (registry, index) = parts(&server, Duration::from_secs(10)).await;
    registry.heartbeat(&info("w1")).await.expect("heartbeat");
    let key = ("f".to_owned(), 3);
    let idle: Vec<_> = (0..20).map(|sb| (key.clone(), sb)).collect();
    index.announce_many("w1", &idle).await.expect("announce");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let index = index.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move { index.claim(&key).await }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        if let Some(c) = t.await.expect("join").expect("claim") {
            claimed.push(c.sandbox);
        }
    }
    let distinct: HashSet<u64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 20, "each idle sandbox is handed out once");
    assert_eq!(distinct.len(), 20);
    // Another revision of the function has its own sandboxes.
    assert_eq!(
        index.claim(&("f".to_owned(), 4)).await.expect("claim"),
        None
    );
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_is_dropped_with_its_sandboxes() {
    let server = RedisServer::start();
    let (registry, index) = parts(&server, Duration::from_millis(600)).await;
    let key = ("f".to_owned(), 1);
    registry.heartbeat(&info("dies")).await.expect("heartbeat");
    registry.heartbeat(&info("lives")).await.expect("heartbeat");
    index.announce("dies", &key, 1).await.expect("announce");
    index.announce("dies", &key, 2).await.expect("announce");
    assert_eq!(registry.list().await.expect("list").len(), 2);

    // Only "lives" keeps heartbeating.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        registry.heartbeat(&info("lives")).await.expect("heartbeat");
    }
    let ids: Vec<String> = registry
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(ids, ["lives"]);
    assert_eq!(
        index.claim(&key).await.expect("claim"),
        None,
        "a dead worker's sandboxes are not offered"
    );
    index.announce("lives", &key, 9).await.expect("announce");
    assert_eq!(
        index.claim(&key).await.expect("claim"),
        Some(Claim {
            worker: "lives".into(),
            sandbox: 9
        })
    );
}

#[tokio::test]
async fn withdrawn_sandboxes_and_deregistered_workers_go_at_once() {
    let server = RedisServer::start();
    let (registry, index) = parts(&server, Duration::from_secs(10)).await;
    let key = ("f".to_owned(), 1);
    registry.heartbeat(&info("w")).await.expect("heartbeat");
    index.announce("w", &key, 1).await.expect("announce");
    index.withdraw("w", &key, 1).await.expect("withdraw");
    assert_eq!(index.claim(&key).await.expect("claim"), None);

    index.announce("w", &key, 2).await.expect("announce");
    registry.deregister("w").await.expect("deregister");
    assert!(registry.list().await.expect("list").is_empty());
    assert_eq!(index.claim(&key).await.expect("claim"), None);
}

#[tokio::test]
async fn a_flushed_registry_fills_again_at_the_next_heartbeat() {
    let server = RedisServer::start();
    let (registry, _) = parts(&server, Duration::from_secs(10)).await;
    let mut w = info("w");
    w.used_mb = 256;
    w.provisioned.insert(WorkerInfo::provisioned_key("f", 2), 3);
    registry.heartbeat(&w).await.expect("heartbeat");
    let mut conn = server.connect().await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flush");
    assert!(registry.list().await.expect("list").is_empty());
    registry.heartbeat(&w).await.expect("heartbeat");
    let listed = registry.list().await.expect("list");
    assert_eq!(listed, vec![w.clone()]);
    assert_eq!(listed[0].free_mb(), 768);
    assert_eq!(listed[0].provisioned["f@2"], 3);
}
