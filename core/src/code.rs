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
//!
//! A zip is hostile input, on the front end ([`check_zip`]) and on the worker alike: no header
//! is trusted. Every entry is inflated as a stream (to a counting sink, or straight to its file)
//! through a cap of its declared size plus one byte, within Lambda's 250 MiB unzipped and
//! [`MAX_ZIP_ENTRIES`]; entries are relative paths inside the bundle, symlinks may not lead out
//! of it, and nothing is written through one. An unpack happens in a private directory renamed
//! into place when complete, removed when not.
//!
//! `Code.Path` names a directory on the node instead; [`CodePathRoots`] says which are allowed.

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

/// Why code could not be stored, fetched or unpacked, or a `Code.Path` is refused.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// The zip is malformed, over a limit, or has no `bootstrap`.
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
    /// A `Code.Path` is not allowed on this node ([`CodePathRoots::check`]).
    #[error("{0}")]
    PathRefused(String),
    /// A `--code-path-root` cannot be resolved.
    #[error("cannot resolve {path}")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Most entries (files, directories, symlinks) a bundle may hold: the classic zip format's own
/// limit. It bounds the inodes one bundle makes in the cache; the memory the central directory
/// takes is already bounded by [`MAX_ZIP_BYTES`].
pub const MAX_ZIP_ENTRIES: usize = 65_535;
/// Longest symlink target in a bundle (Linux's `PATH_MAX`).
const MAX_LINK_BYTES: u64 = 4096;

/// The bounds an unpack holds a bundle to. [`ZipLimits::LAMBDA`] everywhere but in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZipLimits {
    /// Bytes all entries may inflate to together.
    pub max_unpacked_bytes: u64,
    /// Entries the zip may hold.
    pub max_entries: usize,
}

impl ZipLimits {
    /// Lambda's 250 MiB unzipped and [`MAX_ZIP_ENTRIES`].
    pub const LAMBDA: Self = Self {
        max_unpacked_bytes: MAX_UNPACKED_BYTES,
        max_entries: MAX_ZIP_ENTRIES,
    };
}

/// Checks that `zip` is a readable archive within Lambda's limits with an executable-to-be
/// `bootstrap` at its root, by inflating every entry into a counting sink: no header is trusted.
/// Costs the CPU of one unpack (up to 250 MiB inflated) and no more memory than a buffer.
///
/// # Errors
/// [`CodeError::Invalid`] naming what is wrong and what is allowed.
pub fn check_zip(zip: &[u8]) -> Result<(), CodeError> {
    inflate(zip, ZipLimits::LAMBDA, None).map(|_| ())
}

/// The most entries any end-of-central-directory record in `zip` declares (classic or zip64,
/// this disk's count or the total). The zip reader settles on one of them, trying each from the
/// end, and reads as many central-directory records as it says, keeping each in memory (a few
/// hundred bytes apiece: 600,000 empty entries in a 50 MB zip took a node to 570 MB): bounding
/// them all bounds that before it starts.
fn declared_entries(zip: &[u8]) -> u64 {
    let u16_at = |at: usize| {
        zip.get(at..at + 2)
            .map_or(0, |b| u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |at: usize| {
        zip.get(at..at + 8).map_or(0, |b| {
            let mut v = [0u8; 8];
            v.copy_from_slice(b);
            u64::from_le_bytes(v)
        })
    };
    let mut most = 0;
    for at in 0..zip.len().saturating_sub(3) {
        if zip[at] != b'P' || zip[at + 1] != b'K' {
            continue;
        }
        match [zip[at + 2], zip[at + 3]] {
            [5, 6] => most = most.max(u16_at(at + 8)).max(u16_at(at + 10)),
            [6, 6] => most = most.max(u64_at(at + 24)).max(u64_at(at + 32)),
            _ => {}
        }
    }
    most
}

/// One entry's path inside the bundle: relative, `.` dropped, `..` resolved, never above the
/// root. `None` for an absolute path, a NUL, or a `..` that leaves the bundle.
fn entry_path(name: &str) -> Option<PathBuf> {
    use std::path::Component;
    if name.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether a symlink at `link` (a bundle path) with `target` resolves inside the bundle however
/// it is followed: relative, any `..` only at its start and no higher than the bundle's root,
/// none after a name (a name may itself be a symlink, and `..` after it climbs from wherever
/// that one points). With no symlink among the link's own ancestors (checked by the caller),
/// every hop lands inside the bundle.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    use std::path::Component;
    let depth = link.components().count().saturating_sub(1);
    let mut climbs = 0usize;
    let mut named = false;
    for c in target.components() {
        match c {
            Component::ParentDir if !named => climbs += 1,
            Component::Normal(_) => named = true,
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    named && climbs <= depth
}

/// Reads `src` to its end into `dst` (or nowhere), failing once more than `cap` bytes came out;
/// returns how many did. Read errors are the zip's (corrupt data, CRC mismatch), write errors
/// the disk's.
fn pour(
    name: &str,
    src: &mut impl Read,
    mut dst: Option<(&mut std::fs::File, &Path)>,
    cap: u64,
) -> Result<u64, CodeError> {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let got = match src.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(CodeError::Invalid(format!(
                    "entry {name:?} cannot be inflated: {e}"
                )))
            }
        };
        n += got as u64;
        if n > cap {
            return Ok(n);
        }
        if let Some((file, path)) = dst.as_mut() {
            file.write_all(&buf[..got])
                .map_err(|source| CodeError::Unpack {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
}

/// Inflates every entry of `zip` within `limits`, into `dest` when given (a fresh directory) or
/// into a counting sink. Each entry is read through a cap of its declared size plus one byte, so
/// an entry that inflates past its header is refused after at most that many bytes; the sum of
/// the declared sizes is checked before anything is inflated. Regular files and directories are
/// written first and symlinks last, so no write ever goes through a link. Returns the bytes the
/// regular files inflated to.
fn inflate(zip: &[u8], limits: ZipLimits, dest: Option<&Path>) -> Result<u64, CodeError> {
    use std::os::unix::fs::PermissionsExt;
    let invalid = |m: String| CodeError::Invalid(m);
    if zip.len() > MAX_ZIP_BYTES {
        return Err(invalid(format!(
            "the zip is {} bytes; Lambda allows at most {MAX_ZIP_BYTES} (50 MiB) zipped",
            zip.len()
        )));
    }
    let claimed = declared_entries(zip);
    if claimed > limits.max_entries as u64 {
        return Err(invalid(format!(
            "the zip declares {claimed} entries; at most {} are allowed",
            limits.max_entries
        )));
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| invalid(format!("not a zip file: {e}")))?;
    if archive.len() > limits.max_entries {
        return Err(invalid(format!(
            "the zip has {} entries; at most {} are allowed",
            archive.len(),
            limits.max_entries
        )));
    }
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let f = archive
            .by_index_raw(i)
            .map_err(|e| invalid(format!("entry {i}: {e}")))?;
        declared = declared.saturating_add(f.size());
    }
    if declared > limits.max_unpacked_bytes {
        return Err(invalid(format!(
            "the zip's entries declare {declared} bytes unpacked; at most {} (250 MiB, Lambda's \
             unzipped limit) are allowed",
            limits.max_unpacked_bytes
        )));
    }
    let unpack_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CodeError::Unpack { path, source }
    };
    let mut total = 0u64;
    let mut has_bootstrap = false;
    let mut seen: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut links: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| invalid(format!("entry {i}: {e}")))?;
        let name = f.name().to_owned();
        let rel = entry_path(&name).ok_or_else(|| {
            invalid(format!(
                "entry {name:?} is an absolute path or leaves the bundle through `..`; entries \
                 must be relative paths inside the bundle"
            ))
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        if !seen.insert(rel.clone()) && !f.is_dir() {
            return Err(invalid(format!(
                "entry {name:?} appears twice; each path may appear once"
            )));
        }
        if f.is_dir() {
            if let Some(d) = dest {
                let out = d.join(&rel);
                std::fs::create_dir_all(&out).map_err(unpack_err(&out))?;
                std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
                    .map_err(unpack_err(&out))?;
            }
            continue;
        }
        if f.is_symlink() {
            let mut target = Vec::new();
            (&mut f)
                .take(MAX_LINK_BYTES + 1)
                .read_to_end(&mut target)
                .map_err(|e| invalid(format!("entry {name:?} cannot be inflated: {e}")))?;
            if target.len() as u64 > MAX_LINK_BYTES {
                return Err(invalid(format!(
                    "symlink {name:?} has a target longer than {MAX_LINK_BYTES} bytes"
                )));
            }
            let target = PathBuf::from(
                <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target),
            );
            if target.as_os_str().as_encoded_bytes().contains(&0)
                || !link_stays_inside(&rel, &target)
            {
                return Err(invalid(format!(
                    "symlink {name:?} -> {target:?} may leave the bundle; a bundle's symlinks \
                     must be relative, may start with `../` only as far up as the bundle's root, \
                     and may have no `..` after a name"
                )));
            }
            has_bootstrap |= rel == Path::new("bootstrap");
            links.push((name, rel, target));
            continue;
        }
        let size = f.size();
        if size > limits.max_unpacked_bytes - total {
            return Err(invalid(format!(
                "entry {name:?} of {size} bytes takes the bundle past {} bytes unpacked (250 \
                 MiB, Lambda's unzipped limit)",
                limits.max_unpacked_bytes
            )));
        }
        let n = match dest {
            None => pour(&name, &mut f, None, size)?,
            Some(d) => {
                let out = d.join(&rel);
                if let Some(parent) = out.parent() {
                    std::fs::create_dir_all(parent).map_err(unpack_err(parent))?;
                }
                let mut file = std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(&out)
                    .map_err(unpack_err(&out))?;
                let n = pour(&name, &mut f, Some((&mut file, &out)), size)?;
                // Sandboxes run as unprivileged UIDs: everything readable; `bootstrap` and files
                // the zip marks executable are executable.
                let exec =
                    rel == Path::new("bootstrap") || f.unix_mode().is_some_and(|m| m & 0o111 != 0);
                std::fs::set_permissions(
                    &out,
                    std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
                )
                .map_err(unpack_err(&out))?;
                n
            }
        };
        if n > size {
            return Err(invalid(format!(
                "entry {name:?} inflates past the {size} bytes its header declares (a zip bomb); \
                 every entry must inflate to exactly its declared size"
            )));
        }
        total += n;
        has_bootstrap |= rel == Path::new("bootstrap");
    }
    if !has_bootstrap {
        return Err(invalid(
            "the zip has no bootstrap at its root (Lambda's custom-runtime contract)".into(),
        ));
    }
    // A link among another entry's ancestors would let that entry (or the link's `..`) land
    // wherever the link points.
    let link_paths: std::collections::HashSet<&Path> =
        links.iter().map(|(_, rel, _)| rel.as_path()).collect();
    for p in &seen {
        if let Some(a) = p.ancestors().skip(1).find(|a| link_paths.contains(a)) {
            return Err(invalid(format!(
                "entry {:?} lies under symlink {:?}; nothing may be stored through a symlink",
                p.display(),
                a.display()
            )));
        }
    }
    if let Some(d) = dest {
        for (_, rel, target) in &links {
            let out = d.join(rel);
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).map_err(unpack_err(parent))?;
            }
            std::os::unix::fs::symlink(target, &out).map_err(unpack_err(&out))?;
        }
    }
    Ok(total)
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
    unpack(&zip, code, cache, dir, ZipLimits::LAMBDA)
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
    // The record says how much to read; hold it to what a front end could have stored.
    let n = usize::try_from(code.chunks).unwrap_or(usize::MAX);
    if code.size > MAX_ZIP_BYTES as u64 || n > MAX_ZIP_BYTES.div_ceil(CHUNK_BYTES) {
        return Err(CodeError::Invalid(format!(
            "code {} claims {} bytes in {} chunks; at most {MAX_ZIP_BYTES} bytes in chunks of \
             {CHUNK_BYTES} are allowed",
            code.sha256, code.size, code.chunks
        )));
    }
    let mut read = 0usize;
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
            let payload = m.payload().unwrap_or_default();
            read += payload.len();
            if read > MAX_ZIP_BYTES {
                return Err(CodeError::Invalid(format!(
                    "code {} in {} is over {MAX_ZIP_BYTES} bytes",
                    code.sha256, code.topic
                )));
            }
            chunks[i] = Some(payload.to_vec());
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

/// Tells apart the unpacks one process runs at once (two invocations of one new bundle).
static UNPACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Unpacks `zip` into `dir` by way of a fresh `<cache>/.<sha256>.<pid>.<n>`, renamed into place
/// only once every entry is in; on any failure that directory is removed, so a refused or
/// partial bundle leaves nothing in the cache.
fn unpack(
    zip: &[u8],
    code: &StoredCode,
    cache: &Path,
    dir: PathBuf,
    limits: ZipLimits,
) -> Result<PathBuf, CodeError> {
    use std::os::unix::fs::PermissionsExt;
    let n = UNPACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache.join(format!(".{}.{}.{n}", code.sha256, std::process::id()));
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CodeError::Unpack { path, source }
    };
    std::fs::create_dir_all(cache).map_err(at(cache))?;
    std::fs::create_dir(&tmp).map_err(at(&tmp))?;
    let unpacked = inflate(zip, limits, Some(&tmp)).and_then(|bytes| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(at(&tmp))?;
        Ok(bytes)
    });
    let bytes = match unpacked {
        Ok(bytes) => bytes,
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %rm,
                    "cannot remove a partly unpacked bundle");
            }
            return Err(e);
        }
    };
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another invocation unpacked it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    tracing::debug!(sha256 = %code.sha256, bytes, "code bundle unpacked");
    Ok(dir)
}

/// Whether `name` in a cache directory is an unpack left by another process (one killed while
/// unpacking): `.<sha256>.<pid>.<n>` with a pid not ours. A node holds its cache directory alone,
/// so no other process is still writing it.
fn stale_unpack(name: &str) -> bool {
    let mut parts = name.strip_prefix('.').unwrap_or_default().split('.');
    let (Some(_sha), Some(pid), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    n.parse::<u64>().is_ok() && pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
}

/// The directories a node lets `Code.Path` name (`--code-path-root`, canonical). A path is
/// allowed when its canonical form (every symlink resolved) lies under one of them, and so does
/// its `bootstrap`'s: a symlink cannot lead out of a root. With no root, no `Code.Path` is
/// allowed: it names a directory on the node's own disk, which could be another function's
/// unpacked code or anything else the node can read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodePathRoots {
    roots: Vec<PathBuf>,
}

impl CodePathRoots {
    /// The roots `dirs`, each resolved to its canonical path.
    ///
    /// # Errors
    /// [`CodeError::Root`] naming a root that does not exist or cannot be resolved.
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Self, CodeError> {
        let mut roots = Vec::new();
        for dir in dirs {
            let canonical = std::fs::canonicalize(&dir).map_err(|source| CodeError::Root {
                path: dir.clone(),
                source,
            })?;
            if !canonical.is_dir() {
                return Err(CodeError::Root {
                    path: dir,
                    source: std::io::Error::other("not a directory"),
                });
            }
            if !roots.contains(&canonical) {
                roots.push(canonical);
            }
        }
        Ok(Self { roots })
    }

    /// The canonical roots.
    #[must_use]
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn allows(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    /// Checks `path` (a `Code.Path`) and returns its canonical form, the directory to store.
    ///
    /// # Errors
    /// [`CodeError::PathRefused`] saying what is wrong and what is allowed.
    pub fn check(&self, path: &str) -> Result<PathBuf, CodeError> {
        let refused = |m: String| CodeError::PathRefused(m);
        if self.roots.is_empty() {
            return Err(refused(format!(
                "Code.Path {path} is not allowed: this node allows no code directories. Start \
                 it with --code-path-root DIR (or SLUICE_CODE_PATH_ROOTS=DIR,...) to allow \
                 bundles under DIR, or give the code as Code.ZipFile"
            )));
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(refused(format!(
                "Code.Path must be an absolute path, got {path:?}"
            )));
        }
        let canonical = std::fs::canonicalize(p).map_err(|e| {
            refused(format!(
                "Code.Path {path} must be an existing directory on this node (the unpacked \
                 bundle): {e}"
            ))
        })?;
        if !self.allows(&canonical) {
            return Err(refused(format!(
                "Code.Path {path} (resolved to {}) is outside the directories this node allows \
                 (--code-path-root): {}",
                canonical.display(),
                self.list()
            )));
        }
        if !canonical.is_dir() {
            return Err(refused(format!(
                "Code.Path {path} must be a directory (the unpacked bundle)"
            )));
        }
        let bootstrap = canonical.join("bootstrap");
        let target = std::fs::canonicalize(&bootstrap)
            .ok()
            .filter(|b| b.is_file());
        match target {
            None => Err(refused(format!(
                "Code.Path {path} has no bootstrap file: a function bundle needs an executable \
                 bootstrap at its root (Lambda's custom-runtime contract)"
            ))),
            Some(b) if !self.allows(&b) => Err(refused(format!(
                "the bootstrap of Code.Path {path} resolves to {}, outside the directories this \
                 node allows (--code-path-root): {}",
                b.display(),
                self.list()
            ))),
            Some(_) => Ok(canonical),
        }
    }

    fn list(&self) -> String {
        let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        roots.join(", ")
    }
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
                if stale_unpack(&name) && e.path().is_dir() {
                    if std::fs::remove_dir_all(e.path()).is_ok() {
                        tracing::info!(path = %e.path().display(), "removed a partial unpack");
                    }
                    return None;
                }
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

    /// An entry of a test zip.
    enum Entry<'a> {
        File(&'a str, &'a [u8]),
        Zeros(&'a str, usize),
        Link(&'a str, &'a str),
        Dir(&'a str),
    }

    fn zip_of(entries: &[Entry<'_>]) -> Vec<u8> {
        use std::io::Write;
        use zip::write::SimpleFileOptions;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(0o755);
        for e in entries {
            match e {
                Entry::File(name, bytes) => {
                    w.start_file(*name, opts).expect("start");
                    w.write_all(bytes).expect("write");
                }
                Entry::Zeros(name, n) => {
                    w.start_file(*name, opts.compression_level(Some(9)))
                        .expect("start");
                    let mb = vec![0u8; 1 << 20];
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(mb.len());
                        w.write_all(&mb[..k]).expect("write");
                        left -= k;
                    }
                }
                Entry::Link(name, target) => {
                    w.add_symlink(*name, *target, opts).expect("link");
                }
                Entry::Dir(name) => w.add_directory(*name, opts).expect("dir"),
            }
        }
        w.finish().expect("finish").into_inner()
    }

    /// Rewrites the uncompressed size of entry `name` in its local and central headers: the
    /// header lies, the data does not change.
    fn declare(zip: &mut [u8], name: &str, size: u32) {
        let mut patched = 0;
        for at in 0..zip.len().saturating_sub(46) {
            let (size_at, len_at, name_at) = match &zip[at..at + 4] {
                b"PK\x03\x04" => (at + 22, at + 26, at + 30),
                b"PK\x01\x02" => (at + 24, at + 28, at + 46),
                _ => continue,
            };
            let len = usize::from(u16::from_le_bytes([zip[len_at], zip[len_at + 1]]));
            if zip.get(name_at..name_at + len) == Some(name.as_bytes()) {
                zip[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        }
        assert_eq!(patched, 2, "{name}: local and central header");
    }

    fn refusal(r: Result<u64, CodeError>) -> String {
        match r {
            Err(CodeError::Invalid(m)) => m,
            other => panic!("expected the bundle refused, got {other:?}"),
        }
    }

    fn scratch(what: &str) -> PathBuf {
        let n = UNPACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-code-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    fn stored(zip: &[u8]) -> StoredCode {
        StoredCode {
            sha256: hex(&Sha256::digest(zip)),
            size: zip.len() as u64,
            topic: "code".into(),
            offset: 0,
            chunks: 1,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_bomb_whose_header_lies_is_refused_after_its_declared_size_and_leaves_nothing() {
        // 32 MiB of zeros deflate to ~32 KiB; the header says 1 KiB.
        let mut zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\n"),
            Entry::Zeros("bomb", 32 << 20),
        ]);
        declare(&mut zip, "bomb", 1024);
        assert!(zip.len() < 256 * 1024, "{} bytes", zip.len());
        let m = refusal(inflate(&zip, ZipLimits::LAMBDA, None));
        assert!(m.contains("\"bomb\" inflates past the 1024 bytes"), "{m}");
        assert!(check_zip(&zip).is_err());

        let cache = scratch("bomb");
        let code = stored(&zip);
        let dir = cache.join(&code.sha256);
        match unpack(&zip, &code, &cache, dir, ZipLimits::LAMBDA) {
            Err(CodeError::Invalid(m)) => assert!(m.contains("inflates past"), "{m}"),
            other => panic!("unpacked a bomb: {other:?}"),
        }
        assert_eq!(names(&cache), Vec::<String>::new(), "left in the cache");
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn a_bomb_with_honest_headers_is_refused_before_anything_is_inflated() {
        // The header says 300 MiB (the data is 1 KiB): refused on the declared sum alone.
        let mut zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\n"),
            Entry::Zeros("big", 1024),
        ]);
        declare(&mut zip, "big", 300 << 20);
        let m = refusal(inflate(&zip, ZipLimits::LAMBDA, None));
        assert!(m.contains("declare 314572810 bytes unpacked"), "{m}");
        assert!(m.contains("at most 262144000"), "{m}");

        // Honest entries whose sum is over the bound.
        let limits = ZipLimits {
            max_unpacked_bytes: 3 << 20,
            max_entries: 10,
        };
        let zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\n"),
            Entry::Zeros("a", 2 << 20),
            Entry::Zeros("b", 2 << 20),
        ]);
        let m = refusal(inflate(&zip, limits, None));
        assert!(m.contains("at most 3145728"), "{m}");
        // Within the bound it passes, and counts what it inflated.
        let ok = ZipLimits {
            max_unpacked_bytes: 5 << 20,
            ..limits
        };
        assert_eq!(inflate(&zip, ok, None).expect("within"), (4 << 20) + 10);
    }

    #[test]
    fn too_many_entries_are_refused() {
        let files: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
        let mut entries = vec![Entry::File("bootstrap", b"x")];
        entries.extend(files.iter().map(|f| Entry::File(f, b"y")));
        let limits = ZipLimits {
            max_unpacked_bytes: 1 << 20,
            max_entries: 5,
        };
        let zip = zip_of(&entries);
        let m = refusal(inflate(&zip, limits, None));
        assert!(m.contains("declares 6 entries; at most 5"), "{m}");

        // An end record that claims more than the zip holds is refused before the zip is read.
        let mut zip = zip_of(&entries[..2]);
        let eocd = zip.len() - 22;
        assert_eq!(&zip[eocd..eocd + 4], b"PK\x05\x06");
        zip[eocd + 8..eocd + 12].copy_from_slice(&[0xe8, 0x03, 0xe8, 0x03]);
        let m = refusal(inflate(&zip, limits, None));
        assert!(m.contains("declares 1000 entries"), "{m}");
    }

    #[test]
    fn entries_and_symlinks_that_leave_the_bundle_are_refused() {
        for (bad, why) in [
            (Entry::File("../evil", b"x"), "leaves the bundle"),
            (Entry::File("a/../../evil", b"x"), "leaves the bundle"),
            (Entry::File("/etc/evil", b"x"), "absolute path"),
            (Entry::Link("etc", "/etc"), "may leave the bundle"),
            (Entry::Link("a/l", "../../x"), "may leave the bundle"),
            (Entry::Link("l", "x/../.."), "may leave the bundle"),
            (Entry::Link("l", "a/.."), "may leave the bundle"),
        ] {
            let zip = zip_of(&[Entry::File("bootstrap", b"#!/bin/sh\n"), bad]);
            let m = refusal(inflate(&zip, ZipLimits::LAMBDA, None));
            assert!(m.contains(why), "{m}");
        }
        // A file stored through a symlink lands wherever the link points.
        let zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\n"),
            Entry::Link("d", "sub"),
            Entry::File("d/f", b"x"),
        ]);
        let m = refusal(inflate(&zip, ZipLimits::LAMBDA, None));
        assert!(m.contains("lies under symlink"), "{m}");
        // One path under two names.
        let zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\n"),
            Entry::File("./bootstrap", b"again"),
        ]);
        let m = refusal(inflate(&zip, ZipLimits::LAMBDA, None));
        assert!(m.contains("appears twice"), "{m}");
    }

    #[test]
    fn a_bundle_unpacks_with_its_modes_and_inner_symlinks() {
        let zip = zip_of(&[
            Entry::File("bootstrap", b"#!/bin/sh\necho hi\n"),
            Entry::Dir("lib/"),
            Entry::File("lib/libx.so.1", b"elf"),
            Entry::Link("lib/libx.so", "libx.so.1"),
            Entry::File("bin/real", b"app"),
            Entry::Link("bin/app", "../lib/libx.so"),
            Entry::File("./data/../notes.txt", b"n"),
        ]);
        let cache = scratch("ok");
        let code = stored(&zip);
        let dir = unpack(
            &zip,
            &code,
            &cache,
            cache.join(&code.sha256),
            ZipLimits::LAMBDA,
        )
        .expect("unpack");
        assert_eq!(names(&cache), vec![code.sha256.clone()], "only the bundle");
        assert_eq!(
            std::fs::read(dir.join("bin/app")).expect("through links"),
            b"elf"
        );
        assert_eq!(
            std::fs::read_link(dir.join("lib/libx.so")).expect("link"),
            Path::new("libx.so.1")
        );
        assert_eq!(std::fs::read(dir.join("notes.txt")).expect("notes"), b"n");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bootstrap"), 0o755);
        assert_eq!(mode("lib"), 0o755);
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn only_another_processs_unpack_is_stale() {
        let sha = "ab".repeat(32);
        assert!(stale_unpack(&format!(".{sha}.1.0")) || std::process::id() == 1);
        assert!(!stale_unpack(&format!(".{sha}.{}.3", std::process::id())));
        assert!(!stale_unpack(&format!(".{sha}.used")));
        assert!(!stale_unpack(&sha));
    }

    #[test]
    fn code_path_is_allowed_only_under_a_root_and_symlinks_cannot_leave_it() {
        use std::os::unix::fs::symlink;
        let base = scratch("roots");
        let (root, outside) = (base.join("root"), base.join("outside"));
        for d in [
            root.join("fn"),
            root.join("nobootstrap"),
            outside.join("fn"),
        ] {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        std::fs::write(root.join("fn/bootstrap"), "#!/bin/sh\n").expect("write");
        std::fs::write(outside.join("fn/bootstrap"), "#!/bin/sh\n").expect("write");
        symlink(outside.join("fn"), root.join("escape")).expect("link");
        std::fs::create_dir_all(root.join("linked")).expect("mkdir");
        symlink(outside.join("fn/bootstrap"), root.join("linked/bootstrap")).expect("link");
        let s = |p: &Path| p.display().to_string();

        let none = CodePathRoots::default();
        let m = none
            .check(&s(&root.join("fn")))
            .expect_err("no roots")
            .to_string();
        assert!(m.contains("--code-path-root DIR"), "{m}");

        let roots = CodePathRoots::new([root.clone()]).expect("roots");
        let canonical = std::fs::canonicalize(root.join("fn")).expect("canonical");
        assert_eq!(
            roots.check(&s(&root.join("fn"))).expect("allowed"),
            canonical
        );
        // The same directory reached through `..` is still allowed.
        assert_eq!(
            roots
                .check(&s(&root.join("nobootstrap/../fn")))
                .expect("allowed"),
            canonical
        );
        for (path, why) in [
            (s(&outside.join("fn")), "outside the directories"),
            (s(&root.join("escape")), "outside the directories"),
            (
                s(&root.join("fn/../../outside/fn")),
                "outside the directories",
            ),
            (s(&root.join("linked")), "bootstrap of Code.Path"),
            (s(&root.join("nobootstrap")), "no bootstrap"),
            (s(&root.join("missing")), "existing directory"),
            ("relative/fn".to_owned(), "absolute path"),
        ] {
            let m = roots.check(&path).expect_err(&path).to_string();
            assert!(m.contains(why), "{path}: {m}");
        }
        let m = roots
            .check(&s(&outside.join("fn")))
            .expect_err("outside")
            .to_string();
        assert!(
            m.contains(&s(&std::fs::canonicalize(&root).expect("c"))),
            "{m}"
        );
        assert!(matches!(
            CodePathRoots::new([base.join("nope")]),
            Err(CodeError::Root { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
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
