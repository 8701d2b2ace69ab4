//! The vmsync wire protocol: framing, messages, and the connection
//! handshake with mutual authentication.
//!
//! This crate is pure: codecs and state machines over byte buffers, no
//! sockets, no timers, no policy. The daemon owns the connections and feeds
//! bytes in and out:
//!
//! * [`encode`] appends a [`Message`] as one frame to a send buffer
//!   ([`encode_split`] leaves large payloads out, for vectored writes);
//!   [`decode`] takes one frame off the front of a receive buffer, returning
//!   `Ok(None)` until a whole frame is there. Malformed input of any kind is
//!   an error, never a panic or an unbounded allocation: the daemon closes
//!   that connection and carries on.
//! * [`Handshake`] runs the symmetric Hello / AuthResponse / AuthOk exchange
//!   that checks version, resource, node ids and channel and proves both
//!   sides know the shared secret; [`Handshake::session_keys`] then derives
//!   the connection's keys, and [`secure`] seals and opens every later frame
//!   as an authenticated, encrypted record.
//!
//! Module map: [`frame`] (frame header, encode/decode), [`message`] (the
//! messages and their wire codes), [`handshake`], [`secure`] (the sealed
//! records after the handshake), [`secret`] (secret strength checks and
//! generation), [`types`] (enums and small structs inside messages), `codec`
//! (field encoding), [`compress`] (compressed block data), [`error`]; with the
//! `net` feature, `net`: framed, authenticated TCP connections over tokio
//! (the one place this crate does I/O).

mod codec;
pub mod compress;
pub mod error;
pub mod frame;
#[cfg(feature = "net")]
pub mod gate;
pub mod handshake;
pub mod message;
#[cfg(feature = "net")]
pub mod net;
pub mod secret;
pub mod secure;
pub mod types;
#[cfg(feature = "net")]
pub mod zerocopy;

pub use codec::SecretKey;
pub use error::ProtocolError;
pub use frame::{
    decode, encode, encode_split, encode_to_bytes, HEADER_LEN, MAGIC, MAX_DATA_LEN, MAX_PAYLOAD,
};
pub use handshake::{Handshake, HandshakeError, HandshakeParams, HandshakeStep, PeerInfo};
pub use message::{BlockHash, Mac, Message, MessageType, Nonce, MIN_HASH_GRANULE};
pub use secret::{check_secret, generate_secret, WeakSecret};
pub use secure::{Opener, RecordBuf, Sealer, SessionKeys, SharedRecord, SharedSealer};
pub use types::{Channel, DiskState, GenerationIds, Role};

/// Version of the wire protocol spoken by this crate. Peers must speak the
/// same version; it is checked (and authenticated) in the handshake.
///
/// 2: every frame after the handshake travels in an AEAD record ([`secure`]).
/// 3: the WAN push: `HashRequest`/`HashReply` and compressed `ResyncPacked`.
/// 4: `ResyncFrom`: resync by reference, for the WAN postmaster.
/// 5: `State` says whether the sender's generation is unwritten.
/// 6: records are sealed with AEGIS-256X4 instead of AES-256-GCM.
/// 7: `ResyncPacked` may carry zstd (codec 2); a `Ping` is not answered.
/// 8: shared records: a write sealed once for every peer (`SharedKey`,
///    `SharedNext`).
pub const PROTOCOL_VERSION: u32 = 8;

/// The node id the directory server uses in handshakes (never a node's).
pub const DIRECTORY_NODE_ID: u32 = u32::MAX;

/// "No node" in node-id fields (e.g. no primary).
pub const NO_NODE: u32 = u32::MAX;
