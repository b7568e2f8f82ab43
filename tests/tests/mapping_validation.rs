//! Mappings cannot corrupt each other or read Sluice's own topics, and what the API accepts the
//! pollers can run: checked against a real node on the real broker and Redis.

use serde_json::{json, Value};
use sluice_tests::functions::Bundle;
use sluice_tests::kafka::{bootstrap, create_topic, unique_name};
use sluice_tests::node::Node;
use sluice_tests::redis::RedisServer;

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn mapping(topic: &str, extra: &Value) -> Value {
    let mut m = json!({ "FunctionName": "f", "Topics": [topic], "StartingPosition": "TRIM_HORIZON",
        "SelfManagedEventSource": { "Endpoints": { "KAFKA_BOOTSTRAP_SERVERS": [bootstrap()] } } });
    for (k, v) in extra.as_object().expect("object") {
        m[k] = v.clone();
    }
    m
}

/// A node with function `f`; its Redis, the bundle and the topic prefix.
struct Setup {
    node: Node,
    prefix: String,
    http: reqwest::Client,
    _redis: RedisServer,
    _bundle: Bundle,
}

async fn setup(name: &str) -> Setup {
    let redis = RedisServer::start();
    let prefix = unique_name(name).replace('-', "");
    let node = Node::start(&bootstrap(), &redis.url(), &prefix, &[]);
    let bundle = Bundle::of("fn-echo");
    let http = reqwest::Client::new();
    let (status, body) = post(
        &http,
        &format!("{}/2015-03-31/functions", node.endpoint),
        &json!({ "FunctionName": "f", "Code": { "Path": bundle.path() } }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    Setup {
        node,
        prefix,
        http,
        _redis: redis,
        _bundle: bundle,
    }
}

#[tokio::test]
async fn consumer_groups_are_unique_and_sluices_own_topics_and_groups_cannot_be_mapped() {
    let s = setup("mv").await;
    let (node, prefix, http) = (&s.node, &s.prefix, &s.http);
    let url = format!("{}/2015-03-31/event-source-mappings/", node.endpoint);
    let (t1, t2) = (unique_name("mv-a"), unique_name("mv-b"));
    create_topic(&t1, 1).await.expect("topic");
    create_topic(&t2, 1).await.expect("topic");
    let group = unique_name("shared-group");
    let g = json!({ "SelfManagedKafkaEventSourceConfig": { "ConsumerGroupId": group } });

    let (status, first) = post(http, &url, &mapping(&t1, &g)).await;
    assert_eq!(status, 202, "{first}");
    let first_uuid = first["UUID"].as_str().expect("uuid").to_owned();
    // Same group, other topic: its commits would overwrite the first mapping's.
    let (status, body) = post(http, &url, &mapping(&t2, &g)).await;
    assert_eq!(
        status, 400,
        "a second mapping on group {group} was accepted: {body}"
    );
    assert_eq!(body["Type"], "User", "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("ConsumerGroupId") && msg.contains(&first_uuid),
        "{msg}"
    );

    // A mapping without a ConsumerGroupId gets its UUID as group; nobody may take that one.
    let (status, second) = post(http, &url, &mapping(&t2, &json!({}))).await;
    assert_eq!(status, 202, "{second}");
    let second_uuid = second["UUID"].as_str().expect("uuid").to_owned();
    let (status, body) = post(
        http,
        &url,
        &mapping(
            &t1,
            &json!({ "SelfManagedKafkaEventSourceConfig": { "ConsumerGroupId": second_uuid } }),
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Sluice's own topics: the async queue holds every function's events.
    for own in [format!("{prefix}.async"), format!("{prefix}.config")] {
        let (status, body) = post(http, &url, &mapping(&own, &json!({}))).await;
        assert_eq!(status, 400, "mapping on {own} accepted: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Sluice's own topics"),
            "{body}"
        );
    }
    // …and its own consumer groups.
    let (status, body) = post(
        http,
        &url,
        &mapping(
            &t1,
            &json!({ "SelfManagedKafkaEventSourceConfig": { "ConsumerGroupId": format!("{prefix}.async-pollers") } }),
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn filter_patterns_are_checked_by_the_pollers_compiler_at_create_and_update() {
    let s = setup("mvf").await;
    let (node, http) = (&s.node, &s.http);
    let url = format!("{}/2015-03-31/event-source-mappings/", node.endpoint);
    let topic = unique_name("mvf");
    create_topic(&topic, 1).await.expect("topic");
    // A JSON object on `value`, so the old shape check passed it; the leaf is not a list of
    // conditions, so the poller's compiler refuses it.
    let bad = json!({ "FilterCriteria": { "Filters": [ { "Pattern": r#"{"value":{"kind":"order"}}"# } ] } });
    let (status, body) = post(http, &url, &mapping(&topic, &bad)).await;
    assert_eq!(status, 400, "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains("FilterCriteria.Filters[0].Pattern"), "{msg}");

    let (status, m) = post(http, &url, &mapping(&topic, &json!({}))).await;
    assert_eq!(status, 202, "{m}");
    let uuid = m["UUID"].as_str().expect("uuid");
    let r = http
        .put(format!("{url}{uuid}"))
        .json(&bad)
        .send()
        .await
        .expect("update");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 400, "{body}");
    let good = json!({ "FilterCriteria": { "Filters": [ { "Pattern": r#"{"value":{"kind":["order"]}}"# } ] } });
    let r = http
        .put(format!("{url}{uuid}"))
        .json(&good)
        .send()
        .await
        .expect("update");
    assert_eq!(r.status().as_u16(), 202);
}

#[tokio::test]
async fn racing_creates_with_one_consumer_group_on_two_nodes_accept_exactly_one() {
    let s = setup("mvr").await;
    // A second node on the same cluster, Redis and prefix: the race crosses nodes.
    let other = Node::start(
        &bootstrap(),
        &s._redis.url(),
        &s.prefix,
        &["--node-id", &format!("{}-second", s.prefix)],
    );
    let topic = unique_name("mvr");
    create_topic(&topic, 1).await.expect("topic");
    for round in 0..3 {
        let group = unique_name(&format!("race{round}"));
        let g = json!({ "SelfManagedKafkaEventSourceConfig": { "ConsumerGroupId": group } });
        let body = mapping(&topic, &g);
        let urls: Vec<String> = (0..8)
            .map(|i| {
                let n = if i % 2 == 0 { &s.node } else { &other };
                format!("{}/2015-03-31/event-source-mappings/", n.endpoint)
            })
            .collect();
        let results = futures::future::join_all(urls.iter().map(|u| post(&s.http, u, &body))).await;
        let accepted = results.iter().filter(|(st, _)| *st == 202).count();
        let refused = results.iter().filter(|(st, _)| *st == 400).count();
        let statuses: Vec<u16> = results.iter().map(|(st, _)| *st).collect();
        assert_eq!(
            (accepted, refused),
            (1, 7),
            "round {round}: statuses of 8 racing creates on group {group}: {statuses:?}"
        );
    }
}
