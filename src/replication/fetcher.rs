//! The requester side of on-demand fetch and background sync: a
//! [`BlockSource`] that reads the newest version of a range from a node
//! holding it.
//!
//! Who holds what comes from the handover (see `handover`): a block stale
//! here and clear in what the previous primary reported a peer lacks is
//! held by that peer in its newest version; nothing but this node writes
//! there afterwards, and it never writes a block it lacks without
//! fetching it first. Without a handover, the peers' bitmaps say it. Holders in our LAN group are
//! asked first, then any. A range no single node holds whole is split.
//! When no holder answers, the request is retried until `fetch_timeout`,
//! then fails with EIO and a log line naming the blocks and the nodes
//! that hold them: never stale data.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdev::lazy::{BlockSource, BoxFuture, Fetched};
use blockdev::meta::Bitmap;
use bytes::BytesMut;
use protocol::{Channel, Message};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::peer::PeerReplica;
use super::transport::{self, Connection, LinkError, LocalIdentity};

/// Longest one holder may take to answer one request before the next
/// holder is tried (1 MiB over a slow WAN link, behind a few others).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a connection to a holder may take to set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between rounds over all holders while none answers.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Fetches blocks from peers over `Channel::Fetch` connections.
pub struct Fetcher {
    identity: LocalIdentity,
    lan_group: String,
    /// Each peer, and the blocks it lacks (so cannot be asked for).
    peers: Vec<(Arc<PeerReplica>, Arc<Bitmap>)>,
    /// One connection per holder, opened on first use, replaced when it
    /// fails.
    sessions: Mutex<HashMap<u32, Arc<Session>>>,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    next_id: AtomicU64,
}

impl Fetcher {
    pub fn new(
        identity: LocalIdentity,
        lan_group: String,
        peers: Vec<(Arc<PeerReplica>, Arc<Bitmap>)>,
        timeout: Duration,
    ) -> Fetcher {
        Fetcher {
            identity,
            lan_group,
            peers,
            sessions: Mutex::new(HashMap::new()),
            timeout,
            runtime: tokio::runtime::Handle::current(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Peers holding every block of the range, nearest first.
    fn holders(&self, offset: u64, len: u64) -> Vec<Arc<PeerReplica>> {
        let mut holders: Vec<_> = self
            .peers
            .iter()
            .filter(|(_, lacks)| !lacks.any_in_bytes(offset, len))
            .map(|(p, _)| Arc::clone(p))
            .collect();
        // Same LAN group first, then linked peers (likely up) first.
        holders.sort_by_key(|p| (p.config.lan_group != self.lan_group, !p.is_connected()));
        holders
    }

    /// The newest data of the range, or why no holder gave it.
    async fn fetch_once(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        hash: Option<[u8; 32]>,
    ) -> Result<Fetched, String> {
        let holders = self.holders(offset, len);
        if holders.is_empty() {
            let block = self.block_size();
            if len <= block {
                return Err(format!(
                    "no node holds the newest version of block {}",
                    offset / block
                ));
            }
            // Different blocks, different holders: halve the range.
            let half = (len / 2).div_ceil(block) * block;
            let first = Box::pin(self.fetch_once(offset, half, None)).await?;
            let second = Box::pin(self.fetch_once(offset + half, len - half, None)).await?;
            let (Fetched::Data(a), Fetched::Data(b)) = (first, second) else {
                return Err("a holder answered \"same\" without a hash".into());
            };
            let mut joined = BytesMut::with_capacity(len as usize);
            joined.extend_from_slice(&a);
            joined.extend_from_slice(&b);
            return Ok(Fetched::Data(joined.freeze()));
        }
        let mut errors = Vec::new();
        for holder in holders {
            match self.ask(&holder, offset, len, hash).await {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    tracing::debug!(holder = %holder.config.name, offset, len, error = %e, "holder did not answer; trying the next");
                    errors.push(format!("{}: {e}", holder.config.name));
                }
            }
        }
        Err(errors.join("; "))
    }

    fn block_size(&self) -> u64 {
        self.peers
            .first()
            .map_or(4096, |(_, lacks)| u64::from(lacks.block_size()))
    }

    /// One request to one holder.
    async fn ask(
        &self,
        holder: &PeerReplica,
        offset: u64,
        len: u64,
        hash: Option<[u8; 32]>,
    ) -> Result<Fetched, String> {
        let session = self.session(holder.id(), holder.config.address).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Message::ReadRequest {
            id,
            offset,
            len: len as u32,
            hash,
        };
        match session.request(id, request).await? {
            Message::ReadReply {
                offset: at, data, ..
            } if at == offset && data.len() as u64 == len => Ok(Fetched::Data(data)),
            Message::ReadSame {
                offset: at, len: l, ..
            } if at == offset && u64::from(l) == len => match hash {
                Some(_) => Ok(Fetched::Same),
                None => Err("answered \"same\" to a request without a hash".into()),
            },
            Message::ReadError { errno, .. } => Err(format!(
                "holder refused: {}",
                io::Error::from_raw_os_error(errno)
            )),
            other => {
                session.kill();
                Err(format!(
                    "answer {:?} does not match the request {offset}+{len}",
                    other.message_type()
                ))
            }
        }
    }

    /// `holder`'s copy of the range (the WAN relay: a postmaster's data,
    /// read over the LAN).
    pub async fn read_from(
        &self,
        holder: &PeerReplica,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, String> {
        match self.ask(holder, offset, len, None).await? {
            Fetched::Data(data) => Ok(data),
            Fetched::Same => Err("answered \"same\" to a request without a hash".into()),
        }
    }

    /// Online verify: `None` when `peer`'s copy of the range hashes to
    /// `hash`, else its data.
    pub async fn compare_with(
        &self,
        peer: &PeerReplica,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    ) -> Result<Option<bytes::Bytes>, String> {
        match self.ask(peer, offset, len, Some(hash)).await? {
            Fetched::Same => Ok(None),
            Fetched::Data(data) => Ok(Some(data)),
        }
    }

    /// The BLAKE3 hash of each `granule`-byte piece of `peer`'s copy of
    /// the range (the WAN push skips pieces that match, see `wan`).
    pub async fn hashes(
        &self,
        peer: &PeerReplica,
        offset: u64,
        len: u64,
        granule: u32,
    ) -> Result<Vec<[u8; 32]>, String> {
        let session = self.session(peer.id(), peer.config.address).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Message::HashRequest {
            id,
            offset,
            len: len as u32,
            granule,
        };
        let pieces = len.div_ceil(u64::from(granule)) as usize;
        match session.request(id, request).await? {
            Message::HashReply {
                offset: at, hashes, ..
            } if at == offset && hashes.len() == pieces * 32 => Ok(hashes
                .chunks_exact(32)
                .map(|h| h.try_into().expect("32-byte chunks"))
                .collect()),
            Message::ReadError { errno, .. } => Err(format!(
                "peer refused: {}",
                io::Error::from_raw_os_error(errno)
            )),
            other => {
                session.kill();
                Err(format!(
                    "answer {:?} does not match the hash request {offset}+{len}",
                    other.message_type()
                ))
            }
        }
    }

    /// The live session to `peer`, connecting if there is none.
    async fn session(&self, peer: u32, address: SocketAddr) -> Result<Arc<Session>, String> {
        if let Some(session) = self.lock_sessions().get(&peer) {
            if session.is_alive() {
                return Ok(Arc::clone(session));
            }
        }
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::connect(&self.identity, address, peer, Channel::Fetch),
        )
        .await
        .map_err(|_| format!("no connection to {address} within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let session = Session::start(conn);
        self.lock_sessions().insert(peer, Arc::clone(&session));
        Ok(session)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names the nodes that hold the range, for the error log.
    fn describe_holders(&self, offset: u64, len: u64) -> String {
        let names: Vec<String> = self
            .holders(offset, len)
            .iter()
            .map(|p| format!("{} ({})", p.config.name, p.config.address))
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// The [`BlockSource`] the fetch layer is given.
pub struct NetSource(pub Arc<Fetcher>);

impl BlockSource for NetSource {
    fn fetch(
        &self,
        offset: u64,
        len: u64,
        local_hash: Option<[u8; 32]>,
    ) -> BoxFuture<'_, io::Result<Fetched>> {
        let this = Arc::clone(&self.0);
        // The network needs the runtime, whoever polls us.
        let work = self.0.runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + this.timeout;
            loop {
                match this.fetch_once(offset, len, local_hash).await {
                    Ok(fetched) => return Ok(fetched),
                    Err(why) if tokio::time::Instant::now() >= deadline => {
                        let block = this.block_size();
                        tracing::error!(
                            first_block = offset / block,
                            blocks = len.div_ceil(block),
                            holders = this.describe_holders(offset, len),
                            error = why,
                            "cannot fetch blocks this node lacks within fetch_timeout: failing the I/O"
                        );
                        return Err(io::Error::other(format!(
                            "no holder of {offset}+{len} answered: {why}"
                        )));
                    }
                    Err(why) => {
                        tracing::warn!(offset, len, error = why, "fetch failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
        Box::pin(async move {
            work.await
                .unwrap_or_else(|e| Err(io::Error::other(format!("fetch task failed: {e}"))))
        })
    }
}

/// One connection to a holder: requests go out through a writer task,
/// answers come back in any order and are matched by id.
struct Session {
    outgoing: mpsc::UnboundedSender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    dead: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Session {
    fn start(conn: Connection) -> Arc<Session> {
        let Connection {
            mut reader, writer, ..
        } = conn;
        let (outgoing, rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            outgoing,
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let pumping = Arc::clone(&session);
        let pump = tokio::spawn(
            async move {
                let _ = writer.pump(rx).await;
                pumping.kill();
            }
            .in_current_span(),
        );
        let reading = Arc::clone(&session);
        let read = tokio::spawn(async move {
            loop {
                let answer = match reader.next().await {
                    Ok(answer) => answer,
                    Err(LinkError::Closed) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch connection failed");
                        break;
                    }
                };
                let id = match &answer {
                    Message::ReadReply { id, .. }
                    | Message::ReadSame { id, .. }
                    | Message::ReadError { id, .. }
                    | Message::HashReply { id, .. } => *id,
                    other => {
                        tracing::warn!(message = %other.message_type(), "holder sent something other than an answer");
                        break;
                    }
                };
                let waiter = reading
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(answer);
                }
            }
            reading.kill();
        });
        session
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([pump, read]);
        session
    }

    fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }

    /// Marks the session dead and fails every request waiting on it.
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            task.abort();
        }
    }

    async fn request(&self, id: u64, request: Message) -> Result<Message, String> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if !self.is_alive() || self.outgoing.send(request).is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err("connection closed".into());
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("connection lost".into()),
            Err(_) => {
                // A holder this slow is treated as gone: the next request
                // opens a fresh connection (or goes to another holder).
                self.kill();
                Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }
}

impl Drop for Fetcher {
    /// Sessions keep themselves alive through their tasks: close them.
    fn drop(&mut self) {
        for session in self.lock_sessions().values() {
            session.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Peer;

    fn peer(id: u32, group: &str, lacks: &[u64]) -> (Arc<PeerReplica>, Arc<Bitmap>) {
        let bitmap = Arc::new(Bitmap::new(64, 4096));
        let config = Peer {
            id,
            name: format!("n{id}"),
            address: "127.0.0.1:9".parse().unwrap(),
            lan_group: group.into(),
        };
        let replica = Arc::new(PeerReplica::new(
            config,
            group == "home",
            Arc::new(Bitmap::new(64, 4096)),
            Arc::new(AtomicBool::new(false)),
            Arc::default(),
        ));
        for &block in lacks {
            bitmap.set_range(block, 1);
        }
        (replica, bitmap)
    }

    fn names(holders: &[Arc<PeerReplica>]) -> Vec<String> {
        holders.iter().map(|p| p.config.name.clone()).collect()
    }

    #[tokio::test]
    async fn holders_are_the_nodes_holding_every_block_nearest_first() {
        let identity = LocalIdentity {
            resource: "r".into(),
            node_id: 1,
            secret: Arc::new(vec![7; 32]),
        };
        let fetcher = Fetcher::new(
            identity,
            "home".into(),
            vec![
                peer(2, "away", &[]),
                peer(3, "home", &[5]),
                peer(4, "home", &[]),
            ],
            Duration::from_secs(1),
        );
        // Block 0: everyone holds it; LAN peers first (in config order).
        assert_eq!(names(&fetcher.holders(0, 4096)), ["n3", "n4", "n2"]);
        // Blocks 4..6: node 3 lacks block 5, so it is no holder of the range.
        assert_eq!(names(&fetcher.holders(4 * 4096, 2 * 4096)), ["n4", "n2"]);
        // A range nobody holds whole is split by `fetch_once`.
        let none = Fetcher::new(
            LocalIdentity {
                resource: "r".into(),
                node_id: 1,
                secret: Arc::new(vec![7; 32]),
            },
            "home".into(),
            vec![peer(2, "home", &[1]), peer(3, "home", &[0])],
            Duration::from_secs(1),
        );
        assert!(none.holders(0, 2 * 4096).is_empty());
        assert_eq!(names(&none.holders(0, 4096)), ["n2"]);
        assert_eq!(names(&none.holders(4096, 4096)), ["n3"]);
    }
}
