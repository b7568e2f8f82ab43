//! The configuration store on the real broker (and real Redis for write locks).

use std::sync::Arc;
use std::time::Duration;

use sluice_core::kafka::KafkaSettings;
use sluice_core::model::FunctionConfig;
use sluice_core::store::{
    ConfigObject, ConfigStore, ConfigStoreConfig, Expected, ObjectKey, StoreError,
};
use sluice_tests::kafka::{bootstrap, unique_name};
use sluice_tests::redis::RedisServer;
use tokio_util::sync::CancellationToken;

fn function(name: &str, memory: i64) -> ConfigObject {
    ConfigObject::Function(FunctionConfig {
        memory_size: memory,
        ..FunctionConfig::from_path(name, "/srv/fn")
    })
}

fn memory_of(store: &ConfigStore, name: &str) -> Option<i64> {
    store.function(name).map(|f| f.object.memory_size)
}

async fn open(topic: &str, node: &str, redis: Option<&RedisServer>, prefix: &str) -> ConfigStore {
    let mut cfg = ConfigStoreConfig::new(node);
    cfg.topic = topic.to_owned();
    cfg.redis_prefix = prefix.to_owned();
    let conn = match redis {
        Some(r) => Some(
            redis::aio::ConnectionManager::new(redis::Client::open(r.url()).expect("url"))
                .await
                .expect("redis"),
        ),
        None => None,
    };
    ConfigStore::open(
        &KafkaSettings::new(bootstrap()),
        cfg,
        conn,
        CancellationToken::new(),
    )
    .await
    .expect("open store")
}

#[tokio::test]
async fn a_write_is_visible_to_its_writer_when_it_returns() {
    let redis = RedisServer::start();
    let topic = unique_name("cfg");
    let store = open(&topic, "a", Some(&redis), "t1:").await;
    let key = ObjectKey::function("echo");
    let rev = store
        .write(&key, Some(function("echo", 256)), Expected::Absent)
        .await
        .expect("create");
    assert_eq!(rev, 1);
    // No waiting: the write returned only after this node's view applied it.
    assert_eq!(memory_of(&store, "echo"), Some(256));
    assert_eq!(store.function("echo").map(|f| f.revision), Some(1));

    let err = store
        .write(&key, Some(function("echo", 512)), Expected::Absent)
        .await
        .expect_err("exists");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    let err = store
        .write(&key, Some(function("echo", 512)), Expected::Revision(7))
        .await
        .expect_err("stale");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 7,
                actual: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store
            .write(&key, Some(function("echo", 512)), Expected::Revision(1))
            .await
            .expect("update"),
        2
    );
    assert_eq!(memory_of(&store, "echo"), Some(512));
}

#[tokio::test]
async fn a_node_that_starts_later_sees_everything_written_before() {
    let redis = RedisServer::start();
    let topic = unique_name("cfg");
    let first = open(&topic, "a", Some(&redis), "t2:").await;
    for i in 0..20 {
        let name = format!("fn-{i}");
        first
            .write(
                &ObjectKey::function(&name),
                Some(function(&name, 128 + i)),
                Expected::Absent,
            )
            .await
            .expect("create");
    }
    first
        .write(&ObjectKey::function("fn-3"), None, Expected::Exists)
        .await
        .expect("delete");
    first
        .write(
            &ObjectKey::function("fn-4"),
            Some(function("fn-4", 1024)),
            Expected::Exists,
        )
        .await
        .expect("update");

    let late = open(&topic, "b", Some(&redis), "t2:").await;
    let names: Vec<String> = late
        .functions()
        .into_iter()
        .map(|f| f.object.function_name)
        .collect();
    assert_eq!(names.len(), 19, "{names:?}");
    assert!(!names.contains(&"fn-3".to_owned()));
    assert_eq!(memory_of(&late, "fn-4"), Some(1024));
    assert_eq!(late.function("fn-4").map(|f| f.revision), Some(2));
    // A deleted object keeps its revision count, so a re-create continues it on every node.
    let rev = late
        .write(
            &ObjectKey::function("fn-3"),
            Some(function("fn-3", 128)),
            Expected::Absent,
        )
        .await
        .expect("re-create");
    assert_eq!(rev, 3);
    first.catch_up().await.expect("catch up");
    assert_eq!(first.function("fn-3").map(|f| f.revision), Some(3));
}

/// Many writers on two nodes update one object at once. Whatever interleaving happens, every
/// write either succeeds (and is then part of the history) or is told it conflicted: the count of
/// successes equals the revisions gained, and both nodes end with the same state.
async fn concurrent_updates_are_never_silently_lost(redis: Option<&RedisServer>, prefix: &str) {
    let topic = unique_name("cfg");
    let a = open(&topic, "a", redis, prefix).await;
    let b = open(&topic, "b", redis, prefix).await;
    let key = ObjectKey::function("hot");
    a.write(&key, Some(function("hot", 128)), Expected::Absent)
        .await
        .expect("create");
    b.catch_up().await.expect("catch up");

    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let barrier = Arc::clone(&barrier);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            // Read-modify-write on the revision this writer saw.
            let seen = store.function("hot").map_or(0, |f| f.revision);
            let result = store
                .write(
                    &key,
                    Some(function("hot", 200 + i)),
                    Expected::Revision(seen),
                )
                .await;
            (i, result)
        }));
    }
    let mut ok = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.expect("task") {
            (i, Ok(rev)) => ok.push((rev, 200 + i)),
            (_, Err(StoreError::Conflict { .. })) => conflicts += 1,
            (_, Err(e)) => panic!("unexpected error {e}"),
        }
    }
    a.catch_up().await.expect("catch up");
    b.catch_up().await.expect("catch up");
    eprintln!(
        "{} writes applied, {conflicts} refused as conflicts ({} of them refused by the log)",
        ok.len(),
        a.read(sluice_core::store::View::conflicts)
    );
    let final_a = a.function("hot").expect("present");
    let final_b = b.function("hot").expect("present");
    assert_eq!(final_a, final_b, "nodes disagree");
    assert_eq!(
        ok.len() as u64,
        final_a.revision - 1,
        "successes {ok:?}, conflicts {conflicts}"
    );
    assert_eq!(ok.len() + conflicts, 16);
    assert!(!ok.is_empty());
    // The last successful write is what both nodes hold.
    let (last_rev, last_memory) = ok.iter().max().copied().expect("one success");
    assert_eq!(final_a.revision, last_rev);
    assert_eq!(final_a.object.memory_size, last_memory);
    // Distinct revisions: no two successes claim the same slot in the history.
    let mut revs: Vec<u64> = ok.iter().map(|(r, _)| *r).collect();
    revs.dedup();
    assert_eq!(revs.len(), ok.len());
}

#[tokio::test]
async fn concurrent_updates_with_redis_locks() {
    let redis = RedisServer::start();
    concurrent_updates_are_never_silently_lost(Some(&redis), "t3:").await;
}

#[tokio::test]
async fn concurrent_updates_decided_by_the_log_alone() {
    // Without Redis the writers race to the topic; the log order decides and losers are told.
    concurrent_updates_are_never_silently_lost(None, "t4:").await;
}

#[tokio::test]
async fn a_write_held_by_a_crashed_writers_lock_waits_for_the_lock_ttl() {
    let redis = RedisServer::start();
    let topic = unique_name("cfg");
    let store = open(&topic, "a", Some(&redis), "t5:").await;
    let key = ObjectKey::function("locked");
    // A writer that died holding the lock: the key expires after its TTL (10 s by default, here 1 s).
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let _: () = redis::cmd("SET")
        .arg(format!("t5:config-lock:{key}"))
        .arg("dead")
        .arg("PX")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .expect("set");
    let started = std::time::Instant::now();
    store
        .write(&key, Some(function("locked", 128)), Expected::Absent)
        .await
        .expect("write after TTL");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "write did not wait for the lock"
    );
}

/// A racing writer whose record reaches the log after another write to the same base revision
/// (what the Redis lock normally prevents) is refused by every node, including nodes that start
/// later, and the winner's state stays.
#[tokio::test]
async fn a_record_based_on_a_stale_revision_is_refused_by_every_node() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use sluice_core::store::ConfigRecord;

    let topic = unique_name("cfg");
    let a = open(&topic, "a", None, "t6:").await;
    let key = ObjectKey::function("raced");
    a.write(&key, Some(function("raced", 128)), Expected::Absent)
        .await
        .expect("create");
    a.write(&key, Some(function("raced", 256)), Expected::Revision(1))
        .await
        .expect("update");

    // The loser of a race: based on revision 1, arriving after revision 2.
    let stale = ConfigRecord {
        revision: 2,
        base_revision: 1,
        write_id: uuid::Uuid::new_v4(),
        writer: "racer".into(),
        written_at_ms: 0,
        object: Some(function("raced", 4096)),
    };
    let producer: FutureProducer = KafkaSettings::new(bootstrap())
        .durable_producer_config()
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&key.to_string())
                .payload(&serde_json::to_vec(&stale).expect("json")),
            Duration::from_secs(10),
        )
        .await
        .expect("delivered");

    a.catch_up().await.expect("catch up");
    let late = open(&topic, "late", None, "t6:").await;
    for store in [&a, &late] {
        assert_eq!(memory_of(store, "raced"), Some(256));
        assert_eq!(store.function("raced").map(|f| f.revision), Some(2));
        assert_eq!(store.read(sluice_core::store::View::conflicts), 1);
    }
}
