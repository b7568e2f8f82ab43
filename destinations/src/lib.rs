//! Destinations: Lambda-shaped invocation records written to Kafka topics (on-success,
//! on-failure), and the tools that read them back.
//!
//! - [`record`]: Lambda's asynchronous invocation record (`version`, `timestamp`,
//!   `requestContext`, `requestPayload`, `responseContext`, `responsePayload`).
//! - [`stream_record`]: Lambda's failure record of a Kafka event source mapping (one message per
//!   failed record, the record inside a one-record Kafka event).
//! - [`redrive`]: reads a failure destination back and submits its events (to the async queue)
//!   and records (to their own topics) again, resumable, with request ids unique per run.
//! - [`writer`]: [`DestinationWriter`], which creates destination topics on first use, retries a
//!   write while the error is retryable (counting failures), delivers a record too large for
//!   Kafka with its payloads replaced by a marker, and returns other permanent errors
//!   ([`DestinationError`]) instead of retrying them forever.
//!
//! Threading: async, on the node's runtime; one shared idempotent producer. The redrive's
//! consumer is driven from the blocking pool.
#![forbid(unsafe_code)]

pub mod record;
pub mod redrive;
pub mod stream_record;
pub mod writer;

pub use record::{Condition, InvocationRecord, ResponseContext};
pub use redrive::{redrive, RedriveConfig, RedriveError, RedriveProgress, RedriveReport};
pub use stream_record::{FailedRecord, StreamFailureRecord};
pub use writer::{Delivered, DestinationError, DestinationWriter};
