//! Destinations: Lambda-shaped invocation records written to Kafka topics (on-success,
//! on-failure), and the tail and redrive tools that read them back.
//!
//! Not built yet: this crate is the home of the "Async invocation" issue. It exists now so that the
//! workspace has the shape of `design.md` §1.
#![forbid(unsafe_code)]
