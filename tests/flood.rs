//! Unauthenticated clients are bounded (issue: reliability and security):
//! a flood of connections, garbage and a slow-drip client against a
//! secondary limited to 1,024 descriptors costs it bounded memory and a
//! bounded number of log lines, its peer still links and replicates, and
//! `status` answers; and a client without the secret learns neither the
//! resource name nor the node's id.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use protocol::{Channel, Message, PROTOCOL_VERSION};
use support::cluster::client;
use support::rawpeer::{self, RawConn};
use support::{runtime, wait_for, Cluster, ClusterSpec};

const FLOOD: usize = 2000;

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Lets this test process hold the flood's sockets.
fn raise_own_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn a_flood_of_unauthenticated_connections_costs_bounded_memory_and_the_peer_still_links() {
    raise_own_descriptor_limit();
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        protocol: "C",
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let n2_pid = cluster.daemon(2).pid();
    let limited = Command::new("prlimit")
        .args(["--pid", &n2_pid.to_string(), "--nofile=1024:1024"])
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit failed");
    let addr = cluster.dir.node(2).listen;
    let rss_before = vm_rss_kib(n2_pid);

    // The link must come up again during the flood: take it down first.
    assert!(cluster
        .daemon(1)
        .ctl(&["disconnect", "n2"])
        .status
        .success());
    assert!(wait_for(
        || cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20)
    ));

    // A slow-drip client: a valid Hello's first bytes, one per second.
    let mut drip = TcpStream::connect(addr).unwrap();
    let hello = protocol::encode_to_bytes(&Message::Hello {
        version: PROTOCOL_VERSION,
        resource: "r0".into(),
        node_id: 1,
        peer_node_id: 2,
        channel: Channel::Data,
        nonce: [9; 32],
    })
    .unwrap();
    let drip_started = Instant::now();
    drip.write_all(&hello[..1]).unwrap();

    // 2,000 connections, held open; every tenth sends garbage.
    let mut held = Vec::new();
    for i in 0..FLOOD {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                if i % 10 == 0 {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
                }
                held.push(s);
            }
            Err(e) => panic!("connect {i} failed: {e}"),
        }
    }

    // Meanwhile node 2 answers status and its peer links again.
    assert!(
        cluster.daemon(2).try_status_json().is_some(),
        "status did not answer"
    );
    assert!(cluster.daemon(1).ctl(&["connect", "n2"]).status.success());
    let mut sent = 1;
    let linked = wait_for(
        || {
            if sent < hello.len() && drip_started.elapsed() > Duration::from_secs(sent as u64) {
                let _ = drip.write_all(&hello[sent..sent + 1]);
                sent += 1;
            }
            cluster.peer(1, 2)["connected"] == true && cluster.peer(2, 1)["connected"] == true
        },
        Duration::from_secs(40),
    );
    assert!(linked, "the peers did not link again during the flood");
    let c1 = client(&rt, &cluster, 1);
    rt.block_on(c1.write(0, vec![0x77; 1 << 20], false))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert!(cluster.wait_identical(None).is_ok(), "replicas differ");
    assert!(cluster.daemon(2).try_status_json().is_some());

    // The slow drip was cut off at the handshake deadline, long before it
    // could finish its Hello.
    drip.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = matches!(drip.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "the slow-drip client is still connected");
    assert!(
        drip_started.elapsed() < Duration::from_secs(40),
        "slow drip held for {:?}",
        drip_started.elapsed()
    );

    let rss_after = vm_rss_kib(n2_pid);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "node 2 grew from {rss_before} KiB to {rss_after} KiB"
    );
    let refusals =
        rawpeer::log_lines_with(&cluster.dir.node(2).log, "refused incoming connection").len();
    eprintln!(
        "flood of {FLOOD}: node 2 VmRSS {rss_before} -> {rss_after} KiB, {refusals} refusal lines, linked again and replicated after {:?}",
        drip_started.elapsed()
    );
    assert!(
        refusals <= 60,
        "{refusals} refusal lines for {FLOOD} connections: not rate-limited"
    );
    drop(held);
}

#[test]
fn an_unauthenticated_client_learns_neither_the_resource_nor_the_node_id() {
    let cluster = Cluster::start(ClusterSpec::default());
    let mut conn = RawConn::connect(cluster.dir.node(2).listen).unwrap();
    conn.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        resource: "r0".into(),
        node_id: 1,
        peer_node_id: 2,
        channel: Channel::Meta,
        nonce: [3; 32],
    })
    .unwrap();
    // Without the secret it can only send a made-up MAC.
    conn.send(&Message::AuthResponse { mac: [0; 32] }).unwrap();
    let received = conn
        .drain_until_closed(Duration::from_secs(15))
        .expect("node 2 closed the connection");
    assert!(!received.is_empty(), "node 2 sent nothing at all");
    for msg in &received {
        match msg {
            Message::Hello {
                resource,
                node_id,
                peer_node_id,
                ..
            } => {
                assert_eq!(resource, "", "node 2's Hello names its resource");
                assert_eq!(
                    (*node_id, *peer_node_id),
                    (0, 0),
                    "node 2's Hello names ids"
                );
            }
            Message::AuthResponse { .. } => {}
            Message::Refused { reason } => {
                assert!(!reason.contains("r0"), "{reason}");
                assert!(reason.contains("authentication failed"), "{reason}");
            }
            other => panic!("unexpected {other:?} before authentication"),
        }
    }
    assert!(received
        .iter()
        .any(|m| matches!(m, Message::Refused { .. })));
    assert!(!received.iter().any(|m| matches!(m, Message::AuthOk)));
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Node 1 has the lower id: it dials node 2 and never waits for it. A
/// node-2 data or meta connection to node 1 that authenticates must be
/// closed, not queued for a link task that never reads it.
#[test]
fn the_dialing_node_closes_inbound_link_connections() {
    let mut cluster = Cluster::start(ClusterSpec::default());
    let secret = rawpeer::read_secret(&cluster.dir.secret);
    let addr = cluster.dir.node(1).listen;
    let pid = cluster.daemon(1).pid();
    let fds_before = open_fds(pid);
    for round in 0..20 {
        let channel = if round % 2 == 0 {
            Channel::Data
        } else {
            Channel::Meta
        };
        let Ok(mut conn) = rawpeer::handshake(addr, rawpeer::params("r0", 2, 1, channel), &secret)
        else {
            continue; // refused outright: closed, as it should be
        };
        conn.drain_until_closed(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("node 1 kept an inbound {channel:?} connection: {e}"));
    }
    let fds_after = open_fds(pid);
    assert!(
        fds_after <= fds_before + 4,
        "node 1's descriptors grew from {fds_before} to {fds_after}"
    );
    cluster.wait_linked(1);
    assert_eq!(cluster.peer(1, 2)["connected"], true);
}
