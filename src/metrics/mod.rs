//! The Prometheus endpoint (`[metrics] listen`, opt-in).
//!
//! What is measured where:
//! - guest I/O (requests, bytes, errors and a latency histogram per
//!   operation) by [`io::Metered`], a layer on top of the block stack that
//!   is only inserted when metrics are on, so a node without them pays
//!   nothing per request;
//! - everything else (role, link and replication state, bytes replicated,
//!   resynced, fetched, stale bytes per peer, WAN push) is read from the
//!   node's status when Prometheus scrapes (see [`snapshot`]).

pub mod exporter;
pub mod io;
pub mod snapshot;

pub use io::{IoMetrics, Metered};
