//! Functions: a code bundle with an executable `bootstrap` and its runtime settings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate::{check_function_name, Validate, Violations};

/// The longest function name Lambda accepts.
pub const MAX_FUNCTION_NAME_LEN: usize = 64;

/// A function, as CreateFunction takes it (Lambda's names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfig {
    /// The function's name: 1–64 letters, digits, `-` and `_`.
    pub function_name: String,
    /// Where the code bundle is: a local path or an inline zip. The bundle holds an executable
    /// `bootstrap` (Lambda's custom-runtime contract).
    pub code: FunctionCode,
    /// Memory for one execution environment, in MiB: 128–10240, default 128.
    #[serde(default = "default_memory_size")]
    pub memory_size: i64,
    /// Longest time one invocation may run, in seconds: 1–900, default 3.
    #[serde(default = "default_timeout")]
    pub timeout: i64,
    /// Environment variables given to `bootstrap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    /// Reserved concurrency: caps and guarantees the function's concurrent executions; 0 stops
    /// every invocation (throttled). Absent: the function shares the unreserved pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_concurrent_executions: Option<i64>,
    /// Passed to the runtime as `_HANDLER`; custom runtimes may ignore it.
    #[serde(default = "default_handler")]
    pub handler: String,
    /// The runtime identifier. Sluice runs custom runtimes: `provided.al2023` (default) or
    /// `provided.al2`.
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Free text, up to 256 characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Accepted for compatibility with Lambda tooling; Sluice does not use IAM roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The size of the function's `/tmp`, in MiB: 512–10240, default 512 (Lambda's
    /// EphemeralStorage). Writes past it fail with ENOSPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<EphemeralStorage>,
}

/// Lambda's `EphemeralStorage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorage {
    /// MiB of `/tmp`: 512–10240.
    pub size: i64,
}

/// Lambda's default `/tmp` size, MiB.
pub const DEFAULT_EPHEMERAL_STORAGE_MB: i64 = 512;

/// Where a function's code is. Exactly one of the fields is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionCode {
    /// The unpacked bundle: a directory on the nodes' file system (a Sluice extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The bundle as a base64-encoded zip, as the Lambda API takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip_file: Option<String>,
    /// Where Sluice keeps a bundle given as `ZipFile` (set by Sluice, not by users).
    #[serde(
        default,
        rename = "SluiceStoredCode",
        skip_serializing_if = "Option::is_none"
    )]
    pub stored: Option<Box<StoredCode>>,
}

/// A bundle kept in Kafka: chunks of one partition of `topic`, from `offset`, keyed by the
/// SHA-256 of the zip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StoredCode {
    /// Hex SHA-256 of the zip.
    pub sha256: String,
    /// Zip size, bytes.
    pub size: u64,
    /// The code topic.
    pub topic: String,
    /// Offset of the first chunk (partition 0).
    pub offset: i64,
    /// Number of chunks.
    pub chunks: u32,
}

/// Environment variables (Lambda's `Environment.Variables`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Environment {
    /// Name → value. Names start with a letter and hold letters, digits and `_`.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

impl FunctionConfig {
    /// A function with Lambda's defaults whose bundle is the directory or zip at `path`.
    #[must_use]
    pub fn from_path(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            function_name: name.into(),
            code: FunctionCode {
                path: Some(path.into()),
                zip_file: None,
                stored: None,
            },
            memory_size: default_memory_size(),
            timeout: default_timeout(),
            environment: None,
            reserved_concurrent_executions: None,
            handler: default_handler(),
            runtime: default_runtime(),
            description: String::new(),
            role: None,
            ephemeral_storage: None,
        }
    }

    /// The size of the function's `/tmp`, MiB (the default when none is set).
    #[must_use]
    pub fn ephemeral_storage_mb(&self) -> i64 {
        self.ephemeral_storage
            .map_or(DEFAULT_EPHEMERAL_STORAGE_MB, |e| e.size)
    }
}

fn default_memory_size() -> i64 {
    128
}
fn default_timeout() -> i64 {
    3
}
fn default_handler() -> String {
    "bootstrap".to_owned()
}
fn default_runtime() -> String {
    "provided.al2023".to_owned()
}

/// Environment variables Lambda sets itself and does not let users override.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

impl Validate for FunctionConfig {
    fn validate(&self) -> Result<(), Violations> {
        let mut v = Violations::default();
        check_function_name(&mut v, "FunctionName", &self.function_name);
        match (&self.code.path, &self.code.zip_file) {
            (Some(p), None) if p.is_empty() => v.push("Code.Path", "must not be empty"),
            (None, Some(z)) if z.is_empty() => v.push("Code.ZipFile", "must not be empty"),
            (Some(_), None) | (None, Some(_)) => {}
            (None, None) if self.code.stored.is_some() => {}
            (None, None) => v.push("Code", "must have one of Path or ZipFile, got neither"),
            (Some(_), Some(_)) => v.push("Code", "must have one of Path or ZipFile, got both"),
        }
        v.range("MemorySize", self.memory_size, 128, 10_240);
        v.range("Timeout", self.timeout, 1, 900);
        if let Some(e) = self.ephemeral_storage {
            v.range("EphemeralStorage.Size", e.size, 512, 10_240);
        }
        if let Some(r) = self.reserved_concurrent_executions {
            v.range("ReservedConcurrentExecutions", r, 0, 100_000);
        }
        if !matches!(
            self.runtime.as_str(),
            "provided.al2023" | "provided.al2" | "provided"
        ) {
            v.push(
                "Runtime",
                format!(
                    "must be one of provided.al2023, provided.al2, provided (custom runtimes with a \
                     bootstrap), got {:?}",
                    self.runtime
                ),
            );
        }
        if self.handler.is_empty() || self.handler.len() > 128 {
            v.push(
                "Handler",
                format!("must be 1..=128 characters, got {}", self.handler.len()),
            );
        }
        if self.description.chars().count() > 256 {
            v.push(
                "Description",
                format!(
                    "must be at most 256 characters, got {}",
                    self.description.chars().count()
                ),
            );
        }
        if let Some(env) = &self.environment {
            for name in env.variables.keys() {
                let field = format!("Environment.Variables.{name}");
                let well_formed = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !well_formed {
                    v.push(
                        field,
                        "name must start with a letter and hold only letters, digits and '_'",
                    );
                } else if RESERVED_ENV.contains(&name.as_str()) {
                    v.push(
                        field,
                        "is reserved: Sluice sets it for every function, as Lambda does",
                    );
                }
            }
            let total: usize = env
                .variables
                .iter()
                .map(|(k, val)| k.len() + val.len())
                .sum();
            if total > 4096 {
                v.push(
                    "Environment.Variables",
                    format!("must total at most 4096 bytes (names and values), got {total}"),
                );
            }
        }
        v.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse, Format, ModelError};

    #[test]
    fn defaults_follow_lambda() {
        let f: FunctionConfig = parse(
            r#"{"FunctionName":"echo","Code":{"Path":"/srv/echo"}}"#,
            Format::Json,
        )
        .expect("valid");
        assert_eq!(f.memory_size, 128);
        assert_eq!(f.timeout, 3);
        assert_eq!(f.runtime, "provided.al2023");
        assert_eq!(f.reserved_concurrent_executions, None);
    }

    #[test]
    fn every_violation_is_reported_with_bound_and_value() {
        let err = parse::<FunctionConfig>(
            r#"{"FunctionName":"bad name","Code":{},"MemorySize":64,"Timeout":901}"#,
            Format::Json,
        )
        .expect_err("invalid");
        let ModelError::Invalid(v) = err else {
            panic!("expected violations, got {err}")
        };
        let text = v.to_string();
        assert_eq!(v.0.len(), 4, "{text}");
        assert!(
            text.contains("MemorySize must be 128..=10240, got 64"),
            "{text}"
        );
        assert!(text.contains("Timeout must be 1..=900, got 901"), "{text}");
        assert!(text.contains("FunctionName"), "{text}");
        assert!(
            text.contains("Code must have one of Path or ZipFile, got neither"),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_in_json_and_yaml() {
        let json = parse::<FunctionConfig>(
            r#"{"FunctionName":"f","Code":{"Path":"/x"},"MemorySizeMb":256}"#,
            Format::Json,
        )
        .expect_err("unknown field");
        assert!(
            json.to_string().contains("unknown field `MemorySizeMb`"),
            "{json}"
        );
        let yaml = parse::<FunctionConfig>(
            "FunctionName: f\nCode:\n  Path: /x\n  S3Bucket: b\n",
            Format::Yaml,
        )
        .expect_err("unknown field");
        assert!(
            yaml.to_string().contains("unknown field `Code.S3Bucket`"),
            "{yaml}"
        );
    }

    #[test]
    fn stored_records_with_fields_from_a_newer_node_still_decode() {
        // What the store reads: plain serde, no strictness (a rolling upgrade).
        let f: FunctionConfig = serde_json::from_str(
            r#"{"FunctionName":"f","Code":{"Path":"/x","Future":1},"SnapStart":{"ApplyOn":"None"}}"#,
        )
        .expect("lenient decode");
        assert_eq!(f.function_name, "f");
        // What users send: strict.
        let err = parse::<FunctionConfig>(
            r#"{"FunctionName":"f","Code":{"Path":"/x"},"SnapStart":{"ApplyOn":"None"}}"#,
            Format::Json,
        )
        .expect_err("unknown field");
        assert!(
            err.to_string().contains("unknown field `SnapStart`"),
            "{err}"
        );
    }

    #[test]
    fn reserved_environment_names_are_refused() {
        let err = parse::<FunctionConfig>(
            r#"{"FunctionName":"f","Code":{"Path":"/x"},
                "Environment":{"Variables":{"AWS_LAMBDA_RUNTIME_API":"x","OK_NAME":"y"}}}"#,
            Format::Json,
        )
        .expect_err("reserved");
        assert!(err
            .to_string()
            .contains("Environment.Variables.AWS_LAMBDA_RUNTIME_API is reserved"));
    }

    #[test]
    fn negative_reserved_concurrency_names_the_bound() {
        let err = parse::<FunctionConfig>(
            r#"{"FunctionName":"f","Code":{"Path":"/x"},"ReservedConcurrentExecutions":-1}"#,
            Format::Json,
        )
        .expect_err("negative");
        assert!(err
            .to_string()
            .contains("ReservedConcurrentExecutions must be 0..=100000, got -1"));
    }
}
