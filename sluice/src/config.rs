//! A node's configuration from three places, one precedence: command-line flags, then
//! environment variables (`SLUICE_*`), then a config file (`--config sluice.toml` or
//! `SLUICE_CONFIG`), then the built-in defaults. Every setting has all three names: the flag
//! `--lease-ttl`, the variable `SLUICE_LEASE_TTL` and the file key `lease-ttl`.
//!
//! The file is TOML, one key per setting, with the flags' values: strings, numbers, booleans, or
//! arrays for the settings that take several values:
//!
//! ```toml
//! kafka = "kafka-1:9092,kafka-2:9092"
//! redis = "redis://redis:6379"
//! roles = ["poller", "worker"]
//! lease-ttl = "10s"
//! kafka-property = ["security.protocol=SSL"]
//! ```
//!
//! It is read before the command line is parsed (while the process has one thread): each key
//! becomes its variable unless that variable is set, so flags and the environment still win. A
//! key that is no setting is an error naming the key, and nothing starts.
//!
//! [`validate`] then checks what a type cannot: bounds between settings, and each error names
//! the setting in all three spellings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Command};

use crate::node::{NodeConfig, Role};

/// The config file's variable.
pub const CONFIG_ENV: &str = "SLUICE_CONFIG";

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("the config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A key that is no setting, or a value of the wrong shape.
    #[error("the config file {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting out of its bounds.
    #[error("{0}")]
    Invalid(String),
}

/// The settings of `sluice node`: long flag → environment variable.
fn settings() -> BTreeMap<String, String> {
    let cmd = NodeConfig::augment_args(Command::new("node"));
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let env = a.get_env()?.to_str()?.to_owned();
            Some((long, env))
        })
        .collect()
}

/// The config file named on the command line of `sluice node` (`--config FILE`,
/// `--config=FILE`) or by `SLUICE_CONFIG`.
#[must_use]
pub fn file_from_args(args: &[String]) -> Option<PathBuf> {
    if args.get(1).map(String::as_str) != Some("node") {
        return None;
    }
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

fn value_text(path: &Path, key: &str, v: &toml::Value) -> Result<String, ConfigError> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(ConfigError::Key {
            path: path.to_owned(),
            message: format!(
                "{key} = {other}: a value must be a string, number, boolean or an array of them"
            ),
        }),
    };
    match v {
        toml::Value::Array(items) => Ok(items
            .iter()
            .map(scalar)
            .collect::<Result<Vec<_>, _>>()?
            .join(",")),
        other => scalar(other),
    }
}

/// The variables the config file at `path` sets: `(variable, value)` for each key, in key
/// order.
///
/// # Errors
/// [`ConfigError`] when the file cannot be read or parsed, or names a key that is no setting.
pub fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
    let known = settings();
    let mut out = Vec::new();
    for (key, value) in &table {
        if key == "config" {
            return Err(ConfigError::Key {
                path: path.to_owned(),
                message: "`config` cannot name another config file".to_owned(),
            });
        }
        let Some(env) = known.get(key) else {
            let close: Vec<&String> = known
                .keys()
                .filter(|k| k.contains(key.as_str()) || key.contains(k.as_str()))
                .collect();
            return Err(ConfigError::Key {
                path: path.to_owned(),
                message: format!(
                    "unknown setting `{key}`{}; settings are the long flags of `sluice node --help` without their dashes, e.g. `lease-ttl`",
                    if close.is_empty() {
                        String::new()
                    } else {
                        format!(" (did you mean {close:?}?)")
                    }
                ),
            });
        };
        out.push((env.clone(), value_text(path, key, value)?));
    }
    Ok(out)
}

/// Reads the config file named by `args` (if any) into the environment, each key only where its
/// variable is not set. Call it before the command line is parsed and before any thread starts.
///
/// # Errors
/// As [`read_file`].
pub fn apply_file(args: &[String]) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = file_from_args(args) else {
        return Ok(None);
    };
    for (env, value) in read_file(&path)? {
        if std::env::var_os(&env).is_none() {
            // Single-threaded here (before the runtime starts), so no reader races the write.
            std::env::set_var(&env, value);
        }
    }
    Ok(Some(path))
}

/// How a setting is spelled in each place, for error messages.
fn names(long: &str) -> String {
    match settings().get(long) {
        Some(env) => format!("--{long} ({env}, `{long}` in the config file)"),
        None => format!("--{long}"),
    }
}

fn at_least(long: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::Invalid(format!(
            "{} must be at least {min:?}, got {value:?}",
            names(long)
        )));
    }
    Ok(())
}

/// Checks what the flags' types cannot, before anything starts.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the first setting out of bounds, the bound and the value.
pub fn validate(args: &NodeConfig) -> Result<(), ConfigError> {
    if args.roles.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{} needs at least one of frontend, poller, worker",
            names("roles")
        )));
    }
    if args.kafka.trim().is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{} must name at least one broker, e.g. kafka-1:9092",
            names("kafka")
        )));
    }
    if let Err(e) = redis::Client::open(args.redis.as_str()) {
        return Err(ConfigError::Invalid(format!(
            "{} is not a Redis URL like redis://host:6379: {e}",
            names("redis")
        )));
    }
    let prefix_ok = |p: &str| {
        p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if args.topic_prefix.is_empty() || !prefix_ok(&args.topic_prefix) {
        return Err(ConfigError::Invalid(format!(
            "{} must be non-empty and use only ASCII letters, digits, '.', '_' and '-' (Kafka topic names), got {:?}",
            names("topic-prefix"),
            args.topic_prefix
        )));
    }
    if args.redis_prefix.contains(['{', '}']) {
        return Err(ConfigError::Invalid(format!(
            "{} must not contain braces (they pick Redis Cluster hash slots), got {:?}",
            names("redis-prefix"),
            args.redis_prefix
        )));
    }
    at_least("lease-ttl", args.lease_ttl, Duration::from_millis(300))?;
    at_least("worker-ttl", args.worker_ttl, Duration::from_millis(500))?;
    at_least(
        "init-timeout",
        args.init_timeout,
        Duration::from_millis(100),
    )?;
    at_least(
        "throttle-backoff-min",
        args.throttle_backoff_min,
        Duration::from_millis(1),
    )?;
    if args.throttle_backoff_max < args.throttle_backoff_min {
        return Err(ConfigError::Invalid(format!(
            "{} ({:?}) must not be shorter than {} ({:?})",
            names("throttle-backoff-max"),
            args.throttle_backoff_max,
            names("throttle-backoff-min"),
            args.throttle_backoff_min
        )));
    }
    if args.async_retry_delays.is_empty() || args.async_retry_delays.len() > 2 {
        return Err(ConfigError::Invalid(format!(
            "{} takes one or two delays (MaximumRetryAttempts is at most 2), got {}",
            names("async-retry-delays"),
            args.async_retry_delays.len()
        )));
    }
    if args.roles.contains(&Role::Worker) {
        if args.memory_budget_mb < 128 {
            return Err(ConfigError::Invalid(format!(
                "{} must be at least 128 (one function of the smallest size), got {}",
                names("memory-budget-mb"),
                args.memory_budget_mb
            )));
        }
        if args.code_cache_max_mb == 0 {
            return Err(ConfigError::Invalid(format!(
                "{} must be at least 1",
                names("code-cache-max-mb")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeConfig,
    }

    fn parse(args: &[&str]) -> NodeConfig {
        Cli::try_parse_from(std::iter::once("node").chain(args.iter().copied()))
            .expect("parse")
            .node
    }

    fn file(text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "sluice-config-{}-{}.toml",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn every_key_of_a_file_becomes_its_settings_variable() {
        let p = file(
            "kafka = \"k1:9092,k2:9092\"\nroles = [\"poller\", \"worker\"]\nlease-ttl = \"3s\"\nmemory-budget-mb = 2048\n",
        );
        let vars = read_file(&p).expect("read");
        assert_eq!(
            vars,
            [
                ("SLUICE_KAFKA".to_owned(), "k1:9092,k2:9092".to_owned()),
                ("SLUICE_LEASE_TTL".to_owned(), "3s".to_owned()),
                ("SLUICE_MEMORY_BUDGET_MB".to_owned(), "2048".to_owned()),
                ("SLUICE_ROLES".to_owned(), "poller,worker".to_owned()),
            ]
        );
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let p = file("lease_ttl = \"3s\"\n");
        let e = read_file(&p).expect_err("unknown").to_string();
        assert!(e.contains("unknown setting `lease_ttl`"), "{e}");
        assert!(e.contains("lease-ttl"), "a close name is suggested: {e}");
        let p2 = file("lease-ttl = { s = 3 }\n");
        let e = read_file(&p2).expect_err("shape").to_string();
        assert!(e.contains("lease-ttl"), "{e}");
        let _ = (std::fs::remove_file(p), std::fs::remove_file(p2));
    }

    #[test]
    fn the_file_is_found_on_the_command_line() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            file_from_args(&args(&["sluice", "node", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            file_from_args(&args(&[
                "sluice",
                "node",
                "--kafka",
                "k",
                "--config=b.toml"
            ])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(
            file_from_args(&args(&["sluice", "invoke", "--config", "a.toml"])),
            None
        );
    }

    #[test]
    fn validation_names_the_setting_the_bound_and_the_value() {
        assert!(validate(&parse(&[])).is_ok(), "the defaults are valid");
        let e = validate(&parse(&["--lease-ttl", "10ms"]))
            .expect_err("short lease")
            .to_string();
        assert!(
            e.contains("--lease-ttl (SLUICE_LEASE_TTL, `lease-ttl` in the config file)")
                && e.contains("300ms")
                && e.contains("10ms"),
            "{e}"
        );
        let e = validate(&parse(&[
            "--throttle-backoff-min",
            "10s",
            "--throttle-backoff-max",
            "1s",
        ]))
        .expect_err("inverted")
        .to_string();
        assert!(e.contains("--throttle-backoff-max"), "{e}");
        let e = validate(&parse(&["--topic-prefix", "a b"]))
            .expect_err("prefix")
            .to_string();
        assert!(e.contains("--topic-prefix"), "{e}");
        let e = validate(&parse(&["--redis", "not a url"]))
            .expect_err("redis")
            .to_string();
        assert!(e.contains("--redis"), "{e}");
    }
}
