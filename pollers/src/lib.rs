//! Pollers: the async-queue pollers and the stream (event source mapping) pollers and their
//! tracker, on one consumer runtime.
//!
//! - `runtime`: the consumer runtime every poller plugs into: partitions owned by leases, the
//!   receive loop with per-partition budgets (a full partition is paused, never the loop), offset
//!   tracking, commits (refreshed while idle), and ordered shutdown.
//! - [`offsets`]: per-partition offset tracking for records processed out of order: the
//!   committed offset is always the lowest unfinished one, so nothing is skipped on a crash.
//! - [`async_poller`]: consumes the async queue, runs each event with Lambda's retry policy,
//!   maximum event age, throttling back-off and destinations; delayed re-delivery goes through
//!   Kafka delay topics before the source offset is committed.
//! - [`stream`]: the tracker (mappings → pollers) and the mapping pollers (per-key lanes per
//!   partition, batching, retry, bisection, partial batches, record age, on-failure).
//!
//! Threading: tokio tasks on the node's runtime; librdkafka's own threads behind the consumers.
#![forbid(unsafe_code)]

pub mod async_poller;
mod balance;
pub mod filter;
pub mod offsets;
mod runtime;
pub mod stream;
