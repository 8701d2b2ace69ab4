//! Framed, authenticated TCP connections: they live in the protocol crate
//! ([`protocol::net`]) so that the directory server can use them without
//! linking the block device; re-exported here under their old path.

pub use protocol::net::*;
