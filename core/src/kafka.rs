//! Kafka client settings shared by every stage, topic administration, and the one place where a
//! Kafka error is classified as retryable or permanent ([`is_retryable`]).
//!
//! Sizes: every producer Sluice makes and every topic it creates allow records of up to
//! [`MAX_RECORD_BYTES`], the largest a destination record can be (a 6 MiB response, a 1 MiB
//! request, the envelope). librdkafka's own default (1,000,000 bytes) is below Lambda's 1 MiB
//! async payload.
//!
//! Topic configuration: [`ensure_topic`] creates a missing topic with its spec, and corrects an
//! existing one whose configuration differs from the spec (IncrementalAlterConfigs), so that a
//! topic created by an older node, or by hand, gets e.g. the code topic's infinite retention.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest record Sluice writes or accepts on its topics: a destination record holds up to a
/// 6 MiB response and a 1 MiB request plus the envelope and JSON escaping. A record that still
/// does not fit (a broker with a lower limit) is truncated by the destination writer.
pub const MAX_RECORD_BYTES: usize = 8 * 1024 * 1024;

/// `message.max.bytes` for producers and `max.message.bytes` for topics: [`MAX_RECORD_BYTES`]
/// plus the protocol's own framing (headers, batch header).
const MAX_MESSAGE_BYTES: usize = MAX_RECORD_BYTES + 64 * 1024;

/// Whether a later try of the operation that failed with `e` can succeed. The one classification
/// of Kafka errors in Sluice (as Vector's Kafka sink has one): permanent are the errors about the
/// record itself (too large, invalid), about who we are (authentication, authorization), and
/// about what we asked for (invalid topic or configuration, unsupported request); everything
/// else (timeouts, transport, a full queue, leader changes, a topic not yet known) is retryable.
#[must_use]
pub fn is_retryable(e: &KafkaError) -> bool {
    match e {
        KafkaError::ClientConfig(..) | KafkaError::Nul(_) => false,
        _ => e.rdkafka_error_code().is_none_or(is_retryable_code),
    }
}

/// [`is_retryable`] for a bare librdkafka or broker error code.
#[must_use]
pub fn is_retryable_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    !matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::InvalidRequiredAcks
            | C::InvalidConfig
            | C::InvalidArgument
            | C::PolicyViolation
            | C::UnsupportedVersion
            | C::UnsupportedForMessageFormat
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::DelegationTokenAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
    )
}

/// Whether `e` says the record is larger than the producer or the broker allows.
#[must_use]
pub fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

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
        self.apply_properties(&mut c);
        c
    }

    fn apply_properties(&self, c: &mut ClientConfig) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
    }

    /// A config for producers of records that must not be lost: idempotent, `acks=all`, records
    /// up to [`MAX_RECORD_BYTES`]. The extra properties still win (a cluster with a lower limit
    /// sets `message.max.bytes` to match it).
    #[must_use]
    pub fn durable_producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string());
        self.apply_properties(&mut c);
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

/// Creates `spec` unless it exists already; an existing topic whose configuration differs from
/// the spec is corrected (see [`correct_topic_config`]; a failure to correct is logged, not
/// returned, since the topic is usable). Every topic gets `max.message.bytes` for
/// [`MAX_RECORD_BYTES`] unless the spec sets it.
///
/// # Errors
/// When the admin client cannot be created or the broker refuses the topic for any reason other
/// than that it exists.
pub async fn ensure_topic(settings: &KafkaSettings, spec: &TopicSpec) -> Result<(), KafkaError> {
    if !create_topic_if_missing(settings, spec).await? {
        if let Err(e) = correct_topic_config(settings, spec).await {
            tracing::error!(topic = %spec.name, error = %e, wanted = ?wanted_config(spec),
                "the topic's configuration differs from what Sluice needs and could not be corrected; set it by hand");
        }
    }
    Ok(())
}

/// Creates `spec` (with `max.message.bytes` for [`MAX_RECORD_BYTES`] unless the spec sets it)
/// unless it exists; returns whether it created it. An existing topic is left as it is.
///
/// # Errors
/// When the admin client cannot be created or the broker refuses the topic for any reason other
/// than that it exists.
pub async fn create_topic_if_missing(
    settings: &KafkaSettings,
    spec: &TopicSpec,
) -> Result<bool, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let wanted = wanted_config(spec);
    let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(-1));
    for (k, v) in &wanted {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let mut created = false;
    for result in admin.create_topics([&topic], &opts).await? {
        match result {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(created)
}

fn wanted_config(spec: &TopicSpec) -> Vec<(&'static str, String)> {
    let mut wanted = spec.config.clone();
    if !wanted.iter().any(|(k, _)| *k == "max.message.bytes") {
        wanted.push(("max.message.bytes", MAX_MESSAGE_BYTES.to_string()));
    }
    wanted
}

/// Sets every entry of `spec`'s configuration (and `max.message.bytes`) that the existing topic
/// does not have yet; entries the spec does not name are left alone. Returns the names of the
/// entries it changed.
///
/// # Errors
/// When the configuration cannot be read, or the broker refuses the change.
pub async fn correct_topic_config(
    settings: &KafkaSettings,
    spec: &TopicSpec,
) -> Result<Vec<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    correct_with(settings, &admin, &spec.name, &wanted_config(spec)).await
}

/// The topic's configuration as the broker describes it: `(name, value)` for every entry.
///
/// # Errors
/// When the broker cannot be asked or refuses.
pub async fn topic_config(
    settings: &KafkaSettings,
    topic: &str,
) -> Result<Vec<(String, Option<String>)>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    describe(&admin, topic).await
}

async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Vec<(String, Option<String>)>, KafkaError> {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    let resource = described
        .into_iter()
        .next()
        .ok_or(KafkaError::AdminOp(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ))?
        .map_err(KafkaError::AdminOp)?;
    Ok(resource
        .entries
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect())
}

async fn correct_with(
    settings: &KafkaSettings,
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    wanted: &[(&'static str, String)],
) -> Result<Vec<String>, KafkaError> {
    let current = describe(admin, topic).await?;
    let differs: Vec<(&str, &str)> = wanted
        .iter()
        .filter(|(k, v)| {
            !current
                .iter()
                .any(|(ck, cv)| ck == k && cv.as_deref() == Some(v.as_str()))
        })
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    if differs.is_empty() {
        return Ok(Vec::new());
    }
    incremental_alter_topic(settings, topic, &differs)
        .await
        .map_err(KafkaError::AdminOpCreation)?;
    tracing::info!(topic, changed = ?differs, "corrected the topic's configuration");
    Ok(differs.into_iter().map(|(k, _)| k.to_owned()).collect())
}

/// IncrementalAlterConfigs (API key 44, v0) setting `set` on `topic`, sent to the first bootstrap
/// server that answers. rdkafka 0.39 offers only the legacy AlterConfigs, which replaces a
/// topic's whole configuration (and which tansu does not serve), and the FFI call is `unsafe`,
/// which this crate forbids; the request is small enough to write here. Plaintext only: on a
/// cluster with TLS or SASL the caller logs what to set by hand.
async fn incremental_alter_topic(
    settings: &KafkaSettings,
    topic: &str,
    set: &[(&str, &str)],
) -> Result<(), String> {
    if let Some((_, p)) = settings
        .properties
        .iter()
        .find(|(k, v)| k == "security.protocol" && !v.eq_ignore_ascii_case("plaintext"))
    {
        return Err(format!(
            "security.protocol={p}: topic configuration is corrected over plaintext only"
        ));
    }
    let request = alter_request(topic, set)?;
    let mut last = String::from("no bootstrap server");
    for server in settings.bootstrap_servers.split(',').map(str::trim) {
        match tokio::time::timeout(Duration::from_secs(15), exchange(server, &request)).await {
            Ok(Ok(response)) => return parse_alter_response(&response),
            Ok(Err(e)) => last = format!("{server}: {e}"),
            Err(_) => last = format!("{server}: no answer within 15 s"),
        }
    }
    Err(last)
}

fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<(), String> {
    let len = i16::try_from(s.len()).map_err(|_| format!("{s:?} is too long"))?;
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

fn alter_request(topic: &str, set: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    const API_KEY: i16 = 44;
    const RESOURCE_TOPIC: i8 = 2;
    const OP_SET: i8 = 0;
    let mut b = Vec::new();
    b.extend_from_slice(&API_KEY.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes()); // version 0
    b.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    put_str(&mut b, "sluice")?;
    b.extend_from_slice(&1i32.to_be_bytes()); // one resource
    b.extend_from_slice(&RESOURCE_TOPIC.to_be_bytes());
    put_str(&mut b, topic)?;
    let n = i32::try_from(set.len()).map_err(|_| "too many entries".to_owned())?;
    b.extend_from_slice(&n.to_be_bytes());
    for (k, v) in set {
        put_str(&mut b, k)?;
        b.extend_from_slice(&OP_SET.to_be_bytes());
        put_str(&mut b, v)?;
    }
    b.push(0); // validate_only = false
    let mut framed = i32::try_from(b.len())
        .map_err(|_| "request too long".to_owned())?
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&b);
    Ok(framed)
}

async fn exchange(server: &str, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = tokio::net::TcpStream::connect(server).await?;
    conn.write_all(request).await?;
    let len = conn.read_i32().await?;
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= 1 << 20)
        .ok_or_else(|| std::io::Error::other(format!("bad response length {len}")))?;
    let mut response = vec![0; len];
    conn.read_exact(&mut response).await?;
    Ok(response)
}

/// Reads `correlation_id, throttle_time_ms, [error_code, error_message, type, name]`.
fn parse_alter_response(r: &[u8]) -> Result<(), String> {
    let short = || "short IncrementalAlterConfigs response".to_owned();
    let i16_at = |at: usize| -> Result<i16, String> {
        Ok(i16::from_be_bytes(
            r.get(at..at + 2)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?,
        ))
    };
    // 4 correlation id + 4 throttle + 4 array length, then the first resource's error code.
    let count = i32::from_be_bytes(
        r.get(8..12)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    );
    if count < 1 {
        return Err("the broker answered for no resource".into());
    }
    let code = i16_at(12)?;
    if code == 0 {
        return Ok(());
    }
    let msg_len = i16_at(14)?;
    let message = usize::try_from(msg_len)
        .ok()
        .and_then(|l| r.get(16..16 + l))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    Err(format!(
        "broker refused the configuration change: error code {code} {message}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_errors_and_identity_errors_are_permanent() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::SaslAuthenticationFailed,
        ] {
            assert!(
                !is_retryable(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        assert!(is_too_large(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
    }

    #[test]
    fn transport_and_queue_errors_are_retryable() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert!(
                is_retryable(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        assert!(is_retryable(&KafkaError::Canceled));
    }

    #[test]
    fn alter_request_is_framed_and_answers_parse() {
        let r = alter_request("t", &[("retention.ms", "-1")]).expect("request");
        let len = i32::from_be_bytes(r[..4].try_into().expect("4 bytes"));
        assert_eq!(usize::try_from(len).expect("len"), r.len() - 4);
        assert_eq!(&r[4..6], &44i16.to_be_bytes());
        let mut ok = vec![
            0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 255, 255, 2, 0, 1, b't',
        ];
        assert_eq!(parse_alter_response(&ok), Ok(()));
        ok[12..14].copy_from_slice(&40i16.to_be_bytes());
        assert!(parse_alter_response(&ok).is_err());
    }
}
