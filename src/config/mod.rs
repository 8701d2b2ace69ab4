//! A node's TOML configuration: parsing and validation.
//!
//! Every error names the file, the key and the reason, and nothing is acted
//! on until the whole file has been checked.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Highest node id + 1; matches the metadata's bitmap slots.
pub const MAX_NODES: u32 = blockdev::meta::MAX_NODE_SLOTS;

/// Most ublk queues `[node] ublk_queues` takes (one per CPU is plenty).
pub const MAX_UBLK_QUEUES: i64 = 64;

/// Replication protocol for LAN peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// A write completes once written locally and queued to every LAN peer.
    A,
    /// A write completes once every connected LAN peer has written it too.
    C,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages.
    pub path: PathBuf,
    pub resource: Resource,
    pub node: Node,
    pub directory: Option<SocketAddr>,
    /// How often a primary reports its staleness bitmaps to the directory.
    pub report_interval_ms: u64,
    pub secret_file: Option<PathBuf>,
    pub peers: Vec<Peer>,
    pub replication: Replication,
    /// `[metrics] listen`: where the Prometheus endpoint answers (opt-in).
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub size: u64,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: u32,
    pub name: String,
    pub backing: PathBuf,
    pub metadata: PathBuf,
    pub listen: Option<SocketAddr>,
    pub control_socket: PathBuf,
    pub lan_group: String,
    pub direct_io: bool,
    /// ublk hardware queues of the device (`nr_hw_queues`): each one a
    /// thread with its own ring, serving the requests of some CPUs.
    pub ublk_queues: u16,
    /// Create the ublk device for zero copy where the kernel has it (Linux
    /// 6.16+): the driver no longer copies each request's data. On by
    /// default; off keeps the copying data path.
    pub ublk_zero_copy: bool,
    /// When set, a primary serves its device on this Unix socket (the
    /// block-socket protocol) instead of ublk: for tests and benchmarks on
    /// machines whose kernel has no ublk.
    pub block_socket: Option<PathBuf>,
    /// Members of this group may use the control socket too (mode 0660
    /// instead of 0600). Only root and the daemon's own user otherwise.
    pub control_group: Option<ControlGroup>,
}

/// A group allowed on the control socket, resolved when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    pub name: String,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub id: u32,
    pub name: String,
    pub address: SocketAddr,
    pub lan_group: String,
}

/// Tunables of the replication engine (`vmsyncctl adjust` changes them in
/// a running daemon).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Replication {
    /// Writes after which the primary closes an epoch even without a flush.
    pub max_epoch_writes: u32,
    /// Bytes queued to one peer past which new guest writes wait for its
    /// backlog to drain (for at most `max_peer_wait_ms`, then the peer falls
    /// behind: pull-ahead). Twice this much queued makes it fall behind at once.
    pub congestion_bytes: u64,
    /// Longest a guest write may wait for one slow peer before that peer is
    /// dropped to "behind" (milliseconds).
    pub max_peer_wait_ms: u64,
    /// Resync bandwidth cap in bytes per second (0: unlimited).
    pub resync_rate: u64,
    /// The rate a LAN resync keeps while the guest does I/O, in bytes per
    /// second (DRBD's `c-min-rate`). A resync yields the link to guest
    /// writes, down to about one chunk every 200 ms (~160 KiB/s) when the
    /// guest alone fills it; below this rate it stops yielding, so guest
    /// writes wait behind more resync data (0: yield fully).
    pub resync_min_rate: u64,
    /// Background sync (pulling the blocks a new primary lacks) cap in bytes
    /// per second (0: unlimited; it always yields to guest reads).
    pub sync_rate: u64,
    /// Online verify cap in bytes compared per second, over all peers
    /// (0: unlimited). Every byte compared is read here and on the peer.
    pub verify_rate: u64,
    /// Budget of the lazy push to each WAN peer (another `lan_group`) in
    /// bytes per second on the wire (0: unlimited). While the guest is
    /// busy the push trickles well below it (see `replication::wan`).
    pub wan_rate: u64,
    /// How the lazy push compresses what it sends to WAN peers (the frame
    /// names the codec; the receiver decodes either).
    pub wan_compression: protocol::compress::Codec,
    /// Longest a guest I/O waits for a block this node lacks while no node
    /// holding it answers, before it fails with EIO (milliseconds).
    pub fetch_timeout_ms: u64,
    /// How often each side of a link pings the other (milliseconds).
    pub ping_interval_ms: u64,
    /// A peer from which no frame at all arrived for this long is dead: the
    /// link is dropped (milliseconds). Also the sockets' `TCP_USER_TIMEOUT`.
    pub ping_timeout_ms: u64,
    /// What a primary does when it meets a secondary whose data diverged
    /// from its own (a split brain); see `replication::split_brain`.
    pub after_split_brain: AfterSplitBrain,
    /// Whether large sends to peers go zero-copy (io_uring's zero-copy
    /// sendmsg): `auto` turns it off on a connection where the kernel
    /// copies anyway (loopback, a local veth).
    pub zero_copy_send: protocol::zerocopy::ZeroCopySend,
}

/// Who loses a split brain, decided when a primary meets a diverged
/// secondary (the only place data flows): DRBD's `after-sb-1pri` policies
/// and, applied then, its `after-sb-0pri` ones. A rule that picks the
/// primary refuses the link instead: the primary serves its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSplitBrain {
    /// Refuse the link; the operator decides (`vmsyncctl discard-my-data`
    /// on the node whose changes go). DRBD's default.
    #[default]
    Disconnect,
    /// The secondary's own changes are discarded: it is resynced from the
    /// primary (`discard-secondary`).
    DiscardSecondary,
    /// The node that wrote nothing since the split loses (nothing is lost);
    /// when both wrote, the link is refused (`discard-zero-changes`).
    DiscardZeroChanges,
    /// The node that became primary after the split loses: the one that
    /// was primary before it keeps its changes (`discard-younger-primary`).
    DiscardYoungerPrimary,
}

impl AfterSplitBrain {
    pub const NAMES: &'static str =
        "disconnect, discard-secondary, discard-zero-changes, discard-younger-primary";

    pub fn name(self) -> &'static str {
        match self {
            AfterSplitBrain::Disconnect => "disconnect",
            AfterSplitBrain::DiscardSecondary => "discard-secondary",
            AfterSplitBrain::DiscardZeroChanges => "discard-zero-changes",
            AfterSplitBrain::DiscardYoungerPrimary => "discard-younger-primary",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            AfterSplitBrain::Disconnect,
            AfterSplitBrain::DiscardSecondary,
            AfterSplitBrain::DiscardZeroChanges,
            AfterSplitBrain::DiscardYoungerPrimary,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            max_epoch_writes: 8192,
            congestion_bytes: 64 << 20,
            max_peer_wait_ms: 2000,
            resync_rate: 0,
            resync_min_rate: 0,
            sync_rate: 0,
            // DRBD's resync controller caps at 100 MiB/s by default
            // (c-max-rate); verify reads the whole device on both sides.
            verify_rate: 100 << 20,
            wan_rate: 0,
            wan_compression: protocol::compress::Codec::Zstd,
            fetch_timeout_ms: 30_000,
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            after_split_brain: AfterSplitBrain::Disconnect,
            zero_copy_send: protocol::zerocopy::ZeroCopySend::Auto,
        }
    }
}

impl Config {
    pub fn is_standalone(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn peer(&self, id: u32) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Peers in this node's LAN group: writes are mirrored to them at once.
    pub fn is_lan_peer(&self, peer: &Peer) -> bool {
        peer.lan_group == self.node.lan_group
    }

    /// Reads the shared secret: the file's bytes, trimmed of surrounding
    /// whitespace. An unreadable file, or a secret that is too short or
    /// too guessable ([`protocol::check_secret`]), is an error naming the
    /// file.
    pub fn read_secret(&self) -> Result<Vec<u8>, ConfigError> {
        let file = self.secret_file.as_ref().ok_or_else(|| {
            self.err(
                "security.secret_file",
                "required when peers are configured".into(),
            )
        })?;
        let secret = std::fs::read(file).map_err(|e| {
            self.err(
                "security.secret_file",
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let trimmed = secret.trim_ascii().to_vec();
        if let Err(weak) = protocol::check_secret(&trimmed) {
            return Err(self.err(
                "security.secret_file",
                format!(
                    "the shared secret in {} is refused: {weak}; \
                     make one with `vmsyncctl gen-secret FILE`",
                    file.display()
                ),
            ));
        }
        Ok(trimmed)
    }

    fn err(&self, key: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            reason,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

// ---- raw shape of the file -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: RawResource,
    node: RawNode,
    directory: Option<RawDirectory>,
    security: Option<RawSecurity>,
    #[serde(default)]
    peer: Vec<RawPeer>,
    replication: Option<RawReplication>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    size: RawSize,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: i64,
    name: String,
    backing: PathBuf,
    metadata: PathBuf,
    listen: Option<String>,
    control_socket: PathBuf,
    lan_group: Option<String>,
    direct_io: Option<bool>,
    ublk_queues: Option<i64>,
    ublk_zero_copy: Option<bool>,
    block_socket: Option<PathBuf>,
    control_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    address: String,
    report_interval_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    secret_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: i64,
    name: String,
    address: String,
    lan_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    max_epoch_writes: Option<i64>,
    congestion_limit: Option<RawSize>,
    max_peer_wait_ms: Option<i64>,
    resync_rate: Option<RawSize>,
    resync_min_rate: Option<RawSize>,
    sync_rate: Option<RawSize>,
    verify_rate: Option<RawSize>,
    wan_rate: Option<RawSize>,
    wan_compression: Option<String>,
    fetch_timeout_ms: Option<i64>,
    ping_interval_ms: Option<i64>,
    ping_timeout_ms: Option<i64>,
    after_split_brain: Option<String>,
    zero_copy_send: Option<String>,
}

/// A size: an integer number of bytes or a string with a suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

const DEFAULT_LAN_GROUP: &str = "default";
const DEFAULT_REPORT_INTERVAL_MS: u64 = 2000;

/// Parses a size such as `4096`, `512KiB`, `16GiB`, `1G` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size (expected e.g. 512MiB or 16GiB)"))?;
    let shift = match suffix.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "\"{text}\": unknown size suffix \"{other}\" (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Parses a bandwidth in bytes per second: a size (`875000`, `512KiB`) or
/// bits per second with a decimal unit, as links are sold (`7Mbit` is
/// 875000 bytes/s; `kbit`, `Mbit`, `Gbit`).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    for (unit, bits) in [
        ("kbit", 1_000u64),
        ("Mbit", 1_000_000),
        ("Gbit", 1_000_000_000),
    ] {
        if let Some(number) = trimmed.strip_suffix(unit) {
            let number: f64 = number
                .trim()
                .parse()
                .map_err(|_| format!("\"{text}\" is not a rate (expected e.g. 7Mbit or 1MiB)"))?;
            if !(number.is_finite() && number >= 0.0) {
                return Err(format!("\"{text}\" is not a rate"));
            }
            return Ok((number * bits as f64 / 8.0) as u64);
        }
    }
    parse_size(trimmed)
}

/// Loads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Validates configuration text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    Validator { path }.validate(raw)
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn size(&self, key: &str, raw: RawSize) -> Result<u64, ConfigError> {
        match raw {
            RawSize::Bytes(n) => {
                u64::try_from(n).map_err(|_| self.err(key, format!("{n} is negative")))
            }
            RawSize::Text(t) => parse_size(&t).map_err(|reason| self.err(key, reason)),
        }
    }

    /// A rate in bytes per second: a number, a size ("10MiB") or a bit
    /// rate ("80Mbit").
    fn rate(&self, key: &str, raw: RawSize) -> Result<u64, ConfigError> {
        match raw {
            RawSize::Text(t) => parse_rate(&t).map_err(|reason| self.err(key, reason)),
            bytes => self.size(key, bytes),
        }
    }

    fn node_id(&self, key: &str, id: i64) -> Result<u32, ConfigError> {
        u32::try_from(id)
            .ok()
            .filter(|&id| id < MAX_NODES)
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("{id} is out of range (0 to {})", MAX_NODES - 1),
                )
            })
    }

    fn address(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| {
            self.err(
                key,
                format!("\"{text}\" is not an address of the form IP:PORT"),
            )
        })
    }

    fn name(&self, key: &str, name: &str) -> Result<String, ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(name.to_string())
        } else {
            Err(self.err(
                key,
                format!("\"{name}\" must be 1 to 64 letters, digits, '-', '_' or '.'"),
            ))
        }
    }

    /// A group that exists on this machine.
    fn group(&self, key: &str, name: &str) -> Result<ControlGroup, ConfigError> {
        let name = self.name(key, name)?;
        match nix::unistd::Group::from_name(&name) {
            Ok(Some(group)) => Ok(ControlGroup {
                name,
                gid: group.gid.as_raw(),
            }),
            Ok(None) => Err(self.err(key, format!("no group named \"{name}\" on this machine"))),
            Err(e) => Err(self.err(key, format!("cannot look up group \"{name}\": {e}"))),
        }
    }

    fn count(&self, key: &str, n: i64) -> Result<u64, ConfigError> {
        u64::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.err(key, format!("{n} must be a positive number")))
    }

    /// One of a fixed set of named values (`names` lists them for the
    /// error).
    fn choice<T>(
        &self,
        key: &str,
        name: &str,
        from_name: impl Fn(&str) -> Option<T>,
        names: &str,
    ) -> Result<T, ConfigError> {
        from_name(name).ok_or_else(|| self.err(key, format!("'{name}' is not one of: {names}")))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let size = self.size("resource.size", raw.resource.size)?;
        if size == 0 || size % 4096 != 0 {
            return Err(self.err(
                "resource.size",
                format!("{size} bytes must be a positive multiple of 4 KiB"),
            ));
        }
        let protocol = match raw.resource.protocol.as_deref() {
            None | Some("A") | Some("a") => Protocol::A,
            Some("C") | Some("c") => Protocol::C,
            Some(other) => {
                return Err(self.err("resource.protocol", format!("\"{other}\" is not A or C")))
            }
        };
        let resource = Resource {
            name: self.name("resource.name", &raw.resource.name)?,
            size,
            protocol,
        };
        let node = Node {
            id: self.node_id("node.id", raw.node.id)?,
            name: self.name("node.name", &raw.node.name)?,
            backing: raw.node.backing,
            metadata: raw.node.metadata,
            listen: raw
                .node
                .listen
                .as_deref()
                .map(|l| self.address("node.listen", l))
                .transpose()?,
            control_socket: raw.node.control_socket,
            lan_group: raw
                .node
                .lan_group
                .unwrap_or_else(|| DEFAULT_LAN_GROUP.into()),
            direct_io: raw.node.direct_io.unwrap_or(false),
            ublk_queues: match raw.node.ublk_queues {
                None => 1,
                Some(n) if (1..=MAX_UBLK_QUEUES).contains(&n) => n as u16,
                Some(n) => {
                    return Err(self.err(
                        "node.ublk_queues",
                        format!("{n} is not between 1 and {MAX_UBLK_QUEUES}"),
                    ))
                }
            },
            ublk_zero_copy: raw.node.ublk_zero_copy.unwrap_or(true),
            block_socket: raw.node.block_socket,
            control_group: raw
                .node
                .control_group
                .as_deref()
                .map(|g| self.group("node.control_group", g))
                .transpose()?,
        };
        if node.backing == node.metadata {
            return Err(self.err(
                "node.metadata",
                "must be a different file from node.backing",
            ));
        }
        let mut peers = Vec::new();
        let mut ids = HashSet::from([node.id]);
        for (i, p) in raw.peer.into_iter().enumerate() {
            let key = |k: &str| format!("peer[{i}].{k}");
            let id = self.node_id(&key("id"), p.id)?;
            if !ids.insert(id) {
                return Err(self.err(&key("id"), format!("node id {id} is used twice")));
            }
            peers.push(Peer {
                id,
                name: self.name(&key("name"), &p.name)?,
                address: self.address(&key("address"), &p.address)?,
                lan_group: p.lan_group.unwrap_or_else(|| DEFAULT_LAN_GROUP.into()),
            });
        }
        if !peers.is_empty() && node.listen.is_none() {
            return Err(self.err("node.listen", "required when peers are configured"));
        }
        if !peers.is_empty() && raw.security.is_none() {
            return Err(self.err("security.secret_file", "required when peers are configured"));
        }
        let mut replication = Replication::default();
        if let Some(r) = raw.replication {
            if let Some(n) = r.max_epoch_writes {
                replication.max_epoch_writes = self
                    .count("replication.max_epoch_writes", n)?
                    .min(u32::MAX as u64) as u32;
            }
            if let Some(s) = r.congestion_limit {
                replication.congestion_bytes = self.size("replication.congestion_limit", s)?;
            }
            if let Some(ms) = r.max_peer_wait_ms {
                replication.max_peer_wait_ms = self.count("replication.max_peer_wait_ms", ms)?;
            }
            if let Some(s) = r.resync_rate {
                replication.resync_rate = self.size("replication.resync_rate", s)?;
            }
            if let Some(s) = r.resync_min_rate {
                replication.resync_min_rate = self.rate("replication.resync_min_rate", s)?;
            }
            if let Some(s) = r.sync_rate {
                replication.sync_rate = self.size("replication.sync_rate", s)?;
            }
            if let Some(s) = r.verify_rate {
                replication.verify_rate = self.size("replication.verify_rate", s)?;
            }
            if let Some(s) = r.wan_rate {
                replication.wan_rate = self.rate("replication.wan_rate", s)?;
            }
            if let Some(name) = r.wan_compression {
                replication.wan_compression = self.choice(
                    "replication.wan_compression",
                    &name,
                    protocol::compress::Codec::from_name,
                    protocol::compress::Codec::NAMES,
                )?;
            }
            if let Some(ms) = r.fetch_timeout_ms {
                replication.fetch_timeout_ms = self.count("replication.fetch_timeout_ms", ms)?;
            }
            if let Some(ms) = r.ping_interval_ms {
                replication.ping_interval_ms = self.count("replication.ping_interval_ms", ms)?;
            }
            if let Some(ms) = r.ping_timeout_ms {
                replication.ping_timeout_ms = self.count("replication.ping_timeout_ms", ms)?;
            }
            if let Some(policy) = r.after_split_brain {
                replication.after_split_brain = self.choice(
                    "replication.after_split_brain",
                    &policy,
                    AfterSplitBrain::from_name,
                    AfterSplitBrain::NAMES,
                )?;
            }
            if let Some(mode) = r.zero_copy_send {
                replication.zero_copy_send = self.choice(
                    "replication.zero_copy_send",
                    &mode,
                    protocol::zerocopy::ZeroCopySend::parse,
                    protocol::zerocopy::ZeroCopySend::NAMES,
                )?;
            }
            if replication.resync_rate > 0 && replication.resync_min_rate > replication.resync_rate
            {
                return Err(self.err(
                    "replication.resync_min_rate",
                    format!(
                        "{} is above replication.resync_rate ({}), the resync's cap",
                        replication.resync_min_rate, replication.resync_rate
                    ),
                ));
            }
            // A timeout of less than two ping intervals drops healthy links
            // whenever one ping is a little late.
            if replication.ping_timeout_ms < 2 * replication.ping_interval_ms {
                return Err(self.err(
                    "replication.ping_timeout_ms",
                    format!(
                        "{} must be at least twice replication.ping_interval_ms ({})",
                        replication.ping_timeout_ms, replication.ping_interval_ms
                    ),
                ));
            }
            if replication.ping_interval_ms < 10 {
                return Err(self.err(
                    "replication.ping_interval_ms",
                    format!(
                        "{} is below the minimum of 10",
                        replication.ping_interval_ms
                    ),
                ));
            }
        }
        let (directory, report_interval_ms) = match raw.directory {
            None => (None, DEFAULT_REPORT_INTERVAL_MS),
            Some(d) => (
                Some(self.address("directory.address", &d.address)?),
                d.report_interval_ms
                    .map(|ms| self.count("directory.report_interval_ms", ms))
                    .transpose()?
                    .unwrap_or(DEFAULT_REPORT_INTERVAL_MS),
            ),
        };
        if directory.is_some() && peers.is_empty() {
            return Err(self.err(
                "directory.address",
                "a directory needs peers: a standalone disk has nothing to switch to",
            ));
        }
        Ok(Config {
            path: self.path.to_path_buf(),
            resource,
            node,
            directory,
            report_interval_ms,
            secret_file: raw.security.map(|s| s.secret_file),
            peers,
            replication,
            metrics_listen: raw
                .metrics
                .map(|m| self.address("metrics.listen", &m.listen))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests;
