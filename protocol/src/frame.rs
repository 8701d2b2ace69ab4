//! Framing: one [`Message`] per length-prefixed frame.
//!
//! ```text
//! offset  size  field
//!      0     4  magic    "VMSY" (MAGIC, little-endian u32)
//!      4     2  type     MessageType code
//!      6     2  flags    reserved, must be 0
//!      8     4  length   payload bytes that follow, at most MAX_PAYLOAD
//!     12     …  payload  the message's fields (see message.rs)
//! ```
//!
//! All integers are little-endian. The decoder works on a growing receive
//! buffer: it rejects a bad header as soon as the 12 header bytes are there,
//! and in particular refuses an oversized length before reserving any memory
//! for it, so a hostile or confused peer can make a connection hold at most
//! one maximum-sized frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::message::{Message, MessageType};

/// First four bytes of every frame: the ASCII bytes `VMSY` on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMSY");

/// Size of the frame header.
pub const HEADER_LEN: usize = 12;

/// Largest bulk-data field (write data, read replies, resync data, bitmap
/// chunks) and largest [`Message::ReadRequest`] length: 8 MiB.
pub const MAX_DATA_LEN: usize = 8 << 20;

/// Largest payload a frame may carry: [`MAX_DATA_LEN`] plus room for the
/// fixed fields that accompany the data.
pub const MAX_PAYLOAD: usize = MAX_DATA_LEN + 4096;

/// Byte offset of the length field within the header.
const LEN_OFFSET: usize = 8;

/// The decoded, checked frame header.
struct FrameHeader {
    msg_type: MessageType,
    payload_len: usize,
}

impl FrameHeader {
    /// Parses and checks a header: magic, then length, then flags, then type.
    fn parse(raw: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut raw = &raw[..];
        let magic = raw.get_u32_le();
        let code = raw.get_u16_le();
        let flags = raw.get_u16_le();
        let len = raw.get_u32_le();

        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let payload_len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= MAX_PAYLOAD)
            .ok_or(ProtocolError::Oversize {
                len: u64::from(len),
            })?;
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags(flags));
        }
        let msg_type = MessageType::from_code(code).ok_or(ProtocolError::UnknownType(code))?;
        Ok(Self {
            msg_type,
            payload_len,
        })
    }
}

/// Appends `msg` as one frame to `out`.
///
/// Fails, leaving `out` unchanged, if the message breaks an invariant of
/// [`Message::validate`] or its payload would exceed [`MAX_PAYLOAD`]: the
/// peer would reject such a frame anyway, and it is better to learn about the
/// bug on the sending side.
pub fn encode(msg: &Message, out: &mut BytesMut) -> Result<(), ProtocolError> {
    msg.validate()?;
    put_frame(msg, 0, out)
}

/// Bulk data shorter than this is copied into the frame by
/// [`encode_split`]: an extra I/O vector costs more than copying it.
pub const SPLIT_MIN_DATA: usize = 16 * 1024;

/// Like [`encode`], but leaves a message's bulk data (of at least
/// [`SPLIT_MIN_DATA`] bytes) out of `out` and returns it instead: the frame
/// is the bytes appended to `out` followed by the returned data. A sender
/// hands both to one vectored socket write and never copies the payload.
pub fn encode_split(msg: &Message, out: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    let mut head = msg.clone();
    let data = match head.take_trailing_data() {
        Some(data) if data.len() >= SPLIT_MIN_DATA => data,
        _ => return encode(msg, out).map(|()| None),
    };
    msg.validate()?;
    put_frame(&head, data.len(), out)?;
    // `head` ends with the empty data's u32 length prefix; it must count the
    // data that follows. Validated above, so the length fits in a u32.
    let prefix_at = out.len() - 4;
    out[prefix_at..].copy_from_slice(&(data.len() as u32).to_le_bytes());
    Ok(Some(data))
}

/// Appends the header and payload of `msg`, with a length that also counts
/// `trailing` bytes the caller sends right after. Leaves `out` unchanged if
/// the payload would exceed [`MAX_PAYLOAD`].
fn put_frame(msg: &Message, trailing: usize, out: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = out.len();
    out.put_u32_le(MAGIC);
    out.put_u16_le(msg.message_type().code());
    out.put_u16_le(0); // flags
    out.put_u32_le(0); // length, patched below once known
    msg.put_payload(out);

    let payload_len = out.len() - start - HEADER_LEN + trailing;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|_| payload_len <= MAX_PAYLOAD);
    let Some(len) = len else {
        out.truncate(start);
        return Err(ProtocolError::Oversize {
            len: payload_len as u64,
        });
    };
    out[start + LEN_OFFSET..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Encodes `msg` as one frame in a buffer of its own.
pub fn encode_to_bytes(msg: &Message) -> Result<Bytes, ProtocolError> {
    let mut out = BytesMut::new();
    encode(msg, &mut out)?;
    Ok(out.freeze())
}

/// Decodes one frame from the front of a receive buffer.
///
/// * `Ok(Some(msg))`: one whole frame was consumed from `buf`; call again,
///   more frames may be buffered.
/// * `Ok(None)`: `buf` holds only part of a frame; nothing was consumed.
///   Once the header is in, capacity for the rest of the frame is reserved so
///   the next read can bring it in one go.
/// * `Err(_)`: the stream is malformed. What is left in `buf` is unspecified;
///   close the connection.
///
/// Never panics, and never reserves more than one frame of
/// [`HEADER_LEN`]` + `[`MAX_PAYLOAD`] bytes, whatever the input. Decoded
/// `Bytes` fields share `buf`'s memory instead of being copied.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
    // Reject a peer that is not speaking vmsync as early as possible, even if
    // it sends fewer bytes than a header.
    if let Some(magic) = buf.first_chunk::<4>() {
        if *magic != MAGIC.to_le_bytes() {
            return Err(ProtocolError::BadMagic {
                found: u32::from_le_bytes(*magic),
            });
        }
    }
    let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(raw)?;
    let frame_len = HEADER_LEN + header.payload_len;
    if buf.len() < frame_len {
        buf.reserve(frame_len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(header.payload_len).freeze();
    Message::decode_payload(header.msg_type, payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, code: u16, flags: u16, len: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(magic);
        b.put_u16_le(code);
        b.put_u16_le(flags);
        b.put_u32_le(len);
        b
    }

    /// A frame with an arbitrary (possibly invalid) payload for `msg_type`.
    fn raw_frame(msg_type: MessageType, payload: &[u8]) -> BytesMut {
        let mut b = header(MAGIC, msg_type.code(), 0, payload.len() as u32);
        b.put_slice(payload);
        b
    }

    #[test]
    fn split_encoding_is_the_same_bytes_as_encode() {
        let big = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let small = Bytes::from_static(&[7; 4096]);
        let messages = [
            Message::Write {
                term: 3,
                epoch: 9,
                seq: 77,
                offset: 1 << 20,
                fua: true,
                data: big.clone(),
            },
            Message::ResyncData {
                term: 1,
                offset: 4096,
                data: big.clone(),
            },
            Message::Write {
                term: 3,
                epoch: 9,
                seq: 78,
                offset: 0,
                fua: false,
                data: small,
            },
            Message::Barrier { term: 3, epoch: 9 },
        ];
        for msg in &messages {
            let whole = encode_to_bytes(msg).unwrap();
            let mut head = BytesMut::from(&b"earlier frames"[..]);
            let data = encode_split(msg, &mut head).unwrap();
            let mut joined = head[b"earlier frames".len()..].to_vec();
            if let Some(data) = &data {
                assert!(data.len() >= SPLIT_MIN_DATA, "{msg:?}");
                joined.extend_from_slice(data);
            }
            assert_eq!(joined, &whole[..], "{msg:?}");
            let mut buf = BytesMut::from(&joined[..]);
            assert_eq!(decode(&mut buf).unwrap().as_ref(), Some(msg));
        }
    }

    #[test]
    fn split_encoding_refuses_oversized_data_and_leaves_the_buffer_alone() {
        let msg = Message::ResyncData {
            term: 1,
            offset: 0,
            data: Bytes::from(vec![0; MAX_DATA_LEN + 1]),
        };
        let mut out = BytesMut::from(&b"kept"[..]);
        assert!(encode_split(&msg, &mut out).is_err());
        assert_eq!(&out[..], b"kept");
    }

    #[test]
    fn magic_reads_vmsy_on_the_wire() {
        let frame = encode_to_bytes(&Message::Ping).unwrap();
        assert_eq!(&frame[..], b"VMSY\x01\x04\0\0\0\0\0\0");
    }

    #[test]
    fn partial_frames_need_more_bytes_and_consume_nothing() {
        let frame = encode_to_bytes(&Message::BarrierAck { epoch: 7 }).unwrap();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn consumes_exactly_one_frame() {
        let mut buf = BytesMut::new();
        encode(&Message::Ping, &mut buf).unwrap();
        encode(&Message::WriteAck { seq: 3 }, &mut buf).unwrap();
        buf.put_slice(b"VMS"); // start of a third frame
        assert_eq!(decode(&mut buf), Ok(Some(Message::Ping)));
        assert_eq!(decode(&mut buf), Ok(Some(Message::WriteAck { seq: 3 })));
        assert_eq!(decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"VMS");
    }

    #[test]
    fn bad_magic_is_rejected_before_a_whole_header() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1"[..4]);
        assert_eq!(
            decode(&mut buf),
            Err(ProtocolError::BadMagic {
                found: u32::from_le_bytes(*b"GET ")
            })
        );
    }

    #[test]
    fn oversize_length_is_rejected_from_the_header_alone() {
        let mut buf = header(MAGIC, MessageType::Write.code(), 0, MAX_PAYLOAD as u32 + 1);
        let capacity = buf.capacity();
        assert_eq!(
            decode(&mut buf),
            Err(ProtocolError::Oversize {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "must not reserve for a rejected frame"
        );

        let mut buf = header(MAGIC, MessageType::Write.code(), 0, u32::MAX);
        assert!(matches!(
            decode(&mut buf),
            Err(ProtocolError::Oversize { .. })
        ));
    }

    #[test]
    fn maximum_length_is_accepted_and_reserved() {
        let mut buf = header(MAGIC, MessageType::Write.code(), 0, MAX_PAYLOAD as u32);
        assert_eq!(decode(&mut buf), Ok(None));
        assert!(buf.capacity() >= HEADER_LEN + MAX_PAYLOAD);
    }

    #[test]
    fn unknown_type_and_flags_are_rejected() {
        let mut buf = header(MAGIC, 0x7777, 0, 0);
        assert_eq!(decode(&mut buf), Err(ProtocolError::UnknownType(0x7777)));
        let mut buf = header(MAGIC, MessageType::Ping.code(), 0x0100, 0);
        assert_eq!(decode(&mut buf), Err(ProtocolError::UnknownFlags(0x0100)));
    }

    #[test]
    fn truncated_payload_names_message_and_field() {
        // BarrierAck needs 8 bytes of epoch; the frame says its payload is 3.
        let mut buf = raw_frame(MessageType::BarrierAck, &[1, 2, 3]);
        let err = decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::Truncated {
                msg_type: MessageType::BarrierAck,
                field: "epoch",
                needed: 8,
                remaining: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "truncated BarrierAck message: field `epoch` needs 8 bytes but only 3 remain"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut buf = raw_frame(MessageType::Ping, &[0]);
        assert_eq!(
            decode(&mut buf),
            Err(ProtocolError::TrailingBytes {
                msg_type: MessageType::Ping,
                count: 1
            })
        );
    }

    #[test]
    fn invalid_enum_tag_is_rejected() {
        let mut payload = BytesMut::new();
        Message::State {
            role: crate::Role::Primary,
            term: 1,
            generation: crate::GenerationIds::default(),
            disk_state: crate::DiskState::UpToDate,
            size: 1,
            unwritten: false,
        }
        .put_payload(&mut payload);
        payload[0] = 5; // role tag
        let mut buf = raw_frame(MessageType::State, &payload);
        assert_eq!(
            decode(&mut buf).unwrap_err().to_string(),
            "invalid State.role: unknown Role tag 5"
        );
    }

    #[test]
    fn overflowing_ranges_are_rejected_on_both_sides() {
        let msg = Message::Discard {
            term: 1,
            epoch: 1,
            seq: 1,
            offset: u64::MAX,
            len: 1,
        };
        let err = encode_to_bytes(&msg).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::InvalidField {
                field: "offset",
                ..
            }
        ));

        let mut payload = BytesMut::new();
        msg.put_payload(&mut payload);
        let mut buf = raw_frame(MessageType::Discard, &payload);
        assert_eq!(decode(&mut buf), Err(err));
    }

    #[test]
    fn read_request_longer_than_a_reply_can_carry_is_rejected() {
        let msg = Message::ReadRequest {
            id: 1,
            offset: 0,
            len: MAX_DATA_LEN as u32 + 1,
            hash: None,
        };
        assert!(matches!(
            encode_to_bytes(&msg),
            Err(ProtocolError::InvalidField { field: "len", .. })
        ));
        let mut payload = BytesMut::new();
        msg.put_payload(&mut payload);
        let mut buf = raw_frame(MessageType::ReadRequest, &payload);
        assert!(matches!(
            decode(&mut buf),
            Err(ProtocolError::InvalidField { field: "len", .. })
        ));
    }

    #[test]
    fn oversize_data_is_refused_by_the_encoder_without_touching_the_buffer() {
        let msg = Message::ReadReply {
            id: 1,
            offset: 0,
            data: Bytes::from(vec![0; MAX_DATA_LEN + 1]),
        };
        let mut out = BytesMut::from(&b"keep"[..]);
        assert!(encode(&msg, &mut out).is_err());
        assert_eq!(&out[..], b"keep");

        let msg = Message::Refused {
            reason: "x".repeat(MAX_PAYLOAD),
        };
        assert_eq!(
            encode(&msg, &mut out),
            Err(ProtocolError::Oversize {
                len: MAX_PAYLOAD as u64 + 4
            })
        );
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn largest_write_fits() {
        let msg = Message::Write {
            term: u64::MAX,
            epoch: u64::MAX,
            seq: u64::MAX,
            offset: 0,
            fua: true,
            data: Bytes::from(vec![0x5a; MAX_DATA_LEN]),
        };
        let mut buf = BytesMut::from(&encode_to_bytes(&msg).unwrap()[..]);
        assert_eq!(decode(&mut buf), Ok(Some(msg)));
    }
}
