//! STUB: replaced by the `dir` branch.
pub mod client;
