//! Property tests of the frame codec: every message variant round-trips,
//! however the byte stream is chunked, and no input makes the decoder panic.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::select;
use protocol::{
    decode, encode, Channel, DiskState, GenerationIds, Message, MessageType, ProtocolError, Role,
    SecretKey, HEADER_LEN, MAGIC,
};

fn data() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..4096).prop_map(Bytes::from)
}

/// Offsets low enough that `offset + len` cannot overflow for any `len`
/// below 2^63 (overflowing ranges are invalid and tested separately).
fn offset() -> impl Strategy<Value = u64> {
    0..=u64::MAX / 2
}

fn small_len() -> impl Strategy<Value = u32> {
    0..=protocol::MAX_DATA_LEN as u32
}

fn channel() -> impl Strategy<Value = Channel> {
    select(Channel::ALL)
}

fn generation() -> impl Strategy<Value = GenerationIds> {
    any::<[u64; 4]>().prop_map(|[current, bitmap, h0, h1]| GenerationIds {
        current,
        bitmap,
        history: [h0, h1],
    })
}

/// Arbitrary messages of type `ty`. The match is exhaustive, so a new message
/// type cannot be added without being covered here.
fn message_of(ty: MessageType) -> BoxedStrategy<Message> {
    match ty {
        MessageType::Hello => (
            any::<u32>(),
            any::<String>(),
            any::<u32>(),
            any::<u32>(),
            channel(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(version, resource, node_id, peer_node_id, channel, nonce)| Message::Hello {
                    version,
                    resource,
                    node_id,
                    peer_node_id,
                    channel,
                    nonce,
                },
            )
            .boxed(),
        MessageType::AuthResponse => any::<[u8; 32]>()
            .prop_map(|mac| Message::AuthResponse { mac })
            .boxed(),
        MessageType::AuthOk => Just(Message::AuthOk).boxed(),
        MessageType::Refused => any::<String>()
            .prop_map(|reason| Message::Refused { reason })
            .boxed(),
        MessageType::Write => (any::<[u64; 3]>(), offset(), any::<bool>(), data())
            .prop_map(|([term, epoch, seq], offset, fua, data)| Message::Write {
                term,
                epoch,
                seq,
                offset,
                fua,
                data,
            })
            .boxed(),
        MessageType::Discard => (any::<[u64; 3]>(), offset(), 0..=u64::MAX / 2)
            .prop_map(|([term, epoch, seq], offset, len)| Message::Discard {
                term,
                epoch,
                seq,
                offset,
                len,
            })
            .boxed(),
        MessageType::WriteZeroes => (any::<[u64; 3]>(), offset(), 0..=u64::MAX / 2)
            .prop_map(|([term, epoch, seq], offset, len)| Message::WriteZeroes {
                term,
                epoch,
                seq,
                offset,
                len,
            })
            .boxed(),
        MessageType::Barrier => any::<(u64, u64)>()
            .prop_map(|(term, epoch)| Message::Barrier { term, epoch })
            .boxed(),
        MessageType::BarrierAck => any::<u64>()
            .prop_map(|epoch| Message::BarrierAck { epoch })
            .boxed(),
        MessageType::WriteAck => any::<u64>()
            .prop_map(|seq| Message::WriteAck { seq })
            .boxed(),
        MessageType::WriteNack => any::<(u64, i32)>()
            .prop_map(|(seq, errno)| Message::WriteNack { seq, errno })
            .boxed(),
        MessageType::ReadRequest => (
            any::<u64>(),
            offset(),
            small_len(),
            any::<Option<[u8; 32]>>(),
        )
            .prop_map(|(id, offset, len, hash)| Message::ReadRequest {
                id,
                offset,
                len,
                hash,
            })
            .boxed(),
        MessageType::ReadReply => (any::<u64>(), offset(), data())
            .prop_map(|(id, offset, data)| Message::ReadReply { id, offset, data })
            .boxed(),
        MessageType::ReadSame => (any::<u64>(), offset(), any::<u32>())
            .prop_map(|(id, offset, len)| Message::ReadSame { id, offset, len })
            .boxed(),
        MessageType::ReadError => any::<(u64, i32)>()
            .prop_map(|(id, errno)| Message::ReadError { id, errno })
            .boxed(),
        MessageType::ResyncData => (any::<u64>(), offset(), data())
            .prop_map(|(term, offset, data)| Message::ResyncData { term, offset, data })
            .boxed(),
        MessageType::ResyncAck => (offset(), any::<u32>())
            .prop_map(|(offset, len)| Message::ResyncAck { offset, len })
            .boxed(),
        MessageType::HashRequest => (any::<u64>(), offset(), small_len(), 9u32..20)
            .prop_map(|(id, offset, len, shift)| Message::HashRequest {
                id,
                offset,
                len,
                granule: 1 << shift,
            })
            .boxed(),
        MessageType::HashReply => (any::<u64>(), offset(), 0usize..64)
            .prop_map(|(id, offset, n)| Message::HashReply {
                id,
                offset,
                hashes: bytes::Bytes::from(vec![0x5a; n * 32]),
            })
            .boxed(),
        MessageType::ResyncPacked => (any::<u64>(), offset(), small_len(), data())
            .prop_map(|(term, offset, len, data)| Message::ResyncPacked {
                term,
                offset,
                len,
                codec: protocol::compress::CODEC_LZ4,
                data,
            })
            .boxed(),
        MessageType::ResyncFrom => (
            any::<u64>(),
            offset(),
            small_len(),
            any::<u32>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(term, offset, len, holder, hash)| Message::ResyncFrom {
                term,
                offset,
                len,
                holder,
                hash,
            })
            .boxed(),
        MessageType::State => (
            select(Role::ALL),
            any::<u64>(),
            generation(),
            select(DiskState::ALL),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(role, term, generation, disk_state, size, unwritten)| Message::State {
                    role,
                    term,
                    generation,
                    disk_state,
                    size,
                    unwritten,
                },
            )
            .boxed(),
        MessageType::Bitmap => (any::<(u32, u32, u64, u8, u32, bool)>(), data())
            .prop_map(
                |((node_id, block_size, nbits, encoding, chunk_index, last), data)| {
                    Message::Bitmap {
                        node_id,
                        block_size,
                        nbits,
                        encoding,
                        chunk_index,
                        last,
                        data,
                    }
                },
            )
            .boxed(),
        MessageType::Ping => Just(Message::Ping).boxed(),
        MessageType::PingAck => Just(Message::PingAck).boxed(),
        MessageType::DirJoin => (
            any::<String>(),
            any::<String>(),
            any::<String>(),
            any::<u64>(),
        )
            .prop_map(|(name, address, lan_group, size)| Message::DirJoin {
                name,
                address,
                lan_group,
                size,
            })
            .boxed(),
        MessageType::DirInfo => any::<(u64, u32)>()
            .prop_map(|(term, primary)| Message::DirInfo { term, primary })
            .boxed(),
        MessageType::DirPromote => any::<bool>()
            .prop_map(|force| Message::DirPromote { force })
            .boxed(),
        MessageType::DirGranted => (
            any::<(u64, u32, u64, bool, u64, bool, u32)>(),
            generation(),
            extents(),
        )
            .prop_map(
                |(
                    (term, prev_primary, prev_term, prev_final, report_age_ms, overridden, bitmaps),
                    prev_generation,
                    hot_extents,
                )| {
                    Message::DirGranted {
                        term,
                        prev_primary,
                        prev_term,
                        prev_generation,
                        prev_final,
                        report_age_ms,
                        overridden,
                        hot_extents,
                        bitmaps,
                    }
                },
            )
            .boxed(),
        MessageType::DirReport => (any::<(u64, bool, u32)>(), generation(), extents())
            .prop_map(
                |((term, last, bitmaps), generation, hot_extents)| Message::DirReport {
                    term,
                    generation,
                    last,
                    hot_extents,
                    bitmaps,
                },
            )
            .boxed(),
        MessageType::DirDemote => any::<(bool, u64)>()
            .prop_map(|(force, term)| Message::DirDemote { force, term })
            .boxed(),
        MessageType::DirRefused => any::<String>()
            .prop_map(|reason| Message::DirRefused { reason })
            .boxed(),
        MessageType::DirBitmap => (any::<(u32, u32, u64, u8)>(), data())
            .prop_map(
                |((node_id, block_size, nbits, encoding), data)| Message::DirBitmap {
                    node_id,
                    block_size,
                    nbits,
                    encoding,
                    data,
                },
            )
            .boxed(),
        MessageType::SharedKey => any::<[u8; 32]>()
            .prop_map(|key| Message::SharedKey {
                key: SecretKey(key),
            })
            .boxed(),
        MessageType::SharedNext => any::<u64>()
            .prop_map(|counter| Message::SharedNext { counter })
            .boxed(),
    }
}

/// Whole little-endian u64s, as the hot-extent lists are.
fn extents() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u64>(), 0..8)
        .prop_map(|v| Bytes::from(v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>()))
}

fn message() -> impl Strategy<Value = Message> {
    select(MessageType::ALL).prop_flat_map(message_of)
}

/// Decodes every complete frame in `buf`, stopping at the first error.
fn decode_all(buf: &mut BytesMut) -> (Vec<Message>, Option<ProtocolError>) {
    let mut out = Vec::new();
    loop {
        match decode(buf) {
            Ok(Some(msg)) => out.push(msg),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn encode_all(msgs: &[Message]) -> BytesMut {
    let mut wire = BytesMut::new();
    for msg in msgs {
        encode(msg, &mut wire).expect("valid message encodes");
    }
    wire
}

/// Feeds `wire` to a decoder in pieces of the given sizes (cycled), the way
/// a socket might deliver it, decoding after every piece.
fn decode_in_pieces(wire: &[u8], sizes: &[usize]) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = wire;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(size.clamp(1, rest.len()));
        rest = tail;
        buf.put_slice(piece);
        let (msgs, err) = decode_all(&mut buf);
        assert_eq!(err, None);
        out.extend(msgs);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_variant_round_trips(msg in message()) {
        let mut wire = encode_all(std::slice::from_ref(&msg));
        let frame = wire.clone();
        prop_assert_eq!(decode(&mut wire), Ok(Some(msg.clone())));
        prop_assert!(wire.is_empty());
        // Encoding is canonical: re-encoding reproduces the frame exactly.
        prop_assert_eq!(encode_all(&[msg]), frame);
    }

    #[test]
    fn byte_at_a_time_streaming(msgs in prop::collection::vec(message(), 1..6)) {
        let wire = encode_all(&msgs);
        prop_assert_eq!(decode_in_pieces(&wire, &[1]), msgs);
    }

    #[test]
    fn arbitrary_chunking(
        msgs in prop::collection::vec(message(), 1..8),
        sizes in prop::collection::vec(1usize..3000, 1..16),
    ) {
        let wire = encode_all(&msgs);
        prop_assert_eq!(decode_in_pieces(&wire, &sizes), msgs);
    }

    #[test]
    fn truncated_frame_needs_more_bytes(msg in message(), cut in any::<prop::sample::Index>()) {
        let wire = encode_all(&[msg]);
        let mut buf = BytesMut::from(&wire[..cut.index(wire.len())]);
        prop_assert_eq!(decode(&mut buf), Ok(None));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_all(&mut buf);
    }

    /// Random payloads behind a valid header get past the header checks and
    /// exercise every field decoder. Whatever decodes must re-encode to the
    /// very same bytes (one encoding per message).
    #[test]
    fn arbitrary_payloads_never_panic_and_decode_canonically(
        ty in select(MessageType::ALL),
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut frame = BytesMut::new();
        frame.put_u32_le(MAGIC);
        frame.put_u16_le(ty.code());
        frame.put_u16_le(0);
        frame.put_u32_le(payload.len() as u32);
        frame.put_slice(&payload);
        let original = frame.clone();
        match decode(&mut frame) {
            Ok(Some(msg)) => {
                prop_assert_eq!(msg.message_type(), ty);
                prop_assert_eq!(encode_all(&[msg]), original);
            }
            Ok(None) => prop_assert!(false, "a whole frame was present"),
            Err(_) => {}
        }
    }

    /// Corrupting any byte of a valid frame yields an error, a partial frame,
    /// or a message that re-encodes to the corrupted bytes; never a panic.
    #[test]
    fn corrupted_frames_never_panic(
        msg in message(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut wire = encode_all(&[msg]);
        let at = at.index(wire.len());
        wire[at] ^= xor;
        let corrupted = wire.clone();
        if let Ok(Some(decoded)) = decode(&mut wire) {
            let consumed = corrupted.len() - wire.len();
            prop_assert!(consumed >= HEADER_LEN);
            prop_assert_eq!(&encode_all(&[decoded])[..], &corrupted[..consumed]);
        }
    }
}
