//! What the configuration topic holds: one record per write, keyed by object.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{
    EventInvokeConfig, EventSourceMappingState, FunctionConfig, ProvisionedConcurrencyConfig,
};

/// The kinds of object the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A function.
    Function,
    /// A function's asynchronous invocation settings (named after the function).
    EventInvokeConfig,
    /// An event source mapping (named by its UUID).
    EventSourceMapping,
    /// A function's provisioned concurrency (named after the function).
    ProvisionedConcurrency,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Function => "function",
            ObjectKind::EventInvokeConfig => "event-invoke-config",
            ObjectKind::EventSourceMapping => "event-source-mapping",
            ObjectKind::ProvisionedConcurrency => "provisioned-concurrency",
        }
    }
}

/// An object's identity, and the Kafka record key: `<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// What it is.
    pub kind: ObjectKind,
    /// Its name (function name, or mapping UUID).
    pub name: String,
}

impl ObjectKey {
    /// The key of function `name`.
    #[must_use]
    pub fn function(name: &str) -> Self {
        Self {
            kind: ObjectKind::Function,
            name: name.to_owned(),
        }
    }
    /// The key of function `name`'s event-invoke config.
    #[must_use]
    pub fn event_invoke_config(function: &str) -> Self {
        Self {
            kind: ObjectKind::EventInvokeConfig,
            name: function.to_owned(),
        }
    }
    /// The key of function `name`'s provisioned-concurrency configuration.
    #[must_use]
    pub fn provisioned_concurrency(function: &str) -> Self {
        Self {
            kind: ObjectKind::ProvisionedConcurrency,
            name: function.to_owned(),
        }
    }
    /// The key of mapping `uuid`.
    #[must_use]
    pub fn event_source_mapping(uuid: &str) -> Self {
        Self {
            kind: ObjectKind::EventSourceMapping,
            name: uuid.to_owned(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)
    }
}

impl ObjectKey {
    /// The Kafka record key of one write of this object: `<kind>/<name>/<write id>`.
    ///
    /// Every write has a key of its own, so the log cleaner of a compacted topic never replaces
    /// one write by another: a record disappears only when a later writer tombstones it after a
    /// successor was accepted (see [`super::View::stale`]). Keying by object alone would let a
    /// record that lost a race, written last, shadow the winner once compaction ran.
    #[must_use]
    pub fn record_key(&self, write_id: uuid::Uuid) -> String {
        format!("{self}/{write_id}")
    }

    /// Splits a record key into the object and the write id: `<kind>/<name>/<write id>`, or
    /// `<kind>/<name>` as nodes before per-write keys wrote them (no write id).
    ///
    /// # Errors
    /// When the kind is unknown or there is no `/`.
    pub fn from_record_key(s: &str) -> Result<(Self, Option<uuid::Uuid>), String> {
        let key: ObjectKey = s.parse()?;
        match key.name.rsplit_once('/') {
            Some((name, id)) => {
                let id = uuid::Uuid::parse_str(id)
                    .map_err(|e| format!("bad write id in key {s:?}: {e}"))?;
                Ok((
                    Self {
                        kind: key.kind,
                        name: name.to_owned(),
                    },
                    Some(id),
                ))
            }
            None => Ok((key, None)),
        }
    }
}

impl FromStr for ObjectKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| format!("no '/' in key {s:?}"))?;
        let kind = match kind {
            "function" => ObjectKind::Function,
            "event-invoke-config" => ObjectKind::EventInvokeConfig,
            "event-source-mapping" => ObjectKind::EventSourceMapping,
            "provisioned-concurrency" => ObjectKind::ProvisionedConcurrency,
            other => return Err(format!("unknown kind {other:?} in key {s:?}")),
        };
        Ok(Self {
            kind,
            name: name.to_owned(),
        })
    }
}

/// A stored object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "Kind", content = "Spec")]
#[allow(clippy::large_enum_variant)] // decoded one record at a time; a Box would touch every match
pub enum ConfigObject {
    /// A function.
    Function(FunctionConfig),
    /// Asynchronous invocation settings.
    EventInvokeConfig(EventInvokeConfig),
    /// An event source mapping.
    EventSourceMapping(Box<EventSourceMappingState>),
    /// Provisioned concurrency.
    ProvisionedConcurrency(ProvisionedConcurrencyConfig),
}

impl ConfigObject {
    /// The kind of this object.
    #[must_use]
    pub fn kind(&self) -> ObjectKind {
        match self {
            ConfigObject::Function(_) => ObjectKind::Function,
            ConfigObject::EventInvokeConfig(_) => ObjectKind::EventInvokeConfig,
            ConfigObject::EventSourceMapping(_) => ObjectKind::EventSourceMapping,
            ConfigObject::ProvisionedConcurrency(_) => ObjectKind::ProvisionedConcurrency,
        }
    }
}

/// One write, as the record value on the configuration topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigRecord {
    /// The revision this write creates: `base_revision + 1`.
    pub revision: u64,
    /// The revision the writer saw (0: absent).
    pub base_revision: u64,
    /// Identifies the write, so that its writer can find its verdict.
    pub write_id: uuid::Uuid,
    /// The node that wrote it (for operators).
    pub writer: String,
    /// When it was written, Unix milliseconds.
    pub written_at_ms: i64,
    /// The new object; `None` deletes it.
    pub object: Option<ConfigObject>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_name_the_object_and_the_write() {
        let key = ObjectKey::function("orders");
        let id = uuid::Uuid::new_v4();
        let rk = key.record_key(id);
        assert_eq!(rk, format!("function/orders/{id}"));
        assert_eq!(ObjectKey::from_record_key(&rk), Ok((key.clone(), Some(id))));
        // Keys written before per-write keys still name their object.
        assert_eq!(
            ObjectKey::from_record_key("function/orders"),
            Ok((key, None))
        );
        assert!(ObjectKey::from_record_key("function/orders/not-a-uuid").is_err());
        assert!(ObjectKey::from_record_key("nothing").is_err());
    }

    #[test]
    fn provisioned_concurrency_key_round_trips() {
        let key = ObjectKey::provisioned_concurrency("orders");
        assert_eq!(key.to_string(), "provisioned-concurrency/orders");
        assert_eq!(
            "provisioned-concurrency/orders".parse::<ObjectKey>(),
            Ok(key)
        );
    }

    #[test]
    fn every_kind_round_trips_through_its_key() {
        for key in [
            ObjectKey::function("f"),
            ObjectKey::event_invoke_config("f"),
            ObjectKey::event_source_mapping("0b8e6c2e-0000-4000-8000-000000000000"),
            ObjectKey::provisioned_concurrency("f"),
        ] {
            assert_eq!(key.to_string().parse::<ObjectKey>(), Ok(key));
        }
        assert!("provisioned/f".parse::<ObjectKey>().is_err());
    }

    #[test]
    fn provisioned_concurrency_object_is_tagged_with_its_kind() {
        let object = ConfigObject::ProvisionedConcurrency(ProvisionedConcurrencyConfig {
            requested_provisioned_concurrent_executions: 2,
            last_modified: "2019-11-14T18:16:05.568+0000".into(),
        });
        assert_eq!(object.kind(), ObjectKind::ProvisionedConcurrency);
        let value = serde_json::to_value(&object).expect("encodes");
        assert_eq!(value["Kind"], "ProvisionedConcurrency");
        assert_eq!(value["Spec"]["RequestedProvisionedConcurrentExecutions"], 2);
        let back: ConfigObject = serde_json::from_value(value).expect("decodes");
        assert_eq!(back, object);
    }
}
