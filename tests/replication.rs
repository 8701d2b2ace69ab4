//! LAN replication between real `vmsyncd` processes on loopback: mirroring,
//! protocols A and C, peer and primary crashes, link cuts, resync.
//!
//! The primary serves its top layer on a block socket (no ublk on the host);
//! the workload runs through it and a model says what every replica must
//! hold afterwards.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::cluster::{client, proxied_pair};
use support::workload::{self, BLOCK};
use support::{runtime, Cluster, ClusterSpec, Model, Op, Workload};

const MIB: u64 = 1 << 20;

fn spec(nodes: u32, protocol: &'static str) -> ClusterSpec {
    ClusterSpec {
        nodes,
        protocol,
        ..ClusterSpec::default()
    }
}

/// The 4 KiB blocks an op sequence touches.
fn touched_blocks(ops: &[Op]) -> BTreeSet<u64> {
    ops.iter()
        .filter_map(|op| op.range())
        .flat_map(|r| (r.start / BLOCK)..r.end.div_ceil(BLOCK))
        .collect()
}

/// `zero_copy_send`: "on" sends every large flush zero-copy even on
/// loopback (where the kernel copies at delivery, so "auto" soon stops).
fn converge_three_nodes(protocol: &'static str, zero_copy_send: &str) {
    let cluster = Cluster::start(ClusterSpec {
        extra_toml: format!("[replication]\nzero_copy_send = \"{zero_copy_send}\"\n"),
        ..spec(3, protocol)
    });
    cluster.promote(1);
    assert!(
        cluster.wait_peers_up_to_date(1),
        "initial sync did not finish"
    );
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let ops = Workload::new(11, size).ops(3000);
    let model = rt
        .block_on(workload::run(&c, &ops, 16, Model::zeroed(size)))
        .expect("workload on the primary");
    rt.block_on(c.flush()).unwrap();
    let hash = cluster.wait_identical(Some(model.blake3()));
    assert!(hash.is_ok(), "replicas differ from the model: {hash:?}");
    let status = cluster.status(1);
    assert_eq!(status["role"], "primary");
    for p in status["peers"].as_array().unwrap() {
        assert_eq!(p["protocol"], protocol);
        assert_eq!(p["state"], "up-to-date");
        // Writes of 16 KiB and more went to both peers as one record
        // sealed once (and opened by each).
        let (shared, mirrored) = (&p["shared_record_bytes"], &p["replicated_bytes"]);
        assert!(
            shared.as_u64().unwrap() > 0 && shared.as_u64() < mirrored.as_u64(),
            "shared {shared}, mirrored {mirrored}"
        );
        if zero_copy_send == "on" {
            let zero_copy = p["zero_copy_bytes"].as_u64().unwrap();
            assert!(
                zero_copy >= shared.as_u64().unwrap(),
                "zero-copy {zero_copy}, shared {shared}"
            );
        }
    }
    assert_eq!(cluster.status(2)["role"], "secondary");
}

#[test]
fn three_nodes_converge_with_protocol_a() {
    converge_three_nodes("A", "auto");
}

#[test]
fn three_nodes_converge_with_protocol_c_sending_zero_copy() {
    converge_three_nodes("C", "on");
}

#[test]
fn a_killed_peer_gets_only_the_blocks_it_missed() {
    // Zero-copy sends throughout (also on loopback): the killed peer's
    // link goes down with sends whose memory the kernel still holds.
    let mut cluster = Cluster::start(ClusterSpec {
        extra_toml: "[replication]\nzero_copy_send = \"on\"\n".into(),
        ..spec(3, "A")
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(21, size);
    let phase1 = gen.ops(1000);
    let model = rt
        .block_on(workload::run(&c, &phase1, 16, Model::zeroed(size)))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());
    let resynced_before = cluster.peer(1, 3)["resynced_bytes"].as_u64().unwrap();

    cluster.daemon(3).sigkill();
    // Phase 2 touches a known set of blocks while node 3 is down.
    let phase2a: Vec<Op> = gen.ops(50);
    let model = rt.block_on(workload::run(&c, &phase2a, 16, model)).unwrap();
    // Node 2 comes and goes meanwhile: the primary's data generation moves
    // on twice, which must not cost node 3 more than its missed blocks.
    cluster.daemon(2).sigkill();
    let phase2b: Vec<Op> = gen.ops(50);
    let model = rt.block_on(workload::run(&c, &phase2b, 16, model)).unwrap();
    *cluster.daemon(2) = support::Daemon::start(cluster.dir.node(2));
    cluster.daemon(2).wait_ready(support::cluster::START);
    assert!(
        support::wait_for(
            || cluster.peer(1, 2)["state"] == "up-to-date",
            support::cluster::CONVERGE
        ),
        "node 2 did not resync"
    );
    rt.block_on(c.flush()).unwrap();
    let phase2: Vec<Op> = phase2a.into_iter().chain(phase2b).collect();
    let missed = touched_blocks(&phase2).len() as u64 * BLOCK;
    let stale = cluster.peer(1, 3)["stale_bytes"].as_u64().unwrap();
    assert!(
        stale >= missed,
        "bitmap holds {stale} bytes, the outage wrote {missed}"
    );
    // Only what was in flight when the link dropped may be added.
    assert!(
        stale <= missed + 8 * MIB,
        "bitmap holds {stale} bytes, the outage wrote {missed}"
    );

    *cluster.daemon(3) = support::Daemon::start(cluster.dir.node(3));
    cluster.daemon(3).wait_ready(support::cluster::START);
    assert!(cluster.wait_peers_up_to_date(1), "node 3 did not resync");
    let resent = cluster.peer(1, 3)["resynced_bytes"].as_u64().unwrap() - resynced_before;
    assert_eq!(resent, stale, "resync must send exactly the stale blocks");
    assert!(
        resent < size / 4,
        "a bitmap resync, not a full copy: {resent} bytes"
    );
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());
    for id in [2, 3] {
        let zero_copy = cluster.peer(1, id)["zero_copy_bytes"].as_u64().unwrap();
        assert!(zero_copy > 0, "node {id} got no zero-copy sends");
    }
}

#[test]
fn a_cut_link_heals_and_the_replicas_converge() {
    let rt = runtime();
    // Zero-copy sends throughout: the cut catches some in flight.
    let (cluster, proxy) = proxied_pair(
        &rt,
        "C",
        "[replication]\nmax_peer_wait_ms = 500\nzero_copy_send = \"on\"\n",
    );
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let ops = Workload::new(31, size).ops(3000);
    let run = rt.spawn({
        let c = c.clone();
        async move { workload::run(&c, &ops, 16, Model::zeroed(size)).await }
    });
    std::thread::sleep(Duration::from_millis(700));
    proxy.cut();
    assert!(
        support::wait_for(
            || cluster.peer(1, 2)["connected"] == false,
            Duration::from_secs(10)
        ),
        "primary did not notice the cut"
    );
    std::thread::sleep(Duration::from_millis(700));
    proxy.heal();
    let model = rt
        .block_on(run)
        .unwrap()
        .expect("guest writes never fail because a peer is gone");
    rt.block_on(c.flush()).unwrap();
    assert!(
        cluster.wait_peers_up_to_date(1),
        "peer did not resync after the link healed"
    );
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_slow_peer_falls_behind_without_stalling_the_guest_and_catches_up() {
    let rt = runtime();
    let (cluster, proxy) = proxied_pair(
        &rt,
        "C",
        "[replication]\ncongestion_limit = \"2MiB\"\nmax_peer_wait_ms = 300\n",
    );
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    // The peer stops taking data but keeps its connections.
    proxy.pause();
    let ops = Workload::new(51, size).ops(1500);
    let started = std::time::Instant::now();
    let model = rt
        .block_on(workload::run(&c, &ops, 16, Model::zeroed(size)))
        .expect("writes complete while the peer is stuck");
    let took = started.elapsed();
    let peer = cluster.peer(1, 2);
    assert_eq!(
        peer["state"], "behind",
        "a stuck peer must fall behind: {peer}"
    );
    assert!(peer["stale_bytes"].as_u64().unwrap() > 0);
    // At most one max_peer_wait per write chain, not one per write.
    assert!(
        took < Duration::from_secs(20),
        "the guest was stalled by a slow peer: {took:?}"
    );
    proxy.resume();
    rt.block_on(c.flush()).unwrap();
    assert!(
        cluster.wait_peers_up_to_date(1),
        "the peer did not catch up once the backlog drained"
    );
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_briefly_congested_peer_throttles_the_guest_instead_of_falling_behind() {
    let rt = runtime();
    let (cluster, proxy) = proxied_pair(
        &rt,
        "A",
        "[replication]\ncongestion_limit = \"1MiB\"\nmax_peer_wait_ms = 20000\n",
    );
    let c = std::sync::Arc::new(client(&rt, &cluster, 1));
    let size = cluster.dir.spec.size;
    let resynced_before = cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap();
    // Far more than the congestion limit plus what the sockets can buffer.
    const CHUNK: u64 = 256 * 1024;
    let total = size * 3 / 4;
    let mut expected = vec![0u8; size as usize];
    for (i, b) in expected[..total as usize].iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8 ^ (i % 13) as u8;
    }
    let payload = bytes::Bytes::from(expected[..total as usize].to_vec());

    proxy.pause();
    let writer = {
        let c = std::sync::Arc::clone(&c);
        rt.spawn(async move {
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
            let mut tasks = tokio::task::JoinSet::new();
            for offset in (0..total).step_by(CHUNK as usize) {
                let permit = std::sync::Arc::clone(&sem).acquire_owned().await.unwrap();
                let (c, data) = (
                    std::sync::Arc::clone(&c),
                    payload.slice(offset as usize..(offset + CHUNK) as usize),
                );
                tasks.spawn(async move {
                    let r = c.write(offset, data, false).await;
                    drop(permit);
                    r
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap()?;
            }
            std::io::Result::Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !writer.is_finished(),
        "{total} bytes of writes completed while the peer took nothing: no backpressure"
    );
    let peer = cluster.peer(1, 2);
    assert_eq!(
        peer["state"], "up-to-date",
        "a peer slower for less than max_peer_wait_ms must stay mirrored: {peer}"
    );
    proxy.resume();
    rt.block_on(writer)
        .unwrap()
        .expect("the throttled writes complete once the peer drains");
    rt.block_on(c.flush()).unwrap();
    let peer = cluster.peer(1, 2);
    assert_eq!(peer["state"], "up-to-date", "{peer}");
    assert_eq!(peer["stale_bytes"], 0, "{peer}");
    assert_eq!(
        peer["resynced_bytes"].as_u64().unwrap(),
        resynced_before,
        "the peer was dropped behind and resynced: {peer}"
    );
    let result = cluster.wait_identical(Some(blake3::hash(&expected)));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_killed_primary_resyncs_its_activity_log_after_restart() {
    let mut cluster = Cluster::start(spec(3, "A"));
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let rt = runtime();
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(41, size);
    let phase1 = gen.ops(800);
    let flushed = {
        let c = client(&rt, &cluster, 1);
        let m = rt
            .block_on(workload::run(&c, &phase1, 16, Model::zeroed(size)))
            .unwrap();
        rt.block_on(c.flush()).unwrap();
        m
    };
    // Phase 2 is cut short by SIGKILL of the primary.
    let phase2 = gen.ops(3000);
    let c = client(&rt, &cluster, 1);
    let ops = phase2.clone();
    let run = rt.spawn(async move { workload::run(&c, &ops, 16, Model::zeroed(size)).await });
    std::thread::sleep(Duration::from_millis(400));
    cluster.daemon(1).sigkill();
    let _ = rt.block_on(run);

    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    let status = cluster.status(1);
    assert_eq!(status["last_shutdown"], "crash");
    assert!(status["recovered_extents"].as_u64().unwrap() > 0);
    assert_eq!(
        status["role"], "secondary",
        "a restarted node with peers waits to be promoted"
    );
    cluster.wait_linked(1);
    cluster.promote(1);
    assert!(
        cluster.wait_peers_up_to_date(1),
        "activity-log resync did not finish"
    );
    let hash = cluster.wait_identical(None);
    assert!(
        hash.is_ok(),
        "replicas differ after the primary's crash: {hash:?}"
    );
    // Everything flushed before the crash and not rewritten after it survives.
    let image = std::fs::read(&cluster.dir.node(2).backing).unwrap();
    let rewritten = touched_blocks(&phase2);
    for block in 0..size / BLOCK {
        if rewritten.contains(&block) {
            continue;
        }
        let r = (block * BLOCK) as usize..((block + 1) * BLOCK) as usize;
        assert!(
            image[r.clone()] == flushed.image()[r],
            "flushed block {block} was lost"
        );
    }
}

/// Stamps every 4 KiB block of epoch `n` with `n`.
fn epoch_block(n: u64) -> Vec<u8> {
    n.to_le_bytes().repeat(BLOCK as usize / 8)
}

#[test]
fn a_crashed_peer_holds_a_prefix_of_the_primarys_epochs() {
    const WRITES_PER_EPOCH: u64 = 8;
    const EPOCHS: u64 = 500;
    let mut cluster = Cluster::start(spec(2, "A"));
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    for round in 0..3u64 {
        // Each round uses its own region, so blocks are written once.
        let base = round * 4100;
        let writer = rt.spawn({
            let c = c.clone();
            async move {
                for n in 1..=EPOCHS {
                    let mut writes = tokio::task::JoinSet::new();
                    for i in 0..WRITES_PER_EPOCH {
                        let c = c.clone();
                        let offset = (base + n * WRITES_PER_EPOCH + i) * BLOCK;
                        writes.spawn(
                            async move { c.write(offset, epoch_block(base + n), false).await },
                        );
                    }
                    while let Some(w) = writes.join_next().await {
                        w.unwrap()?;
                    }
                    // A flush closes the epoch on the peer.
                    c.flush().await?;
                }
                std::io::Result::Ok(())
            }
        });
        std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 700));
        cluster.daemon(2).sigkill();
        rt.block_on(writer)
            .unwrap()
            .expect("the primary keeps serving without its peer");

        let image = std::fs::read(&cluster.dir.node(2).backing).unwrap();
        let present = |n: u64| -> u64 {
            (0..WRITES_PER_EPOCH)
                .filter(|i| {
                    let at = ((base + n * WRITES_PER_EPOCH + i) * BLOCK) as usize;
                    image[at..at + BLOCK as usize] == epoch_block(base + n)[..]
                })
                .count() as u64
        };
        let counts: Vec<u64> = (1..=EPOCHS).map(present).collect();
        let last_seen = counts.iter().rposition(|&c| c > 0);
        if let Some(last) = last_seen {
            for (n, &count) in counts[..last].iter().enumerate() {
                assert_eq!(
                    count,
                    WRITES_PER_EPOCH,
                    "round {round}: epoch {} is visible on the peer but epoch {} is incomplete",
                    last + 1,
                    n + 1
                );
            }
        }
        assert!(
            last_seen.is_some_and(|l| l > 0),
            "round {round}: the peer received nothing before the crash"
        );

        *cluster.daemon(2) = support::Daemon::start(cluster.dir.node(2));
        cluster.daemon(2).wait_ready(support::cluster::START);
        assert!(
            cluster.wait_peers_up_to_date(1),
            "round {round}: peer did not resync"
        );
    }
    assert!(cluster.wait_identical(None).is_ok());
}

/// mkfs discards the whole device in one request; far more extents than
/// the activity log holds at once must still be mirrored.
#[test]
fn a_discard_of_a_whole_large_device_is_mirrored() {
    const SIZE: u64 = 1 << 30;
    let cluster = Cluster::start(ClusterSpec {
        size: SIZE,
        ..spec(2, "C")
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let data = vec![0xa5u8; 256 * 1024];
    for offset in [0, SIZE / 2, SIZE - data.len() as u64] {
        rt.block_on(c.write(offset, data.clone(), false)).unwrap();
    }
    rt.block_on(c.discard(0, SIZE))
        .expect("a discard of the whole device succeeds");
    rt.block_on(c.flush()).unwrap();
    let zeroes = {
        let mut h = blake3::Hasher::new();
        let chunk = vec![0u8; MIB as usize];
        for _ in 0..SIZE / MIB {
            h.update(&chunk);
        }
        h.finalize()
    };
    let result = cluster.wait_identical(Some(zeroes));
    assert!(result.is_ok(), "{result:?}");
}

/// More writes in flight, in more distinct extents, than the activity log
/// has slots, while a stuck peer (protocol C) keeps each of them waiting
/// for its ack: writes wait for a slot, and none may wait forever.
#[test]
fn writes_in_more_extents_than_the_activity_log_holds_all_complete() {
    const SIZE: u64 = 1 << 30;
    const EXTENT: u64 = 4 * MIB;
    let rt = runtime();
    let spec = ClusterSpec {
        size: SIZE,
        extra_toml: "[replication]\nmax_peer_wait_ms = 1000\n".into(),
        ..spec(2, "C")
    };
    let (cluster, proxy) = support::cluster::primary_with_proxy(&rt, spec, 2);
    // Several connections, as a ublk device has several queues.
    let clients: Vec<_> = (0..4).map(|_| client(&rt, &cluster, 1)).collect();
    let mut expected = vec![0u8; SIZE as usize];
    let writes: Vec<(u64, Vec<u8>)> = (0..SIZE / EXTENT)
        .map(|extent| (extent * EXTENT, vec![extent as u8 ^ 0x5a; 64 * 1024]))
        .collect();
    for (offset, data) in &writes {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    proxy.pause();
    let all = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            let c = clients[i % clients.len()].clone();
            tasks.spawn(async move { c.write(offset, data, false).await });
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap()?;
            }
            std::io::Result::Ok(())
        })
        .await
    });
    all.expect("writes hung waiting for activity-log slots")
        .expect("writes failed");
    proxy.resume();
    rt.block_on(clients[0].flush()).unwrap();
    assert!(
        cluster.wait_peers_up_to_date(1),
        "the peer did not catch up"
    );
    let result = cluster.wait_identical(Some(blake3::hash(&expected)));
    assert!(result.is_ok(), "{result:?}");
}

/// Protocol A lets the primary run ahead of a slow peer. Writes the peer
/// has not acknowledged, in extents that have since left the primary's
/// activity log, must survive a primary crash as stale bits: recovery only
/// marks the extents still in the log.
#[test]
fn a_killed_primary_far_ahead_of_its_peer_still_resyncs_what_left_its_activity_log() {
    const SIZE: u64 = 1 << 30;
    const EXTENT: u64 = 4 * MIB;
    let rt = runtime();
    let spec = ClusterSpec {
        size: SIZE,
        extra_toml: "[replication]\ncongestion_limit = \"256MiB\"\nmax_peer_wait_ms = 60000\n"
            .into(),
        ..spec(2, "A")
    };
    let (mut cluster, proxy) = support::cluster::primary_with_proxy(&rt, spec, 2);

    proxy.pause();
    let c = client(&rt, &cluster, 1);
    let mut expected = vec![0u8; SIZE as usize];
    // One write per extent, twice as many extents as the log holds.
    for extent in 0..SIZE / EXTENT {
        let offset = extent * EXTENT;
        let data = vec![(extent % 251) as u8 + 1; 64 * 1024];
        expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        rt.block_on(c.write(offset, data, false)).unwrap();
    }
    rt.block_on(c.flush()).unwrap();
    // Mirrored all along (resyncing what left the log counts), never behind.
    assert_ne!(cluster.peer(1, 2)["state"], "behind");
    drop(c);
    cluster.daemon(1).sigkill();
    proxy.cut();
    assert!(
        support::wait_for(
            || cluster.peer(2, 1)["connected"] == false,
            Duration::from_secs(20)
        ),
        "node 2 did not notice node 1's death"
    );

    proxy.resume();
    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    cluster.wait_linked(1);
    cluster.promote(1);
    assert!(
        cluster.wait_peers_up_to_date(1),
        "the peer was not resynced"
    );
    let result = cluster.wait_identical(Some(blake3::hash(&expected)));
    assert!(
        result.is_ok(),
        "the peer lacks writes of extents that left the activity log: {result:?}"
    );
}

/// Makes a file immutable (`chattr +i`) until dropped: writes through
/// descriptors already open then fail with EPERM, a real I/O error.
struct Immutable<'a>(&'a std::path::Path);

impl<'a> Immutable<'a> {
    fn set(path: &'a std::path::Path) -> Self {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .expect("run chattr");
        assert!(
            out.status.success(),
            "chattr +i {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(path)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(self.0)
            .status();
    }
}

/// Waits until node `id`'s status says its disk is `failed`.
fn wait_disk_failed(cluster: &Cluster, id: u32) -> bool {
    support::wait_for(
        || {
            cluster.daemons[id as usize - 1]
                .try_status_json()
                .is_some_and(|s| s["disk"] == "failed")
        },
        support::cluster::CONVERGE,
    )
}

/// A peer's backing device starts refusing writes (DRBD: on-io-error
/// detach): guest writes on the primary keep succeeding, the peer's disk
/// state goes `failed` with a log line naming the device and the
/// operation, the primary stops mirroring to it and collects the writes in
/// its bitmap; the other peer loses nothing. Restarted once the device
/// works again, the peer is resynced and ends identical.
#[test]
fn a_peer_whose_disk_fails_goes_failed_and_is_resynced_after_a_restart() {
    let mut cluster = Cluster::start(spec(3, "C"));
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(61, size);
    let mut model = rt
        .block_on(workload::run(&c, &gen.ops(300), 8, Model::zeroed(size)))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    {
        let _refusing = Immutable::set(&cluster.dir.node(2).backing);
        // Every guest write succeeds, while and after n2's disk fails.
        model = rt
            .block_on(workload::run(&c, &gen.ops(400), 8, model))
            .expect("guest writes on the primary while a peer's disk fails");
        rt.block_on(c.flush()).unwrap();
        assert!(
            wait_disk_failed(&cluster, 2),
            "n2's disk state did not go failed: {}",
            cluster.status(2)
        );
        let failed = support::wait_for(
            || cluster.peer(1, 2)["state"] == "failed",
            support::cluster::CONVERGE,
        );
        assert!(
            failed,
            "the primary does not show n2 failed: {}",
            cluster.peer(1, 2)
        );
        // Written while n2 is failed: only its bitmap gets it.
        model = rt
            .block_on(workload::run(&c, &gen.ops(200), 8, model))
            .unwrap();
        rt.block_on(c.flush()).unwrap();
        let n2 = cluster.peer(1, 2);
        assert!(
            n2["stale_bytes"].as_u64().unwrap() > 0,
            "nothing marked for n2: {n2}"
        );
        assert_eq!(cluster.peer(1, 3)["state"], "up-to-date");
        assert_eq!(cluster.status(1)["disk"], "up-to-date");
        assert_eq!(
            cluster.hash(3),
            model.blake3(),
            "the healthy peer lacks acknowledged writes"
        );
        let log = std::fs::read_to_string(&cluster.dir.node(2).log).unwrap();
        let backing = cluster.dir.node(2).backing.display().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("backing device failed: write")
                    && l.contains(&backing)
                    && l.contains("disk state failed")),
            "no error line naming the device and the operation in n2's log"
        );
        // A failed disk is no place to promote.
        let out = cluster.daemons[1].ctl(&["promote", "--force"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("backing device failed"));
    }
    // The device works again: restart the peer's daemon to re-attach it.
    let status = cluster.daemon(2).sigterm_and_wait(support::cluster::START);
    assert!(
        status.success(),
        "a failed secondary did not stop cleanly: {status}"
    );
    *cluster.daemon(2) = support::Daemon::start(cluster.dir.node(2));
    cluster.daemon(2).wait_ready(support::cluster::START);
    assert!(
        cluster.wait_peers_up_to_date(1),
        "n2 was not resynced after its restart: {}",
        cluster.peer(1, 2)
    );
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(
        result.is_ok(),
        "replicas differ after the resync: {result:?}"
    );
    assert_eq!(cluster.status(2)["disk"], "up-to-date");
}

/// The primary's own backing device refuses a write (after it went to the
/// peers): the guest gets EIO for it and for every request after, the disk
/// state is `failed`, and a failover to a peer gives back every write the
/// guest had been told was done.
#[test]
fn a_primary_whose_disk_fails_refuses_io_and_a_peer_takes_over_with_every_acknowledged_write() {
    let cluster = Cluster::start(spec(2, "C"));
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let model = rt
        .block_on(workload::run(
            &c,
            &Workload::new(67, size).ops(500),
            8,
            Model::zeroed(size),
        ))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    {
        let _refusing = Immutable::set(&cluster.dir.node(1).backing);
        let refused = rt.block_on(c.write(1 << 20, vec![0xeeu8; 4096], false));
        let err = refused.expect_err("a write to an immutable backing succeeded");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    // Detached: even with the device writable again, nothing is served.
    assert_eq!(cluster.status(1)["disk"], "failed");
    let read = rt.block_on(c.read(0, 4096));
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    let write = rt.block_on(c.write(0, vec![1u8; 4096], false));
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EIO));
    let log = std::fs::read_to_string(&cluster.dir.node(1).log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("backing device failed: write")
                && l.contains(&cluster.dir.node(1).backing.display().to_string())),
        "no error line naming the device and the operation in n1's log"
    );
    drop(c);
    // Failover: demote the failed primary (its peer confirms every write),
    // promote the peer.
    let out = cluster.daemons[0].ctl(&["demote"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demote of a failed primary: {text}");
    assert!(text.contains("every peer holds every write"), "{text}");
    cluster.promote(2);
    let c2 = client(&rt, &cluster, 2);
    let mut image = Vec::with_capacity(size as usize);
    for offset in (0..size).step_by(MIB as usize) {
        image.extend(rt.block_on(c2.read(offset, MIB as usize)).unwrap());
    }
    // The refused write may or may not be on the peer (the guest got an
    // error for it); everything else is exactly what was acknowledged.
    image[1 << 20..(1 << 20) + 4096].copy_from_slice(&model.image()[1 << 20..(1 << 20) + 4096]);
    assert!(
        image == model.image(),
        "the new primary lacks writes the failed primary acknowledged"
    );
}

/// A peer in another LAN group is not mirrored, but pushed to after the
/// writes (`wan.rs`), with barriers of its own: it converges, and the push
/// stops (it used to loop forever, its bits never clearing without a
/// barrier ack). `tests/wan.rs` tests the push itself.
#[test]
fn a_wan_peer_is_resynced_after_the_writes_and_the_resync_ends() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        protocol: "C",
        lan_groups: vec!["home".into(), "away".into()],
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    assert_eq!(cluster.peer(1, 2)["link"], "wan");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(91, size);
    let ops = gen.ops(1500);
    let model = rt
        .block_on(workload::run(&c, &ops, 16, Model::zeroed(size)))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    assert!(
        cluster.wait_peers_up_to_date(1),
        "the WAN peer did not catch up"
    );
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());
    // Nothing left to send: the resync must be idle, not looping.
    let resynced = cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap(),
        resynced,
        "the resync of an up-to-date WAN peer keeps sending"
    );
    // The initial full sync, then at most what the guest wrote.
    let written: u64 = ops
        .iter()
        .filter_map(|op| op.range())
        .map(|r| r.end.div_ceil(BLOCK) * BLOCK - r.start / BLOCK * BLOCK)
        .sum();
    assert!(
        resynced <= size + written,
        "resent {resynced} bytes: a {size}-byte device and {written} bytes written"
    );
}

/// Online verify: blocks corrupted behind a peer's back (written straight
/// into its backing file) are found by hash, exactly, while the replicas
/// otherwise agree; `--repair` resyncs them from the primary.
#[test]
fn verify_finds_blocks_corrupted_behind_a_peers_back_and_repair_fixes_them() {
    use std::os::unix::fs::FileExt;
    let cluster = Cluster::start(spec(2, "C"));
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    let size = cluster.dir.spec.size;
    let ops = Workload::new(97, size).ops(500);
    let model = rt
        .block_on(workload::run(&c, &ops, 16, Model::zeroed(size)))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());
    let verify = |args: &[&str]| {
        let out = cluster.daemons[0].ctl(args);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    assert!(verify(&["verify"]).contains("n2: identical"));

    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(&cluster.dir.node(2).backing)
        .unwrap();
    image.write_all_at(&[0xab; 4096], 8 * MIB + 4096).unwrap();
    image.write_all_at(&[0xcd; 512], 20 * MIB + 1024).unwrap();
    drop(image);
    let found = verify(&["verify"]);
    assert!(
        found.contains("n2: 8192 bytes differ: 8392704+4096, 20971520+4096"),
        "{found}"
    );
    assert_ne!(
        cluster.hash(2),
        model.blake3(),
        "verify alone repairs nothing"
    );
    assert!(verify(&["verify", "--repair"]).contains("resyncing"));
    assert!(
        cluster.wait_identical(Some(model.blake3())).is_ok(),
        "repair did not restore the peer"
    );
    assert!(verify(&["verify"]).contains("n2: identical"));
}

/// `status --json` follows a verify while it runs: at `verify_rate` (low
/// here) the bytes compared grow sample by sample, the run ends `done`, and
/// it counts exactly the blocks corrupted behind the peer's back.
#[test]
fn verify_progress_shows_in_status_at_the_configured_rate() {
    use std::os::unix::fs::FileExt;
    const RATE: u64 = 16 * MIB;
    let cluster = Cluster::start(ClusterSpec {
        size: 64 * MIB,
        extra_toml: format!("[replication]\nverify_rate = {RATE}\n"),
        ..spec(2, "C")
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = runtime();
    let c = client(&rt, &cluster, 1);
    rt.block_on(c.write(0, vec![0x5a; 4 * MIB as usize], false))
        .unwrap();
    rt.block_on(c.flush()).unwrap();
    assert!(cluster.wait_identical(None).is_ok());
    assert_eq!(cluster.status(1)["verify"]["state"], "none");
    // Three blocks: two neighbours and one far away (one of them in the
    // last MiB, so the whole device must be compared to find it).
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(&cluster.dir.node(2).backing)
        .unwrap();
    image.write_all_at(&[0xee; 8192], MIB).unwrap();
    image.write_all_at(&[0x11; 100], 64 * MIB - 4096).unwrap();
    drop(image);

    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_vmsyncctl"))
        .arg("--config")
        .arg(&cluster.dir.node(1).config)
        .arg("verify")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    let last = loop {
        let v = cluster.status(1)["verify"].clone();
        // (Until vmsyncctl's request reached the daemon, no verify runs.)
        if v["state"] == "none" && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if v["state"] != "running" {
            break v;
        }
        samples.push(v["bytes_done"].as_u64().unwrap());
        assert_eq!(v["total_bytes"], 64 * MIB);
        assert!(v["started_at"].as_u64().is_some(), "{v}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "verify still running: {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let took = started.elapsed();
    let out = verify.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    eprintln!("verify of 64 MiB at {RATE} B/s took {took:?}; bytes_done samples {samples:?}");
    // 64 MiB at 16 MiB/s: about 4 s, so about a dozen samples that rise.
    let rising = samples.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(rising >= 3, "progress did not move: {samples:?}");
    assert!(samples.windows(2).all(|w| w[1] >= w[0]), "{samples:?}");
    assert!(
        took >= Duration::from_secs(3),
        "64 MiB at 16 MiB/s cannot take {took:?}: verify_rate ignored"
    );
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["bytes_done"], 64 * MIB);
    assert_eq!(last["differing_blocks"], 3, "{last}");
    assert!(last["finished_at"].as_u64().is_some(), "{last}");
    assert!(text.contains("12288 bytes differ"), "{text}");
    // The text status says the same.
    let out = cluster.daemons[0].ctl(&["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("verify done") && status.contains("differing blocks 3"),
        "{status}"
    );
}
