//! Bad network input is refused, logged, and the daemon serves on.
//!
//! A two-node cluster runs for real on loopback: node 1 primary, node 2
//! secondary, linked. Node 2 accepts (lower ids dial), so the tests open
//! raw TCP connections to node 2's listen address and send it garbage,
//! doctored handshakes and, finally, writes from a fenced primary. Each
//! time node 2 must close the connection (and say why with `Refused` where
//! the protocol allows), log the refusal, and carry on: still answering
//! `status`, still linked to the real node 1, still mirroring its writes.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use blockdev::blocksock::BlockClient;
use bytes::{Bytes, BytesMut};
use protocol::{Channel, DiskState, GenerationIds, Handshake, Message, Role, PROTOCOL_VERSION};
use rand::RngCore;
use support::rawpeer::{self, HandshakeFailure, RawConn, RawLink};
use support::{runtime, Cluster, ClusterSpec};

const SIZE: u64 = 16 << 20;
const RESOURCE: &str = "r0";
/// How long node 2 may take to close a refused connection.
const CLOSE: Duration = Duration::from_secs(15);
/// How long a log line may take to appear.
const LOG: Duration = Duration::from_secs(10);

/// Node 1 primary, node 2 secondary, linked and in sync.
fn primary_and_secondary() -> Cluster {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        size: SIZE,
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(
        cluster.wait_peers_up_to_date(1),
        "initial sync to node 2 did not finish"
    );
    cluster
}

fn node2_addr(cluster: &Cluster) -> SocketAddr {
    cluster.dir.node(2).listen
}

fn secret(cluster: &Cluster) -> Vec<u8> {
    rawpeer::read_secret(&cluster.dir.secret)
}

/// Waits for node 2's log to hold a "refused incoming connection" line for
/// the connection from `from` that mentions `reason`.
fn assert_refusal_logged(cluster: &Cluster, from: SocketAddr, reason: &str) {
    let log = &cluster.dir.node(2).log;
    let from = format!("from={from}");
    let found = support::wait_for(
        || {
            rawpeer::log_lines_with(log, "refused incoming connection")
                .iter()
                .any(|l| l.contains(&from) && l.contains(reason))
        },
        LOG,
    );
    assert!(
        found,
        "node 2's log has no \"refused incoming connection\" line with {from} and \
         \"{reason}\"; its refusals: {:#?}",
        rawpeer::log_lines_with(log, "refused incoming connection")
    );
}

/// Asserts that node 2 survived: the process runs, answers `status`, is
/// still linked to node 1, and a fresh write on node 1 reaches its image.
fn assert_cluster_serves_on(cluster: &mut Cluster, rt: &tokio::runtime::Runtime, tag: u8) {
    assert!(cluster.daemon(2).is_running(), "node 2 exited");
    let status = cluster.daemon(2).try_status_json();
    let status = status.expect("node 2 no longer answers status");
    assert_eq!(status["role"], "secondary", "node 2's status: {status}");
    cluster.wait_linked(2);
    cluster.wait_linked(1);

    let client = rt
        .block_on(BlockClient::connect(&cluster.dir.node(1).block_socket))
        .expect("connect to node 1's block socket");
    let offset = u64::from(tag) * 64 * 1024;
    let block = vec![tag; 64 * 1024];
    rt.block_on(client.write(offset, block.clone(), false))
        .expect("write on the primary");
    rt.block_on(client.flush()).expect("flush on the primary");
    let identical = cluster.wait_identical(None);
    assert!(
        identical.is_ok(),
        "replicas differ after the write: {identical:?}"
    );
    let image = std::fs::read(&cluster.dir.node(2).backing).unwrap();
    assert!(
        image[offset as usize..offset as usize + block.len()] == block[..],
        "the write on node 1 did not reach node 2's backing file"
    );
}

/// Sends `bytes` on a fresh connection and expects node 2 to close it.
fn send_garbage(cluster: &Cluster, bytes: &[u8]) -> SocketAddr {
    let mut conn = RawConn::connect(node2_addr(cluster)).expect("connect to node 2");
    let from = conn.local_addr();
    conn.send_raw(bytes).expect("send garbage");
    let received = conn
        .drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept a connection that sent garbage open: {e}"));
    assert!(
        received.is_empty(),
        "node 2 answered garbage with {received:?}"
    );
    from
}

/// Checks a handshake failure: node 2 closed the connection and sent a
/// `Refused` whose reason contains `reason`.
fn assert_refused(failure: &HandshakeFailure, reason: &str) {
    assert!(
        failure.closed,
        "node 2 did not close the refused connection: {failure:?}"
    );
    let refused = failure
        .refused
        .as_deref()
        .unwrap_or_else(|| panic!("node 2 sent no Refused: {failure:?}"));
    assert!(
        refused.contains(reason),
        "node 2 refused with \"{refused}\", expected it to mention \"{reason}\""
    );
}

#[test]
fn garbage_bytes_are_refused_and_the_daemon_serves_on() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();

    // Random bytes (not starting with the frame magic "VMSY").
    let mut random = vec![0u8; 4096];
    rand::thread_rng().fill_bytes(&mut random);
    random[0] = b'X';
    let from = send_garbage(&cluster, &random);
    assert_refusal_logged(&cluster, from, "bad frame magic");

    // Someone pointed a web browser (or a port scanner) at the port.
    let from = send_garbage(
        &cluster,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n",
    );
    assert_refusal_logged(&cluster, from, "bad frame magic");

    // A valid header announcing a payload far over the limit is refused
    // from the header alone.
    let mut header = Vec::new();
    header.extend_from_slice(b"VMSY");
    header.extend_from_slice(&0x0001u16.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    let from = send_garbage(&cluster, &header);
    assert_refusal_logged(&cluster, from, "before authentication");

    // A frame of a message other than Hello is not a handshake.
    let from = send_garbage(
        &cluster,
        &protocol::encode_to_bytes(&Message::Ping).unwrap(),
    );
    assert_refusal_logged(&cluster, from, "expected Hello, got Ping");

    assert_cluster_serves_on(&mut cluster, &rt, 1);
}

#[test]
fn a_silent_connection_is_dropped_at_the_handshake_timeout() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    // Three bytes: not even a frame header, so node 2 waits for more.
    let mut conn = RawConn::connect(node2_addr(&cluster)).expect("connect to node 2");
    let from = conn.local_addr();
    conn.send_raw(b"VMS").unwrap();
    let started = std::time::Instant::now();
    let received = conn
        .drain_until_closed(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("a half-sent handshake held the connection: {e}"));
    assert!(received.is_empty(), "unexpected answer {received:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "dropped only after {:?}",
        started.elapsed()
    );
    assert_refusal_logged(&cluster, from, "handshake timed out");
    assert_cluster_serves_on(&mut cluster, &rt, 2);
}

#[test]
fn a_hello_for_another_resource_is_refused() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    let failure = rawpeer::handshake(
        node2_addr(&cluster),
        rawpeer::params("not-r0", 1, 2, Channel::Data),
        &secret(&cluster),
    )
    .err()
    .expect("node 2 accepted a connection for another resource");
    // Told no more than a wrong secret would be: not node 2's resource.
    assert_refused(&failure, "authentication failed");
    assert!(!failure.refused.as_deref().unwrap_or("").contains(RESOURCE));
    assert_refusal_logged(
        &cluster,
        failure.local_addr,
        "claiming to be node 1 of resource \"not-r0\"",
    );
    assert_cluster_serves_on(&mut cluster, &rt, 3);
}

#[test]
fn a_wrong_secret_fails_authentication() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    let mut wrong = secret(&cluster);
    wrong[0] ^= 1;
    for channel in [Channel::Data, Channel::Meta] {
        let failure = rawpeer::handshake(
            node2_addr(&cluster),
            rawpeer::params(RESOURCE, 1, 2, channel),
            &wrong,
        )
        .err()
        .expect("node 2 accepted a peer with the wrong secret");
        assert_refused(&failure, "authentication failed");
        assert_refusal_logged(&cluster, failure.local_addr, "authentication failed");
        // Our side of the handshake does not accept node 2 either.
        assert_eq!(
            failure.local,
            Some(protocol::HandshakeError::AuthFailed),
            "{failure:?}"
        );
    }
    assert_cluster_serves_on(&mut cluster, &rt, 4);
}

#[test]
fn an_unknown_node_id_is_refused() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    let failure = rawpeer::handshake(
        node2_addr(&cluster),
        rawpeer::params(RESOURCE, 9, 2, Channel::Data),
        &secret(&cluster),
    )
    .err()
    .expect("node 2 accepted node 9, which is not configured");
    // It knows the secret, so after authentication it may be told why.
    assert_refused(&failure, "node 9 is not a configured peer");
    assert_refusal_logged(
        &cluster,
        failure.local_addr,
        "node 9 is not a configured peer",
    );
    assert_cluster_serves_on(&mut cluster, &rt, 5);
}

#[test]
fn a_hello_claiming_to_be_node_2_itself_is_refused() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    // Node 2 is not its own peer; a Hello "from node 2" must not get in.
    let (machine, _) = Handshake::new(
        rawpeer::params(RESOURCE, 3, 2, Channel::Data),
        &secret(&cluster),
    )
    .unwrap();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        resource: RESOURCE.into(),
        node_id: 2,
        peer_node_id: 2,
        channel: Channel::Data,
        nonce: [7; 32],
    };
    let failure = rawpeer::handshake_with(node2_addr(&cluster), machine, &hello)
        .err()
        .expect("node 2 accepted a Hello from node 2");
    // It fails authentication like any wrong claim (the MACs name an id
    // nobody has), telling nothing about node 2.
    assert_refused(&failure, "authentication failed");
    assert_refusal_logged(&cluster, failure.local_addr, "claiming to be node 2");
    assert_cluster_serves_on(&mut cluster, &rt, 6);
}

#[test]
fn a_wrong_protocol_version_is_refused() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    let mut conn = RawConn::connect(node2_addr(&cluster)).expect("connect to node 2");
    let from = conn.local_addr();
    // Version 1: the protocol before protected links.
    let mut hello = BytesMut::new();
    protocol::encode(
        &Message::Hello {
            version: 1,
            resource: RESOURCE.into(),
            node_id: 1,
            peer_node_id: 2,
            channel: Channel::Data,
            nonce: [0x42; 32],
        },
        &mut hello,
    )
    .expect("encode a version-1 Hello");
    conn.send_raw(&hello).unwrap();
    let received = conn
        .drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept a version-1 connection open: {e}"));
    let refused = received.iter().find_map(|m| match m {
        Message::Refused { reason } => Some(reason.clone()),
        _ => None,
    });
    let refused = refused.unwrap_or_else(|| panic!("no Refused in {received:?}"));
    assert!(
        refused.contains("version 1") && refused.contains(&format!("we speak {PROTOCOL_VERSION}")),
        "refusal does not name the versions: {refused}"
    );
    assert!(
        !received
            .iter()
            .any(|m| matches!(m, Message::AuthResponse { .. } | Message::AuthOk)),
        "node 2 went on with the handshake: {received:?}"
    );
    assert_refusal_logged(&cluster, from, "peer speaks protocol version 1");
    assert_cluster_serves_on(&mut cluster, &rt, 7);
}

/// Kills node 1 and waits until node 2 has noticed (its link is free).
fn kill_primary(cluster: &mut Cluster) {
    cluster.daemon(1).sigkill();
    let down = support::wait_for(
        || cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20),
    );
    assert!(down, "node 2 did not notice node 1's death");
}

/// Establishes a link to node 2 as node 1 and exchanges State, announcing
/// `role` at `term`. Returns the link and node 2's State.
fn fake_node1_link(cluster: &Cluster, role: Role, term: u64) -> (RawLink, Message) {
    let mut link = RawLink::establish(node2_addr(cluster), RESOURCE, 1, 2, &secret(cluster))
        .unwrap_or_else(|f| panic!("node 2 refused a correctly authenticated node 1: {f:?}"));
    let theirs = link.meta.recv().expect("node 2's State");
    assert!(
        matches!(
            theirs,
            Message::State {
                role: Role::Secondary,
                size: SIZE,
                ..
            }
        ),
        "node 2 opened with {theirs:?}"
    );
    link.meta
        .send(&Message::State {
            role,
            term,
            generation: GenerationIds {
                current: 0x5ca1_ab1e,
                bitmap: 0,
                history: [0, 0],
            },
            disk_state: DiskState::UpToDate,
            size: SIZE,
            unwritten: false,
        })
        .expect("send State");
    (link, theirs)
}

#[test]
fn a_write_of_a_stale_term_is_refused_and_never_applied() {
    let mut cluster = primary_and_secondary();
    let rt = runtime();
    let term = cluster.status(2)["term"].as_u64().unwrap();
    assert!(
        term >= 1,
        "node 2 has not seen node 1's promotion: term {term}"
    );

    kill_primary(&mut cluster);
    let (mut link, theirs) = fake_node1_link(&cluster, Role::Primary, 0);
    let Message::State { term: seen, .. } = theirs else {
        unreachable!()
    };
    assert!(seen >= 1, "node 2 announced term {seen}");
    // Node 2 may drop the link as soon as it sees the stale term (in our
    // State or in the write), so a broken pipe while sending is the refusal we
    // are testing for, not a failure. The barrier would make it ack the epoch.
    let stale_write = Message::Write {
        term: 0,
        epoch: 1,
        seq: 1,
        offset: 0,
        fua: true,
        data: Bytes::from(vec![0xEE; 4096]),
    };
    for msg in [stale_write, Message::Barrier { term: 0, epoch: 1 }] {
        if let Err(e) = link.data.send(&msg) {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "sending {msg:?} failed with {e}"
            );
            break;
        }
    }
    link.data
        .drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept the stale primary's data connection: {e}"));
    let on_meta = link
        .meta
        .drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept the stale primary's meta connection: {e}"));
    assert!(
        !on_meta
            .iter()
            .any(|m| matches!(m, Message::WriteAck { .. } | Message::BarrierAck { .. })),
        "node 2 acknowledged a stale write: {on_meta:?}"
    );

    let log = &cluster.dir.node(2).log;
    assert!(
        support::wait_for(
            || !rawpeer::log_lines_with(log, "stale primary").is_empty(),
            LOG
        ),
        "node 2's log does not mention the stale primary"
    );
    let image = std::fs::read(&cluster.dir.node(2).backing).unwrap();
    assert!(
        image[..4096].iter().any(|&b| b != 0xEE),
        "node 2 applied a write of a fenced term"
    );
    assert!(cluster.daemon(2).is_running(), "node 2 exited");
    let status = cluster.status(2);
    assert!(
        status["term"].as_u64().unwrap() >= term,
        "node 2's term went back: {status}"
    );
    drop(link);

    // The real node 1 comes back, is promoted again, and all is well.
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    cluster.wait_linked(1);
    cluster.wait_linked(2);
    cluster.promote(1);
    assert!(
        cluster.status(1)["term"].as_u64().unwrap() > term,
        "the new promotion did not start a newer term"
    );
    assert!(
        cluster.wait_peers_up_to_date(1),
        "node 2 did not catch up with the re-promoted node 1"
    );
    assert_cluster_serves_on(&mut cluster, &rt, 8);
}

/// The generation ids node 2 has persisted (superblock bytes 52..84).
fn persisted_generation(cluster: &Cluster, id: u32) -> GenerationIds {
    let meta = std::fs::read(&cluster.dir.node(id).metadata).unwrap();
    let word = |at: usize| u64::from_le_bytes(meta[at..at + 8].try_into().unwrap());
    GenerationIds {
        current: word(52),
        bitmap: word(60),
        history: [word(68), word(76)],
    }
}

// A secondary fences a stale primary's `State { disk_state: UpToDate }` on
// meta like its data messages: it must not persist the fenced primary's
// generation ids or mark itself up to date.
#[test]
fn a_stale_primary_cannot_make_the_secondary_adopt_its_generation() {
    let mut cluster = primary_and_secondary();
    let before = persisted_generation(&cluster, 2);
    assert_ne!(
        before.current, 0,
        "node 2 never adopted node 1's generation"
    );

    kill_primary(&mut cluster);
    let (mut link, _) = fake_node1_link(&cluster, Role::Primary, 0);
    // Mid-session, the fenced primary claims node 2 is in sync with a
    // generation of its own making.
    let forged = GenerationIds {
        current: 0xbad0_0000_0000_0bad,
        bitmap: before.current,
        history: [before.current, 0],
    };
    link.meta
        .send(&Message::State {
            role: Role::Primary,
            term: 0,
            generation: forged,
            disk_state: DiskState::UpToDate,
            size: SIZE,
            unwritten: false,
        })
        .expect("send the forged State");
    // Give node 2 time to act on it, then look at what it persisted.
    let _ = link.meta.drain_until_closed(Duration::from_secs(2));
    let after = persisted_generation(&cluster, 2);
    assert_ne!(
        after.current, forged.current,
        "node 2 adopted the generation of a primary of term 0 after having seen term 1"
    );
}

// A fenced primary (a term older than one seen) that links up must not be
// taken for the current primary: otherwise `promote` would refuse ("peer n1
// is primary; demote it first").
#[test]
fn a_stale_primary_holding_the_link_does_not_block_promotion() {
    let mut cluster = primary_and_secondary();
    kill_primary(&mut cluster);
    let (mut link, _) = fake_node1_link(&cluster, Role::Primary, 0);
    // Try to keep the link alive as a real (but fenced) primary would; the
    // daemon is expected to have dropped it already.
    for _ in 0..5 {
        let _ = link.meta.send(&Message::Ping);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cluster.daemon(2).ctl(&["promote"]);
    assert!(
        out.status.success(),
        "node 2 cannot be promoted while a primary of term 0 is linked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Node 2's term as its status shows it.
fn term_of(cluster: &Cluster, id: u32) -> u64 {
    cluster.status(id)["term"].as_u64().unwrap()
}

/// Waits until node 2 has closed both connections of `link`.
fn assert_link_dropped(link: RawLink, what: &str) {
    let RawLink { mut data, mut meta } = link;
    data.drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept the data connection after {what}: {e}"));
    meta.drain_until_closed(CLOSE)
        .unwrap_or_else(|e| panic!("node 2 kept the meta connection after {what}: {e}"));
}

/// Sends `msg` on `conn`; node 2 may already have closed it (it refuses as
/// early as it can), which is the refusal under test, not a failure.
fn send_or_refused(conn: &mut RawConn, msg: &Message) {
    if let Err(e) = conn.send(msg) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "sending {msg:?} failed with {e}"
        );
    }
}

// An authenticated peer (it holds the secret, but may be buggy or
// compromised) announcing a term at the top of the range must not make node
// 2 persist it: the next promotion would wrap the term to 0 and every old
// primary would look current again. Nor may an epoch at the maximum wrap.
#[test]
fn terms_and_epochs_at_the_maximum_are_refused_without_wrapping() {
    let mut cluster = primary_and_secondary();
    kill_primary(&mut cluster);
    let term = term_of(&cluster, 2);
    let log = cluster.dir.node(2).log.clone();

    // In State.
    let (link, _) = fake_node1_link(&cluster, Role::Primary, u64::MAX);
    assert_link_dropped(link, "a State of term u64::MAX");
    assert!(
        support::wait_for(
            || !rawpeer::log_lines_with(&log, "above the maximum").is_empty(),
            LOG
        ),
        "node 2's log does not say why it refused the term"
    );
    assert_eq!(term_of(&cluster, 2), term, "node 2 took the term");

    // In a Write and in a Barrier of an otherwise valid session; an epoch at
    // the maximum is just a number to a secondary (acked, never incremented).
    for bad in [
        Message::Write {
            term: u64::MAX,
            epoch: 1,
            seq: 1,
            offset: 0,
            fua: false,
            data: Bytes::from(vec![0xEE; 4096]),
        },
        Message::Barrier {
            term: u64::MAX,
            epoch: 1,
        },
    ] {
        let (mut link, _) = fake_node1_link(&cluster, Role::Primary, term);
        send_or_refused(
            &mut link.data,
            &Message::Barrier {
                term,
                epoch: u64::MAX,
            },
        );
        send_or_refused(&mut link.data, &bad);
        let what = format!("{bad:?}").chars().take(40).collect::<String>();
        assert_link_dropped(link, &what);
        assert!(cluster.daemon(2).is_running(), "node 2 exited");
        assert_eq!(term_of(&cluster, 2), term, "node 2 took the term");
    }
    let image = std::fs::read(&cluster.dir.node(2).backing).unwrap();
    assert!(
        image[..4096].iter().any(|&b| b != 0xEE),
        "node 2 applied a write of term u64::MAX"
    );

    // A peer id outside the metadata's node slots never gets that far.
    let failure = rawpeer::handshake(
        node2_addr(&cluster),
        rawpeer::params(RESOURCE, u32::MAX, 2, Channel::Meta),
        &secret(&cluster),
    )
    .err()
    .expect("node 2 accepted node u32::MAX");
    assert!(failure.closed, "{failure:?}");

    // The term did not wrap: a promotion goes one up.
    let out = cluster.daemon(2).ctl(&["promote"]);
    assert!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(term_of(&cluster, 2), term + 1);
}
