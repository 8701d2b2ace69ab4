//! `vmsyncctl disconnect PEER` / `connect PEER`: the operator takes one
//! peer's link down and keeps it down (either side may do it), the primary
//! keeps serving and tracks what the peer misses, and `connect` brings the
//! peer back by resyncing exactly that.

mod support;

use std::time::Duration;

use support::cluster::client;
use support::{runtime, wait_for, Cluster, ClusterSpec, Model, Workload};

const LINK: Duration = Duration::from_secs(20);

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Node 1 is primary; the link is taken down from node `from`; node 1
/// writes; the link stays down; `connect` on node `from` resyncs node 2.
fn take_the_link_down_from(from: u32) {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        protocol: "C",
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let c1 = client(&rt, &cluster, 1);
    let mut gen = Workload::new(11, size);
    let before = rt
        .block_on(support::workload::run(
            &c1,
            &gen.ops(200),
            16,
            Model::zeroed(size),
        ))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    let before_hash = cluster.wait_identical(Some(before.blake3())).unwrap();

    let other = 3 - from;
    let other_name = format!("n{other}");
    let said = ok(cluster.daemon(from).ctl(&["disconnect", &other_name]));
    assert!(said.contains("taken down"), "{said}");
    assert!(wait_for(
        || cluster.peer(1, 2)["connected"] == false && cluster.peer(2, 1)["connected"] == false,
        LINK
    ));
    assert_eq!(cluster.peer(from, other)["disconnected_by_operator"], true);
    assert_eq!(cluster.peer(other, from)["disconnected_by_operator"], false);
    let said = ok(cluster.daemon(from).ctl(&["disconnect", &other_name]));
    assert!(said.contains("already down"), "{said}");

    // The primary keeps serving; node 2 gets none of it.
    let after = rt
        .block_on(support::workload::run(&c1, &gen.ops(100), 16, before))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert_eq!(cluster.hash(1), after.blake3());
    assert_eq!(cluster.hash(2), before_hash);
    assert!(cluster.peer(1, 2)["stale_bytes"].as_u64().unwrap() > 0);
    // And it stays down: the other side's retries are refused.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cluster.peer(1, 2)["connected"], false);
    assert_eq!(cluster.peer(2, 1)["connected"], false);

    let stale = cluster.peer(1, 2)["stale_bytes"].as_u64().unwrap();
    let resynced_before = cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap();
    let said = ok(cluster.daemon(from).ctl(&["connect", &other_name]));
    assert!(said.contains("allowed up"), "{said}");
    assert!(
        cluster.wait_identical(Some(after.blake3())).is_ok(),
        "node 2 did not catch up after connect"
    );
    assert!(cluster.wait_peers_up_to_date(1));
    // Only what it missed was resynced.
    let resynced = cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap() - resynced_before;
    assert!(
        resynced <= stale + (1 << 20),
        "resynced {resynced} bytes for {stale} stale"
    );
}

#[test]
fn the_primary_disconnects_a_peer_and_connects_it_again() {
    take_the_link_down_from(1);
}

#[test]
fn a_secondary_disconnects_from_its_primary_and_connects_again() {
    take_the_link_down_from(2);
}

#[test]
fn connect_and_disconnect_of_unknown_peers_are_refused_and_change_nothing() {
    let cluster = Cluster::start(ClusterSpec::default());
    let out = cluster.daemons[0].ctl(&["disconnect", "n9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no peer 'n9'") && err.contains("n2 (id 2)"),
        "{err}"
    );
    assert_eq!(cluster.peer(1, 2)["connected"], true);
    assert_eq!(cluster.peer(1, 2)["disconnected_by_operator"], false);
    // By id works too; connect of a link that is up says so.
    let said = ok(cluster.daemons[0].ctl(&["connect", "2"]));
    assert!(said.contains("was not taken down"), "{said}");
}
