//! Function code given inline (`Code.ZipFile`): kept in Kafka so that every worker node can
//! fetch it, and unpacked into a local cache on first use.
//!
//! A bundle is written to the code topic as chunks of at most [`CHUNK_BYTES`] (Kafka's default
//! message limit is 1 MB), each keyed `<sha256>/<index>`, in one partition; the function's
//! configuration keeps where the chunks are ([`StoredCode`]). A worker reads the chunks back
//! (placing each by its index), checks the hash and unpacks the zip into `<cache>/<sha256>/`.
//!
//! Code never expires: the topic is compacted with infinite retention ([`code_topic_spec`], an
//! existing topic is corrected at start), and since every chunk has its own key, compaction keeps
//! every chunk of every bundle (storing the same bundle again only replaces its own chunks; a
//! reader starting at the first store's offset finds the newer copies further on).
//!
//! The local cache is bounded ([`CodeCache`]): least recently used bundles go first once it is
//! over its size, but never one a live sandbox runs from or an invocation has just fetched.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use crate::kafka::{KafkaSettings, TopicSpec};
use crate::model::StoredCode;

/// Largest chunk written to the code topic.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Lambda's limit on a zipped bundle.
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// Lambda's limit on an unpacked bundle.
pub const MAX_UNPACKED_BYTES: u64 = 250 * 1024 * 1024;

/// The code topic: one partition (a bundle's chunks in order), compacted (chunk keys are
/// unique, so nothing of a live bundle is ever compacted away) and never deleted by age.
#[must_use]
pub fn code_topic_spec(topic: &str) -> TopicSpec {
    TopicSpec {
        name: topic.to_owned(),
        partitions: 1,
        config: vec![
            ("cleanup.policy", "compact".to_owned()),
            ("retention.ms", "-1".to_owned()),
            ("retention.bytes", "-1".to_owned()),
        ],
    }
}

/// Creates the code topic, or corrects an existing one to [`code_topic_spec`] (a topic made by
/// an older node has the broker's default retention, 7 days on Kafka). Before an existing topic
/// becomes compacted, chunks written under the bare bundle hash (before chunk keys were unique,
/// so compaction would keep only the last chunk of each bundle) are written again under their
/// own keys. Blocks a thread for the migration.
///
/// # Errors
/// [`CodeError::Kafka`] when the topic cannot be created, read, migrated or corrected.
pub async fn ensure_code_topic(kafka: &KafkaSettings, topic: &str) -> Result<(), CodeError> {
    let spec = code_topic_spec(topic);
    let created = crate::kafka::create_topic_if_missing(kafka, &spec)
        .await
        .map_err(|e| CodeError::Kafka(format!("create {topic}: {e}")))?;
    if created {
        return Ok(());
    }
    let config = crate::kafka::topic_config(kafka, topic)
        .await
        .map_err(|e| CodeError::Kafka(format!("describe {topic}: {e}")))?;
    let compacted = config
        .iter()
        .any(|(k, v)| k == "cleanup.policy" && v.as_deref() == Some("compact"));
    if !compacted {
        let (k, t) = (kafka.clone(), topic.to_owned());
        let rt = tokio::runtime::Handle::current();
        let moved = tokio::task::spawn_blocking(move || rekey_legacy_chunks(&k, &t, &rt))
            .await
            .map_err(|e| CodeError::Kafka(e.to_string()))??;
        if moved > 0 {
            tracing::info!(
                topic,
                chunks = moved,
                "wrote legacy code chunks again under their own keys"
            );
        }
    }
    crate::kafka::correct_topic_config(kafka, &spec)
        .await
        .map(|_| ())
        .map_err(|e| CodeError::Kafka(format!("correct the configuration of {topic}: {e}")))
}

/// Writes every chunk keyed by a bare hash again, keyed `<sha256>/<index>`; returns how many.
fn rekey_legacy_chunks(
    kafka: &KafkaSettings,
    topic: &str,
    rt: &tokio::runtime::Handle,
) -> Result<usize, CodeError> {
    use rdkafka::message::Headers;
    let kerr = |e: rdkafka::error::KafkaError| CodeError::Kafka(e.to_string());
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", "sluice-code-rekey")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kerr)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(kerr)?;
    consumer.assign(&tpl).map_err(kerr)?;
    let producer: FutureProducer = kafka.durable_producer_config().create().map_err(kerr)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut moved = 0;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(CodeError::Kafka(format!("timed out re-keying {topic}")));
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
            Err(e) => return Err(kerr(e)),
        };
        let Some(sha) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        if sha.contains('/') {
            continue;
        }
        let idx = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "sluice-chunk")
                .and_then(|h| h.value)
                .map(<[u8]>::to_vec)
        });
        let Some(i) = chunk_index(sha, m.key(), idx.as_deref()) else {
            continue;
        };
        let key = chunk_key(sha, i);
        let headers = OwnedHeaders::new().insert(Header {
            key: "sluice-chunk",
            value: idx.as_deref(),
        });
        let payload = m.payload().unwrap_or_default();
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(payload)
            .partition(0)
            .headers(headers);
        rt.block_on(producer.send(record, Duration::from_secs(30)))
            .map_err(|(e, _)| kerr(e))?;
        moved += 1;
    }
    Ok(moved)
}

fn chunk_key(sha: &str, index: usize) -> String {
    format!("{sha}/{index}")
}

/// The index of the chunk of bundle `sha` in a record with `key` and chunk header `idx`
/// (`"i/n"`); `None` for a record of another bundle. Records written before chunk keys were
/// unique are keyed by the bare hash.
fn chunk_index(sha: &str, key: Option<&[u8]>, idx: Option<&[u8]>) -> Option<usize> {
    let key = std::str::from_utf8(key?).ok()?;
    match key.strip_prefix(sha)? {
        "" => std::str::from_utf8(idx?)
            .ok()?
            .split('/')
            .next()?
            .parse()
            .ok(),
        rest => rest.strip_prefix('/')?.parse().ok(),
    }
}

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
    // The node corrects an existing topic at start (`ensure_code_topic`); here only create it.
    crate::kafka::create_topic_if_missing(kafka, &code_topic_spec(topic))
        .await
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let sha = hex(&Sha256::digest(zip));
    let chunks: Vec<&[u8]> = zip.chunks(CHUNK_BYTES).collect();
    let n = chunks.len();
    let mut first = None;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let idx = format!("{i}/{n}");
        let key = chunk_key(&sha, i);
        let headers = OwnedHeaders::new().insert(Header {
            key: "sluice-chunk",
            value: Some(idx.as_bytes()),
        });
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
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
/// [`CodeError`] when it cannot be read (chunks missing from the topic, Kafka unreachable),
/// does not match its hash, or cannot be unpacked.
pub fn fetch_and_unpack(
    kafka: &KafkaSettings,
    code: &StoredCode,
    cache: &Path,
) -> Result<PathBuf, CodeError> {
    let dir = cache.join(&code.sha256);
    if dir.join("bootstrap").is_file() {
        return Ok(dir);
    }
    let zip = fetch(kafka, code)?;
    unpack(&zip, code, cache, dir)
}

fn fetch(kafka: &KafkaSettings, code: &StoredCode) -> Result<Vec<u8>, CodeError> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", "sluice-code-fetch")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&code.topic, 0, Offset::Offset(code.offset))
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    consumer
        .assign(&tpl)
        .map_err(|e| CodeError::Kafka(e.to_string()))?;
    let n = usize::try_from(code.chunks).unwrap_or(0);
    let mut chunks: Vec<Option<Vec<u8>>> = vec![None; n];
    let mut missing = n;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while missing > 0 {
        if std::time::Instant::now() > deadline {
            return Err(CodeError::Kafka(format!(
                "timed out reading code {} from {}",
                code.sha256, code.topic
            )));
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {
                return Err(CodeError::Kafka(format!(
                    "{missing} of the {n} chunks of code {} are not in {} from offset {} on",
                    code.sha256, code.topic, code.offset
                )));
            }
            Err(e) => return Err(CodeError::Kafka(e.to_string())),
        };
        let idx = m.headers().and_then(|h| {
            use rdkafka::message::Headers;
            h.iter()
                .find(|h| h.key == "sluice-chunk")
                .and_then(|h| h.value)
        });
        let Some(i) = chunk_index(&code.sha256, m.key(), idx).filter(|i| *i < n) else {
            continue;
        };
        if chunks[i].is_none() {
            chunks[i] = Some(m.payload().unwrap_or_default().to_vec());
            missing -= 1;
        }
    }
    let zip = chunks.into_iter().flatten().flatten().collect::<Vec<u8>>();
    if hex(&Sha256::digest(&zip)) != code.sha256 {
        return Err(CodeError::Invalid(format!(
            "code {} read back from Kafka does not match its hash",
            code.sha256
        )));
    }
    Ok(zip)
}

fn unpack(zip: &[u8], code: &StoredCode, cache: &Path, dir: PathBuf) -> Result<PathBuf, CodeError> {
    check_zip(zip)?;
    let tmp = cache.join(format!(".{}.{}", code.sha256, std::process::id()));
    let unpack = |source| CodeError::Unpack {
        path: tmp.clone(),
        source,
    };
    std::fs::create_dir_all(&tmp).map_err(unpack)?;
    let mut archive =
        zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| CodeError::Invalid(e.to_string()))?;
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

/// Names the bundles (by hash) that live sandboxes run from, so the cache never removes them.
pub type InUse = std::sync::Arc<dyn Fn() -> std::collections::HashSet<String> + Send + Sync>;

/// The worker's unpacked-code cache: `<dir>/<sha256>/`, at most `max_bytes` on disk, least
/// recently used out first. A bundle is never removed while it is in use: while a live sandbox
/// runs from it (the [`InUse`] hook, e.g. the pool's idle sandboxes), or until the deadline the
/// last [`CodeCache::get`] gave it (an invocation that fetched it may still be booting or running
/// a sandbox from it). Only in-use bundles can keep the cache over its bound.
#[derive(Clone)]
pub struct CodeCache {
    /// The cache directory.
    pub dir: PathBuf,
    /// Its size bound.
    pub max_bytes: u64,
    in_use: Option<InUse>,
}

impl std::fmt::Debug for CodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl CodeCache {
    /// A cache in `dir` bounded by `max_bytes`.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        Self {
            dir: dir.into(),
            max_bytes,
            in_use: None,
        }
    }

    /// The same cache, never removing the bundles `in_use` names.
    #[must_use]
    pub fn with_in_use(mut self, in_use: InUse) -> Self {
        self.in_use = Some(in_use);
        self
    }

    /// [`fetch_and_unpack`] into this cache; marks the bundle in use for `hold` (the longest the
    /// caller may run a sandbox from it without the [`InUse`] hook knowing: its boot and one
    /// invocation) and, when it was fetched now, evicts least recently used bundles past the
    /// bound. Blocking.
    ///
    /// # Errors
    /// As [`fetch_and_unpack`].
    pub fn get(
        &self,
        kafka: &KafkaSettings,
        code: &StoredCode,
        hold: Duration,
    ) -> Result<PathBuf, CodeError> {
        let fresh = !self.dir.join(&code.sha256).join("bootstrap").is_file();
        let dir = fetch_and_unpack(kafka, code, &self.dir)?;
        touch(&self.dir, &code.sha256, SystemTime::now() + hold);
        if fresh {
            self.evict(&code.sha256);
        }
        Ok(dir)
    }

    /// Removes least recently used bundles (never `keep`, never one in use) until the cache is
    /// within its bound. Returns the removed hashes.
    pub fn evict(&self, keep: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let live = self.in_use.as_ref().map(|f| f()).unwrap_or_default();
        let mut bundles: Vec<(SystemTime, String, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if name.starts_with('.') || !e.path().is_dir() {
                    return None;
                }
                let held_until = std::fs::metadata(self.dir.join(format!(".{name}.used")))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                Some((held_until, name, dir_bytes(&e.path())))
            })
            .collect();
        let mut total: u64 = bundles.iter().map(|b| b.2).sum();
        bundles.sort();
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for (held_until, name, bytes) in bundles {
            if total <= self.max_bytes {
                break;
            }
            if name == keep || held_until > now || live.contains(&name) {
                continue;
            }
            if std::fs::remove_dir_all(self.dir.join(&name)).is_ok() {
                let _ = std::fs::remove_file(self.dir.join(format!(".{name}.used")));
                total = total.saturating_sub(bytes);
                metrics::counter!("sluice_code_cache_evictions_total").increment(1);
                removed.push(name);
            }
        }
        if total > self.max_bytes {
            tracing::debug!(
                bytes = total,
                bound = self.max_bytes,
                "code cache over its bound: every bundle left is in use"
            );
        }
        metrics::gauge!("sluice_code_cache_bytes").set(total as f64);
        removed
    }
}

/// Marks bundle `sha` in use until `until` (the mtime of `<dir>/.<sha>.used`; a later use moves
/// it, so the oldest mtime is also the least recently used bundle).
fn touch(dir: &Path, sha: &str, until: SystemTime) {
    let marker = dir.join(format!(".{sha}.used"));
    let ok = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&marker)
        .and_then(|f| f.set_modified(until));
    if let Err(e) = ok {
        tracing::warn!(path = %marker.display(), error = %e, "cannot mark a cached bundle used");
    }
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_name_their_index_and_legacy_keys_use_the_header() {
        let sha = "ab12";
        assert_eq!(
            chunk_index(sha, Some(chunk_key(sha, 3).as_bytes()), None),
            Some(3)
        );
        assert_eq!(chunk_index(sha, Some(b"ab12"), Some(b"2/5")), Some(2));
        assert_eq!(chunk_index(sha, Some(b"ab13/1"), None), None);
        assert_eq!(chunk_index(sha, Some(b"ab12x"), None), None);
        assert_eq!(chunk_index(sha, None, Some(b"0/1")), None);
    }

    #[test]
    fn cache_evicts_least_recently_used_past_its_bound_but_never_one_in_use() {
        let dir = std::env::temp_dir().join(format!("sluice-code-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = SystemTime::now();
        let s = Duration::from_secs;
        // (bundle, held until): `held` is still inside its last get's hold, `live` is an idle
        // sandbox's, the rest are free, `older` the least recently used.
        for (sha, until) in [
            ("old", now - s(7200)),
            ("older", now - s(9000)),
            ("live", now - s(9500)),
            ("held", now + s(60)),
            ("new", now),
        ] {
            std::fs::create_dir_all(dir.join(sha)).expect("mkdir");
            std::fs::write(dir.join(sha).join("bootstrap"), vec![0u8; 1000]).expect("write");
            touch(&dir, sha, until);
        }
        let live: InUse = std::sync::Arc::new(|| ["live".to_owned()].into_iter().collect());
        let cache = CodeCache::new(&dir, 1500).with_in_use(live);
        let removed = cache.evict("new");
        assert_eq!(removed, ["older", "old"]);
        for kept in ["new", "held", "live"] {
            assert!(dir.join(kept).join("bootstrap").is_file(), "{kept} removed");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
