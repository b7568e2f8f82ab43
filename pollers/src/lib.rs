//! Pollers: the async-queue pollers (this module's [`async_poller`]) and, next, the stream
//! (event source mapping) pollers and their tracker.
//!
//! - [`offsets`]: per-partition offset tracking for records processed out of order: the
//!   committed offset is always the lowest unfinished one, so nothing is skipped on a crash.
//! - [`async_poller`]: consumes the async queue, runs each event with Lambda's retry policy,
//!   maximum event age, throttling back-off and destinations; delayed re-delivery goes through
//!   Kafka delay topics before the source offset is committed.
//!
//! Threading: tokio tasks on the node's runtime; librdkafka's own threads behind the consumers.
#![forbid(unsafe_code)]

pub mod async_poller;
mod balance;
pub mod filter;
pub mod offsets;
pub mod stream;
