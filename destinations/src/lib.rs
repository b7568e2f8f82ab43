//! Destinations: Lambda-shaped invocation records written to Kafka topics (on-success,
//! on-failure), and the tools that read them back.
//!
//! - [`record`]: Lambda's asynchronous invocation record (`version`, `timestamp`,
//!   `requestContext`, `requestPayload`, `responseContext`, `responsePayload`).
//! - [`writer`]: [`DestinationWriter`], which creates destination topics on first use and retries
//!   a write until Kafka has it (counting failures), so an event is never lost on the way out.
//!
//! Threading: async, on the node's runtime; one shared idempotent producer.
#![forbid(unsafe_code)]

pub mod record;
pub mod writer;

pub use record::{Condition, InvocationRecord, ResponseContext};
pub use writer::DestinationWriter;
