//! The control socket between `vmsyncctl` and `vmsyncd`.
//!
//! One JSON object per line each way: a [`Request`], then a [`Response`].
//!
//! Access: the socket file is mode 0600 (0660 with `node.control_group`),
//! created so that it never exists with a wider mode; and every connection's
//! peer credentials (SO_PEERCRED) are checked again, so a socket file that
//! was made reachable by mistake (a chmod, a bind mount) still only serves
//! root, the daemon's own user and the control group. A client that does
//! not send its request within [`REQUEST_TIMEOUT`] is dropped.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ControlGroup;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line the daemon accepts; anything longer is garbage.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// How long a client has to send its request line; `vmsyncctl` sends it at
/// once. An idle connection would otherwise hold a task and a descriptor
/// for ever.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Stop the daemon; without `force` refused while the device is open.
    Shutdown {
        force: bool,
    },
    Promote {
        force: bool,
    },
    Demote {
        force: bool,
    },
    /// Compare every block with every up-to-date peer; with `repair`,
    /// resync what differs from the primary's copy.
    Verify {
        repair: bool,
    },
    /// Full resync from the primary (this node's data is not trusted).
    Invalidate,
    /// The split-brain victim: drop this node's own changes and resync.
    DiscardMyData,
    /// Take one peer's link down and keep it down (by name or id).
    Disconnect {
        peer: String,
    },
    /// Let a peer's link come up again.
    Connect {
        peer: String,
    },
    /// Re-read the configuration file and apply what changed.
    Adjust,
    /// Grow to the configuration file's `[resource] size` (the daemon
    /// restarts itself under the device; see `node::resize`).
    Resize {
        assume_clean: bool,
    },
    /// Stream state changes (see `events`); with `now`, only the present
    /// state, then the connection ends.
    Events {
        #[serde(default)]
        now: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            error: None,
            status: None,
            message: Some(message.into()),
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(error.into()),
            status: None,
            message: None,
        }
    }

    pub fn status(status: Status) -> Self {
        Response {
            ok: true,
            error: None,
            status: Some(status),
            message: None,
        }
    }
}

/// What `vmsyncctl status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub resource: String,
    pub node_id: u32,
    pub node: String,
    /// "standalone", "primary" or "secondary".
    pub role: String,
    /// `/dev/ublkbN` while the device is exposed.
    pub device: Option<String>,
    pub size: u64,
    pub term: u64,
    /// "clean" or "unclean": the persisted flag (unclean while in use).
    pub metadata: String,
    /// How the previous run ended: "clean" or "crash".
    pub last_shutdown: String,
    /// Extents resynced or marked stale because of an unclean previous stop.
    pub recovered_extents: u64,
    pub disk: String,
    pub peers: Vec<PeerStatus>,
    /// The directory's address, when one is configured.
    #[serde(default)]
    pub directory: Option<String>,
    /// Writes are refused: the directory handed out a newer term.
    #[serde(default)]
    pub fenced: bool,
    /// Blocks this node lacks after a machine switch and their background
    /// sync (all zero when it holds every block).
    #[serde(default)]
    pub sync: SyncStatus,
    /// The last (or running) online verify since the daemon started.
    #[serde(default)]
    pub verify: VerifyStatus,
    /// Set when this daemon restarted to grow (`vmsyncctl resize`) and
    /// could not: why. It serves the size it had.
    #[serde(default)]
    pub resize_error: Option<String>,
}

/// Progress of `vmsyncctl verify` (on the primary).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyStatus {
    /// "none" (never ran), "running", "done" or "failed".
    pub state: String,
    /// Whether differing blocks are resynced from the primary.
    pub repair: bool,
    /// Bytes compared so far, over every peer compared with.
    pub bytes_done: u64,
    /// Bytes to compare: the device size times the peers compared with.
    pub total_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
    /// Blocks found differing so far (while running: candidates still to be
    /// checked again after a barrier; when done: confirmed).
    pub differing_blocks: u64,
    /// Unix time (seconds) the run started and finished.
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub last_error: Option<String>,
}

/// The local replica's missing blocks and the background sync pulling them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    /// "none" (nothing missing), "syncing" or "paused" (missing, not pulling:
    /// e.g. a secondary waiting for its primary to resend them).
    pub state: String,
    /// Bytes this node lacks and must fetch.
    pub stale_bytes: u64,
    /// Bytes fetched since the promotion (on demand and in the background).
    pub fetched_bytes: u64,
    /// Bytes a holder found identical by hash (nothing sent).
    pub same_bytes: u64,
    /// Guest I/Os that had to wait for a fetch.
    pub on_demand_fetches: u64,
    pub rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub id: u32,
    pub name: String,
    pub address: String,
    /// "lan" or "wan".
    pub link: String,
    pub connected: bool,
    /// The operator took this link down (`vmsyncctl disconnect`).
    #[serde(default)]
    pub disconnected_by_operator: bool,
    /// On a primary: "up-to-date", "resyncing", "behind", "failed" (its
    /// backing device failed), "connected" or "disconnected"; on a
    /// secondary: "primary", "secondary" or "disconnected".
    pub state: String,
    pub protocol: String,
    /// Bytes this peer lacks (set bits × block size).
    pub stale_bytes: u64,
    pub resync_rate_bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
    /// Bytes resent by resync to this peer since the daemon started.
    pub resynced_bytes: u64,
    /// Guest write bytes mirrored to this peer as they happened, since the
    /// daemon started.
    #[serde(default)]
    pub replicated_bytes: u64,
    /// Of those, the bytes sent in records sealed once for every peer (a
    /// write mirrored to two or more peers) rather than by this link.
    #[serde(default)]
    pub shared_record_bytes: u64,
    /// Bytes the data connection handed to the kernel zero-copy (records as
    /// on the wire; see `replication.zero_copy_send`).
    #[serde(default)]
    pub zero_copy_bytes: u64,
    /// Bytes queued for this peer and not yet handed to its socket.
    #[serde(default)]
    pub send_queue_bytes: u64,
    /// Why the last link to this peer failed (e.g. a split brain), if it did.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The lazy push, for a WAN peer (another LAN group); absent for LAN peers.
    #[serde(default)]
    pub wan: Option<WanPushStatus>,
}

/// The lazy push to one WAN peer (`replication::wan`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WanPushStatus {
    /// Bytes the peer lacks (as the peer's `stale_bytes`).
    pub stale_bytes: u64,
    /// `[replication] wan_rate`, bytes per second on the wire (0: unlimited).
    pub budget_bytes_per_sec: u64,
    /// Bytes per second the current push pass puts on the wire (0 when idle).
    pub push_rate_bytes_per_sec: u64,
    /// Bytes the push put on the wire since the daemon started.
    pub pushed_wire_bytes: u64,
    /// Stale bytes found identical on the peer by hash, so not sent.
    pub saved_by_hash_bytes: u64,
    /// Bytes compression kept off the wire.
    pub saved_by_compression_bytes: u64,
    /// Seconds until the peer is current at the present pace, if pushing.
    pub eta_seconds: Option<u64>,
    /// The member of the peer's LAN group it reads its blocks from (the
    /// group's postmaster), when that is another node; absent when the
    /// peer gets the data itself.
    #[serde(default)]
    pub postmaster: Option<String>,
    /// Bytes the peer got by reference from its postmaster (over its LAN,
    /// not the WAN) since the daemon started.
    #[serde(default)]
    pub relayed_bytes: u64,
}

/// Sends one request to the daemon listening at `socket`.
pub async fn call(socket: &Path, request: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply from the daemon: {e}"),
        )
    })
}

/// Binds the control socket, replacing a stale socket file left by a dead
/// daemon but refusing to steal one a live daemon still answers on.
///
/// The socket is bound under a temporary name, given its mode (0600, or
/// 0660 and `group`) and only then renamed into place, so no client can
/// connect while it is more open than that.
pub async fn bind(socket: &Path, group: Option<&ControlGroup>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", socket.display()),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = socket
        .file_name()
        .ok_or_else(|| std::io::Error::other("the control socket path has no file name"))?;
    let mut staging_name = std::ffi::OsString::from(".");
    staging_name.push(name);
    staging_name.push(format!(".{}.tmp", std::process::id()));
    let staging = socket.with_file_name(staging_name);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let placed = (|| {
        let mode = match group {
            Some(g) => {
                nix::unistd::chown(&staging, None, Some(nix::unistd::Gid::from_raw(g.gid)))
                    .map_err(std::io::Error::from)?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staging, socket)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

/// Whether the process at the other end of `stream` may use the control
/// socket: root, the daemon's own user, or a member of `group`.
pub async fn authorize(stream: &UnixStream, group: Option<&ControlGroup>) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the client's credentials: {e}"))?;
    let (uid, gid) = (cred.uid(), cred.gid());
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Ok(());
    }
    if let Some(group) = group {
        if gid == group.gid {
            return Ok(());
        }
        // A supplementary member: the group's member list names the user.
        // User and group look-ups may block (NSS): not on a runtime thread.
        let group = group.clone();
        let member = tokio::task::spawn_blocking(move || {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()?;
            let members = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(group.gid))
                .ok()
                .flatten()?
                .mem;
            Some(members.contains(&user.name))
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
        if member {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: uid {uid} may not use this control socket (root, the daemon's user{})",
        if group.is_some() {
            " or node.control_group"
        } else {
            ""
        }
    ))
}

/// Reads one request from a control connection. Garbage yields an error
/// response for that connection only.
pub async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let (read, _) = stream.split();
    let mut line = String::new();
    let mut limited = tokio::io::AsyncReadExt::take(BufReader::new(read), MAX_REQUEST_BYTES);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| format!("no request within {} s; closing", REQUEST_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot read request: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
}

/// Writes the response line.
pub async fn write_response(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response)?;
    line.push(b'\n');
    stream.write_all(&line).await
}
