//! `vmsyncctl resize`: growing a replicated device after every node's
//! backing store grew, with the daemons stopped. Real daemons on loopback.

mod support;

use std::time::Duration;

use support::cluster::{client, Cluster, START};
use support::hash::blake3_of_file;
use support::workload::write_flushed;
use support::{runtime, ClusterSpec, Daemon, Model, Workload};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "vmsyncctl failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "vmsyncctl succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Two nodes hold identical data; both are stopped, their backing files
/// grown (node 2's new area full of garbage, as a reused disk would be),
/// their configs given the new size, and `resize` run on each. Restarted
/// and promoted, node 1 serves the larger device with the old data intact,
/// node 2's new area is resynced from node 1 (nothing else: the old area
/// is not resent), and writes beyond the old end replicate.
#[test]
fn resize_grows_every_replica_and_the_new_area_converges() {
    let rt = runtime();
    let old = 64u64 << 20;
    let new = 2 * old;
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        size: old,
        protocol: "C",
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    let c1 = client(&rt, &cluster, 1);
    let before = write_flushed(
        &rt,
        &c1,
        &Workload::new(41, old).ops(300),
        Model::zeroed(old),
    );
    drop(c1);
    assert!(cluster.wait_identical(Some(before.blake3())).is_ok());

    // Online growth is not possible on these kernels: refused, clearly.
    let why = refused(&cluster.daemon(1).ctl(&["resize"]));
    assert!(why.contains("vmsyncd is running"), "{why}");

    ok(&cluster.daemon(1).ctl(&["demote"]));
    for id in 1..=2 {
        assert!(cluster
            .daemon(id)
            .sigterm_and_wait(Duration::from_secs(20))
            .success());
    }

    for id in 1..=2 {
        let node = cluster.dir.node(id).clone();
        let toml = cluster
            .dir
            .config_toml(id)
            .replace(&format!("size = {old}\n"), &format!("size = {new}\n"));
        cluster.dir.write_config(id, &toml);
        // The backing has not grown yet: refused, nothing changed.
        let meta_before = std::fs::read(&node.metadata).unwrap();
        let why = refused(&support::daemon::ctl(&node.config, &["resize"]));
        assert_eq!(std::fs::read(&node.metadata).unwrap(), meta_before);
        assert!(
            why.contains("smaller") || why.contains("too small") || why.contains(&new.to_string()),
            "{why}"
        );
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&node.backing)
            .unwrap();
        if id == 2 {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&vec![0xab; (new - old) as usize], old)
                .unwrap();
        } else {
            file.set_len(new).unwrap();
        }
        let said = ok(&support::daemon::ctl(&node.config, &["resize"]));
        assert!(
            said.contains(&format!("grown from {old} to {new} bytes")),
            "{said}"
        );
        // Once is enough.
        let again = ok(&support::daemon::ctl(&node.config, &["resize"]));
        assert!(again.contains("nothing to do"), "{again}");
    }

    for id in 1..=2 {
        *cluster.daemon(id) = Daemon::start(cluster.dir.node(id));
        cluster.daemon(id).wait_ready(START);
    }
    cluster.wait_linked(1);
    cluster.promote(1);
    assert_eq!(cluster.status(1)["size"], new, "{}", cluster.status(1));
    assert!(cluster.wait_peers_up_to_date(1));
    let resynced = cluster.status(1)["peers"][0]["resynced_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        resynced <= new - old,
        "more than the new area was resent: {resynced} bytes"
    );

    let mut image = std::fs::read(&cluster.dir.node(1).backing).unwrap();
    image.truncate(new as usize);
    let start = Model::from_image(image);
    assert_eq!(
        &start.image()[..old as usize],
        before.image(),
        "old data changed"
    );
    assert!(start.image()[old as usize..].iter().all(|&b| b == 0));
    let c1 = client(&rt, &cluster, 1);
    let after = write_flushed(&rt, &c1, &Workload::new(42, new).ops(300), start);
    let tail = rt.block_on(c1.read(new - 4096, 4096)).unwrap();
    assert_eq!(tail, after.image()[(new - 4096) as usize..]);
    assert!(cluster.wait_peers_up_to_date(1));
    for id in 1..=2 {
        assert_eq!(
            blake3_of_file(&cluster.dir.node(id).backing, new),
            after.blake3(),
            "node {id} does not hold the grown device's data"
        );
    }
}
