//! Kafka client settings shared by every stage, and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// How a node reaches its Kafka cluster.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (security, timeouts), applied to every client.
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Settings for a cluster with no extra properties.
    #[must_use]
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            properties: Vec::new(),
        }
    }

    /// A librdkafka config with the bootstrap servers and the extra properties.
    #[must_use]
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set("client.id", "sluice");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A config for producers of records that must not be lost: idempotent, `acks=all`.
    #[must_use]
    pub fn durable_producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000");
        c
    }
}

/// A topic Sluice creates when it is missing.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Its partition count.
    pub partitions: i32,
    /// Topic configuration, e.g. `cleanup.policy=compact`.
    pub config: Vec<(&'static str, String)>,
}

/// Creates `spec` unless it exists already.
///
/// # Errors
/// When the admin client cannot be created or the broker refuses the topic for any reason other
/// than that it exists.
pub async fn ensure_topic(settings: &KafkaSettings, spec: &TopicSpec) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(-1));
    for (k, v) in &spec.config {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics([&topic], &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}
