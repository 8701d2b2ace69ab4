//! vmsync node daemon library: configuration, control socket, the node and
//! its replication engine. The binaries `vmsyncd` and `vmsyncctl` are thin
//! wrappers over this crate.

pub mod config;
pub mod control;
pub mod ctl;
pub mod directory;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod replication;
