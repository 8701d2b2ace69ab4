//! Handshake tests: two machines talking through the real codec, plus
//! attackers who do not know the secret but can replay, reflect and relay.

use std::collections::VecDeque;

use bytes::BytesMut;
use protocol::{
    decode, encode_to_bytes, Channel, Handshake, HandshakeError, HandshakeParams, HandshakeStep,
    Message, MessageType, PeerInfo, RecordBuf, PROTOCOL_VERSION,
};

const SECRET: &[u8] = b"correct horse battery staple";

fn params(node_id: u32, peer_node_id: u32) -> HandshakeParams {
    HandshakeParams {
        resource: "work-vm".into(),
        node_id,
        peer_node_id,
        channel: Channel::Data,
    }
}

/// Sends a message through the real frame codec.
fn over_wire(msg: &Message) -> Message {
    let mut buf = BytesMut::from(&encode_to_bytes(msg).unwrap()[..]);
    decode(&mut buf).unwrap().unwrap()
}

type Outcome = Result<PeerInfo, HandshakeError>;

/// Runs two machines against each other until both have an outcome. A side
/// that fails sends its refusal, as the daemon would.
fn run(a: (HandshakeParams, &[u8]), b: (HandshakeParams, &[u8])) -> (Outcome, Outcome) {
    let (ha, hello_a) = Handshake::new(a.0, a.1).unwrap();
    let (hb, hello_b) = Handshake::new(b.0, b.1).unwrap();
    let mut machines = [ha, hb];
    let mut outcomes: [Option<Outcome>; 2] = [None, None];
    // inboxes[i] holds messages on their way to side i.
    let mut inboxes = [VecDeque::from([hello_b]), VecDeque::from([hello_a])];
    while let Some(i) = (0..2).find(|&i| outcomes[i].is_none() && !inboxes[i].is_empty()) {
        let msg = inboxes[i].pop_front().map(|m| over_wire(&m)).unwrap();
        match machines[i].on_message(msg) {
            Ok(HandshakeStep::Send(reply)) => inboxes[1 - i].push_back(reply),
            Ok(HandshakeStep::Done(peer)) => outcomes[i] = Some(Ok(peer)),
            Err(e) => {
                inboxes[1 - i].extend(e.refusal());
                outcomes[i] = Some(Err(e));
            }
        }
    }
    let [oa, ob] = outcomes.map(|o| o.expect("handshake stalled"));
    (oa, ob)
}

#[test]
fn same_secret_succeeds_on_both_channels() {
    for channel in [Channel::Data, Channel::Meta] {
        let pa = HandshakeParams {
            channel,
            ..params(1, 2)
        };
        let pb = HandshakeParams {
            channel,
            ..params(2, 1)
        };
        let (a, b) = run((pa, SECRET), (pb, SECRET));
        assert_eq!(
            a,
            Ok(PeerInfo {
                node_id: 2,
                channel,
                version: PROTOCOL_VERSION
            })
        );
        assert_eq!(
            b,
            Ok(PeerInfo {
                node_id: 1,
                channel,
                version: PROTOCOL_VERSION
            })
        );
    }
}

#[test]
fn secrets_of_any_length_work() {
    for secret in [&b""[..], b"x", &[0x42; 10_000]] {
        let (a, b) = run((params(1, 2), secret), (params(2, 1), secret));
        assert!(a.is_ok() && b.is_ok());
    }
}

#[test]
fn wrong_secret_fails_on_both_sides() {
    let (a, b) = run((params(1, 2), SECRET), (params(2, 1), b"another secret"));
    assert_eq!(a, Err(HandshakeError::AuthFailed));
    assert_eq!(b, Err(HandshakeError::AuthFailed));
    assert_eq!(
        a.unwrap_err().to_string(),
        "authentication failed: wrong shared secret"
    );
}

#[test]
fn wrong_resource_fails_with_both_names() {
    let pb = HandshakeParams {
        resource: "other-vm".into(),
        ..params(2, 1)
    };
    let (a, b) = run((params(1, 2), SECRET), (pb, SECRET));
    assert_eq!(
        a.unwrap_err().to_string(),
        "peer is resource 'other-vm', we are 'work-vm'"
    );
    assert_eq!(
        b.unwrap_err().to_string(),
        "peer is resource 'work-vm', we are 'other-vm'"
    );
}

#[test]
fn wrong_version_fails() {
    // Version 1 is the protocol before protected links: refused.
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    let hello = Message::Hello {
        version: 1,
        resource: "work-vm".into(),
        node_id: 2,
        peer_node_id: 1,
        channel: Channel::Data,
        nonce: [9; 32],
    };
    let err = a.on_message(hello).unwrap_err();
    assert_eq!(
        err,
        HandshakeError::VersionMismatch {
            peer: 1,
            ours: protocol::PROTOCOL_VERSION
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "peer speaks protocol version 1, we speak {}",
            protocol::PROTOCOL_VERSION
        )
    );
    assert_eq!(
        err.refusal(),
        Some(Message::Refused {
            reason: format!(
                "peer speaks protocol version 1, we speak {}",
                protocol::PROTOCOL_VERSION
            )
        })
    );
}

#[test]
fn wrong_node_id_fails_on_both_sides() {
    // A expects node 3, but node 2 answers (and node 2 did expect A).
    let (a, b) = run((params(1, 3), SECRET), (params(2, 1), SECRET));
    assert_eq!(
        a,
        Err(HandshakeError::WrongPeer {
            claimed: 2,
            expected: 3
        })
    );
    assert_eq!(
        b,
        Err(HandshakeError::NotExpectedByPeer {
            expected: 3,
            ours: 2
        })
    );
}

#[test]
fn channel_mismatch_fails() {
    let pb = HandshakeParams {
        channel: Channel::Meta,
        ..params(2, 1)
    };
    let (a, _) = run((params(1, 2), SECRET), (pb, SECRET));
    assert_eq!(
        a.unwrap_err().to_string(),
        "peer opened a Meta channel, we expected Data"
    );
}

#[test]
fn own_hello_reflected_back_fails() {
    let (mut a, hello_a) = Handshake::new(params(1, 2), SECRET).unwrap();
    assert_eq!(
        a.on_message(over_wire(&hello_a)),
        Err(HandshakeError::ReflectedNonce)
    );
}

#[test]
fn own_mac_reflected_back_fails() {
    let (mut a, hello_a) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (mut b, hello_b) = Handshake::new(params(2, 1), SECRET).unwrap();
    let HandshakeStep::Send(mac_a) = a.on_message(hello_b).unwrap() else {
        panic!()
    };
    let HandshakeStep::Send(mac_b) = b.on_message(hello_a).unwrap() else {
        panic!()
    };
    assert_ne!(mac_a, mac_b, "the two directions must have different MACs");
    assert_eq!(a.on_message(mac_a.clone()), Err(HandshakeError::AuthFailed));
    // The same MAC does authenticate A to B, where it belongs.
    assert_eq!(
        b.on_message(mac_a),
        Ok(HandshakeStep::Send(Message::AuthOk))
    );
}

/// An attacker impersonating node 2 to node 1 opens two connections to node
/// 1 and relays between them, choosing its nonces so that node 1 computes, on
/// the second connection, a MAC over the same nonce pair the first needs.
/// Because the sender's id is in the transcript, node 1's MAC never passes as
/// node 2's.
#[test]
fn relay_between_two_connections_fails() {
    let (mut conn1, hello1) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (mut conn2, hello2) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (Message::Hello { nonce: n1, .. }, Message::Hello { nonce: n2, .. }) = (hello1, hello2)
    else {
        panic!()
    };
    let fake_hello = |nonce| Message::Hello {
        version: PROTOCOL_VERSION,
        resource: "work-vm".into(),
        node_id: 2,
        peer_node_id: 1,
        channel: Channel::Data,
        nonce,
    };
    // conn1 needs MAC(sender 2, receiver 1, n2, n1); conn2 yields
    // MAC(sender 1, receiver 2, n2, n1).
    conn1.on_message(fake_hello(n2)).unwrap();
    let HandshakeStep::Send(mac_from_conn2) = conn2.on_message(fake_hello(n1)).unwrap() else {
        panic!()
    };
    assert_eq!(
        conn1.on_message(mac_from_conn2),
        Err(HandshakeError::AuthFailed)
    );
}

#[test]
fn replayed_handshake_fails() {
    // Record node 2's side of a genuine handshake with node 1...
    let (mut a, hello_a) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (mut b, hello_b) = Handshake::new(params(2, 1), SECRET).unwrap();
    a.on_message(hello_b.clone()).unwrap();
    let HandshakeStep::Send(recorded_mac) = b.on_message(hello_a).unwrap() else {
        panic!()
    };
    // ...and replay it to a fresh connection of node 1.
    let (mut victim, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    victim.on_message(hello_b).unwrap();
    assert_eq!(
        victim.on_message(recorded_mac),
        Err(HandshakeError::AuthFailed)
    );
}

#[test]
fn authentication_cannot_be_skipped() {
    let (_, hello_b) = Handshake::new(params(2, 1), SECRET).unwrap();
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    a.on_message(hello_b).unwrap();
    assert_eq!(
        a.on_message(Message::AuthOk),
        Err(HandshakeError::Unexpected {
            got: MessageType::AuthOk,
            expected: "AuthResponse"
        })
    );
}

#[test]
fn out_of_order_and_foreign_messages_fail() {
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    let err = a
        .on_message(Message::AuthResponse { mac: [0; 32] })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected AuthResponse message during handshake (expected Hello)"
    );
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    assert!(matches!(
        a.on_message(Message::Ping),
        Err(HandshakeError::Unexpected { .. })
    ));
}

#[test]
fn refusal_from_peer_is_reported() {
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    let err = a
        .on_message(Message::Refused {
            reason: "go away".into(),
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "peer refused the connection: go away");
    assert_eq!(
        err.refusal(),
        None,
        "a refusal is not answered with a refusal"
    );
}

#[test]
fn machine_is_over_after_done_or_error() {
    let (mut a, hello_a) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (mut b, hello_b) = Handshake::new(params(2, 1), SECRET).unwrap();
    let HandshakeStep::Send(mac_a) = a.on_message(hello_b.clone()).unwrap() else {
        panic!()
    };
    let HandshakeStep::Send(mac_b) = b.on_message(hello_a).unwrap() else {
        panic!()
    };
    assert_eq!(
        a.on_message(mac_b),
        Ok(HandshakeStep::Send(Message::AuthOk))
    );
    assert_eq!(
        b.on_message(mac_a),
        Ok(HandshakeStep::Send(Message::AuthOk))
    );
    assert!(matches!(
        a.on_message(Message::AuthOk),
        Ok(HandshakeStep::Done(_))
    ));
    assert_eq!(a.on_message(Message::AuthOk), Err(HandshakeError::Over));

    // After a failure, even a valid message is refused.
    assert!(b.on_message(Message::Ping).is_err());
    assert_eq!(b.on_message(Message::AuthOk), Err(HandshakeError::Over));
}

#[test]
fn same_node_id_on_both_ends_is_a_local_error() {
    assert_eq!(
        Handshake::new(params(4, 4), SECRET).unwrap_err(),
        HandshakeError::SameNodeId(4)
    );
}

#[test]
fn nonces_are_fresh_and_the_secret_never_crosses_the_wire() {
    let (mut a, hello_a) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (_, hello_a2) = Handshake::new(params(1, 2), SECRET).unwrap();
    assert_ne!(hello_a, hello_a2);

    let (mut b, hello_b) = Handshake::new(params(2, 1), SECRET).unwrap();
    let mut sent = vec![hello_a.clone(), hello_b.clone()];
    let HandshakeStep::Send(mac_a) = a.on_message(hello_b).unwrap() else {
        panic!()
    };
    let HandshakeStep::Send(mac_b) = b.on_message(hello_a).unwrap() else {
        panic!()
    };
    sent.extend([mac_a, mac_b]);
    for msg in &sent {
        let frame = encode_to_bytes(msg).unwrap();
        assert!(!frame.windows(SECRET.len()).any(|w| w == SECRET));
    }
    assert!(
        !format!("{a:?}").contains("key"),
        "Debug must not show the key"
    );
}

/// Runs a successful handshake between fresh machines for nodes 1 and 2 and
/// returns both machines, done.
fn established(channel: Channel, secret: &[u8]) -> (Handshake, Handshake) {
    let (mut a, hello_a) = Handshake::new(
        HandshakeParams {
            channel,
            ..params(1, 2)
        },
        secret,
    )
    .unwrap();
    let (mut b, hello_b) = Handshake::new(
        HandshakeParams {
            channel,
            ..params(2, 1)
        },
        secret,
    )
    .unwrap();
    assert!(a.session_keys().is_none(), "no keys before the handshake");
    let Ok(HandshakeStep::Send(mac_a)) = a.on_message(over_wire(&hello_b)) else {
        panic!("a: no mac")
    };
    let Ok(HandshakeStep::Send(mac_b)) = b.on_message(over_wire(&hello_a)) else {
        panic!("b: no mac")
    };
    let Ok(HandshakeStep::Send(ok_a)) = a.on_message(over_wire(&mac_b)) else {
        panic!("a: no AuthOk")
    };
    let Ok(HandshakeStep::Send(ok_b)) = b.on_message(over_wire(&mac_a)) else {
        panic!("b: no AuthOk")
    };
    assert!(
        a.session_keys().is_none(),
        "no keys before the peer's AuthOk"
    );
    assert!(matches!(a.on_message(ok_b), Ok(HandshakeStep::Done(_))));
    assert!(matches!(b.on_message(ok_a), Ok(HandshakeStep::Done(_))));
    (a, b)
}

#[test]
fn session_keys_match_swapped_and_differ_per_direction_and_connection() {
    let (a, b) = established(Channel::Data, SECRET);
    let (ka, kb) = (a.session_keys().unwrap(), b.session_keys().unwrap());
    assert_eq!(ka.send, kb.recv);
    assert_eq!(ka.recv, kb.send);
    assert_ne!(ka.send, ka.recv, "directions share a key");
    // A second connection (fresh nonces) and the other channel: other keys.
    let (a2, _) = established(Channel::Data, SECRET);
    let (a3, _) = established(Channel::Meta, SECRET);
    for other in [a2.session_keys().unwrap(), a3.session_keys().unwrap()] {
        assert_ne!(other.send, ka.send);
        assert_ne!(other.recv, ka.recv);
    }
    // Records flow both ways under them.
    let (mut seal_a, mut open_a) = ka.split();
    let (mut seal_b, mut open_b) = kb.split();
    let mut records = RecordBuf::new();
    seal_a.seal(&Message::Ping, &mut records).unwrap();
    let mut wire = BytesMut::from(records.as_slice());
    assert_eq!(open_b.open(&mut wire), Ok(Some(Message::Ping)));
    records.clear();
    seal_b.seal(&Message::PingAck, &mut records).unwrap();
    let mut wire = BytesMut::from(records.as_slice());
    assert_eq!(open_a.open(&mut wire), Ok(Some(Message::PingAck)));
}

#[test]
fn a_failed_handshake_yields_no_keys() {
    let (mut a, _) = Handshake::new(params(1, 2), SECRET).unwrap();
    let (_, hello_b) = Handshake::new(params(2, 1), b"another secret").unwrap();
    let Ok(HandshakeStep::Send(_)) = a.on_message(over_wire(&hello_b)) else {
        panic!("no mac")
    };
    let _ = a.on_message(Message::AuthResponse { mac: [0; 32] });
    assert!(a.session_keys().is_none());
}
