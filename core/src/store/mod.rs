//! The configuration store shared by all nodes.
//!
//! Durable state is a compacted Kafka topic (one partition, so one total order). Every node tails
//! it from the beginning into an in-memory [`View`]; the topic is the only source of truth.
//!
//! Writes are optimistic. Each record names the revision it was based on; the view applies a record
//! only when that base equals the object's current revision, so every node, reading the same log in
//! the same order, reaches the same verdict on the same record, and a lost race is reported to its
//! writer as [`StoreError::Conflict`], never silently dropped. A write returns once the writer's own
//! view has applied (or refused) it.
//!
//! Writers also take a short per-object lock in Redis before checking and producing. The log rule
//! alone detects every conflict; the lock keeps losing records out of the log, which matters for
//! compaction (Kafka keeps the *last* record of a key, so a refused record that came last would
//! shadow the accepted one for nodes that start after compaction ran).

mod record;
mod tail;
mod view;

pub use record::{ConfigObject, ConfigRecord, ObjectKey, ObjectKind};
pub use tail::{ConfigStore, ConfigStoreConfig, Expected, StoreError};
pub use view::{Outcome, Versioned, View};
