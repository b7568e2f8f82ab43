//! The configuration model: what users write (JSON or YAML, Lambda's PascalCase names) and what
//! the store persists.
//!
//! Numbers are read as `i64` so that a negative or oversized value reaches [`Validate`] and gets a
//! message naming the bound, instead of a bare serde type error.

mod function;
mod invoke_config;
mod mapping;
mod provisioned;
mod validate;

pub use function::{
    check_tags, host_architecture, Environment, EphemeralStorage, FunctionCode, FunctionConfig,
    FunctionRef, StoredCode, TracingConfig, DEFAULT_EPHEMERAL_STORAGE_MB, MAX_FUNCTION_NAME_LEN,
};
pub use invoke_config::{Destination, DestinationConfig, EventInvokeConfig, KafkaTopicUri};
pub use mapping::{
    EventSourceMappingConfig, EventSourceMappingState, Filter, FilterCriteria,
    FunctionResponseType, KafkaEventSourceConfig, MappingState, MetricsConfig, MetricsKind,
    ProvisionedPollerConfig, SelfManagedEventSource, SourceAccessConfiguration, StartingPosition,
};
pub use provisioned::ProvisionedConcurrencyConfig;
pub use validate::{parse, parse_strict, Format, ModelError, Validate, Violation, Violations};
