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

use support::cluster::{client, start_with_proxy};
use support::{runtime, wait_for, ClusterSpec, Model, Workload};

fn spec(nodes: u32, protocol: &'static str) -> ClusterSpec {
    ClusterSpec {
        nodes,
        protocol,
        ..ClusterSpec::default()
    }
}

/// Protocol A lets a primary complete writes its peer never received. When
/// that primary crashes and the peer is promoted, those writes are gone
/// from the cluster; the old primary, back as a secondary, must be resynced
/// over them (it says which blocks through its bitmap) — not keep them.
#[test]
fn a_crashed_primary_gives_up_its_unreplicated_writes_to_the_promoted_peer() {
    let rt = runtime();
    let (mut cluster, proxy) = start_with_proxy(&rt, spec(2, "A"), 2);
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(71, size);

    let phase1 = gen.ops(400);
    let c1 = client(&rt, &cluster, 1);
    let model = rt
        .block_on(support::workload::run(
            &c1,
            &phase1,
            16,
            Model::zeroed(size),
        ))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());

    // Node 2 stops receiving; node 1 completes (protocol A) and flushes
    // writes that never reach it, then dies with them.
    proxy.pause();
    let unreplicated = gen.ops(400);
    rt.block_on(support::workload::run(
        &c1,
        &unreplicated,
        16,
        model.clone(),
    ))
    .unwrap();
    rt.block_on(c1.flush()).unwrap();
    drop(c1);
    cluster.daemon(1).sigkill();
    proxy.cut();
    assert!(
        wait_for(
            || cluster.peer(2, 1)["connected"] == false,
            Duration::from_secs(20)
        ),
        "node 2 did not notice that node 1 is gone"
    );

    cluster.promote(2);
    let phase3 = gen.ops(200);
    let c2 = client(&rt, &cluster, 2);
    let model = rt
        .block_on(support::workload::run(&c2, &phase3, 16, model))
        .unwrap();
    rt.block_on(c2.flush()).unwrap();

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
