//! The block socket: a minimal request/response protocol over a Unix stream
//! socket that serves any [`BlockDevice`].
//!
//! It stands in for the kernel where ublk is unavailable (host tests and
//! benchmarks): like a ublk queue it keeps many requests in flight against
//! the device and answers each as soon as it completes, in any order. That
//! matters because the replication layer's throughput depends on queue depth;
//! a one-at-a-time test frontend would hide both its speed and its races.
//!
//! Wire format (little-endian), see [`wire`]:
//!
//! ```text
//! request:  magic u32 | op u8 | tag u64 | offset u64 | len u32 | len bytes (writes only)
//! response: magic u32 | tag u64 | result i32 (0 or -errno) | len bytes (successful reads only)
//! ```
//!
//! Security: anyone who can connect can read and write the whole device, so
//! the socket must live in a directory only the owner can reach.
//!
//! [`BlockDevice`]: crate::device::BlockDevice

mod client;
mod server;
pub mod wire;

pub use client::BlockClient;
pub use server::{serve, MAX_IN_FLIGHT};
pub use wire::MAX_IO_BYTES;

#[cfg(test)]
mod tests;
