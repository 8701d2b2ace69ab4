//! The messages of the vmsync protocol.
//!
//! A message's payload is its fields, in declaration order, and nothing
//! else: no per-field tags or padding. Field encodings:
//!
//! | field type | encoding |
//! |---|---|
//! | `u8` `u16` `u32` `u64` `i32` | fixed width, little-endian |
//! | `bool` | one byte, 0 or 1 (anything else is rejected) |
//! | enums ([`Channel`], [`Role`], [`DiskState`]) | one tag byte |
//! | `[u8; 32]` (nonces, MACs, hashes) | 32 raw bytes |
//! | `String`, `Bytes` | `u32` byte length, then the bytes (UTF-8 for strings) |
//! | `Option<T>` | one byte 0 (absent) or 1 followed by `T` |
//! | [`GenerationIds`] | its four `u64`s in declaration order |
//!
//! The `messages!` macro below turns the single declaration of each message
//! into the enum variant, its wire type code, its encoder, its decoder and a
//! log-friendly `Debug` (bulk data shown as a length), so the field list
//! exists exactly once and encoder and decoder cannot drift apart.
//!
//! Wire type codes are grouped by purpose: `0x00xx` handshake, `0x01xx`
//! replication, `0x02xx` block reads and resync, `0x03xx` node state,
//! `0x04xx` keepalive.
//!
//! Who sends what: the *primary* originates every write; a *secondary*
//! applies and acknowledges them. Any node may request blocks from any node
//! that holds them (on-demand fetch by a new primary, background resync).
//! "Data" and "meta" refer to the [`Channel`] the message normally travels
//! on; the codec itself does not enforce channels.

use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::codec::{FieldError, Reader, SecretKey, Wire, WireDebug};
use crate::error::ProtocolError;
use crate::frame::MAX_DATA_LEN;
use crate::types::{Channel, DiskState, GenerationIds, Role};

/// A 32-byte random value a node contributes to a handshake.
pub type Nonce = [u8; 32];

/// A 32-byte keyed BLAKE3 MAC.
pub type Mac = [u8; 32];

/// A 32-byte BLAKE3 hash of a block range's contents.
pub type BlockHash = [u8; 32];

/// Smallest granule of a [`Message::HashRequest`]: one 32-byte hash per
/// 512 bytes at most, so the reply never outgrows the range.
pub const MIN_HASH_GRANULE: u32 = 512;

macro_rules! messages {
    ($(
        $(#[$meta:meta])*
        $name:ident = $code:literal $({
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        })?
    ),* $(,)?) => {
        /// One message of the vmsync protocol. See the module documentation
        /// for the wire layout.
        #[derive(Clone, PartialEq, Eq)]
        pub enum Message {
            $(
                $(#[$meta])*
                $name $({ $( $(#[$fmeta])* $field: $ty ),* })?
            ),*
        }

        /// The wire type code of each [`Message`] variant (the `type` field
        /// of the frame header).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum MessageType {
            $( #[doc = concat!("Type of [`Message::", stringify!($name), "`].")] $name = $code ),*
        }

        impl MessageType {
            /// Every message type, in declaration order.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$name),*];

            /// The type with wire code `code`, if this version defines one.
            pub fn from_code(code: u16) -> Option<Self> {
                match code {
                    $( $code => Some(Self::$name), )*
                    _ => None,
                }
            }

            /// The wire code.
            pub fn code(self) -> u16 {
                self as u16
            }

            /// The variant's name, for logs and errors.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$name => stringify!($name), )*
                }
            }
        }

        impl Message {
            /// The wire type code of this message.
            pub fn message_type(&self) -> MessageType {
                match self {
                    $( Self::$name { .. } => MessageType::$name, )*
                }
            }

            /// Appends the payload (fields only, no frame header).
            pub(crate) fn put_payload(&self, out: &mut BytesMut) {
                match self {
                    $( Self::$name $({ $($field),* })? => {
                        $($( Wire::put($field, out); )*)?
                    } )*
                }
            }

            /// Decodes the fields of a message of type `ty`. Does not check
            /// for trailing bytes or run [`Message::validate`].
            fn get_payload(ty: MessageType, r: &mut Reader) -> Result<Self, ProtocolError> {
                Ok(match ty {
                    $( MessageType::$name => Self::$name $({
                        $( $field: read_field(r, ty, stringify!($field))? ),*
                    })?, )*
                })
            }
        }

        impl fmt::Debug for Message {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $( Self::$name $({ $($field),* })? => {
                        #[allow(unused_mut)]
                        let mut s = f.debug_struct(stringify!($name));
                        $($( s.field(stringify!($field), &WireDebug($field)); )*)?
                        s.finish()
                    } )*
                }
            }
        }
    };
}

/// Reads one field, naming the message and field in any error.
fn read_field<T: Wire>(
    r: &mut Reader,
    msg_type: MessageType,
    field: &'static str,
) -> Result<T, ProtocolError> {
    T::get(r).map_err(|e| match e {
        FieldError::Truncated { needed, remaining } => ProtocolError::Truncated {
            msg_type,
            field,
            needed,
            remaining,
        },
        FieldError::Invalid(reason) => ProtocolError::InvalidField {
            msg_type,
            field,
            reason,
        },
    })
}

messages! {
    // ---- handshake (both channels, both directions) -------------------------

    /// First message on every connection, sent by both sides at once. Its
    /// layout is frozen across protocol versions (version first), so that a
    /// version mismatch is always reported as such.
    Hello = 0x0001 {
        /// The sender's [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// Name of the replicated resource the sender serves.
        resource: String,
        /// The sender's node id.
        node_id: u32,
        /// The node id the sender believes it is talking to.
        peer_node_id: u32,
        /// Which connection of the pair this is.
        channel: Channel,
        /// Fresh random challenge; the peer's MAC must cover it.
        nonce: Nonce,
    },

    /// Proof of the shared secret, sent by both sides after receiving the
    /// peer's [`Message::Hello`]. See [`crate::handshake`] for the transcript.
    AuthResponse = 0x0002 {
        /// Keyed BLAKE3 over the handshake transcript, from the sender's side.
        mac: Mac,
    },

    /// Sent by each side once it has verified the peer's MAC: the connection
    /// is authenticated in that direction and regular traffic may follow.
    AuthOk = 0x0003,

    /// Sent by a side that rejects the handshake, just before closing, so
    /// that the peer can log why.
    Refused = 0x0004 {
        /// Human-readable reason.
        reason: String,
    },

    // ---- replication (primary -> secondary on data, acks on meta) -----------

    /// A guest write, mirrored by the primary to each connected LAN peer.
    /// Writes of one epoch may be applied in any order.
    Write = 0x0101 {
        /// The primary's term; a secondary drops writes of older terms.
        term: u64,
        /// Epoch the write belongs to (see [`Message::Barrier`]).
        epoch: u64,
        /// Per-connection sequence number, echoed by [`Message::WriteAck`].
        seq: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Forced unit access: the guest asked for this write to be durable
        /// before completion.
        fua: bool,
        /// The data, at most [`MAX_DATA_LEN`] bytes.
        data: Bytes,
    },

    /// A guest discard (trim) of a byte range, mirrored like a write.
    Discard = 0x0102 {
        /// The primary's term.
        term: u64,
        /// Epoch the request belongs to.
        epoch: u64,
        /// Sequence number, acknowledged like a write.
        seq: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },

    /// A guest write-zeroes of a byte range, mirrored like a write.
    WriteZeroes = 0x0103 {
        /// The primary's term.
        term: u64,
        /// Epoch the request belongs to.
        epoch: u64,
        /// Sequence number, acknowledged like a write.
        seq: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },

    /// Sent by the primary to close `epoch`: the secondary completes every
    /// write of the epoch, flushes its disk, then answers
    /// [`Message::BarrierAck`].
    Barrier = 0x0104 {
        /// The primary's term.
        term: u64,
        /// The epoch being closed.
        epoch: u64,
    },

    /// Secondary to primary: every write of `epoch` is durable here.
    BarrierAck = 0x0105 {
        /// The epoch closed by the matching [`Message::Barrier`].
        epoch: u64,
    },

    /// Secondary to primary (protocol C): the write, discard or write-zeroes
    /// with this sequence number has been applied.
    WriteAck = 0x0106 {
        /// Sequence number of the acknowledged request.
        seq: u64,
    },

    /// Secondary to primary: applying the request with this sequence number
    /// failed locally. The primary marks its blocks stale for this peer.
    WriteNack = 0x0107 {
        /// Sequence number of the failed request.
        seq: u64,
        /// The local error (a positive `errno` value, e.g. `EIO`).
        errno: i32,
    },

    // ---- block reads and resync (any node to a holder of the blocks) --------

    /// Asks a node that holds the newest version of a range for its
    /// contents: on-demand fetch by a new primary, or background resync.
    /// Answered by exactly one of [`Message::ReadReply`],
    /// [`Message::ReadSame`] or [`Message::ReadError`] with the same `id`.
    ReadRequest = 0x0201 {
        /// Requester-chosen id, echoed in the answer.
        id: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length in bytes, at most [`MAX_DATA_LEN`] so the reply fits in
        /// one frame.
        len: u32,
        /// BLAKE3 of the requester's own (possibly stale) copy of the range;
        /// if it matches the holder's, the holder answers
        /// [`Message::ReadSame`] instead of sending the data.
        hash: Option<BlockHash>,
    },

    /// The requested range's contents.
    ReadReply = 0x0202 {
        /// Id of the [`Message::ReadRequest`].
        id: u64,
        /// Byte offset of `data`.
        offset: u64,
        /// The contents.
        data: Bytes,
    },

    /// The requester's copy of the range already matches (its hash did).
    ReadSame = 0x0203 {
        /// Id of the [`Message::ReadRequest`].
        id: u64,
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u32,
    },

    /// The holder could not read the range; the requester tries another
    /// holder or fails the I/O.
    ReadError = 0x0204 {
        /// Id of the [`Message::ReadRequest`].
        id: u64,
        /// The holder's error (a positive `errno` value).
        errno: i32,
    },

    /// Block contents pushed by a sync source outside the write stream: the
    /// primary pushing stale blocks to a WAN peer, a postmaster forwarding
    /// them inside its LAN, or a resync source. Unlike [`Message::Write`] it
    /// belongs to no epoch, and the receiver must not let it overwrite blocks
    /// it has written itself since (its dirty bitmap).
    ResyncData = 0x0205 {
        /// The sender's term.
        term: u64,
        /// Byte offset into the device.
        offset: u64,
        /// The contents, at most [`MAX_DATA_LEN`] bytes.
        data: Bytes,
    },

    /// Receiver of [`Message::ResyncData`] to its sender: the range is
    /// durable here, so the sender may clear the receiver's staleness bits.
    ResyncAck = 0x0206 {
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u32,
    },

    /// Asks a node for the BLAKE3 hash of each `granule`-byte piece of a
    /// range of its copy (the primary, before pushing stale blocks to a WAN
    /// peer, skips the pieces that already match). Travels on the fetch
    /// connection; answered by [`Message::HashReply`] or
    /// [`Message::ReadError`] with the same `id`.
    HashRequest = 0x0207 {
        /// Requester-chosen id, echoed in the answer.
        id: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length in bytes, at most [`MAX_DATA_LEN`].
        len: u32,
        /// Bytes per hash: a power of two, at least [`MIN_HASH_GRANULE`].
        granule: u32,
    },

    /// The hashes asked for by a [`Message::HashRequest`]: 32 bytes per
    /// granule, in order (the last granule may be short).
    HashReply = 0x0208 {
        /// Id of the [`Message::HashRequest`].
        id: u64,
        /// Byte offset of the range.
        offset: u64,
        /// The concatenated 32-byte hashes.
        hashes: Bytes,
    },

    /// [`Message::ResyncData`] with its data compressed (see
    /// [`crate::compress`]): sent instead when compression shrinks it.
    /// Applied, acknowledged and ordered exactly like `ResyncData`. A frame
    /// that does not decompress to exactly `len` bytes is a protocol
    /// violation (the receiver drops the connection).
    ResyncPacked = 0x0209 {
        /// The sender's term.
        term: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length of the data once decompressed, at most [`MAX_DATA_LEN`].
        len: u32,
        /// How `data` is compressed: [`crate::compress::CODEC_ZSTD`] or
        /// [`crate::compress::CODEC_LZ4`].
        codec: u8,
        /// The compressed contents, at most [`MAX_DATA_LEN`] bytes.
        data: Bytes,
    },

    /// Resync by reference (the WAN postmaster, see vmsync's `wan`): the
    /// range's current contents hash to `hash` and node `holder` — a member
    /// of the receiver's own LAN group that got them over the WAN — holds
    /// them durably. The receiver reads them from `holder` over its fetch
    /// connection, checks the hash, and applies them exactly like
    /// [`Message::ResyncData`] (same epoch, same acknowledgement). If it
    /// cannot (the holder is gone, or answers other data), it must not
    /// acknowledge the epoch: it drops the link, and the sender resends.
    ResyncFrom = 0x020a {
        /// The sender's term.
        term: u64,
        /// Byte offset into the device.
        offset: u64,
        /// Length in bytes, at most [`MAX_DATA_LEN`].
        len: u32,
        /// The node to read the range from.
        holder: u32,
        /// BLAKE3 of the range's contents.
        hash: BlockHash,
    },

    // ---- node state ----------------------------------------------------------

    /// A node's view of itself, sent by both sides right after the handshake
    /// and whenever it changes; the basis for choosing the sync direction.
    State = 0x0301 {
        /// The sender's role.
        role: Role,
        /// The newest term the sender has seen.
        term: u64,
        /// Generation ids of the sender's data.
        generation: GenerationIds,
        /// How trustworthy the sender's copy is.
        disk_state: DiskState,
        /// Size of the sender's copy of the device, in bytes.
        size: u64,
        /// The sender started its current generation (a promotion) and
        /// has written nothing in it: its data is the parent generation's
        /// (`generation.history[0]`). For split-brain policies.
        unwritten: bool,
    },

    /// One chunk of a node's staleness bitmap, in the blockdev crate's
    /// encoding (opaque here). Large bitmaps travel as several chunks,
    /// numbered from 0, the final one with `last` set.
    Bitmap = 0x0302 {
        /// The node whose staleness the bitmap describes.
        node_id: u32,
        /// Bytes covered by one bit.
        block_size: u32,
        /// Total number of bits in the whole bitmap.
        nbits: u64,
        /// Encoding of `data`, defined by the blockdev crate.
        encoding: u8,
        /// Index of this chunk, from 0.
        chunk_index: u32,
        /// Whether this is the final chunk.
        last: bool,
        /// Encoded bits, at most [`MAX_DATA_LEN`] bytes.
        data: Bytes,
    },

    // ---- keepalive (meta channel, both directions) --------------------------

    /// Liveness probe. Each side sends one every ping interval while the
    /// link is up; the receiver does not answer (since version 7).
    Ping = 0x0401,

    /// The answer to [`Message::Ping`] of versions before 7; accepted and
    /// ignored.
    PingAck = 0x0402,

    // ---- directory (Channel::Directory) -------------------------------------
    //
    // A node dials the directory (node id [`crate::DIRECTORY_NODE_ID`] in the
    // handshake) and sends DirJoin first; then any number of DirPromote or
    // DirReport requests, each answered before the next. The directory dials
    // a primary's listen address to ask it to step down (DirDemote). A
    // report or grant is followed by `bitmaps` DirBitmap messages.

    /// Node to directory, first on every connection: who the node is.
    /// Answered by [`Message::DirInfo`] or [`Message::DirRefused`].
    DirJoin = 0x0501 {
        /// The node's name.
        name: String,
        /// The node's listen address (`IP:PORT`), where peers and the
        /// directory reach it.
        address: String,
        /// The node's LAN group.
        lan_group: String,
        /// The size of the node's copy of the device, in bytes.
        size: u64,
    },

    /// Directory to node: the resource's current term and primary.
    DirInfo = 0x0502 {
        /// The newest term the directory handed out.
        term: u64,
        /// The primary's node id, or [`crate::NO_NODE`].
        primary: u32,
    },

    /// Node to directory: make me primary. The directory asks the current
    /// primary (if any, and not the sender) to demote first; with `force`
    /// an unreachable or refusing primary is overridden. Answered by
    /// [`Message::DirGranted`] (then its bitmaps) or [`Message::DirRefused`].
    DirPromote = 0x0503 {
        /// Proceed even though the current primary cannot hand over.
        force: bool,
    },

    /// Directory to node: you are primary of `term`. What follows is the
    /// last report of the resource (from `prev_primary`, or none if
    /// `prev_primary` is [`crate::NO_NODE`]): its `bitmaps` DirBitmap
    /// messages, one per node, say which blocks each node lacks.
    DirGranted = 0x0504 {
        /// The new term, to be used for everything the new primary sends.
        term: u64,
        /// The node that made the last report, or [`crate::NO_NODE`].
        prev_primary: u32,
        /// The term that node was primary of.
        prev_term: u64,
        /// Its data generation ids at the report.
        prev_generation: GenerationIds,
        /// The report was its final one (it demoted cleanly and wrote
        /// nothing since); otherwise writes after it may be missing.
        prev_final: bool,
        /// Age of the report in milliseconds.
        report_age_ms: u64,
        /// Whether the previous primary was overridden (forced promotion).
        overridden: bool,
        /// Hot extents of the reporting primary (its activity log):
        /// little-endian `u64` extent numbers, pulled first.
        hot_extents: Bytes,
        /// Number of DirBitmap messages that follow.
        bitmaps: u32,
    },

    /// Primary to directory: which blocks every node lacks, periodically,
    /// on demote (`last`), and as the answer to [`Message::DirDemote`].
    /// Followed by `bitmaps` DirBitmap messages; answered by
    /// [`Message::DirInfo`], or [`Message::DirRefused`] when the sender is
    /// not the primary of `term` (it is then fenced).
    DirReport = 0x0505 {
        /// The term the sender is primary of.
        term: u64,
        /// The sender's data generation ids.
        generation: GenerationIds,
        /// The final report: the sender has demoted.
        last: bool,
        /// The sender's hot extents: little-endian `u64` extent numbers.
        hot_extents: Bytes,
        /// Number of DirBitmap messages that follow.
        bitmaps: u32,
    },

    /// Directory to a primary: demote (remove the device, hand every write
    /// over) and answer with a final [`Message::DirReport`], or
    /// [`Message::DirRefused`] with the reason (e.g. the device is open).
    DirDemote = 0x0506 {
        /// Demote even if the device is open.
        force: bool,
        /// The directory's current term.
        term: u64,
    },

    /// Either side: the request is refused, with the reason.
    DirRefused = 0x0507 {
        /// Human-readable reason.
        reason: String,
    },

    /// One node's staleness bitmap inside a report or grant, in the blockdev
    /// crate's encoding (opaque here; at most [`MAX_DATA_LEN`] bytes).
    DirBitmap = 0x0508 {
        /// The node whose missing blocks the bitmap marks.
        node_id: u32,
        /// Bytes covered by one bit.
        block_size: u32,
        /// Number of bits.
        nbits: u64,
        /// Encoding of `data`, defined by the blockdev crate.
        encoding: u8,
        /// The encoded bits.
        data: Bytes,
    },

    // ---- protected links (inside records; handled by [`crate::Opener`]) ----
    //
    // A replicated write goes to every LAN peer: rather than seal it once
    // per connection, the sender seals it once under a key of its own and
    // sends the same record on each connection, announced there by a record
    // of the connection's own (see [`crate::secure`]). The receiver's
    // opener consumes both messages; they never reach the application.

    /// The sender's key for shared records, sent once on a connection
    /// before the first [`Message::SharedNext`].
    SharedKey = 0x0601 {
        /// An AEGIS-256X4 key the sender drew at random.
        key: SecretKey,
    },

    /// The next record on this connection is a shared one, sealed under the
    /// sender's [`Message::SharedKey`] with record counter `counter`.
    SharedNext = 0x0602 {
        /// The shared record's counter (its nonce); never reused by the
        /// sender under one key.
        counter: u64,
    },
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    /// Splits off the bulk data a message ends with (every `data: Bytes`
    /// field is its message's last field), leaving an empty `Bytes` in its
    /// place. `None` for messages without bulk data.
    pub(crate) fn take_trailing_data(&mut self) -> Option<Bytes> {
        match self {
            Self::Write { data, .. }
            | Self::ReadReply { data, .. }
            | Self::ResyncData { data, .. }
            | Self::ResyncPacked { data, .. }
            | Self::Bitmap { data, .. }
            | Self::DirBitmap { data, .. } => Some(std::mem::take(data)),
            _ => None,
        }
    }

    /// Decodes a whole payload of type `ty`: fields, no trailing bytes, and
    /// the semantic checks of [`Message::validate`].
    pub(crate) fn decode_payload(ty: MessageType, payload: Bytes) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        let msg = Self::get_payload(ty, &mut r)?;
        if r.remaining() != 0 {
            let count = r.remaining();
            return Err(ProtocolError::TrailingBytes {
                msg_type: ty,
                count,
            });
        }
        msg.validate()?;
        Ok(msg)
    }

    /// Checks the invariants a well-formed message must satisfy beyond its
    /// field types, so that receivers can rely on them: bulk data fits
    /// [`MAX_DATA_LEN`], a read request can be answered in one frame, and no
    /// byte range wraps around `u64`. (Whether a range fits the *device* is
    /// for the receiver to check; the codec does not know its size.)
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let ty = self.message_type();
        let invalid = |field: &'static str, reason: String| ProtocolError::InvalidField {
            msg_type: ty,
            field,
            reason,
        };
        // A length that must fit in one frame's bulk data.
        let at_most_max = |field: &'static str, len: u64| {
            if len > MAX_DATA_LEN as u64 {
                return Err(invalid(
                    field,
                    format!("{len} bytes exceed the maximum of {MAX_DATA_LEN}"),
                ));
            }
            Ok(len)
        };
        let range = |offset: u64, len: u64| {
            offset
                .checked_add(len)
                .map(drop)
                .ok_or_else(|| invalid("offset", format!("range {offset}+{len} overflows a u64")))
        };
        // No wildcard: a new message type must decide what it needs here.
        match self {
            Self::Write { offset, data, .. }
            | Self::ReadReply { offset, data, .. }
            | Self::ResyncData { offset, data, .. } => {
                range(*offset, at_most_max("data", data.len() as u64)?)
            }
            Self::Bitmap { data, .. } | Self::DirBitmap { data, .. } => {
                at_most_max("data", data.len() as u64).map(drop)
            }
            Self::DirGranted { hot_extents, .. } | Self::DirReport { hot_extents, .. } => {
                if hot_extents.len() % 8 != 0 {
                    return Err(invalid(
                        "hot_extents",
                        format!("{} bytes are not whole u64s", hot_extents.len()),
                    ));
                }
                at_most_max("hot_extents", hot_extents.len() as u64).map(drop)
            }
            Self::ReadRequest { offset, len, .. } => {
                range(*offset, at_most_max("len", u64::from(*len))?)
            }
            Self::HashRequest {
                offset,
                len,
                granule,
                ..
            } => {
                if !granule.is_power_of_two() || *granule < MIN_HASH_GRANULE {
                    return Err(invalid(
                        "granule",
                        format!("{granule} is not a power of two of at least {MIN_HASH_GRANULE}"),
                    ));
                }
                range(*offset, at_most_max("len", u64::from(*len))?)
            }
            Self::HashReply { hashes, .. } => {
                if hashes.len() % 32 != 0 {
                    return Err(invalid(
                        "hashes",
                        format!("{} bytes are not whole 32-byte hashes", hashes.len()),
                    ));
                }
                at_most_max("hashes", hashes.len() as u64).map(drop)
            }
            Self::ResyncPacked {
                offset,
                len,
                codec,
                data,
                ..
            } => {
                if !crate::compress::is_known(*codec) {
                    return Err(invalid("codec", format!("unknown codec {codec}")));
                }
                at_most_max("data", data.len() as u64)?;
                range(*offset, at_most_max("len", u64::from(*len))?)
            }
            Self::Discard { offset, len, .. } | Self::WriteZeroes { offset, len, .. } => {
                range(*offset, *len)
            }
            Self::ReadSame { offset, len, .. } | Self::ResyncAck { offset, len } => {
                range(*offset, u64::from(*len))
            }
            Self::ResyncFrom { offset, len, .. } => {
                range(*offset, at_most_max("len", u64::from(*len))?)
            }
            Self::Hello { .. }
            | Self::AuthResponse { .. }
            | Self::AuthOk
            | Self::Refused { .. }
            | Self::Barrier { .. }
            | Self::BarrierAck { .. }
            | Self::WriteAck { .. }
            | Self::WriteNack { .. }
            | Self::ReadError { .. }
            | Self::State { .. }
            | Self::Ping
            | Self::PingAck
            | Self::DirJoin { .. }
            | Self::DirInfo { .. }
            | Self::DirPromote { .. }
            | Self::DirDemote { .. }
            | Self::DirRefused { .. }
            | Self::SharedKey { .. }
            | Self::SharedNext { .. } => Ok(()),
        }
    }
}
