//! Destinations: Lambda-shaped invocation records written to Kafka topics (on-success,
//! on-failure), and the tools that read them back.
//!
//! - [`record`]: Lambda's asynchronous invocation record (`version`, `timestamp`,
//!   `requestContext`, `requestPayload`, `responseContext`, `responsePayload`).
//! - [`writer`]: [`DestinationWriter`], which creates destination topics on first use, retries a
//!   write while the error is retryable (counting failures), delivers a record too large for
//!   Kafka with its payloads replaced by a marker, and returns other permanent errors
//!   ([`DestinationError`]) instead of retrying them forever.
//!
//! Threading: async, on the node's runtime; one shared idempotent producer.
#![forbid(unsafe_code)]

pub mod record;
pub mod writer;

pub use record::{Condition, InvocationRecord, ResponseContext};
pub use writer::{Delivered, DestinationError, DestinationWriter};
