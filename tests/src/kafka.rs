//! The Kafka-compatible broker for integration tests.
//!
//! `scripts/test.sh` starts tansu (durable `sqlite://` storage) on a free loopback port and exports
//! its address as `SLUICE_TEST_KAFKA`. Each test makes its own topic names with [`unique_name`].

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// The bootstrap address of the test broker.
///
/// # Panics
/// When `SLUICE_TEST_KAFKA` is not set: the tests need the real broker, so they fail (never skip)
/// and say how to get one.
#[must_use]
pub fn bootstrap() -> String {
    match std::env::var("SLUICE_TEST_KAFKA") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "SLUICE_TEST_KAFKA is not set: these tests run against a real Kafka-compatible broker. \
             Run them through `scripts/test.sh` (it installs and starts tansu and Redis), or start a \
             broker yourself and export SLUICE_TEST_KAFKA=host:port"
        ),
    }
}

/// A name no other test (or earlier run) uses: `prefix-<uuid>`.
#[must_use]
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a topic on the test broker.
///
/// # Errors
/// When the broker refuses the topic.
pub async fn create_topic(name: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_at(&bootstrap(), name, partitions).await
}

/// Creates a topic on the broker at `bootstrap` (e.g. a private [`crate::broker::Broker`]).
///
/// # Errors
/// When the broker refuses the topic.
pub async fn create_topic_at(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &opts).await? {
        if let Err((topic, code)) = result {
            anyhow::bail!("create topic {topic}: {code}");
        }
    }
    Ok(())
}

/// Reads every record of `topic` (all partitions, from the beginning) until `done` says enough
/// or `timeout` passes; returns `(key, value)` pairs.
///
/// # Panics
/// When the consumer cannot be created.
pub async fn read_until(
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[(String, Vec<u8>)]) -> bool + Send + 'static,
) -> Vec<(String, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        let mut assigned = false;
        while std::time::Instant::now() < deadline {
            if !assigned {
                let parts = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|md| {
                        md.topics()
                            .first()
                            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                    })
                    .unwrap_or_default();
                if parts.is_empty() {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                let mut tpl = TopicPartitionList::new();
                for p in parts {
                    tpl.add_partition_offset(&topic, p, Offset::Beginning)
                        .expect("assign");
                }
                consumer.assign(&tpl).expect("assign");
                assigned = true;
            }
            if done(&out) {
                break;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                out.push((key, m.payload().unwrap_or_default().to_vec()));
            }
        }
        out
    })
    .await
    .expect("reader task")
}
