//! A temporary directory holding everything a small test cluster needs:
//! one TOML config, backing image and log per node, plus the shared secret.
//!
//! Everything runs on loopback, with ports found free at creation time.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Set to keep a test's directory (configs, images, daemon logs) after it ends.
const KEEP_ENV: &str = "VMSYNC_KEEP_TESTDIR";

/// Unix socket paths are limited to 108 bytes; a long `$TMPDIR` would push
/// the control and block sockets over.
const MAX_TMP_PREFIX: usize = 48;

/// What cluster to lay out.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Nodes get ids 1..=nodes and names n1, n2, ...
    pub nodes: u32,
    pub size: u64,
    /// "A" or "C".
    pub protocol: &'static str,
    /// LAN group of each node (index 0 is node 1); nodes beyond the list
    /// are in "home".
    pub lan_groups: Vec<String>,
    /// Whether configs set `node.block_socket` (a primary then serves its
    /// top layer there instead of through ublk).
    pub block_socket: bool,
    /// Appended verbatim to every config, e.g. a `[replication]` table.
    pub extra_toml: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 2,
            size: 64 << 20,
            protocol: "A",
            lan_groups: Vec::new(),
            block_socket: true,
            extra_toml: String::new(),
        }
    }
}

/// The files of one node.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub id: u32,
    pub name: String,
    pub lan_group: String,
    pub config: PathBuf,
    pub backing: PathBuf,
    pub metadata: PathBuf,
    pub listen: SocketAddr,
    pub control_socket: PathBuf,
    /// Where the node serves its device when it is primary (if the spec
    /// enabled it).
    pub block_socket: PathBuf,
    /// The daemon's stdout and stderr (see `Daemon`).
    pub log: PathBuf,
}

pub struct TestDir {
    dir: Option<TempDir>,
    pub spec: ClusterSpec,
    pub secret: PathBuf,
    pub nodes: Vec<NodeFiles>,
}

impl TestDir {
    /// `nodes` nodes with default settings (64 MiB, protocol A, one LAN group).
    pub fn new(nodes: u32) -> Self {
        TestDir::with_spec(ClusterSpec {
            nodes,
            ..ClusterSpec::default()
        })
    }

    /// Lays out the cluster: configs, zero-filled (sparse) backing images of
    /// `spec.size`, and the secret. Metadata is not created (that is
    /// `vmsyncctl create-md`'s job, which tests may want to exercise).
    pub fn with_spec(spec: ClusterSpec) -> Self {
        let tmp = std::env::temp_dir();
        let base = if tmp.as_os_str().len() <= MAX_TMP_PREFIX {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        let dir = tempfile::Builder::new()
            .prefix("vmsync-")
            .tempdir_in(base)
            .unwrap();
        let root = dir.path().to_path_buf();

        let secret = root.join("secret");
        let key: [u8; 32] = rand::random();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        fs::write(&secret, hex + "\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();

        let ports = free_ports(spec.nodes as usize);
        let nodes: Vec<NodeFiles> = (1..=spec.nodes)
            .zip(ports)
            .map(|(id, listen)| {
                let name = format!("n{id}");
                let file = |ext: &str| root.join(format!("{name}.{ext}"));
                NodeFiles {
                    id,
                    lan_group: spec
                        .lan_groups
                        .get(id as usize - 1)
                        .cloned()
                        .unwrap_or_else(|| "home".into()),
                    config: file("toml"),
                    backing: file("img"),
                    metadata: file("meta"),
                    listen,
                    control_socket: file("sock"),
                    block_socket: file("blk"),
                    log: file("log"),
                    name,
                }
            })
            .collect();
        let test_dir = TestDir {
            dir: Some(dir),
            spec,
            secret,
            nodes,
        };
        for node in &test_dir.nodes {
            fs::File::create(&node.backing)
                .unwrap()
                .set_len(test_dir.spec.size)
                .unwrap();
            fs::write(&node.config, test_dir.config_toml(node.id)).unwrap();
        }
        test_dir
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("test dir is alive").path()
    }

    /// Node `id` (1-based, as in the configs).
    pub fn node(&self, id: u32) -> &NodeFiles {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in this test dir"))
    }

    /// The config of node `id` as written at creation; tests that need a
    /// variant edit this text and write it back with [`TestDir::write_config`].
    pub fn config_toml(&self, id: u32) -> String {
        let spec = &self.spec;
        let me = self.node(id);
        let mut toml = String::new();
        let _ = write!(
            toml,
            "[resource]\nname = \"r0\"\nsize = {size}\nprotocol = \"{protocol}\"\n\n\
             [node]\nid = {id}\nname = \"{name}\"\nbacking = {backing}\nmetadata = {metadata}\n\
             listen = \"{listen}\"\ncontrol_socket = {control}\nlan_group = \"{group}\"\n",
            size = spec.size,
            protocol = spec.protocol,
            name = me.name,
            backing = quoted(&me.backing),
            metadata = quoted(&me.metadata),
            listen = me.listen,
            control = quoted(&me.control_socket),
            group = me.lan_group,
        );
        if spec.block_socket {
            let _ = writeln!(toml, "block_socket = {}", quoted(&me.block_socket));
        }
        let _ = write!(
            toml,
            "\n[security]\nsecret_file = {}\n",
            quoted(&self.secret)
        );
        for peer in self.nodes.iter().filter(|n| n.id != id) {
            let _ = write!(
                toml,
                "\n[[peer]]\nid = {}\nname = \"{}\"\naddress = \"{}\"\nlan_group = \"{}\"\n",
                peer.id, peer.name, peer.listen, peer.lan_group
            );
        }
        if !spec.extra_toml.is_empty() {
            let _ = write!(toml, "\n{}\n", spec.extra_toml);
        }
        toml
    }

    pub fn write_config(&self, id: u32, toml: &str) {
        fs::write(&self.node(id).config, toml).unwrap();
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("test files kept in {}", dir.keep().display());
        } else if std::thread::panicking() {
            eprintln!("set {KEEP_ENV}=1 to keep the test files (configs, images, daemon logs)");
        }
    }
}

/// A TOML basic string holding `path`.
fn quoted(path: &Path) -> String {
    let text = path.to_str().expect("test paths are UTF-8");
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Distinct loopback ports that were free a moment ago. All listeners are
/// held until every port is chosen so the kernel cannot hand one out twice.
pub fn free_ports(count: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}
