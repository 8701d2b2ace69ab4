//! Shared helpers for the integration tests (each `tests/*.rs` file is its
//! own crate and includes this with `mod support;`).
//!
//! * [`workload`]: a seeded random write workload, run at a queue depth over
//!   a block socket, and the model of what the device must then contain.
//! * [`hash`]: BLAKE3 of an image file or of a device read through a client.
//! * [`testdir`]: configs, images and the secret for an N-node loopback cluster.
//! * [`daemon`]: spawning and controlling the real `vmsyncd` / `vmsyncctl`.
//! * [`netns`]: two network namespaces joined by a shaped veth (a WAN link).

// Every test crate uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod daemon;
pub mod directory;
pub mod hash;
pub mod netns;
pub mod proxy;
pub mod rawpeer;
pub mod testdir;
pub mod workload;

pub use cluster::Cluster;
pub use daemon::{ctl, wait_for, Daemon};
pub use hash::{blake3_of_device_via_client, blake3_of_file};
pub use testdir::{ClusterSpec, NodeFiles, TestDir};
pub use workload::{Model, Op, Workload};

/// A multi-threaded tokio runtime for the async parts of a blocking test
/// (block socket clients), so daemons can be driven with plain blocking
/// calls in between.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
