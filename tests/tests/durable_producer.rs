//! The durable producer replaces an instance that failed fatally, on the real broker.
//!
//! librdkafka cannot be made to fail fatally on demand (no test hook in rdkafka, and tansu gave
//! no fatal error for oversized records, a missing topic with `enable.gapless.guarantee`, or a
//! broker restart under an idempotent producer), so the test drives the rebuild that a fatal
//! error triggers and checks what it must guarantee: later sends go through a new instance, and
//! senders that met the same failure rebuild once.

use std::time::Duration;

use rdkafka::producer::FutureRecord;
use sluice_core::kafka::KafkaSettings;
use sluice_core::producer::DurableProducer;
use sluice_tests::kafka::{bootstrap, create_topic, read_until, unique_name};

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
