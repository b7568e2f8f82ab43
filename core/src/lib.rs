//! Sluice core: the configuration model every stage shares, and the configuration store.
//!
//! - [`model`]: the user-facing configuration of functions ([`model::FunctionConfig`]),
//!   asynchronous invocation ([`model::EventInvokeConfig`]), provisioned concurrency
//!   ([`model::ProvisionedConcurrencyConfig`]) and Kafka event source mappings
//!   ([`model::EventSourceMappingConfig`]), with Lambda's PascalCase names, ranges and defaults.
//!   User input is parsed strictly ([`model::parse`] refuses unknown fields; stored records are
//!   read leniently, so nodes of different versions share one view) and validated with messages
//!   that name the field, the bound and the value.
//! - [`filter`]: Lambda's `FilterCriteria` patterns, compiled once: the API validates with the
//!   compiler the pollers match with.
//! - [`store`]: the configuration store shared by all nodes, a compacted Kafka topic that every
//!   node materialises in memory. Writes are optimistic (revision numbers) and return once the
//!   writer's own view contains them.
//!
//! Threading: the store runs one tokio task per node that tails the configuration topic; readers
//! take snapshots from a `watch` channel and never block the tail.
#![forbid(unsafe_code)]

pub mod code;
pub mod events;
pub mod filter;
pub mod invoke;
pub mod kafka;
pub mod logs;
pub mod model;
pub mod producer;
pub mod store;
pub mod time;
