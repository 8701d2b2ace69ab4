//! Arbitrary bytes into the streaming decoder. See ../README.md.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the delivery piece size, so the fuzzer explores
    // frames split across reads as well as whole buffers.
    let Some((&piece, stream)) = input.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);

    let mut buf = BytesMut::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match protocol::decode(&mut buf) {
                Ok(Some(msg)) => {
                    // Compressed block data: bounded, never a panic.
                    if let protocol::Message::ResyncPacked {
                        codec, len, data, ..
                    } = &msg
                    {
                        if let Ok(out) = protocol::compress::decompress(*codec, data, *len) {
                            assert_eq!(out.len(), *len as usize);
                        }
                    }
                    // Canonical encoding: the message re-encodes to exactly
                    // the bytes that were consumed.
                    let consumed = before.len() - buf.len();
                    let again =
                        protocol::encode_to_bytes(&msg).expect("decoded message re-encodes");
                    assert_eq!(&again[..], &before[..consumed]);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "a partial frame must not be consumed");
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
