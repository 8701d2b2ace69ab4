//! Per-message tests: every variant round-trips, and a few golden frames pin
//! the wire layout so that an accidental format change fails loudly.

use bytes::{Bytes, BytesMut};
use protocol::{
    decode, encode_to_bytes, Channel, DiskState, GenerationIds, Message, MessageType, Role,
    SecretKey,
};

/// One hand-written instance of each message type. The match is exhaustive,
/// so adding a message type without a sample fails to compile.
fn sample(ty: MessageType) -> Message {
    let data = Bytes::from_static(b"\x00\x01block data\xff");
    match ty {
        MessageType::Hello => Message::Hello {
            version: 1,
            resource: "work-vm".into(),
            node_id: 1,
            peer_node_id: 2,
            channel: Channel::Meta,
            nonce: [0xa5; 32],
        },
        MessageType::AuthResponse => Message::AuthResponse { mac: [7; 32] },
        MessageType::AuthOk => Message::AuthOk,
        MessageType::Refused => Message::Refused {
            reason: "peer is resource 'x', we are 'y'".into(),
        },
        MessageType::Write => Message::Write {
            term: 3,
            epoch: 9,
            seq: 1000,
            offset: 4096 * 17,
            fua: true,
            data,
        },
        MessageType::Discard => Message::Discard {
            term: 3,
            epoch: 9,
            seq: 1001,
            offset: 0,
            len: 1 << 30,
        },
        MessageType::WriteZeroes => Message::WriteZeroes {
            term: 3,
            epoch: 10,
            seq: 1002,
            offset: 8192,
            len: 4096,
        },
        MessageType::Barrier => Message::Barrier { term: 3, epoch: 10 },
        MessageType::BarrierAck => Message::BarrierAck { epoch: 10 },
        MessageType::WriteAck => Message::WriteAck { seq: 1000 },
        MessageType::WriteNack => Message::WriteNack {
            seq: 1001,
            errno: 5,
        },
        MessageType::ReadRequest => Message::ReadRequest {
            id: 1,
            offset: 4096,
            len: 65536,
            hash: Some([0x11; 32]),
        },
        MessageType::ReadReply => Message::ReadReply {
            id: 1,
            offset: 4096,
            data,
        },
        MessageType::ReadSame => Message::ReadSame {
            id: 2,
            offset: 4096,
            len: 65536,
        },
        MessageType::ReadError => Message::ReadError { id: 3, errno: -1 },
        MessageType::ResyncData => Message::ResyncData {
            term: 4,
            offset: 1 << 40,
            data,
        },
        MessageType::ResyncAck => Message::ResyncAck {
            offset: 1 << 40,
            len: 4096,
        },
        MessageType::HashRequest => Message::HashRequest {
            id: 5,
            offset: 1 << 20,
            len: 1 << 20,
            granule: 4096,
        },
        MessageType::HashReply => Message::HashReply {
            id: 5,
            offset: 1 << 20,
            hashes: bytes::Bytes::from(vec![0x22; 64]),
        },
        MessageType::ResyncPacked => Message::ResyncPacked {
            term: 4,
            offset: 1 << 40,
            len: 65536,
            codec: protocol::compress::CODEC_LZ4,
            data,
        },
        MessageType::ResyncFrom => Message::ResyncFrom {
            term: 4,
            offset: 1 << 30,
            len: 1 << 20,
            holder: 3,
            hash: [0x33; 32],
        },
        MessageType::State => Message::State {
            role: Role::Primary,
            term: 4,
            generation: GenerationIds {
                current: 0xdead,
                bitmap: 0xbeef,
                history: [1, 2],
            },
            disk_state: DiskState::UpToDate,
            size: 16 << 30,
            unwritten: true,
        },
        MessageType::Bitmap => Message::Bitmap {
            node_id: 2,
            block_size: 4096,
            nbits: 4 << 20,
            encoding: 1,
            chunk_index: 3,
            last: true,
            data,
        },
        MessageType::Ping => Message::Ping,
        MessageType::PingAck => Message::PingAck,
        MessageType::DirJoin => Message::DirJoin {
            name: "laptop".into(),
            address: "127.0.0.1:7790".into(),
            lan_group: "home".into(),
            size: 1 << 30,
        },
        MessageType::DirInfo => Message::DirInfo {
            term: 7,
            primary: protocol::NO_NODE,
        },
        MessageType::DirPromote => Message::DirPromote { force: true },
        MessageType::DirGranted => Message::DirGranted {
            term: 8,
            prev_primary: 1,
            prev_term: 7,
            prev_generation: GenerationIds {
                current: 1,
                bitmap: 2,
                history: [3, 4],
            },
            prev_final: true,
            report_age_ms: 1500,
            overridden: false,
            hot_extents: Bytes::from_static(&[1, 0, 0, 0, 0, 0, 0, 0]),
            bitmaps: 3,
        },
        MessageType::DirReport => Message::DirReport {
            term: 8,
            generation: GenerationIds::default(),
            last: false,
            hot_extents: Bytes::new(),
            bitmaps: 2,
        },
        MessageType::DirDemote => Message::DirDemote {
            force: false,
            term: 8,
        },
        MessageType::DirRefused => Message::DirRefused {
            reason: "the device is open".into(),
        },
        MessageType::DirBitmap => Message::DirBitmap {
            node_id: 2,
            block_size: 4096,
            nbits: 1 << 18,
            encoding: 0,
            data,
        },
        MessageType::SharedKey => Message::SharedKey {
            key: SecretKey([0x3c; 32]),
        },
        MessageType::SharedNext => Message::SharedNext { counter: 1 << 40 },
    }
}

fn round_trip(msg: &Message) -> Message {
    let frame = encode_to_bytes(msg).unwrap();
    let mut buf = BytesMut::from(&frame[..]);
    let decoded = decode(&mut buf).unwrap().expect("a whole frame");
    assert!(buf.is_empty(), "{msg:?} left {} bytes", buf.len());
    decoded
}

#[test]
fn every_message_type_round_trips() {
    for &ty in MessageType::ALL {
        let msg = sample(ty);
        assert_eq!(msg.message_type(), ty);
        assert_eq!(round_trip(&msg), msg, "{ty}");
    }
}

#[test]
fn message_type_codes_are_unique_and_resolvable() {
    for &ty in MessageType::ALL {
        assert_eq!(MessageType::from_code(ty.code()), Some(ty));
    }
    let mut codes: Vec<u16> = MessageType::ALL.iter().map(|t| t.code()).collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), MessageType::ALL.len());
    assert_eq!(MessageType::from_code(0), None);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn golden_ping() {
    assert_eq!(
        hex(&encode_to_bytes(&Message::Ping).unwrap()),
        "564d53590104000000000000"
    );
}

#[test]
fn golden_write() {
    let msg = Message::Write {
        term: 1,
        epoch: 2,
        seq: 3,
        offset: 0x1000,
        fua: true,
        data: Bytes::from_static(b"ab"),
    };
    let expected = concat!(
        "564d5359",
        "0101",
        "0000",
        "27000000",         // magic, type, flags, len = 39
        "0100000000000000", // term
        "0200000000000000", // epoch
        "0300000000000000", // seq
        "0010000000000000", // offset
        "01",               // fua
        "02000000",
        "6162", // data
    );
    assert_eq!(hex(&encode_to_bytes(&msg).unwrap()), expected);
}

#[test]
fn golden_hello() {
    let msg = Message::Hello {
        version: 1,
        resource: "vm".into(),
        node_id: 1,
        peer_node_id: 2,
        channel: Channel::Meta,
        nonce: [0xee; 32],
    };
    let expected = format!(
        "{}{}",
        concat!(
            "564d5359", "0100", "0000", "33000000", // len = 4+6+4+4+1+32 = 51
            "01000000", // version
            "02000000", "766d", // resource
            "01000000", "02000000", // node_id, peer_node_id
            "01",       // channel = Meta
        ),
        "ee".repeat(32)
    );
    assert_eq!(hex(&encode_to_bytes(&msg).unwrap()), expected);
}

#[test]
fn golden_read_request_with_and_without_hash() {
    let with = Message::ReadRequest {
        id: 9,
        offset: 0,
        len: 4096,
        hash: Some([0x33; 32]),
    };
    let without = Message::ReadRequest {
        id: 9,
        offset: 0,
        len: 4096,
        hash: None,
    };
    let common = concat!("0900000000000000", "0000000000000000", "00100000");
    assert_eq!(
        hex(&encode_to_bytes(&without).unwrap()),
        format!("564d53590102000015000000{common}00")
    );
    assert_eq!(
        hex(&encode_to_bytes(&with).unwrap()),
        format!("564d53590102000035000000{common}01{}", "33".repeat(32))
    );
}

#[test]
fn golden_state() {
    let msg = sample(MessageType::State);
    let expected = concat!(
        "564d5359",
        "0103",
        "0000",
        "33000000",         // len = 1+8+32+1+8+1 = 51
        "01",               // role = Primary
        "0400000000000000", // term
        "adde000000000000",
        "efbe000000000000", // generation current, bitmap
        "0100000000000000",
        "0200000000000000", // generation history
        "04",               // disk_state = UpToDate
        "0000000004000000", // size = 16 GiB
        "01",               // unwritten
    );
    assert_eq!(hex(&encode_to_bytes(&msg).unwrap()), expected);
}

#[test]
fn debug_output_is_readable_and_short() {
    let msg = Message::Write {
        term: 1,
        epoch: 2,
        seq: 3,
        offset: 4,
        fua: false,
        data: Bytes::from(vec![0; 1 << 20]),
    };
    assert_eq!(
        format!("{msg:?}"),
        "Write { term: 1, epoch: 2, seq: 3, offset: 4, fua: false, \
         data: <1048576 bytes: 0000000000000000..> }"
    );
    assert_eq!(format!("{:?}", Message::AuthOk), "AuthOk");
    assert_eq!(
        format!("{:?}", Message::AuthResponse { mac: [0xab; 32] }),
        format!("AuthResponse {{ mac: {} }}", "ab".repeat(32))
    );
}

#[test]
fn debug_output_never_shows_a_key() {
    let shown = format!(
        "{:?}",
        Message::SharedKey {
            key: SecretKey([0xab; 32])
        }
    );
    assert_eq!(shown, "SharedKey { key: <key> }");
}
