//! Pollers: the async-queue pollers and the stream (event source mapping) pollers, and the stream
//! tracker that turns mappings × partitions into work units.
//!
//! Not built yet: this crate is the home of issues "Async invocation" and "Stream event source
//! mappings". It exists now so that the workspace has the shape of `design.md` §1.
#![forbid(unsafe_code)]
