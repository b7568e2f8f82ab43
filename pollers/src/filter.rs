//! Event filtering: the compiler and matcher live in [`sluice_core::filter`], so that the API
//! validates a mapping's `FilterCriteria` with the very code its pollers run.

pub use sluice_core::filter::{FilterError, FilterSet};
