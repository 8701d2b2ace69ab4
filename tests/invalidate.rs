//! `vmsyncctl invalidate`: a secondary whose copy is not trusted (here:
//! corrupted behind the daemon's back) is fully resynced from the primary;
//! refused on a primary and on a standalone disk, changing nothing.

mod support;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use support::cluster::client;
use support::{runtime, wait_for, Cluster, ClusterSpec, Model, Workload};

#[test]
fn invalidate_resyncs_a_corrupted_secondary_from_the_primary() {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        protocol: "C",
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let c1 = client(&rt, &cluster, 1);
    let model = rt
        .block_on(support::workload::run(
            &c1,
            &Workload::new(7, size).ops(300),
            16,
            Model::zeroed(size),
        ))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    let good = cluster.wait_identical(Some(model.blake3())).unwrap();

    // Bit rot on node 2 that no bitmap knows of.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cluster.dir.node(2).backing)
            .unwrap();
        for offset in [0u64, 5 << 20, size - 4096] {
            f.seek(SeekFrom::Start(offset)).unwrap();
            f.write_all(&[0xA5; 4096]).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert_ne!(cluster.hash(2), good);

    // Refused on the primary, which changes nothing there.
    let out = cluster.daemon(1).ctl(&["invalidate"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this node is primary") && err.contains("demote it first"),
        "{err}"
    );
    assert_eq!(cluster.status(1)["disk"], "up-to-date");
    assert_eq!(cluster.hash(1), good);

    let out = cluster.daemon(2).ctl(&["invalidate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("full resync from n1"), "{said}");
    assert!(
        cluster.wait_identical(Some(good)).is_ok(),
        "node 2 was not repaired by the full resync"
    );
    assert!(wait_for(
        || cluster.status(2)["disk"] == "up-to-date",
        Duration::from_secs(30)
    ));
    assert!(
        cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap() >= size,
        "not a full resync: {}",
        cluster.peer(1, 2)
    );
}

#[test]
fn invalidate_survives_a_restart_before_the_resync() {
    // Marked inconsistent and generation-less on disk first: a node killed
    // right after invalidate does not come back claiming good data.
    let mut cluster = Cluster::start(ClusterSpec::default());
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    cluster.daemon(1).sigkill();
    assert!(wait_for(
        || cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20)
    ));
    let out = cluster.daemon(2).ctl(&["invalidate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("when a primary links"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    cluster.daemon(2).sigkill();
    *cluster.daemon(2) = support::Daemon::start(cluster.dir.node(2));
    cluster.daemon(2).wait_ready(support::cluster::START);
    assert_eq!(cluster.status(2)["disk"], "inconsistent");
    // Refused promotion without force: its data is not trusted.
    let out = cluster.daemon(2).ctl(&["promote"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("inconsistent"));
}

#[test]
fn invalidate_on_a_standalone_disk_is_refused() {
    let dir = support::TestDir::with_spec(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    let out = support::ctl(&dir.node(1).config, &["create-md"]);
    assert!(out.status.success());
    let mut node = support::Daemon::start(dir.node(1));
    node.wait_ready(support::cluster::START);
    for verb in ["invalidate", "discard-my-data"] {
        let out = node.ctl(&[verb]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no other copy to resync from"),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(node.status_json()["disk"], "up-to-date");
}

/// A full resync while the guest writes throughout (the resync then goes
/// in small chunks with pauses, see `replication::pacing`): the guest's
/// writes keep being mirrored (the peer never falls behind), the resync
/// still finishes under them, and both copies end equal to what the guest
/// wrote.
#[test]
fn a_resync_under_steady_guest_writes_finishes_and_the_copies_match() {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        protocol: "C",
        size: 128 << 20,
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let c1 = client(&rt, &cluster, 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c1, stop) = (c1.clone(), std::sync::Arc::clone(&stop));
        rt.spawn(async move {
            let mut workload = Workload::new(11, size);
            let mut model = Model::zeroed(size);
            let mut batches = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                model = support::workload::run(&c1, &workload.ops(50), 4, model)
                    .await
                    .expect("guest writes during the resync");
                batches += 1;
            }
            (model, batches)
        })
    };
    // The guest is writing before the resync starts.
    std::thread::sleep(Duration::from_millis(300));
    let from = cluster.peer(1, 2)["resynced_bytes"].as_u64().unwrap();
    let out = cluster.daemon(2).ctl(&["invalidate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut states = std::collections::BTreeSet::new();
    let resynced = wait_for(
        || {
            let peer = cluster.peer(1, 2);
            states.insert(peer["state"].as_str().unwrap_or("?").to_string());
            peer["resynced_bytes"].as_u64().unwrap_or(0) >= from + size
                && peer["state"] == "up-to-date"
        },
        Duration::from_secs(120),
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (model, batches) = rt.block_on(writer).unwrap();
    assert!(
        resynced,
        "the resync did not finish under guest writes: {}",
        cluster.peer(1, 2)
    );
    assert!(batches >= 2, "the guest wrote only {batches} batches");
    assert!(
        states.contains("resyncing") && !states.contains("behind"),
        "states seen: {states:?}"
    );
    rt.block_on(c1.flush()).unwrap();
    assert!(
        cluster.wait_identical(Some(model.blake3())).is_ok(),
        "the copies differ from what the guest wrote"
    );
}
