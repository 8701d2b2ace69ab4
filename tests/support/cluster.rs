//! A running cluster of real `vmsyncd` processes on loopback.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

use blockdev::blocksock::BlockClient;

use super::netns::Star;
use super::proxy::Proxy;
use super::{blake3_of_file, ctl, wait_for, ClusterSpec, Daemon, TestDir};

pub const START: Duration = Duration::from_secs(15);
pub const CONVERGE: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub dir: TestDir,
    /// Index `id - 1`.
    pub daemons: Vec<Daemon>,
}

impl Cluster {
    /// Creates metadata for every node, starts them all and waits until
    /// every node is linked to every other.
    pub fn start(spec: ClusterSpec) -> Cluster {
        Cluster::start_edited(spec, |_| {})
    }

    /// [`Cluster::start`], letting `edit` change the files (configs, say)
    /// before anything runs.
    pub fn start_edited(spec: ClusterSpec, edit: impl FnOnce(&TestDir)) -> Cluster {
        let dir = TestDir::with_spec(spec);
        edit(&dir);
        for n in &dir.nodes {
            let out = ctl(&n.config, &["create-md"]);
            assert!(
                out.status.success(),
                "create-md: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let daemons = dir.nodes.iter().map(Daemon::start).collect();
        Cluster::linked(dir, daemons)
    }

    /// A cluster whose node `id` listens on `place(id).0` and runs in
    /// network namespace `place(id).1`, every daemon started with `env`;
    /// waits until every node is linked.
    pub fn start_in_namespaces(
        spec: ClusterSpec,
        env: &[(&str, Option<&str>)],
        place: impl Fn(u32) -> (IpAddr, String),
    ) -> Cluster {
        let mut dir = TestDir::with_spec(spec);
        for node in &mut dir.nodes {
            node.listen = SocketAddr::new(place(node.id).0, node.listen.port());
        }
        for id in 1..=dir.spec.nodes {
            dir.write_config(id, &dir.config_toml(id));
        }
        for n in &dir.nodes {
            assert!(ctl(&n.config, &["create-md"]).status.success());
        }
        let daemons = dir
            .nodes
            .iter()
            .map(|n| Daemon::start_in_netns_with_env(n, &place(n.id).1, env))
            .collect();
        Cluster::linked(dir, daemons)
    }

    /// A cluster on `star`'s links: node 1 in the hub, node k + 2 in spoke
    /// k (so `spec.nodes` must be the spokes + 1).
    pub fn start_on_star(star: &Star, spec: ClusterSpec, env: &[(&str, Option<&str>)]) -> Cluster {
        assert_eq!(spec.nodes as usize, star.spokes.len() + 1);
        Cluster::start_in_namespaces(spec, env, |id| match id {
            // Node 1 dials every peer (the lower id dials), so it only
            // needs an address of its own on one link.
            1 => (star.spokes[0].hub_ip, star.hub.clone()),
            id => {
                let spoke = &star.spokes[id as usize - 2];
                (spoke.ip, spoke.netns.clone())
            }
        })
    }

    /// Waits until every one of `daemons` is ready and linked to every other.
    fn linked(dir: TestDir, daemons: Vec<Daemon>) -> Cluster {
        let mut cluster = Cluster { dir, daemons };
        for d in &mut cluster.daemons {
            d.wait_ready(START);
        }
        for id in 1..=cluster.dir.spec.nodes {
            cluster.wait_linked(id);
        }
        cluster
    }

    pub fn daemon(&mut self, id: u32) -> &mut Daemon {
        &mut self.daemons[id as usize - 1]
    }

    pub fn status(&self, id: u32) -> Value {
        self.daemons[id as usize - 1].status_json()
    }

    /// The status entry node `id` keeps for `peer`.
    pub fn peer(&self, id: u32, peer: u32) -> Value {
        let status = self.status(id);
        status["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == peer).cloned())
            .unwrap_or(Value::Null)
    }

    /// Waits until node `id` reports every peer connected.
    pub fn wait_linked(&self, id: u32) {
        let linked = wait_for(
            || {
                self.daemons[id as usize - 1]
                    .try_status_json()
                    .and_then(|s| {
                        s["peers"]
                            .as_array()
                            .map(|ps| ps.iter().all(|p| p["connected"] == true))
                    })
                    .unwrap_or(false)
            },
            START,
        );
        assert!(linked, "node {id} did not link to all its peers");
    }

    pub fn promote(&self, id: u32) {
        let out = self.daemons[id as usize - 1].ctl(&["promote"]);
        assert!(
            out.status.success(),
            "promote n{id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until `primary` reports every peer up to date with nothing stale.
    pub fn wait_peers_up_to_date(&self, primary: u32) -> bool {
        wait_for(
            || {
                self.daemons[primary as usize - 1]
                    .try_status_json()
                    .and_then(|s| {
                        s["peers"].as_array().map(|ps| {
                            ps.iter()
                                .all(|p| p["state"] == "up-to-date" && p["stale_bytes"] == 0)
                        })
                    })
                    .unwrap_or(false)
            },
            CONVERGE,
        )
    }

    pub fn hash(&self, id: u32) -> blake3::Hash {
        blake3_of_file(&self.dir.node(id).backing, self.dir.spec.size)
    }

    /// Waits until every node's backing image has the same BLAKE3 (and, if
    /// given, equals `expected`). Returns the hashes seen last on failure.
    pub fn wait_identical(
        &self,
        expected: Option<blake3::Hash>,
    ) -> Result<blake3::Hash, Vec<String>> {
        let mut last = Vec::new();
        let ok = wait_for(
            || {
                let hashes: Vec<blake3::Hash> =
                    (1..=self.dir.spec.nodes).map(|id| self.hash(id)).collect();
                last = hashes.iter().map(|h| h.to_hex().to_string()).collect();
                hashes.windows(2).all(|w| w[0] == w[1]) && expected.is_none_or(|e| hashes[0] == e)
            },
            CONVERGE,
        );
        if ok {
            Ok(self.hash(1))
        } else {
            Err(last)
        }
    }
}

/// A block-socket client of node `id` (its top layer, as a guest sees it).
pub fn client(rt: &tokio::runtime::Runtime, cluster: &Cluster, id: u32) -> BlockClient {
    let path = cluster.dir.node(id).block_socket.clone();
    rt.block_on(BlockClient::connect(path))
        .expect("connect to the node's block socket")
}

/// Starts a cluster in which node 1 reaches node `via_proxy` through a proxy
/// the test controls (every other link is direct), promotes node 1 and waits
/// for the initial sync. Node 1 has the lower id, so it is the one that
/// dials that link.
pub fn primary_with_proxy(
    rt: &tokio::runtime::Runtime,
    spec: ClusterSpec,
    via_proxy: u32,
) -> (Cluster, Proxy) {
    primary_with_proxy_edited(rt, spec, via_proxy, |_| {})
}

/// [`primary_with_proxy`], running `edit` once the metadata exists and
/// before any daemon starts (e.g. to put data into backing files).
pub fn primary_with_proxy_edited(
    rt: &tokio::runtime::Runtime,
    spec: ClusterSpec,
    via_proxy: u32,
    edit: impl FnOnce(&TestDir),
) -> (Cluster, Proxy) {
    assert!(via_proxy > 1 && via_proxy <= spec.nodes);
    let dir = TestDir::with_spec(spec);
    let target = dir.node(via_proxy).listen;
    let proxy = rt.block_on(Proxy::start(target));
    let toml = dir.config_toml(1).replace(
        &format!("address = \"{target}\""),
        &format!("address = \"{}\"", proxy.listen),
    );
    dir.write_config(1, &toml);
    // A paused proxy models a slow peer that keeps its connections, not a
    // dead one: keep the ping timeout (which would drop the link, see
    // `tests/liveness.rs`) out of the way unless the test set one.
    for id in 1..=dir.spec.nodes {
        let toml = std::fs::read_to_string(&dir.node(id).config).expect("read config");
        if toml.contains("ping_timeout_ms") {
            continue;
        }
        let toml = if toml.contains("[replication]\n") {
            toml.replacen(
                "[replication]\n",
                "[replication]\nping_timeout_ms = 120000\n",
                1,
            )
        } else {
            format!("{toml}\n[replication]\nping_timeout_ms = 120000\n")
        };
        dir.write_config(id, &toml);
    }
    for n in &dir.nodes {
        assert!(ctl(&n.config, &["create-md"]).status.success());
    }
    edit(&dir);
    let daemons: Vec<_> = dir.nodes.iter().map(Daemon::start).collect();
    let mut cluster = Cluster { dir, daemons };
    for d in &mut cluster.daemons {
        d.wait_ready(START);
    }
    for id in 1..=cluster.dir.spec.nodes {
        cluster.wait_linked(id);
    }
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    (cluster, proxy)
}

/// Two nodes, node 1 primary and in sync, reaching node 2 through a proxy.
pub fn proxied_pair(
    rt: &tokio::runtime::Runtime,
    protocol: &'static str,
    extra_toml: &str,
) -> (Cluster, Proxy) {
    let spec = ClusterSpec {
        nodes: 2,
        protocol,
        extra_toml: extra_toml.into(),
        ..ClusterSpec::default()
    };
    primary_with_proxy(rt, spec, 2)
}

/// Two LAN groups of two nodes each in two network namespaces joined by
/// a veth shaped to `rate` (tc syntax); nodes 1 and 2 at "home" (node 1
/// promoted), nodes 3 and 4 "away". Returns the link, the cluster and a
/// block-socket client of node 1.
pub fn two_sites_of_two(
    rt: &tokio::runtime::Runtime,
    rate: &str,
    wan_rate: &str,
) -> (super::netns::WanLink, Cluster, BlockClient) {
    two_sites_of_two_sized(rt, rate, wan_rate, ClusterSpec::default().size)
}

/// [`two_sites_of_two`] with a device of `size` bytes.
pub fn two_sites_of_two_sized(
    rt: &tokio::runtime::Runtime,
    rate: &str,
    wan_rate: &str,
    size: u64,
) -> (super::netns::WanLink, Cluster, BlockClient) {
    let link = super::netns::WanLink::create(rate);
    let mut dir = super::TestDir::with_spec(ClusterSpec {
        size,
        nodes: 4,
        protocol: "C",
        lan_groups: vec!["home".into(), "home".into(), "away".into(), "away".into()],
        extra_toml: format!("[replication]\nwan_rate = \"{wan_rate}\"\n"),
        ..ClusterSpec::default()
    });
    let away = |id: u32| id >= 3;
    for node in &mut dir.nodes {
        let ip = if away(node.id) {
            link.away.ip
        } else {
            link.home.ip
        };
        node.listen = std::net::SocketAddr::new(ip, node.listen.port());
    }
    for id in 1..=4 {
        dir.write_config(id, &dir.config_toml(id));
    }
    for n in &dir.nodes {
        assert!(super::ctl(&n.config, &["create-md"]).status.success());
    }
    let daemons = dir
        .nodes
        .iter()
        .map(|n| {
            let netns = if away(n.id) {
                &link.away.netns
            } else {
                &link.home.netns
            };
            super::Daemon::start_in_netns(n, netns)
        })
        .collect();
    let mut cluster = Cluster { dir, daemons };
    for d in &mut cluster.daemons {
        d.wait_ready(std::time::Duration::from_secs(15));
    }
    for id in 1..=4 {
        cluster.wait_linked(id);
    }
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let c = client(rt, &cluster, 1);
    (link, cluster, c)
}
