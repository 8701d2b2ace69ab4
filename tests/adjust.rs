//! `vmsyncctl adjust`: a changed `[replication]` applies to the running
//! daemon (here: the resync rate, observed on a live resync); an invalid
//! file, or a change that needs a restart, is refused and applies nothing.

mod support;

use std::time::Duration;

use support::cluster::client;
use support::{runtime, wait_for, Cluster, ClusterSpec, Model};

const MIB: u64 = 1 << 20;

fn with_resync_rate(toml: &str, rate: &str) -> String {
    toml.replace("resync_rate = 0", &format!("resync_rate = {rate}"))
}

#[test]
fn adjust_changes_the_resync_rate_of_a_running_resync() {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        protocol: "C",
        extra_toml: "[replication]\nresync_rate = 0\n".into(),
        ..ClusterSpec::default()
    });
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let original = cluster.dir.config_toml(1);

    // Node 2 misses 16 MiB of writes while its link is down.
    assert!(cluster
        .daemon(1)
        .ctl(&["disconnect", "n2"])
        .status
        .success());
    assert!(wait_for(
        || cluster.peer(1, 2)["connected"] == false,
        Duration::from_secs(20)
    ));
    let size = cluster.dir.spec.size;
    let c1 = client(&rt, &cluster, 1);
    let data = vec![0x5au8; (16 * MIB) as usize];
    for (i, chunk) in data.chunks((4 * MIB) as usize).enumerate() {
        rt.block_on(c1.write(i as u64 * 4 * MIB, chunk.to_vec(), false))
            .unwrap();
    }
    rt.block_on(c1.flush()).unwrap();

    cluster
        .dir
        .write_config(1, &with_resync_rate(&original, "\"1MiB\""));
    let out = cluster.daemon(1).ctl(&["adjust"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("resync_rate 0 → 1048576"), "{said}");

    assert!(cluster.daemon(1).ctl(&["connect", "n2"]).status.success());
    // The resync runs at the new cap: after a while most is still stale.
    assert!(wait_for(
        || cluster.peer(1, 2)["connected"] == true,
        Duration::from_secs(20)
    ));
    std::thread::sleep(Duration::from_secs(3));
    let stale = cluster.peer(1, 2)["stale_bytes"].as_u64().unwrap();
    assert!(
        stale >= 8 * MIB,
        "16 MiB at 1 MiB/s: after 3 s at least 8 MiB must be left, {stale} are"
    );

    // Back to unlimited: it finishes.
    cluster.dir.write_config(1, &original);
    let out = cluster.daemon(1).ctl(&["adjust"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At once, in the running pass: what is left (at least 8 MiB, 8 s at
    // the old cap) goes at the link's speed.
    assert!(
        wait_for(
            || cluster.peer(1, 2)["state"] == "up-to-date",
            Duration::from_secs(4)
        ),
        "the lifted cap did not apply to the running resync: {}",
        cluster.peer(1, 2)
    );
    let mut image = vec![0u8; size as usize];
    image[..data.len()].copy_from_slice(&data);
    assert!(
        cluster
            .wait_identical(Some(Model::from_image(image).blake3()))
            .is_ok(),
        "resync did not finish after the rate was lifted"
    );
}

#[test]
fn adjust_refuses_invalid_files_and_changes_that_need_a_restart() {
    let cluster = Cluster::start(ClusterSpec {
        extra_toml: "[replication]\nresync_rate = 0\n".into(),
        ..ClusterSpec::default()
    });
    let original = cluster.dir.config_toml(1);

    // Unchanged file: nothing to do.
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no change"));

    // A syntax error: refused with the file's problem.
    cluster
        .dir
        .write_config(1, &format!("{original}\n[replication\n"));
    // vmsyncctl reads the file first (for the socket) and says so ...
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOML parse error"));
    // ... and the daemon, reached by its socket, refuses it too.
    let socket = cluster
        .dir
        .node(1)
        .control_socket
        .to_str()
        .unwrap()
        .to_string();
    let out = support::daemon::ctl_socket(&socket, &["adjust"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TOML parse error") && err.contains("nothing changed"),
        "{err}"
    );

    // A tunable together with a new node name and a moved peer: refused,
    // naming both, applying not even the tunable.
    let moved = with_resync_rate(&original, "12345")
        .replace("name = \"n1\"", "name = \"renamed\"")
        .replace(&cluster.dir.node(2).listen.to_string(), "127.0.0.1:1");
    cluster.dir.write_config(1, &moved);
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[node]") && err.contains("peer n2") && err.contains("nothing was applied"),
        "{err}"
    );
    assert_eq!(cluster.peer(1, 2)["connected"], true);

    // The same tunable alone applies, counted from the original value.
    cluster
        .dir
        .write_config(1, &with_resync_rate(&original, "12345"));
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resync_rate 0 → 12345"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The `[[peer]]` section of node `id` as `TestDir` writes it into the
/// other nodes' configs.
fn peer_section(dir: &support::TestDir, id: u32) -> String {
    let n = dir.node(id);
    format!(
        "\n[[peer]]\nid = {}\nname = \"{}\"\naddress = \"{}\"\nlan_group = \"{}\"\n",
        n.id, n.name, n.listen, n.lan_group
    )
}

/// A third machine joins a running pair: `adjust` on both adds it without
/// touching the primary's device, and it is fully synced. Then the second
/// machine leaves: `adjust` takes its link down; new writes reach only the
/// remaining peer.
#[test]
fn adjust_adds_and_removes_peers_of_a_running_primary() {
    let rt = runtime();
    let dir = support::TestDir::with_spec(ClusterSpec {
        nodes: 3,
        protocol: "C",
        ..ClusterSpec::default()
    });
    let n3 = peer_section(&dir, 3);
    for id in [1, 2] {
        let toml = dir.config_toml(id);
        assert!(toml.contains(&n3));
        dir.write_config(id, &toml.replace(&n3, ""));
    }
    for n in &dir.nodes {
        assert!(support::ctl(&n.config, &["create-md"]).status.success());
    }
    let daemons = vec![
        support::Daemon::start(dir.node(1)),
        support::Daemon::start(dir.node(2)),
    ];
    let mut cluster = Cluster { dir, daemons };
    for id in [1, 2] {
        cluster.daemon(id).wait_ready(support::cluster::START);
        cluster.wait_linked(id);
    }
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let mut gen = support::Workload::new(31, size);
    let c1 = client(&rt, &cluster, 1);
    let model = rt
        .block_on(support::workload::run(
            &c1,
            &gen.ops(300),
            16,
            Model::zeroed(size),
        ))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();

    // Node 3 comes up knowing both; they do not know it yet.
    cluster
        .daemons
        .push(support::Daemon::start(cluster.dir.node(3)));
    cluster.daemon(3).wait_ready(support::cluster::START);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cluster.peer(3, 1)["connected"],
        false,
        "node 1 let an unknown node in"
    );

    for id in [1, 2] {
        cluster.dir.write_config(id, &cluster.dir.config_toml(id));
        let out = cluster.daemons[id as usize - 1].ctl(&["adjust"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("peer n3 (id 3, ") && said.contains("added"),
            "{said}"
        );
    }
    assert!(
        cluster.wait_peers_up_to_date(1),
        "node 3 was not synced: {}",
        cluster.status(1)
    );
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());
    assert!(wait_for(
        || cluster.peer(3, 2)["connected"] == true,
        Duration::from_secs(20)
    ));
    // The device stayed up all along, and writes reach the new peer.
    let model = rt
        .block_on(support::workload::run(&c1, &gen.ops(100), 16, model))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());

    // Adding it again is "no change"; a second adjust is idempotent.
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no change"));

    // Node 2 leaves node 1's configuration.
    let n2 = peer_section(&cluster.dir, 2);
    let without_n2 = cluster.dir.config_toml(1).replace(&n2, "");
    cluster.dir.write_config(1, &without_n2);
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("peer n2 (id 2) removed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let peers: Vec<String> = cluster.status(1)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(peers, ["n3"]);
    assert!(wait_for(
        || cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20)
    ));
    let before_n2 = cluster.hash(2);
    let model = rt
        .block_on(support::workload::run(&c1, &gen.ops(100), 16, model))
        .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert!(wait_for(
        || cluster.hash(3) == model.blake3(),
        Duration::from_secs(30)
    ));
    assert_eq!(cluster.hash(1), model.blake3());
    assert_eq!(
        cluster.hash(2),
        before_n2,
        "a removed peer still got writes"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        cluster.peer(2, 1)["connected"],
        false,
        "node 1 let a removed peer back in"
    );

    // Removing the last peer, or changing a peer's address, needs a restart.
    let n3 = peer_section(&cluster.dir, 3);
    cluster.dir.write_config(1, &without_n2.replace(&n3, ""));
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("every [[peer]] removed"));
    let moved = without_n2.replace(&cluster.dir.node(3).listen.to_string(), "127.0.0.1:1");
    cluster.dir.write_config(1, &moved);
    let out = cluster.daemons[0].ctl(&["adjust"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("peer n3 (id 3) changed") && err.contains("nothing was applied"),
        "{err}"
    );
    assert_eq!(cluster.peer(1, 3)["connected"], true);
}
