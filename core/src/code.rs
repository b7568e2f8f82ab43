//! Function code given inline (`Code.ZipFile`): kept in Kafka so that every worker node can
//! fetch it, and unpacked into a local cache on first use.
//!
//! A bundle is written to the code topic as chunks of at most [`CHUNK_BYTES`] (Kafka's default
//! message limit is 1 MB), keyed by its SHA-256, in one partition; the function's configuration
//! keeps where the chunks are ([`StoredCode`]). A worker reads the chunks back, checks the hash
//! and unpacks the zip into `<cache>/<sha256>/`.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use crate::kafka::{ensure_topic, KafkaSettings, TopicSpec};
use crate::model::StoredCode;

/// Largest chunk written to the code topic.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Lambda's limit on a zipped bundle.
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// Lambda's limit on an unpacked bundle.
pub const MAX_UNPACKED_BYTES: u64 = 250 * 1024 * 1024;

/// Why code could not be stored, fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// The zip is malformed, too large, or has no `bootstrap`.
    #[error("invalid code bundle: {0}")]
    Invalid(String),
    /// Kafka refused a read or write.
    #[error("code storage in Kafka: {0}")]
    Kafka(String),
    /// The local cache could not be written.
    #[error("unpack the code bundle into {path}: {source}")]
    Unpack {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks that `zip` is a readable archive within Lambda's limits with an executable-to-be
/// `bootstrap` at its root.
///
/// # Errors
/// [`CodeError::Invalid`] naming what is wrong.
pub fn check_zip(zip: &[u8]) -> Result<(), CodeError> {
    if zip.len() > MAX_ZIP_BYTES {
        return Err(CodeError::Invalid(format!(
            "zip of {} bytes exceeds Lambda's {MAX_ZIP_BYTES}",
            zip.len()
        )));
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| CodeError::Invalid(format!("not a zip file: {e}")))?;
    let mut total = 0u64;
    let mut has_bootstrap = false;
    for i in 0..archive.len() {
        let f = archive
            .by_index(i)
            .map_err(|e| CodeError::Invalid(e.to_string()))?;
        if f.enclosed_name().is_none() {
            return Err(CodeError::Invalid(format!(
                "entry {:?} escapes the bundle",
                f.name()
            )));
        }
        total += f.size();
        has_bootstrap |= f.name() == "bootstrap";
    }
    if total > MAX_UNPACKED_BYTES {
        return Err(CodeError::Invalid(format!(
            "unpacked size {total} exceeds Lambda's {MAX_UNPACKED_BYTES}"
        )));
    }
    if !has_bootstrap {
        return Err(CodeError::Invalid(
            "the zip has no bootstrap at its root (Lambda's custom-runtime contract)".into(),
        ));
    }
    Ok(())
}

/// Writes `zip` to `topic` and returns where it is.
///
/// # Errors
/// [`CodeError::Kafka`] when the topic cannot be created or a chunk is not acknowledged.
pub async fn store(
    kafka: &KafkaSettings,
    producer: &FutureProducer,
    topic: &str,
    zip: &[u8],
) -> Result<StoredCode, CodeError> {
    ensure_topic(
        kafka,
        &TopicSpec {
            name: topic.to_owned(),
            partitions: 1,
            config: Vec::new(),
        },
    )
    .await
    .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let sha = hex(&Sha256::digest(zip));
    let chunks: Vec<&[u8]> = zip.chunks(CHUNK_BYTES).collect();
    let n = chunks.len();
    let mut first = None;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let idx = format!("{i}/{n}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "sluice-chunk",
            value: Some(idx.as_bytes()),
        });
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .key(&sha)
                    .payload(chunk)
                    .partition(0)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| CodeError::Kafka(e.to_string()))?;
        first.get_or_insert(d.offset);
    }
    Ok(StoredCode {
        sha256: sha,
        size: zip.len() as u64,
        topic: topic.to_owned(),
        offset: first.unwrap_or(0),
        chunks: u32::try_from(n).unwrap_or(u32::MAX),
    })
}

/// Fetches the bundle from Kafka and unpacks it into `<cache>/<sha256>` (unless already there);
/// returns that directory. Blocking: call it from a blocking thread.
///
/// # Errors
/// [`CodeError`] when it cannot be read, does not match its hash, or cannot be unpacked.
pub fn fetch_and_unpack(
    kafka: &KafkaSettings,
    code: &StoredCode,
    cache: &Path,
) -> Result<PathBuf, CodeError> {
    let dir = cache.join(&code.sha256);
    if dir.join("bootstrap").is_file() {
        return Ok(dir);
    }
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", "sluice-code-fetch")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&code.topic, 0, Offset::Offset(code.offset))
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    consumer
        .assign(&tpl)
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let mut zip = Vec::with_capacity(usize::try_from(code.size).unwrap_or(0));
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got < code.chunks {
        if std::time::Instant::now() > deadline {
            return Err(CodeError::Kafka(format!(
                "timed out reading code {} from {}",
                code.sha256, code.topic
            )));
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.map_err(|e| CodeError::Kafka(e.to_string()))?;
        if m.key() != Some(code.sha256.as_bytes()) {
            continue;
        }
        zip.extend_from_slice(m.payload().unwrap_or_default());
        got += 1;
    }
    if hex(&Sha256::digest(&zip)) != code.sha256 {
        return Err(CodeError::Invalid(format!(
            "code {} read back from Kafka does not match its hash",
            code.sha256
        )));
    }
    check_zip(&zip)?;
    let tmp = cache.join(format!(".{}.{}", code.sha256, std::process::id()));
    let unpack = |source| CodeError::Unpack {
        path: tmp.clone(),
        source,
    };
    std::fs::create_dir_all(&tmp).map_err(unpack)?;
    let mut archive =
        zip::ZipArchive::new(Cursor::new(&zip)).map_err(|e| CodeError::Invalid(e.to_string()))?;
    for i in 0..archive.len() {
        use std::os::unix::fs::PermissionsExt;
        let mut f = archive
            .by_index(i)
            .map_err(|e| CodeError::Invalid(e.to_string()))?;
        let Some(rel) = f.enclosed_name() else {
            continue;
        };
        let out = tmp.join(&rel);
        if f.is_dir() {
            std::fs::create_dir_all(&out).map_err(unpack)?;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
                .map_err(unpack)?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(unpack)?;
        }
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(unpack)?;
        std::fs::write(&out, bytes).map_err(unpack)?;
        // Sandboxes run as unprivileged UIDs: everything readable; `bootstrap` and files the zip
        // marks executable are executable.
        let exec = rel == Path::new("bootstrap") || f.unix_mode().is_some_and(|m| m & 0o111 != 0);
        std::fs::set_permissions(
            &out,
            std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
        )
        .map_err(unpack)?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(unpack)?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another invocation unpacked it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}
