//! Stream event source mappings on Kafka: the tracker and the mapping pollers.
//!
//! The **tracker** (one per poller node) watches the configuration and runs one [`MappingPoller`]
//! per enabled mapping, restarting it when its configuration changes (an update applies live) and
//! stopping it when the mapping is disabled or deleted. It also moves mappings through Lambda's
//! states (`Creating`/`Enabling`/`Updating` → `Enabled`, `Disabling` → `Disabled`).
//!
//! A **mapping poller** consumes the mapping's topic in the mapping's consumer group. Partitions
//! are work units handed out by Redis leases (see `balance`); the group only stores offsets, so
//! Kafka's own tools show the lag. Records of one partition are routed to
//! `ParallelizationFactor` lanes by key hash, so records of one key stay in order; each lane builds
//! batches (BatchSize, batching window, 6 MiB), filters them, invokes the function synchronously
//! and handles the result: success; a partial-batch response (retry from the lowest failed
//! record); a function error (bisect, retry up to MaximumRetryAttempts or until the record is older
//! than MaximumRecordAgeInSeconds, then one failure record per record to the on-failure topic).
//! The committed offset is always the lowest unfinished record of the partition. A poller whose
//! lease is gone makes no further invoke or commit. A panic while handling a batch never ends its
//! lane (see `lane`): the batch's unfinished records go to the on-failure destination and are
//! finished, counted in `sluice_stream_handler_panics_total{mapping}`.

pub mod event;
mod lane;
mod policy;
mod poller;
mod tracker;

use std::time::Duration;

pub use self::poller::StreamError;
pub use self::tracker::StreamTracker;

/// Settings shared by every mapping poller of a node. (How often an unchanged commit is sent
/// again is [`StreamTracker::with_commit_refresh`].)
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// This node's id (lease holder).
    pub node_id: String,
    /// Prefix of Redis keys.
    pub redis_prefix: String,
    /// TTL of partition leases.
    pub lease_ttl: Duration,
    /// `arn:aws:lambda:<region>:<account>:function:`.
    pub function_arn_prefix: String,
}
