//! Protected links: an attacker on the wire between two real daemons flips
//! a byte of, injects, replays and reorders the sealed records of an
//! established link. Every such record is rejected (the connection drops),
//! the link comes back on its own, and the replicas end up identical.
//!
//! Node 1 (primary) reaches node 2 through a proxy that knows the framing
//! but not the keys (`support::proxy::Tamper`).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::cluster::{client, primary_with_proxy};
use support::proxy::Tamper;
use support::{runtime, wait_for, ClusterSpec, Model, Workload};

/// Lines of node 2's log where a sealed record was refused.
fn rejections(log: &Path) -> usize {
    support::rawpeer::log_lines_with(log, "protected record").len()
}

#[test]
fn tampered_records_are_rejected_and_the_link_recovers_with_identical_replicas() {
    tamper_and_recover(2, 4096);
}

/// With two peers, writes of 16 KiB and more travel as records sealed once
/// for both (the same bytes on each link): attacks on such records on node
/// 2's link fail the same way (the first, a flipped byte, lands in one
/// before any resync can send large records of the link's own).
#[test]
fn tampered_shared_records_are_rejected_and_the_link_recovers_with_identical_replicas() {
    let cluster = tamper_and_recover(3, 64 * 1024);
    let log2 = &cluster.dir.node(2).log;
    let shared = support::rawpeer::log_lines_with(log2, "(a shared record)");
    assert!(!shared.is_empty(), "no shared record was refused");
    let status = cluster.status(1);
    let n2 = &status["peers"][0];
    assert_eq!(n2["name"], "n2");
    assert!(n2["shared_record_bytes"].as_u64().unwrap() > 0, "{n2}");
}

/// Runs every attack on the first record of at least `min_record` bytes
/// from node 1 to node 2 (through the proxy) of a `nodes`-node cluster,
/// writing until it is carried out; checks that node 2 refused it, that
/// the link came back and that the replicas end up identical.
fn tamper_and_recover(nodes: u32, min_record: usize) -> support::Cluster {
    let rt = runtime();
    let spec = ClusterSpec {
        nodes,
        protocol: "C",
        ..ClusterSpec::default()
    };
    let (cluster, proxy) = primary_with_proxy(&rt, spec, 2);
    let size = cluster.dir.spec.size;
    let log2 = cluster.dir.node(2).log.clone();
    let mut gen = Workload::new(2026, size);
    let c1 = client(&rt, &cluster, 1);
    let mut model = Model::zeroed(size);

    let attacks = [
        Tamper::Flip,
        Tamper::InjectRecord,
        Tamper::InjectPlain,
        Tamper::Replay,
        Tamper::Reorder,
    ];
    for (done, what) in attacks.into_iter().enumerate() {
        let before = rejections(&log2);
        // Records of at least a block: writes on the data connection.
        proxy.tamper(what, min_record);
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.tampered() <= done as u64 {
            assert!(Instant::now() < deadline, "{what:?}: never carried out");
            model = rt
                .block_on(support::workload::run(&c1, &gen.ops(64), 16, model))
                .expect("writes succeed whatever happens to the link");
        }
        rt.block_on(c1.flush()).expect("flush");
        assert!(
            wait_for(|| rejections(&log2) > before, Duration::from_secs(20)),
            "{what:?}: node 2 accepted a tampered stream"
        );
        assert!(
            cluster.wait_peers_up_to_date(1),
            "{what:?}: the link did not come back: {}",
            cluster.status(1)
        );
    }

    // The link carries writes again, and nothing tampered was applied.
    model = rt
        .block_on(support::workload::run(&c1, &gen.ops(200), 16, model))
        .expect("writes");
    rt.block_on(c1.flush()).expect("flush");
    assert!(cluster.wait_peers_up_to_date(1));
    let result = cluster.wait_identical(Some(model.blake3()));
    assert!(result.is_ok(), "replicas differ: {result:?}");
    assert_eq!(proxy.tampered(), attacks.len() as u64);
    drop(c1);
    cluster
}

const VMSYNCCTL: &str = env!("CARGO_BIN_EXE_vmsyncctl");

fn gen_secret(file: &Path, force: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(VMSYNCCTL);
    cmd.arg("gen-secret").arg(file);
    if force {
        cmd.arg("--force");
    }
    cmd.output().expect("run vmsyncctl")
}

#[test]
fn gen_secret_writes_32_random_bytes_mode_0600_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.secret");
    let out = gen_secret(&file, false);
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read_to_string(&file).unwrap();
    let hex = first.strip_suffix('\n').expect("one line");
    assert_eq!(hex.len(), 64, "32 bytes as hex: {first:?}");
    assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{first:?}");
    assert_eq!(protocol::check_secret(hex.as_bytes()), Ok(()));

    // An existing secret is kept unless --force.
    let out = gen_secret(&file, false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);

    // --force replaces it, and a loose mode is not inherited.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = gen_secret(&file, true);
    assert!(out.status.success(), "{out:?}");
    let second = std::fs::read_to_string(&file).unwrap();
    assert_ne!(second, first, "a new secret");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
