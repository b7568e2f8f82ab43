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
    /// The instruction set: this node's (`x86_64` or `arm64`), one entry at most; empty means
    /// the node's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Tags (key → value): at most 50, keys 1–128 characters not starting with `aws:`, values up
    /// to 256. Kept and returned; Sluice gives them no other meaning.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// `Zip`, the only package type Sluice runs (container images are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_type: Option<String>,
    /// X-Ray tracing mode (`Active` or `PassThrough`); kept and returned. The trace header is
    /// passed to the function either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing_config: Option<TracingConfig>,
    /// Layer ARNs: accepted only empty (Sluice has no layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

/// Lambda's `TracingConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TracingConfig {
    /// `Active` or `PassThrough`.
    pub mode: String,
}

/// The instruction set of the machine this was built for, as Lambda names it.
#[must_use]
pub fn host_architecture() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    }
}

/// A function named as Lambda lets callers name one: `my-function`, `my-function:qualifier`, a
/// partial ARN (`123456789012:function:my-function`) or a full ARN
/// (`arn:aws:lambda:us-east-1:123456789012:function:my-function`), the ARNs optionally qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef {
    /// The function's name.
    pub name: String,
    /// A version or alias (`$LATEST`, `1`, `live`), when one was given.
    pub qualifier: Option<String>,
    /// The region of a full ARN.
    pub region: Option<String>,
    /// The account of an ARN.
    pub account: Option<String>,
}

impl FunctionRef {
    /// Parses `s`.
    ///
    /// # Errors
    /// What is wrong with it, and the forms that are allowed.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (name, qualifier, region, account) = match parts.as_slice() {
            [name] => (*name, None, None, None),
            [name, q] => (*name, Some(*q), None, None),
            [acct, "function", name] => (*name, None, None, Some(*acct)),
            [acct, "function", name, q] => (*name, Some(*q), None, Some(*acct)),
            ["arn", _, "lambda", region, acct, "function", name] => {
                (*name, None, Some(*region), Some(*acct))
            }
            ["arn", _, "lambda", region, acct, "function", name, q] => {
                (*name, Some(*q), Some(*region), Some(*acct))
            }
            _ => {
                return Err(format!(
                    "{s:?} is not a function name, a partial ARN \
                     (ACCOUNT:function:NAME) or an ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME), \
                     each optionally followed by :QUALIFIER"
                ))
            }
        };
        if name.is_empty() || qualifier.is_some_and(str::is_empty) {
            return Err(format!("{s:?} has an empty function name or qualifier"));
        }
        Ok(Self {
            name: name.to_owned(),
            qualifier: qualifier.map(str::to_owned),
            region: region.map(str::to_owned),
            account: account.map(str::to_owned),
        })
    }
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
            architectures: Vec::new(),
            tags: BTreeMap::new(),
            package_type: None,
            tracing_config: None,
            layers: Vec::new(),
        }
    }

    /// The instruction set the function runs on (the node's unless one was given).
    #[must_use]
    pub fn architecture(&self) -> &str {
        self.architectures
            .first()
            .map_or(host_architecture(), String::as_str)
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
        let arch = host_architecture();
        match self.architectures.as_slice() {
            [] => {}
            [a] if a == arch => {}
            other => v.push(
                "Architectures",
                format!("must be [\"{arch}\"] (this node's instruction set), got {other:?}"),
            ),
        }
        check_tags(&mut v, &self.tags);
        if let Some(p) = &self.package_type {
            if p != "Zip" {
                v.push(
                    "PackageType",
                    format!(
                        "must be Zip, got {p:?}: Sluice runs zip bundles with a bootstrap (custom \
                         runtimes), not container images"
                    ),
                );
            }
        }
        if let Some(t) = &self.tracing_config {
            if !matches!(t.mode.as_str(), "Active" | "PassThrough") {
                v.push(
                    "TracingConfig.Mode",
                    format!("must be Active or PassThrough, got {:?}", t.mode),
                );
            }
        }
        if !self.layers.is_empty() {
            v.push(
                "Layers",
                format!(
                    "must be empty, got {} layer(s): Sluice has no layers; put what a layer would \
                     hold into the bundle",
                    self.layers.len()
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

/// Lambda's limits on tags: 50 per resource, keys 1–128 characters that do not start with
/// `aws:`, values up to 256.
pub fn check_tags(v: &mut Violations, tags: &BTreeMap<String, String>) {
    if tags.len() > 50 {
        v.push(
            "Tags",
            format!("must hold at most 50 tags, got {}", tags.len()),
        );
    }
    for (k, val) in tags {
        let n = k.chars().count();
        if n == 0 || n > 128 {
            v.push(
                format!("Tags.{k}"),
                format!("key must be 1..=128 characters, got {n}"),
            );
        } else if k.starts_with("aws:") {
            v.push(
                format!("Tags.{k}"),
                "key must not start with aws: (reserved by AWS)",
            );
        }
        if val.chars().count() > 256 {
            v.push(
                format!("Tags.{k}"),
                format!(
                    "value must be at most 256 characters, got {}",
                    val.chars().count()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse, Format, ModelError};

    #[test]
    fn function_refs_take_lambdas_name_forms() {
        let r = FunctionRef::parse("arn:aws:lambda:us-east-1:123456789012:function:f:live")
            .expect("arn");
        assert_eq!(
            (
                r.name.as_str(),
                r.qualifier.as_deref(),
                r.region.as_deref(),
                r.account.as_deref()
            ),
            ("f", Some("live"), Some("us-east-1"), Some("123456789012"))
        );
        let r = FunctionRef::parse("123456789012:function:f").expect("partial");
        assert_eq!(
            (r.name.as_str(), r.account.as_deref()),
            ("f", Some("123456789012"))
        );
        let r = FunctionRef::parse("f:$LATEST").expect("qualified");
        assert_eq!(
            (r.name.as_str(), r.qualifier.as_deref()),
            ("f", Some("$LATEST"))
        );
        assert_eq!(FunctionRef::parse("f").expect("name").name, "f");
        for bad in [
            "arn:aws:s3:::bucket",
            "a:b:c",
            "f:",
            ":f",
            "arn:aws:lambda:r:1:layer:x",
        ] {
            assert!(FunctionRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tooling_fields_are_kept_and_what_sluice_cannot_honour_is_refused() {
        let f: FunctionConfig = parse(
            &format!(
                r#"{{"FunctionName":"f","Code":{{"Path":"/x"}},"Architectures":["{}"],
                "Tags":{{"team":"a"}},"PackageType":"Zip","TracingConfig":{{"Mode":"Active"}},
                "Layers":[]}}"#,
                host_architecture()
            ),
            Format::Json,
        )
        .expect("valid");
        assert_eq!(f.tags["team"], "a");
        assert_eq!(f.architecture(), host_architecture());
        let err = parse::<FunctionConfig>(
            r#"{"FunctionName":"f","Code":{"Path":"/x"},"PackageType":"Image",
            "Layers":["arn:aws:lambda:us-east-1:1:layer:l:1"],"Architectures":["sparc"],
            "TracingConfig":{"Mode":"On"},"Tags":{"aws:x":"1"}}"#,
            Format::Json,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for field in [
            "PackageType",
            "Layers",
            "Architectures",
            "TracingConfig.Mode",
            "Tags.aws:x",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
    }

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
