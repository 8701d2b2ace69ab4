//! `vmsyncctl resize`: growing a replicated device after every node's
//! backing store grew, with the daemons stopped or running. Real daemons
//! on loopback (their devices on block sockets; growing a ublk device
//! under a mounted file system is the VM scenario `online_resize`).

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

/// Two nodes of `size` bytes, protocol C, node 1 promoted.
fn primary_and_secondary(size: u64) -> Cluster {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        size,
        protocol: "C",
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    cluster
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
    let mut cluster = primary_and_secondary(old);
    let c1 = client(&rt, &cluster, 1);
    let before = write_flushed(
        &rt,
        &c1,
        &Workload::new(41, old).ops(300),
        Model::zeroed(old),
    );
    drop(c1);
    assert!(cluster.wait_identical(Some(before.blake3())).is_ok());

    // The running daemon is asked; the file still says the old size.
    let said = ok(&cluster.daemon(1).ctl(&["resize"]));
    assert!(said.contains("nothing to do"), "{said}");

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

/// Writes node `id`'s configuration with size `new` (`old`: the size the
/// cluster was started with).
fn configure_size(cluster: &Cluster, id: u32, old: u64, new: u64) {
    let toml = cluster
        .dir
        .config_toml(id)
        .replace(&format!("size = {old}\n"), &format!("size = {new}\n"));
    cluster.dir.write_config(id, &toml);
}

/// Grows node `id`'s backing file to `new` bytes, the new area full of
/// garbage (as a reused disk would be).
fn grow_backing_with_garbage(cluster: &Cluster, id: u32, old: u64, new: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&cluster.dir.node(id).backing)
        .unwrap();
    file.write_all_at(&vec![0x5a; (new - old) as usize], old)
        .unwrap();
}

/// Running daemons grow online: each restarts itself in place (same pid)
/// at the new size. What cannot be done is refused with the reason and
/// changes nothing: a backing store not grown yet, a shrink, a file that
/// changes more than the size, a device on a block socket (whose clients a
/// restart would cut off). The grown secondary stays linked to the smaller
/// primary and mirrored; the primary grows after demoting, the new area is
/// resynced, and the replicas are identical, old data intact.
#[test]
fn running_daemons_grow_in_place_and_refuse_what_they_cannot() {
    let rt = runtime();
    let old = 32u64 << 20;
    let new = 3 * old;
    let mut cluster = primary_and_secondary(old);
    let c1 = client(&rt, &cluster, 1);
    let before = write_flushed(
        &rt,
        &c1,
        &Workload::new(43, old).ops(200),
        Model::zeroed(old),
    );
    assert!(cluster.wait_identical(Some(before.blake3())).is_ok());
    let pids = [cluster.daemon(1).pid(), cluster.daemon(2).pid()];
    let size_of = |cluster: &Cluster, id| cluster.status(id)["size"].as_u64().unwrap();

    // The secondary: its backing store has not grown yet.
    configure_size(&cluster, 2, old, new);
    let why = refused(&cluster.daemon(2).ctl(&["resize"]));
    assert!(why.contains("grow it first"), "{why}");
    // A shrink.
    configure_size(&cluster, 2, old, old / 2);
    let why = refused(&cluster.daemon(2).ctl(&["resize"]));
    assert!(why.contains("shrinking is not supported"), "{why}");
    // More than the size changed.
    grow_backing_with_garbage(&cluster, 2, old, new);
    configure_size(&cluster, 2, old, new);
    let plain = std::fs::read_to_string(&cluster.dir.node(2).config).unwrap();
    let edited = plain.replacen("lan_group = \"", "lan_group = \"elsewhere-", 1);
    assert_ne!(edited, plain);
    cluster.dir.write_config(2, &edited);
    let why = refused(&cluster.daemon(2).ctl(&["resize"]));
    assert!(why.contains("more than [resource] size ([node])"), "{why}");
    assert_eq!(
        size_of(&cluster, 2),
        old,
        "a refused resize changed the size"
    );
    assert_eq!(cluster.daemon(2).pid(), pids[1]);

    // Grown in place. An events follower is told why the stream ends.
    cluster.dir.write_config(2, &plain);
    let follower = std::process::Command::new(env!("CARGO_BIN_EXE_vmsyncctl"))
        .args(["--config", cluster.dir.node(2).config.to_str().unwrap()])
        .args(["events", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300)); // subscribed
    let said = ok(&cluster.daemon(2).ctl(&["resize"]));
    assert!(
        said.contains(&format!("growing from {old} to {new} bytes")),
        "{said}"
    );
    assert!(said.contains(&format!("serves {new} bytes")), "{said}");
    assert!(cluster.daemon(2).is_running());
    assert_eq!(cluster.daemon(2).pid(), pids[1], "not restarted in place");
    assert_eq!(size_of(&cluster, 2), new);
    assert_eq!(
        cluster.status(2)["last_shutdown"],
        "crash",
        "{}",
        cluster.status(2)
    );
    let events = follower.wait_with_output().unwrap();
    let last = String::from_utf8_lossy(&events.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["kind"], "destroy", "{last}");
    assert_eq!(last["props"]["reason"], "restart to grow", "{last}");

    // The primary serves its device on a block socket: refused.
    grow_backing_with_garbage(&cluster, 1, old, new);
    configure_size(&cluster, 1, old, new);
    let why = refused(&cluster.daemon(1).ctl(&["resize"]));
    assert!(why.contains("block socket"), "{why}");
    assert_eq!(size_of(&cluster, 1), old);
    // The grown secondary links to the smaller primary and stays mirrored
    // meanwhile: the primary's writes (protocol C) reach it, and its first
    // `old` bytes are the primary's; its tail is its own until the primary
    // grows.
    cluster.wait_linked(1);
    assert!(cluster.wait_peers_up_to_date(1), "{}", cluster.peer(1, 2));
    let during = write_flushed(&rt, &c1, &Workload::new(44, old).ops(100), before);
    assert_eq!(cluster.peer(1, 2)["state"], "up-to-date");
    assert_eq!(cluster.peer(1, 2)["stale_bytes"], 0);
    assert_eq!(
        blake3_of_file(&cluster.dir.node(2).backing, old),
        during.blake3(),
        "the grown secondary does not hold the primary's writes"
    );
    drop(c1);

    // Demoted (no device), it grows in place too.
    ok(&cluster.daemon(1).ctl(&["demote"]));
    let said = ok(&cluster.daemon(1).ctl(&["resize"]));
    assert!(said.contains(&format!("serves {new} bytes")), "{said}");
    assert_eq!(cluster.daemon(1).pid(), pids[0], "not restarted in place");
    cluster.wait_linked(1);
    cluster.promote(1);
    assert_eq!(size_of(&cluster, 1), new);
    assert!(cluster.wait_peers_up_to_date(1));

    // Old data intact; the new area is node 1's (its garbage too: the
    // primary's version wins), and node 2 holds exactly that.
    let c1 = client(&rt, &cluster, 1);
    let mut head = Vec::new();
    for offset in (0..old).step_by(1 << 20) {
        head.extend(rt.block_on(c1.read(offset, 1 << 20)).unwrap());
    }
    assert!(head == during.image(), "old data changed");
    let mut image = std::fs::read(&cluster.dir.node(1).backing).unwrap();
    image.truncate(new as usize);
    let after = write_flushed(
        &rt,
        &c1,
        &Workload::new(45, new).ops(200),
        Model::from_image(image),
    );
    assert!(cluster.wait_peers_up_to_date(1));
    for id in 1..=2 {
        assert_eq!(
            blake3_of_file(&cluster.dir.node(id).backing, new),
            after.blake3(),
            "node {id} does not hold the grown device's data"
        );
    }
}

/// The primary grown first: a secondary smaller than the primary is not
/// linked (the reason is in its status), the primary's writes mark it
/// stale meanwhile; grown online, it links, is resynced (the writes and the
/// new area) and holds the primary's data over the new size.
#[test]
fn a_secondary_smaller_than_the_primary_is_refused_until_it_grows() {
    let rt = runtime();
    let old = 32u64 << 20;
    let new = 2 * old;
    let mut cluster = primary_and_secondary(old);
    assert!(cluster.wait_peers_up_to_date(1));

    // Node 1 grows first (demoted: its device is on a block socket).
    ok(&cluster.daemon(1).ctl(&["demote"]));
    grow_backing_with_garbage(&cluster, 1, old, new);
    configure_size(&cluster, 1, old, new);
    ok(&cluster.daemon(1).ctl(&["resize"]));
    cluster.promote(1);
    let why = |c: &Cluster| {
        c.peer(1, 2)["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        support::wait_for(
            || why(&cluster).contains("smaller than the primary's"),
            Duration::from_secs(20)
        ),
        "{}",
        cluster.peer(1, 2)
    );
    assert!(
        why(&cluster).contains("vmsyncctl resize"),
        "{}",
        why(&cluster)
    );
    assert_eq!(cluster.peer(1, 2)["connected"], false);
    let c1 = client(&rt, &cluster, 1);
    let mut image = std::fs::read(&cluster.dir.node(1).backing).unwrap();
    image.truncate(new as usize);
    let written = write_flushed(
        &rt,
        &c1,
        &Workload::new(46, new).ops(100),
        Model::from_image(image),
    );
    assert!(cluster.peer(1, 2)["stale_bytes"].as_u64().unwrap() > 0);

    // Grown, the secondary links and gets everything it lacks.
    grow_backing_with_garbage(&cluster, 2, old, new);
    configure_size(&cluster, 2, old, new);
    ok(&cluster.daemon(2).ctl(&["resize"]));
    assert!(cluster.wait_peers_up_to_date(1), "{}", cluster.peer(1, 2));
    assert_eq!(
        blake3_of_file(&cluster.dir.node(2).backing, new),
        written.blake3(),
        "the secondary does not hold the primary's data"
    );
}
