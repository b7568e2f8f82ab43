//! The durable producer replaces an instance that failed fatally, on the real broker.
//!
//! A real fatal error: a private tansu loses acknowledged records (its sqlite data put back to an
//! earlier copy, as an unclean leader election would), so the idempotent producer's next sequence
//! number is out of order for the broker and librdkafka fails the instance for good
//! (`OUT_OF_ORDER_SEQUENCE_NUMBER`, then `_FATAL` on every later send). The first test checks that
//! sends go through again on a rebuilt instance; the second drives the rebuild by hand and checks
//! that senders that met the same failure rebuild once.

use std::time::Duration;

use rdkafka::producer::{FutureRecord, Producer};
use sluice_core::kafka::KafkaSettings;
use sluice_core::producer::DurableProducer;
use sluice_tests::broker::Broker;
use sluice_tests::kafka::{bootstrap, create_topic, create_topic_at, read_until, unique_name};

#[tokio::test]
async fn a_rebuilt_producer_keeps_delivering_and_rebuilds_once_per_failure() {
    let topic = unique_name("durable");
    create_topic(&topic, 1).await.expect("topic");
    let kafka = KafkaSettings::new(bootstrap());
    let p = DurableProducer::new(kafka.durable_producer_config(), "test").expect("producer");
    let send = |i: u32| {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            let v = format!("{i}");
            p.send(
                FutureRecord::<str, str>::to(&topic).payload(&v),
                Duration::from_secs(10),
            )
            .await
            .map(|d| d.offset)
            .map_err(|(e, _)| e)
        }
    };
    assert_eq!(send(0).await.expect("first"), 0);
    let before = p.generation();
    // Two senders met the same fatal error: one rebuild.
    p.rebuild(before, "test: fatal");
    p.rebuild(before, "test: fatal");
    assert_eq!(p.generation(), before + 1);
    for i in 1..5 {
        assert_eq!(send(i).await.expect("after the rebuild"), i64::from(i));
    }
    let got = read_until(&topic, Duration::from_secs(10), |r| r.len() >= 5).await;
    let values: Vec<String> = got
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(values, ["0", "1", "2", "3", "4"]);
}

/// Copies the broker's sqlite files from `from` to `to` (the broker is not running).
fn copy_data(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("backup directory");
    for entry in std::fs::read_dir(from).expect("broker directory") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("tansu.db") {
            std::fs::copy(entry.path(), to.join(&name)).expect("copy broker data");
        }
    }
}

#[tokio::test]
async fn a_producer_that_failed_fatally_is_rebuilt_and_later_sends_go_through() {
    let mut broker = Broker::start();
    let topic = unique_name("fatal");
    create_topic_at(&broker.bootstrap(), &topic, 1)
        .await
        .expect("topic");
    let kafka = KafkaSettings::new(broker.bootstrap());
    let mut config = kafka.durable_producer_config();
    config.set("message.timeout.ms", "10000");
    let p = DurableProducer::new(config, "test").expect("producer");
    let send = |i: u32| {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            let v = format!("{i}");
            p.send(
                FutureRecord::<str, str>::to(&topic).payload(&v),
                Duration::from_secs(5),
            )
            .await
            .map(|d| d.offset)
            .map_err(|(e, _)| e)
        }
    };
    send(0).await.expect("a send before the fault");
    assert_eq!(p.generation(), 0);
    let first = p.producer();

    // The broker loses acknowledged records, as an unclean leader election does: its data goes
    // back to a copy taken after the first record, while the producer has sent five more. The
    // next sequence number it sends is then out of order for the broker: librdkafka can no
    // longer reason about its messages and fails the instance for good.
    let backup = broker.dir().join("backup");
    broker.kill();
    copy_data(broker.dir(), &backup);
    broker.restart();
    for i in 1..6 {
        send(i).await.expect("a send before the data loss");
    }
    broker.kill();
    copy_data(&backup, broker.dir());
    broker.restart();

    let mut results = Vec::new();
    for i in 6..16 {
        let r = send(i).await;
        let ok = r.is_ok();
        results.push(r.map_err(|e| e.to_string()));
        if ok {
            break;
        }
    }
    let fatal = first.client().fatal_error();
    assert!(
        fatal.is_some(),
        "the data loss did not make the first instance fail fatally; sends: {results:?}"
    );
    assert!(
        results.last().is_some_and(Result::is_ok),
        "no send went through after the fatal error ({fatal:?}): {results:?}"
    );
    assert!(
        p.generation() >= 1,
        "the producer was not rebuilt (generation {}): {results:?}",
        p.generation()
    );
    assert!(
        p.producer().client().fatal_error().is_none(),
        "the current instance is healthy"
    );
}
