//! vmsync storage core.
//!
//! * [`device`]: the [`BlockDevice`] trait every layer implements.
//! * [`backing`]: the local backing store (file or block device) on io_uring.
//! * [`lazy`]: the on-demand fetch layer: stale blocks fetched before they are read.
//! * [`meta`]: on-disk metadata: superblock, staleness bitmaps, activity log.
//! * [`pace`]: background work kept within an operator's rate.
//! * [`ublk`]: the frontend that serves a [`BlockDevice`] as `/dev/ublkbN`.

pub mod backing;
pub mod blocksock;
pub mod buffer;
pub mod device;
pub mod lazy;
pub mod meta;
pub mod pace;

pub use backing::{BackingError, BackingOptions, BackingStore};
pub use device::{BlockDevice, DirectFile, DirectOp};
pub mod ublk;
