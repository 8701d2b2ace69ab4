//! Errors of the frame codec.
//!
//! Every variant means the byte stream cannot be trusted any more: the daemon
//! closes the connection (and carries on serving everything else). The
//! variants are distinct so that the log line says *why*, which is what makes
//! "a node on the wrong port" distinguishable from "a peer with a bug".

use crate::frame::{MAGIC, MAX_PAYLOAD};
use crate::message::MessageType;

/// A frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The first four bytes of a frame are not [`MAGIC`]: the peer is not
    /// speaking vmsync (or the stream lost synchronisation).
    #[error("bad frame magic {found:#010x} (expected {MAGIC:#010x}): peer is not speaking the vmsync protocol")]
    BadMagic {
        /// The four bytes found, read little-endian.
        found: u32,
    },

    /// The frame header names a message type this version does not know.
    #[error("unknown message type {0:#06x}")]
    UnknownType(u16),

    /// The frame header sets flag bits this version does not define.
    #[error("unsupported frame flags {0:#06x}")]
    UnknownFlags(u16),

    /// The frame's payload is larger than [`MAX_PAYLOAD`]. Raised from the
    /// header alone, before any buffer is grown for the payload.
    #[error("frame payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD} bytes")]
    Oversize {
        /// The offending payload length.
        len: u64,
    },

    /// A field runs past the end of the frame's payload.
    #[error("truncated {msg_type} message: field `{field}` needs {needed} bytes but only {remaining} remain")]
    Truncated {
        /// The message being decoded.
        msg_type: MessageType,
        /// The field that did not fit.
        field: &'static str,
        /// Bytes the field needed (for a length-prefixed field: its declared length).
        needed: u64,
        /// Bytes left in the payload.
        remaining: usize,
    },

    /// A field is present but its value is not allowed (bad UTF-8, unknown
    /// enum tag, a boolean other than 0/1, a range that overflows, ...).
    #[error("invalid {msg_type}.{field}: {reason}")]
    InvalidField {
        /// The message being decoded or encoded.
        msg_type: MessageType,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The payload is longer than the message it carries. Rejected rather
    /// than ignored so that every message has exactly one encoding.
    #[error("{msg_type} message has {count} unexpected trailing bytes")]
    TrailingBytes {
        /// The message decoded.
        msg_type: MessageType,
        /// How many bytes were left over.
        count: usize,
    },

    /// A protected record's length is below the smallest or above the
    /// largest record (a plaintext frame after the handshake lands here:
    /// its magic read as a length is far too large). Raised before any
    /// buffer is grown for the record.
    #[error("protected record of {len} bytes is out of range: tampered stream or plaintext after the handshake")]
    BadRecordLength {
        /// The offending record length.
        len: u64,
    },

    /// A protected record failed authentication: it was tampered with,
    /// injected, replayed, reordered, or sealed under another key.
    #[error("protected record failed authentication: tampered, injected, replayed or reordered")]
    Unauthenticated,

    /// A shared record (see [`crate::SharedSealer`]) failed authentication
    /// where the connection announced one: tampered, injected, replayed,
    /// reordered, or another record in its place.
    #[error(
        "protected record failed authentication (a shared record): tampered, injected, replayed or reordered"
    )]
    SharedUnauthenticated,

    /// A direction of the connection has used every record counter value;
    /// going on would reuse a nonce.
    #[error("record counter exhausted: the connection must be re-established")]
    CounterExhausted,

    /// An authentic record did not hold exactly one frame.
    #[error("protected record does not hold exactly one frame")]
    RecordNotOneFrame,

    /// Shared records used out of order: a `SharedNext` before the sender's
    /// `SharedKey`, or a shared record that holds `SharedKey` or
    /// `SharedNext` itself.
    #[error("shared record out of order: {0}")]
    SharedRecordMisuse(&'static str),
}
