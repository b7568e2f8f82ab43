//! Validation and parsing shared by every configuration type.

use std::fmt;

use serde::de::DeserializeOwned;

/// One broken rule: the field (Lambda's name, with a path for nested fields) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, e.g. `BatchSize` or `DestinationConfig.OnFailure.Destination`.
    pub field: String,
    /// What is allowed and what was given, e.g. `must be 1..=10000, got 0`.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.message)
    }
}

/// Every violation found in one object (validation does not stop at the first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    /// Records a violation of `field`.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Violation {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Checks `min <= value <= max`.
    pub fn range(&mut self, field: &str, value: i64, min: i64, max: i64) {
        if !(min..=max).contains(&value) {
            self.push(field, format!("must be {min}..={max}, got {value}"));
        }
    }

    /// `Ok(())` when nothing was recorded.
    ///
    /// # Errors
    /// The collected violations, when there are any.
    pub fn into_result(self) -> Result<(), Violations> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// True when nothing was recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// A configuration object that checks its own rules.
pub trait Validate {
    /// Checks every rule and reports all violations at once.
    ///
    /// # Errors
    /// The violations found.
    fn validate(&self) -> Result<(), Violations>;
}

/// The text formats configuration is accepted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON, as the Lambda API and the AWS CLI send it.
    Json,
    /// YAML, as in SAM templates.
    Yaml,
}

impl Format {
    /// Picks the format from a file name (`.yaml`/`.yml` → YAML, anything else JSON).
    #[must_use]
    pub fn from_path(path: &str) -> Self {
        if path.ends_with(".yaml") || path.ends_with(".yml") {
            Format::Yaml
        } else {
            Format::Json
        }
    }
}

/// Why a configuration document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The text is not valid JSON, or has an unknown field or a value of the wrong type.
    #[error("invalid JSON: {0}")]
    ParseJson(#[source] serde_json::Error),
    /// The text is not valid YAML, or has an unknown field or a value of the wrong type.
    #[error("invalid YAML: {0}")]
    ParseYaml(#[source] serde_yaml::Error),
    /// The document has a field Sluice does not know (user input is strict; records that
    /// newer nodes wrote to the configuration store are not, see [`parse`]).
    #[error("unknown field `{0}` (field names are Lambda's, case-sensitive)")]
    UnknownField(String),
    /// The document parsed but breaks the rules.
    #[error("invalid configuration: {0}")]
    Invalid(#[source] Violations),
}

/// Parses and validates a configuration document.
///
/// # Errors
/// [`ModelError::ParseJson`]/[`ModelError::ParseYaml`] for syntax and types,
/// [`ModelError::UnknownField`] for a field the model does not have (with its path, e.g.
/// `Code.S3Bucket`), [`ModelError::Invalid`] with every violated rule.
///
/// The model types themselves accept unknown fields, so that a node reads configuration records
/// written by a newer node (a rolling upgrade never splits the nodes' views); strictness is this
/// function's, which is what user input goes through.
pub fn parse<T: DeserializeOwned + Validate>(text: &str, format: Format) -> Result<T, ModelError> {
    let value: T = parse_strict(text, format)?;
    value.validate().map_err(ModelError::Invalid)?;
    Ok(value)
}

/// Parses user input refusing unknown fields, without validating (for request bodies that are
/// not model objects themselves, e.g. a partial update).
///
/// # Errors
/// As [`parse`], but never [`ModelError::Invalid`].
pub fn parse_strict<T: DeserializeOwned>(text: &str, format: Format) -> Result<T, ModelError> {
    let mut unknown: Option<String> = None;
    let mut note = |path: serde_ignored::Path<'_>| {
        unknown.get_or_insert_with(|| path.to_string());
    };
    let value: T = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let v =
                serde_ignored::deserialize(&mut de, &mut note).map_err(ModelError::ParseJson)?;
            de.end().map_err(ModelError::ParseJson)?;
            v
        }
        Format::Yaml => {
            serde_ignored::deserialize(serde_yaml::Deserializer::from_str(text), &mut note)
                .map_err(ModelError::ParseYaml)?
        }
    };
    if let Some(field) = unknown {
        return Err(ModelError::UnknownField(field));
    }
    Ok(value)
}

/// Checks a Lambda function name: 1–64 of `[A-Za-z0-9_-]`.
pub(crate) fn check_function_name(v: &mut Violations, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= super::MAX_FUNCTION_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        v.push(
            field,
            format!("must be 1..=64 characters of letters, digits, '-' and '_', got {name:?}"),
        );
    }
}

/// Checks a Kafka topic name: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub(crate) fn check_topic_name(v: &mut Violations, field: &str, topic: &str) {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        v.push(
            field,
            format!(
                "must be a Kafka topic name (1..=249 characters of letters, digits, '.', '_' and \
                 '-', not '.' or '..'), got {topic:?}"
            ),
        );
    }
}
