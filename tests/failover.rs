//! Failover: the primary is lost, another node is promoted, and the old
//! primary comes back. Whatever each node held when the primary died, the
//! replicas must end up identical, holding the new primary's data — or,
//! when both sides wrote on their own, the link must be refused as a split
//! brain rather than one side's writes silently overwritten.
//!
//! Real `vmsyncd` processes on loopback; links go through a proxy the test
//! controls where a peer must be kept from seeing some writes.

mod support;

use std::time::Duration;

use support::cluster::{client, primary_with_proxy};
use support::workload::write_flushed;
use support::{runtime, wait_for, ClusterSpec, Model, Workload};

fn spec(nodes: u32, protocol: &'static str) -> ClusterSpec {
    ClusterSpec {
        nodes,
        protocol,
        ..ClusterSpec::default()
    }
}

/// Waits until node `id` sees its link to `peer` down.
fn wait_link_down(cluster: &support::Cluster, id: u32, peer: u32) {
    assert!(
        wait_for(
            || cluster.peer(id, peer)["connected"] == false,
            Duration::from_secs(20)
        ),
        "node {id} did not notice that its link to node {peer} is down"
    );
}

/// Protocol A lets a primary complete writes its peer never received. When
/// that primary crashes and the peer is promoted, those writes are gone
/// from the cluster; the old primary, back as a secondary, must be resynced
/// over them (it says which blocks through its bitmap) — not keep them.
#[test]
fn a_crashed_primary_gives_up_its_unreplicated_writes_to_the_promoted_peer() {
    let rt = runtime();
    let (mut cluster, proxy) = primary_with_proxy(&rt, spec(2, "A"), 2);
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(71, size);

    let phase1 = gen.ops(400);
    let c1 = client(&rt, &cluster, 1);
    let model = write_flushed(&rt, &c1, &phase1, Model::zeroed(size));
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());

    // Node 2 stops receiving; node 1 completes (protocol A) and flushes
    // writes that never reach it, then dies with them.
    proxy.pause();
    let unreplicated = gen.ops(400);
    write_flushed(&rt, &c1, &unreplicated, model.clone());
    drop(c1);
    cluster.daemon(1).sigkill();
    proxy.cut();
    wait_link_down(&cluster, 2, 1);

    cluster.promote(2);
    let phase3 = gen.ops(200);
    let c2 = client(&rt, &cluster, 2);
    let model = write_flushed(&rt, &c2, &phase3, model);

    proxy.resume();
    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    assert_eq!(cluster.status(1)["role"], "secondary");
    assert!(
        cluster.wait_peers_up_to_date(2),
        "the old primary was not resynced: {}",
        cluster.status(2)
    );
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(
        result.is_ok(),
        "the old primary kept writes the new primary never had: {result:?}"
    );
}

/// Node 1 is primary of nodes 2 and 3; node 3 lags (its link is held up)
/// and misses the last writes node 2 received. Node 1 dies.
struct LostPrimary {
    cluster: support::Cluster,
    _proxy: support::proxy::Proxy,
    /// Phase 1, which every node holds.
    common: Model,
    /// Phase 1 and the writes only node 2 received.
    node2_has: Model,
    rt: tokio::runtime::Runtime,
}

fn lose_the_primary_with_one_peer_lagging() -> LostPrimary {
    let rt = runtime();
    // Node 3 must not fall behind (node 1 would only remember that in its
    // bitmap, and node 1 dies): let it lag for as long as the test runs.
    let spec = ClusterSpec {
        extra_toml: "[replication]\nmax_peer_wait_ms = 60000\n".into(),
        ..spec(3, "A")
    };
    let (mut cluster, proxy) = primary_with_proxy(&rt, spec, 3);
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(81, size);
    let c1 = client(&rt, &cluster, 1);
    let common = write_flushed(&rt, &c1, &gen.ops(400), Model::zeroed(size));
    assert!(cluster.wait_identical(Some(common.blake3())).is_ok());

    proxy.pause();
    let node2_has = write_flushed(&rt, &c1, &gen.ops(300), common.clone());
    assert!(
        wait_for(
            || cluster.hash(2) == node2_has.blake3(),
            Duration::from_secs(30)
        ),
        "node 2 did not receive the second phase"
    );
    drop(c1);
    cluster.daemon(1).sigkill();
    proxy.cut();
    for id in [2, 3] {
        wait_link_down(&cluster, id, 1);
    }
    assert_ne!(
        cluster.hash(3),
        node2_has.blake3(),
        "node 3 was meant to miss the second phase"
    );
    LostPrimary {
        cluster,
        _proxy: proxy,
        common,
        node2_has,
        rt,
    }
}

impl LostPrimary {
    /// Promotes `id`, writes a little through it, and waits until node 2
    /// and 3 agree; returns the hash they agree on.
    fn promote_and_converge(&self, id: u32, start: &Model) -> blake3::Hash {
        let cluster = &self.cluster;
        cluster.promote(id);
        let size = cluster.dir.spec.size;
        let c = client(&self.rt, cluster, id);
        let model = self
            .rt
            .block_on(support::workload::run(
                &c,
                &Workload::new(91, size).ops(100),
                16,
                start.clone(),
            ))
            .unwrap();
        self.rt.block_on(c.flush()).unwrap();
        let peers_of = |id: u32| -> bool {
            let status = cluster.status(id);
            status["peers"].as_array().is_some_and(|ps| {
                ps.iter()
                    .filter(|p| p["id"] != 1)
                    .all(|p| p["state"] == "up-to-date" && p["stale_bytes"] == 0)
            })
        };
        assert!(
            wait_for(|| peers_of(id), support::cluster::CONVERGE),
            "the surviving secondary was not resynced: {}",
            cluster.status(id)
        );
        let agreed = wait_for(
            || cluster.hash(2) == cluster.hash(3),
            support::cluster::CONVERGE,
        );
        assert!(
            agreed,
            "nodes 2 and 3 differ after the failover to node {id}"
        );
        assert_eq!(
            cluster.hash(2),
            model.blake3(),
            "the replicas must hold what the new primary held, plus its writes"
        );
        cluster.hash(2)
    }
}

/// The new primary is the peer that got further: the other one must be
/// given what it missed, though no surviving bitmap recorded it.
#[test]
fn after_the_primary_dies_the_lagging_peer_catches_up_with_the_promoted_one() {
    let lost = lose_the_primary_with_one_peer_lagging();
    lost.promote_and_converge(2, &lost.node2_has);
}

/// The new primary is the peer that lagged: the other must give up the
/// writes it holds that the new primary never received.
#[test]
fn after_the_primary_dies_the_peer_that_got_further_gives_up_its_extra_writes() {
    let lost = lose_the_primary_with_one_peer_lagging();
    // The proxy forwarded nothing after the pause: node 3 holds phase 1.
    assert_eq!(lost.cluster.hash(3), lost.common.blake3());
    let start = lost.common.clone();
    lost.promote_and_converge(3, &start);
}

/// How node 2 comes to miss node 1's writes before node 1 dies.
#[derive(Clone, Copy)]
enum Missing {
    /// The link is cut: node 2 is disconnected.
    Cut,
    /// The link stalls: node 2 stays connected but falls behind.
    Stall,
}

/// What happens after the split brain is found.
#[derive(PartialEq, Eq)]
enum Resolution {
    /// Nothing: the link stays refused.
    Refuse,
    /// The operator runs `discard-my-data` on node 1.
    DiscardMyData,
    /// Node 2 is configured to discard a diverged secondary's changes.
    Policy,
}

/// Node 1 keeps writing while node 2 misses the writes; node 1 dies; node 2
/// is promoted and writes too. Both hold acknowledged writes the other
/// lacks: when they meet, the link is refused as a split brain and neither
/// replica is touched, so the operator can choose (DRBD does the same).
/// With `Resolution::DiscardMyData`, the operator then picks node 2's data:
/// node 1 runs `discard-my-data` and must end up byte-identical to node 2.
/// With `Resolution::Policy`, node 2 is configured with `after_split_brain =
/// "discard-secondary"` and does that by itself.
fn primary_and_promoted_peer_wrote_alone(missing: Missing, resolution: Resolution) {
    let rt = runtime();
    let policy = if resolution == Resolution::Policy {
        "after_split_brain = \"discard-secondary\"\n"
    } else {
        ""
    };
    let (mut cluster, proxy) = support::cluster::proxied_pair(
        &rt,
        "C",
        &format!("[replication]\ncongestion_limit = \"1MiB\"\nmax_peer_wait_ms = 300\n{policy}"),
    );
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(101, size);
    let c1 = client(&rt, &cluster, 1);
    let common = write_flushed(&rt, &c1, &gen.ops(300), Model::zeroed(size));
    assert!(cluster.wait_identical(Some(common.blake3())).is_ok());

    match missing {
        Missing::Cut => {
            proxy.cut();
            for (id, peer) in [(1, 2), (2, 1)] {
                wait_link_down(&cluster, id, peer);
            }
        }
        Missing::Stall => proxy.pause(),
    }
    let node1_alone = write_flushed(&rt, &c1, &gen.ops(400), common.clone());
    if let Missing::Stall = missing {
        assert_eq!(cluster.peer(1, 2)["state"], "behind");
        assert_eq!(cluster.peer(1, 2)["connected"], true);
    }
    drop(c1);
    cluster.daemon(1).sigkill();
    proxy.cut();
    wait_link_down(&cluster, 2, 1);

    cluster.promote(2);
    let c2 = client(&rt, &cluster, 2);
    let start = Model::from_image(std::fs::read(&cluster.dir.node(2).backing).unwrap());
    let node2_alone = write_flushed(&rt, &c2, &Workload::new(102, size).ops(200), start);

    proxy.resume();
    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    let log = cluster.dir.node(2).log.clone();
    assert!(
        wait_for(
            || !support::rawpeer::log_lines_with(&log, "split brain").is_empty(),
            Duration::from_secs(20)
        ),
        "node 2 did not report a split brain"
    );
    if resolution == Resolution::Policy {
        assert!(
            !support::rawpeer::log_lines_with(&log, "the secondary's changes are discarded")
                .is_empty(),
            "node 2 did not apply its after_split_brain policy"
        );
        assert!(
            cluster.wait_identical(Some(node2_alone.blake3())).is_ok(),
            "node 1 did not converge to the primary's data"
        );
        assert!(cluster.wait_peers_up_to_date(2));
        return;
    }
    // Give a wrong resync time to happen, then check that none did.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.hash(1),
        node1_alone.blake3(),
        "node 1's own writes were overwritten"
    );
    assert_eq!(cluster.hash(2), node2_alone.blake3());
    let peer = cluster.peer(2, 1);
    assert_ne!(peer["state"], "up-to-date");
    assert!(
        peer["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("split brain")),
        "status must say why the peer is not mirrored: {peer}"
    );
    assert_eq!(cluster.status(1)["role"], "secondary");
    if resolution == Resolution::Refuse {
        return;
    }

    // Refused on the survivor: it is primary and serves that data.
    let out = cluster.daemon(2).ctl(&["discard-my-data"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this node is primary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster.hash(2), node2_alone.blake3());

    let out = cluster.daemon(1).ctl(&["discard-my-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster.status(1)["disk"], "inconsistent");
    assert!(
        cluster.wait_identical(Some(node2_alone.blake3())).is_ok(),
        "node 1 did not converge to the survivor's data"
    );
    assert!(cluster.wait_peers_up_to_date(2));
    assert_eq!(cluster.status(1)["disk"], "up-to-date");
    // And it mirrors again: a new write reaches it.
    let after = write_flushed(&rt, &c2, &Workload::new(103, size).ops(50), node2_alone);
    assert!(cluster.wait_identical(Some(after.blake3())).is_ok());
}

#[test]
fn a_primary_that_wrote_alone_and_a_peer_promoted_meanwhile_are_a_split_brain() {
    primary_and_promoted_peer_wrote_alone(Missing::Cut, Resolution::Refuse);
}

/// DRBD's manual split-brain recovery: `discard-my-data` on the victim.
#[test]
fn discard_my_data_on_the_split_brain_victim_resyncs_it_from_the_survivor() {
    primary_and_promoted_peer_wrote_alone(Missing::Cut, Resolution::DiscardMyData);
}

/// DRBD's `after-sb-1pri discard-secondary`, configured on the primary.
#[test]
fn with_discard_secondary_the_primary_resyncs_a_diverged_secondary_by_itself() {
    primary_and_promoted_peer_wrote_alone(Missing::Cut, Resolution::Policy);
}

/// The same when node 2 stayed connected but fell behind: it missed
/// acknowledged writes just as surely.
#[test]
fn a_primary_and_its_promoted_peer_that_had_fallen_behind_are_a_split_brain() {
    primary_and_promoted_peer_wrote_alone(Missing::Stall, Resolution::Refuse);
}

/// Node 3 fell behind and its resync from node 1 was cut short when node 1
/// died: only node 1 knew which blocks node 3 still lacked, and they lie
/// in more extents than the new primary's activity log holds.
#[test]
fn a_peer_whose_resync_was_cut_short_by_the_primarys_death_is_fully_resynced() {
    const SIZE: u64 = 1 << 30;
    const EXTENT: u64 = 4 << 20;
    const MIB: usize = 1 << 20;
    let rt = runtime();
    let spec = ClusterSpec {
        size: SIZE,
        extra_toml: "[replication]\ncongestion_limit = \"1MiB\"\nmax_peer_wait_ms = 200\n".into(),
        ..spec(3, "A")
    };
    let (mut cluster, proxy) = primary_with_proxy(&rt, spec, 3);

    // Node 3 stalls and falls behind while 1 MiB lands in every extent,
    // highest first: the resync (lowest block first) will reach the
    // extents the new primary wrote longest ago last.
    proxy.pause();
    let c1 = client(&rt, &cluster, 1);
    let mut expected = vec![0u8; SIZE as usize];
    for extent in (0..SIZE / EXTENT).rev() {
        let offset = extent * EXTENT;
        let data = vec![(extent % 251) as u8 + 1; MIB];
        expected[offset as usize..offset as usize + MIB].copy_from_slice(&data);
        rt.block_on(c1.write(offset, data, false)).unwrap();
    }
    rt.block_on(c1.flush()).unwrap();
    assert_eq!(cluster.peer(1, 3)["state"], "behind");

    // Let the resync start, and stall it again part way.
    proxy.resume();
    assert!(
        wait_for(
            || cluster.status(3)["disk"] == "inconsistent",
            Duration::from_secs(30)
        ),
        "node 3's resync did not start"
    );
    proxy.pause();
    let stale = cluster.peer(1, 3)["stale_bytes"].as_u64().unwrap();
    assert!(
        stale > 0,
        "the resync finished before it could be cut short"
    );
    drop(c1);
    // Node 2 (not stalled, but behind too after the burst: the congestion
    // limit is 1 MiB) must have caught up, or it cannot be promoted.
    assert!(
        wait_for(
            || cluster.peer(1, 2)["state"] == "up-to-date"
                && cluster.status(2)["disk"] == "up-to-date",
            support::cluster::CONVERGE
        ),
        "node 2 did not catch up: {}",
        cluster.peer(1, 2)
    );
    cluster.daemon(1).sigkill();
    proxy.cut();
    wait_link_down(&cluster, 3, 1);

    cluster.promote(2);
    let expected = blake3::hash(&expected);
    assert_eq!(cluster.hash(2), expected);
    assert!(
        wait_for(
            || cluster.peer(2, 3)["state"] == "up-to-date"
                && cluster.peer(2, 3)["stale_bytes"] == 0,
            support::cluster::CONVERGE
        ),
        "node 3 was not resynced by node 2: {}",
        cluster.status(2)
    );
    assert!(
        wait_for(|| cluster.hash(3) == expected, support::cluster::CONVERGE),
        "node 3 still lacks blocks only the dead primary knew about"
    );
    assert_eq!(cluster.status(3)["disk"], "up-to-date");
}

/// A planned switchover under protocol A: `demote` right after a burst of
/// writes the peer has not received yet must hand them over before the
/// peer can be promoted, or the promoted peer serves older data and the
/// old primary's flushed writes are resynced away.
#[test]
fn demote_hands_over_every_write_before_the_peer_is_promoted() {
    let rt = runtime();
    let (cluster, proxy) = support::cluster::proxied_pair(&rt, "A", "");
    let size = cluster.dir.spec.size;
    let c1 = client(&rt, &cluster, 1);
    proxy.pause();
    let model = write_flushed(
        &rt,
        &c1,
        &Workload::new(111, size).ops(600),
        Model::zeroed(size),
    );
    drop(c1);
    assert!(
        cluster.peer(1, 2)["send_queue_bytes"].as_u64().unwrap() > 0
            || cluster.hash(2) != model.blake3(),
        "the peer already had everything: nothing to hand over"
    );
    // The peer gets going again while node 1 steps down.
    proxy.resume();
    let out = cluster.daemons[0].ctl(&["demote"]);
    assert!(
        out.status.success(),
        "demote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster.hash(2),
        model.blake3(),
        "demote returned before the peer held every write"
    );
    cluster.promote(2);
    assert!(cluster.wait_peers_up_to_date(2));
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(
        result.is_ok(),
        "writes were lost in the switchover: {result:?}"
    );
}

/// `demote` says which peers lack writes, so nobody promotes one of them
/// by mistake.
#[test]
fn demote_names_the_peers_that_lack_writes() {
    let rt = runtime();
    let (cluster, proxy) = support::cluster::proxied_pair(&rt, "C", "");
    proxy.cut();
    wait_link_down(&cluster, 1, 2);
    let c1 = client(&rt, &cluster, 1);
    rt.block_on(c1.write(0, vec![7u8; 4096], false)).unwrap();
    drop(c1);
    let out = cluster.daemons[0].ctl(&["demote"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let peer_name = cluster.dir.node(2).name.clone();
    assert!(
        stdout.contains("not up to date")
            && stdout.contains(&format!("{peer_name} (disconnected)")),
        "demote did not name the peer that lacks a write: {stdout}"
    );
}

/// DRBD's `after-sb-0pri` policies, applied when a primary meets the
/// diverged node. Node 1 is primary and keeps writing while cut off from
/// node 2; node 1 dies; node 2 is promoted (and writes, if `node2_writes`);
/// node 1 comes back. The policy picks node 1's data either way (node 2
/// wrote nothing, or it is the younger primary), so:
/// * while node 2 is primary the link is refused, saying to promote the
///   peer, and neither replica is touched (the primary's data is the
///   guest's disk);
/// * once node 2 is demoted, both secondaries report the split brain and
///   whom to promote;
/// * promoting node 1 resolves it by itself: node 2 ends byte-identical
///   to node 1, which keeps every write it made alone.
fn split_brain_policy_keeps_the_old_primarys_writes(policy: &str, node2_writes: bool) {
    let rt = runtime();
    let (mut cluster, proxy) = support::cluster::proxied_pair(
        &rt,
        "C",
        &format!(
            "[replication]\ncongestion_limit = \"1MiB\"\nmax_peer_wait_ms = 300\nafter_split_brain = \"{policy}\"\n"
        ),
    );
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(201, size);
    let c1 = client(&rt, &cluster, 1);
    let common = write_flushed(&rt, &c1, &gen.ops(300), Model::zeroed(size));
    assert!(cluster.wait_identical(Some(common.blake3())).is_ok());

    proxy.cut();
    for (id, peer) in [(1, 2), (2, 1)] {
        wait_link_down(&cluster, id, peer);
    }
    let node1_alone = write_flushed(&rt, &c1, &gen.ops(400), common.clone());
    drop(c1);
    cluster.daemon(1).sigkill();

    cluster.promote(2);
    let node2_data = if node2_writes {
        let c2 = client(&rt, &cluster, 2);
        write_flushed(&rt, &c2, &Workload::new(202, size).ops(200), common.clone())
    } else {
        common.clone()
    };

    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    let log2 = cluster.dir.node(2).log.clone();
    assert!(
        wait_for(
            || !support::rawpeer::log_lines_with(&log2, "promote the peer").is_empty(),
            Duration::from_secs(20)
        ),
        "node 2 (primary) did not refuse the link saying to promote the peer: {:?}",
        support::rawpeer::log_lines_with(&log2, "split brain")
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cluster.hash(1),
        node1_alone.blake3(),
        "node 1's writes were touched"
    );
    assert_eq!(
        cluster.hash(2),
        node2_data.blake3(),
        "the primary's data was touched"
    );

    let out = cluster.daemon(2).ctl(&["demote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (id, advice) in [(1, "promote this node"), (2, "promote the peer")] {
        assert!(
            wait_for(
                || cluster.peer(id, 3 - id)["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("split brain") && e.contains(advice)),
                Duration::from_secs(20)
            ),
            "node {id} (secondary) does not report the split brain with '{advice}': {}",
            cluster.peer(id, 3 - id)
        );
    }
    assert_eq!(cluster.hash(2), node2_data.blake3());

    cluster.promote(1);
    assert!(
        cluster.wait_identical(Some(node1_alone.blake3())).is_ok(),
        "node 2 did not converge to node 1's data"
    );
    assert!(cluster.wait_peers_up_to_date(1));
    let log1 = cluster.dir.node(1).log.clone();
    assert!(
        !support::rawpeer::log_lines_with(&log1, "split brain resolved").is_empty(),
        "node 1 did not log how it resolved the split brain"
    );
    // And it mirrors again.
    let c1 = client(&rt, &cluster, 1);
    let after = write_flushed(&rt, &c1, &Workload::new(203, size).ops(50), node1_alone);
    assert!(cluster.wait_identical(Some(after.blake3())).is_ok());
}

/// `discard-zero-changes`: node 2 was promoted but wrote nothing.
#[test]
fn with_discard_zero_changes_the_node_that_wrote_nothing_is_resynced() {
    split_brain_policy_keeps_the_old_primarys_writes("discard-zero-changes", false);
}

/// `discard-younger-primary`: node 2 wrote, but became primary after node 1.
#[test]
fn with_discard_younger_primary_the_node_promoted_after_the_split_is_resynced() {
    split_brain_policy_keeps_the_old_primarys_writes("discard-younger-primary", true);
}

/// `discard-zero-changes` never discards writes: when both nodes wrote, the
/// link stays refused and both replicas are untouched.
#[test]
fn with_discard_zero_changes_two_nodes_that_both_wrote_stay_refused() {
    let rt = runtime();
    let (mut cluster, proxy) = support::cluster::proxied_pair(
        &rt,
        "C",
        "[replication]\ncongestion_limit = \"1MiB\"\nmax_peer_wait_ms = 300\nafter_split_brain = \"discard-zero-changes\"\n",
    );
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(301, size);
    let c1 = client(&rt, &cluster, 1);
    let common = write_flushed(&rt, &c1, &gen.ops(200), Model::zeroed(size));
    assert!(cluster.wait_identical(Some(common.blake3())).is_ok());
    proxy.cut();
    wait_link_down(&cluster, 1, 2);
    let node1_alone = write_flushed(&rt, &c1, &gen.ops(200), common.clone());
    drop(c1);
    cluster.daemon(1).sigkill();
    cluster.promote(2);
    let c2 = client(&rt, &cluster, 2);
    let node2_alone = write_flushed(&rt, &c2, &Workload::new(302, size).ops(200), common);
    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    assert!(
        wait_for(
            || cluster.peer(2, 1)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("both nodes wrote since the split")),
            Duration::from_secs(20)
        ),
        "node 2 does not say that both wrote: {}",
        cluster.peer(2, 1)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.hash(1), node1_alone.blake3());
    assert_eq!(cluster.hash(2), node2_alone.blake3());
}
