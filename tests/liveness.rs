//! Dead-peer detection between real `vmsyncd` processes: a frozen primary
//! (SIGSTOP: its sockets stay open, nothing answers) is noticed within the
//! ping timeout, its secondary can be promoted with `--force`, and the old
//! primary, once woken, is fenced by the newer term instead of serving
//! writes as a second current primary. And a peer that is already behind
//! does not make guest flushes wait `max_peer_wait_ms`.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::cluster::{client, proxied_pair};
use support::{runtime, wait_for, Cluster, ClusterSpec};

const PING_TIMEOUT: Duration = Duration::from_millis(3000);

fn signal(cluster: &mut Cluster, id: u32, sig: Signal) {
    let pid = cluster.daemon(id).pid();
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

#[test]
fn a_frozen_primary_is_detected_replaced_and_fenced_when_it_wakes() {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        protocol: "C",
        extra_toml: format!(
            "[replication]\nping_interval_ms = 500\nping_timeout_ms = {}\n",
            PING_TIMEOUT.as_millis()
        ),
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let c1 = client(&rt, &cluster, 1);
    let before: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
    rt.block_on(c1.write(0, before.clone(), false)).unwrap();
    rt.block_on(c1.flush()).unwrap();

    signal(&mut cluster, 1, Signal::SIGSTOP);
    let frozen = Instant::now();
    let detected = wait_for(
        || cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20),
    );
    let took = frozen.elapsed();
    eprintln!("frozen primary detected after {took:?} (ping_timeout_ms = {PING_TIMEOUT:?})");
    assert!(detected, "n2 still shows the frozen n1 connected");
    assert!(
        took < PING_TIMEOUT + Duration::from_secs(5),
        "detection took {took:?}"
    );

    let out = cluster.daemon(2).ctl(&["promote", "--force"]);
    assert!(
        out.status.success(),
        "promote --force on n2: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c2 = client(&rt, &cluster, 2);
    let after: Vec<u8> = vec![0xa5; 4096];
    rt.block_on(c2.write(1 << 20, after.clone(), false))
        .unwrap();
    rt.block_on(c2.flush()).unwrap();

    // n1 wakes up believing it is primary; it must learn the newer term
    // from n2 and stop taking writes.
    signal(&mut cluster, 1, Signal::SIGCONT);
    let woke = Instant::now();
    let mut refused = false;
    while woke.elapsed() < Duration::from_secs(15) {
        if rt
            .block_on(c1.write(2 << 20, vec![0x5a; 4096], false))
            .is_err()
        {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused, "the woken old primary still accepts writes");
    eprintln!("woken primary refused writes after {:?}", woke.elapsed());
    let s1 = cluster.status(1);
    assert_eq!(s1["fenced"], true, "n1 must report itself fenced: {s1}");
    assert!(
        rt.block_on(c1.flush()).is_err(),
        "a fenced primary must refuse flushes too"
    );

    // Only one writable primary: n2, with its data intact.
    let s2 = cluster.status(2);
    assert_eq!(s2["role"], "primary");
    assert_eq!(s2["fenced"], false, "{s2}");
    rt.block_on(c2.write(3 << 20, vec![1u8; 4096], false))
        .expect("n2 keeps serving writes");
    let read = rt.block_on(c2.read(0, before.len())).unwrap();
    assert!(
        read == before,
        "n2 lost data the old primary had acknowledged"
    );
    let read = rt.block_on(c2.read(1 << 20, 4096)).unwrap();
    assert!(read == after, "n2 lost its own write");
    let read = rt.block_on(c2.read(2 << 20, 4096)).unwrap();
    assert!(
        read.iter().all(|&b| b == 0),
        "a write of the fenced old primary reached the new one"
    );
}

#[test]
fn a_peer_that_is_behind_does_not_slow_guest_flushes() {
    let rt = runtime();
    // Protocol C: every flush waits for the acks of mirrored peers.
    let max_wait = Duration::from_millis(3000);
    let (cluster, proxy) = proxied_pair(
        &rt,
        "C",
        &format!(
            "[replication]\nmax_peer_wait_ms = {}\n",
            max_wait.as_millis()
        ),
    );
    let c = client(&rt, &cluster, 1);
    proxy.pause();
    // The first flush waits max_peer_wait_ms, then drops the peer behind.
    rt.block_on(c.write(0, vec![1u8; 4096], false)).unwrap();
    rt.block_on(c.flush()).unwrap();
    assert_eq!(cluster.peer(1, 2)["state"], "behind");
    let mut slowest = Duration::ZERO;
    for i in 0..20u64 {
        rt.block_on(c.write(4096 * (i + 1), vec![i as u8; 4096], false))
            .unwrap();
        let started = Instant::now();
        rt.block_on(c.flush()).unwrap();
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("slowest of 20 flushes with a behind peer: {slowest:?}");
    assert!(
        slowest < max_wait / 6,
        "a flush waited {slowest:?} for a peer that is behind"
    );
    proxy.resume();
    assert!(
        cluster.wait_peers_up_to_date(1),
        "the peer did not catch up once resumed"
    );
    let result = cluster.wait_identical(None);
    assert!(result.is_ok(), "{result:?}");
}
