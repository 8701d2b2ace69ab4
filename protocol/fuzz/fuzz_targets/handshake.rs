//! A handshake machine fed messages from an attacker who does not know the
//! secret. See ../README.md.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::{Channel, Handshake, HandshakeParams, HandshakeStep};

fuzz_target!(|input: &[u8]| {
    let params = HandshakeParams {
        resource: "fuzz".into(),
        node_id: 1,
        peer_node_id: 2,
        channel: Channel::Data,
    };
    // A fixed nonce keeps runs reproducible; the fuzzer can still not forge
    // a MAC, since it never sees the key.
    let Ok((mut machine, _hello)) = Handshake::with_nonce(params, b"fuzz secret", [7; 32]) else {
        return;
    };
    let mut buf = BytesMut::from(input);
    while let Ok(Some(msg)) = protocol::decode(&mut buf) {
        match machine.on_message(msg) {
            Ok(HandshakeStep::Send(_)) => {}
            Ok(HandshakeStep::Done(peer)) => panic!("authenticated without the secret: {peer:?}"),
            Err(_) => return,
        }
    }
});
