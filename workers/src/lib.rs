//! Workers: sandboxes (jailed process, KVM micro-VM), the per-node warm pool, the worker manager and
//! placement.
//!
//! Not built yet: this crate is the home of the "Sandboxes" issues. It exists now so that the
//! workspace has the shape of `design.md` §1.
#![forbid(unsafe_code)]
