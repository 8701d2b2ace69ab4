//! Keeping a link to every peer, and deciding what runs on it.
//!
//! The node with the lower id dials, the other accepts, so each pair has one
//! link; a link is a data and a meta connection. Once both are up, each side
//! sends its `State` on meta, and the pair of roles decides the session:
//! primary → secondary runs [`super::source`] here and [`super::target`]
//! there; two secondaries just keep the link alive. Any error, or a role
//! change on either side, ends the session; the link is then re-established
//! with backoff, forever.

use std::sync::Arc;
use std::time::Duration;

use protocol::{Channel, DiskState, GenerationIds, Message, Role};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::liveness::{self, Due, Liveness};
use super::peer::PeerReplica;
use super::transport::{self, Connection, FrameReader, FrameWriter, LinkError, LocalIdentity};
use super::Replication;
use protocol::gate::{HandshakeGate, LogRefusal, DEFAULT_MAX_PENDING_HANDSHAKES};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long was a working link: reconnect quickly.
const SESSION_SETTLED: Duration = Duration::from_secs(2);

/// What the peer announced when the link came up.
#[derive(Debug, Clone, Copy)]
pub struct PeerState {
    pub role: Role,
    pub term: u64,
    pub generation: GenerationIds,
    pub disk_state: DiskState,
    pub size: u64,
    /// Its generation holds no writes yet (see `Message::State`).
    pub unwritten: bool,
}

/// Both connections of an established link.
pub struct Link {
    pub data_reader: FrameReader,
    pub data_writer: FrameWriter,
    pub meta_reader: FrameReader,
    pub meta_writer: FrameWriter,
}

/// Connections the directory opened to this node (it asks a primary to
/// demote); the node serves them.
pub type IncomingConnections = mpsc::Receiver<Connection>;

/// Binds the listener and starts a link task per peer. Returns the
/// directory's connections, for the node to serve.
pub async fn start(repl: Arc<Replication>) -> anyhow::Result<IncomingConnections> {
    // The kernel's own dead-peer detection on every socket to a peer
    // follows the same timeout as the pings (see `liveness`).
    transport::set_dead_peer_timeout(liveness::ping_timeout(&repl.tunables()));
    protocol::zerocopy::set_zero_copy_send(repl.tunables().zero_copy_send);
    let identity = LocalIdentity {
        resource: repl.config.resource.name.clone(),
        node_id: repl.config.node.id,
        secret: Arc::new(repl.config.read_secret()?),
    };
    let listen = repl
        .config
        .node
        .listen
        .ok_or_else(|| anyhow::anyhow!("node.listen is required with peers"))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "listening for peers");

    let (directory_tx, directory_rx) = mpsc::channel(4);
    let router = Arc::new(Router {
        repl: Arc::clone(&repl),
        links: std::sync::RwLock::new(Vec::new()),
        directory: repl.config.directory.is_some().then_some(directory_tx),
    });
    let links = LinkStarter {
        identity: identity.clone(),
        router: Arc::clone(&router),
    };
    for peer in repl.peers.load().iter() {
        links.start(Arc::clone(peer));
    }
    repl.set_link_starter(links);
    tokio::spawn(accept_loop(listener, identity, router).in_current_span());
    Ok(directory_rx)
}

/// Starts link tasks: at start for every configured peer, and for a peer
/// `vmsyncctl adjust` adds.
pub struct LinkStarter {
    identity: LocalIdentity,
    router: Arc<Router>,
}

impl LinkStarter {
    /// Routes `peer`'s connections to a new link task, which keeps the link
    /// up until the peer is removed (`AdminSwitch::remove`).
    pub fn start(&self, peer: Arc<PeerReplica>) {
        let (tx, rx) = mpsc::channel(8);
        let id = peer.id();
        self.router.add_link(id, tx);
        // Inside the node's span (resource, node), naming the peer.
        let span = tracing::info_span!("link", peer = %peer.config.name);
        let router = Arc::clone(&self.router);
        let repl = Arc::clone(&self.router.repl);
        let identity = self.identity.clone();
        tokio::spawn(
            async move {
                maintain(repl, peer, identity, rx).await;
                router.remove_link(id);
                tracing::info!("peer removed; link task ended");
            }
            .instrument(span),
        );
    }
}

/// Where an authenticated connection goes, by who dialed and which channel.
struct Router {
    repl: Arc<Replication>,
    /// Data and meta connections: the peer's link task (peers come and go
    /// with `vmsyncctl adjust`; held only to look a sender up).
    links: std::sync::RwLock<Vec<(u32, mpsc::Sender<Connection>)>>,
    /// The directory's connections, when one is configured.
    directory: Option<mpsc::Sender<Connection>>,
}

impl Router {
    fn add_link(&self, id: u32, tx: mpsc::Sender<Connection>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.retain(|(peer, _)| *peer != id);
        links.push((id, tx));
    }

    fn remove_link(&self, id: u32) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.retain(|(peer, _)| *peer != id);
    }

    fn link_to(&self, id: u32) -> Option<mpsc::Sender<Connection>> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .find(|(peer, _)| *peer == id)
            .map(|(_, tx)| tx.clone())
    }

    fn knows(&self, id: u32) -> bool {
        self.link_to(id).is_some()
            || (id == protocol::DIRECTORY_NODE_ID && self.directory.is_some())
    }

    async fn route(&self, conn: Connection) {
        let from_directory = conn.peer_id == protocol::DIRECTORY_NODE_ID;
        match (conn.channel, from_directory) {
            (Channel::Directory, true) => {
                if let Some(directory) = &self.directory {
                    let _ = directory.send(conn).await;
                }
            }
            (Channel::Fetch, false) => {
                let peer = conn.peer_id;
                super::holder::serve(Arc::clone(&self.repl), conn)
                    .instrument(tracing::info_span!("holder", peer))
                    .await
            }
            (Channel::Data | Channel::Meta, false) => {
                // The lower id dials: a link connection from a peer we dial
                // ourselves is never read by its link task, so it is closed
                // here rather than left to pile up.
                if self.repl.config.node.id < conn.peer_id {
                    tracing::warn!(
                        peer = conn.peer_id,
                        "link connection from a peer this node dials itself; closed"
                    );
                    return;
                }
                if let Some(link) = self.link_to(conn.peer_id) {
                    // Never wait on a link task that is busy (a full queue):
                    // the newest connection wins, an excess one is closed.
                    if let Err(e) = link.try_send(conn) {
                        tracing::debug!(error = %e, "link connection not taken; closed");
                    }
                }
            }
            (channel, _) => tracing::warn!(
                peer = conn.peer_id,
                ?channel,
                "connection on a channel this node does not serve for it; closed"
            ),
        }
    }
}

async fn accept_loop(listener: TcpListener, identity: LocalIdentity, router: Arc<Router>) {
    let gate = Arc::new(HandshakeGate::new(DEFAULT_MAX_PENDING_HANDSHAKES));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors (a flood), or the like: back off a
                // little; logged within the same limit as refusals.
                log_refusal(&gate, None, &format!("accept failed: {e}"));
                tokio::time::sleep(BACKOFF_START).await;
                continue;
            }
        };
        let Some(slot) = gate.try_enter(from.ip()) else {
            log_refusal(
                &gate,
                Some(from),
                "too many handshakes in progress; closed at once",
            );
            continue;
        };
        let identity = identity.clone();
        let router = Arc::clone(&router);
        let gate = Arc::clone(&gate);
        tokio::spawn(
            async move {
                let accepted = transport::accept(&identity, stream, |id| router.knows(id)).await;
                drop(slot);
                match accepted {
                    Ok(conn) => router.route(conn).await,
                    Err(e) => log_refusal(&gate, Some(from), &e.to_string()),
                }
            }
            .in_current_span(),
        );
    }
}

/// "refused incoming connection", within the gate's rate limit.
fn log_refusal(gate: &HandshakeGate, from: Option<std::net::SocketAddr>, error: &str) {
    if let LogRefusal::Yes { suppressed } = gate.refusal() {
        match from {
            Some(from) => {
                tracing::warn!(%from, error = %error, suppressed_since_last_window = suppressed, "refused incoming connection")
            }
            None => tracing::warn!(
                error = %error,
                suppressed_since_last_window = suppressed,
                "refused incoming connection"
            ),
        }
    }
}

/// Keeps the link to one peer up for the life of the daemon, or until the
/// peer is removed from the configuration.
async fn maintain(
    repl: Arc<Replication>,
    peer: Arc<PeerReplica>,
    identity: LocalIdentity,
    mut incoming: mpsc::Receiver<Connection>,
) {
    let dials = repl.config.node.id < peer.id();
    let mut backoff = BACKOFF_START;
    loop {
        if peer.admin.is_removed() {
            return;
        }
        if !peer.admin.is_up() {
            stay_disconnected(&peer, &mut incoming).await;
            backoff = BACKOFF_START;
            continue;
        }
        let link = tokio::select! {
            link = async {
                if dials {
                    dial(&identity, &peer).await
                } else {
                    wait_for_dialer(&mut incoming).await
                }
            } => link,
            _ = peer.admin.down() => continue,
        };
        match link {
            Ok(link) => {
                tracing::info!("link up");
                // Who may read shared records changes with the links.
                repl.replace_shared_sealer();
                peer.set_last_error(None);
                let started = tokio::time::Instant::now();
                let result = run_session(&repl, &peer, link).await;
                peer.disconnected();
                repl.replace_shared_sealer();
                // The folded-in bits may lie in extents the activity log no
                // longer covers: persist them now, or a crash would lose them.
                if let Err(e) = repl.metadata.flush_bitmaps() {
                    tracing::error!(error = %e, "cannot persist the staleness bitmaps");
                }
                match &result {
                    Ok(()) => tracing::info!("link closed; reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, "link lost; reconnecting");
                        peer.set_last_error(Some(e.to_string()));
                    }
                }
                // A link that keeps failing at once (the peer refuses us,
                // e.g. its operator took it down, or a split brain) is
                // retried with growing backoff, not ten times a second.
                let failed_at_once = result.is_err() && started.elapsed() < SESSION_SETTLED;
                if !failed_at_once {
                    backoff = BACKOFF_START;
                    peer.link_worked();
                }
                tokio::time::sleep(backoff).await;
                if failed_at_once {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, ?backoff, "cannot reach peer");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// While the operator keeps the link down: connections the peer opens are
/// closed at once (it sees them refused and keeps retrying with backoff).
async fn stay_disconnected(peer: &PeerReplica, incoming: &mut mpsc::Receiver<Connection>) {
    tracing::info!("link taken down by the operator");
    loop {
        tokio::select! {
            _ = peer.admin.up() => break,
            conn = incoming.recv() => match conn {
                Some(conn) => drop(conn),
                None => std::future::pending().await,
            },
        }
    }
    tracing::info!("link allowed up again by the operator");
}

async fn dial(identity: &LocalIdentity, peer: &PeerReplica) -> Result<Link, LinkError> {
    let addr = peer.config.address;
    let data = transport::connect(identity, addr, peer.id(), Channel::Data).await?;
    let meta = transport::connect(identity, addr, peer.id(), Channel::Meta).await?;
    Ok(Link {
        data_reader: data.reader,
        data_writer: data.writer,
        meta_reader: meta.reader,
        meta_writer: meta.writer,
    })
}

/// Waits until the dialer has opened both connections (the newest of each).
async fn wait_for_dialer(incoming: &mut mpsc::Receiver<Connection>) -> Result<Link, LinkError> {
    let mut data = None;
    let mut meta = None;
    loop {
        let conn = incoming.recv().await.ok_or(LinkError::Closed)?;
        match conn.channel {
            Channel::Data => data = Some(conn),
            Channel::Meta => meta = Some(conn),
            // Routed elsewhere by the accept loop; never a link's.
            Channel::Fetch | Channel::Directory => continue,
        }
        if let (Some(_), Some(_)) = (&data, &meta) {
            let (d, m) = (data.take().expect("checked"), meta.take().expect("checked"));
            return Ok(Link {
                data_reader: d.reader,
                data_writer: d.writer,
                meta_reader: m.reader,
                meta_writer: m.writer,
            });
        }
    }
}

pub fn our_state(repl: &Replication) -> Message {
    Message::State {
        role: repl.role().role,
        term: repl.known_term(),
        generation: repl.generation(),
        disk_state: repl.disk_state(),
        size: repl.local_size(),
        unwritten: repl.metadata.generation_unwritten(),
    }
}

/// A secondary must hold at least the primary's device. A larger one is
/// linked and replicates the primary's size, keeping the rest to itself:
/// a resize round grows the secondaries first, and each stays mirrored
/// until the primary grows too (its own resize then marks its new area
/// stale for every peer, so the peers' tails get the primary's version).
/// Between two secondaries nothing flows, so their sizes do not matter.
fn check_sizes(our_role: Role, ours: u64, theirs: &PeerState) -> Result<(), LinkError> {
    let (primary, secondary) = match (our_role, theirs.role) {
        (Role::Primary, Role::Secondary) => (ours, theirs.size),
        (Role::Secondary, Role::Primary) => (theirs.size, ours),
        _ => return Ok(()),
    };
    if secondary < primary {
        let whose = if our_role == Role::Primary {
            "the peer's"
        } else {
            "our"
        };
        return Err(LinkError::Violation(format!(
            "{whose} device ({secondary} bytes) is smaller than the primary's ({primary} bytes): \
             refusing to replicate until it is grown (`vmsyncctl resize` on that node)"
        )));
    }
    Ok(())
}

/// Exchanges State and runs the session the two roles call for.
async fn run_session(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    mut link: Link,
) -> Result<(), LinkError> {
    let mut role_changes = repl.subscribe_role();
    let me = *role_changes.borrow_and_update();
    link.meta_writer.send(&our_state(repl)).await?;
    let timeout = liveness::ping_timeout(&repl.tunables());
    let theirs = match tokio::time::timeout(timeout, link.meta_reader.next()).await {
        Ok(Ok(Message::State {
            role,
            term,
            generation,
            disk_state,
            size,
            unwritten,
        })) => PeerState {
            role,
            term,
            generation,
            disk_state,
            size,
            unwritten,
        },
        Ok(Ok(other)) => {
            return Err(LinkError::Violation(format!(
                "expected State, got {}",
                other.message_type()
            )))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(LinkError::Violation("no State from peer".into())),
    };
    // Before anything else: a term we cannot take (it would wrap), or one
    // newer than our tenure as primary (we have been replaced: fenced).
    repl.check_peer_term(theirs.term, &peer.config.name)?;
    check_sizes(me.role, repl.local_size(), &theirs)?;
    if theirs.role == Role::Primary && theirs.term < repl.known_term() {
        return Err(LinkError::Violation(format!(
            "stale primary: peer is primary of term {}, but term {} has been seen",
            theirs.term,
            repl.known_term()
        )));
    }
    repl.observe_term(theirs.term);
    peer.linked(theirs.role);
    tracing::info!(our_role = %me.role, peer_role = %theirs.role, peer_term = theirs.term, peer_disk = %theirs.disk_state, "peer state");
    // A failed disk on either end: the link only carries pings and State
    // (DRBD's detached disk). The primary marks everything in that peer's
    // bitmap (`PeerMode::Failed`) and waits for a restart with a working
    // device.
    if theirs.disk_state == DiskState::Failed && me.role == Role::Primary {
        peer.disk_failed();
        tracing::warn!("peer's backing device failed: not mirroring to it; its bitmap collects every write until it is restarted");
        return idle(repl, peer, link, &mut role_changes).await;
    }
    if repl.disk_state() == DiskState::Failed && me.role == Role::Secondary {
        return idle(repl, peer, link, &mut role_changes).await;
    }
    match (me.role, theirs.role) {
        (Role::Primary, Role::Secondary) => {
            super::source::run(repl, peer, link, theirs, &mut role_changes).await
        }
        (Role::Secondary, Role::Primary) => {
            super::target::run(repl, peer, link, theirs, &mut role_changes).await
        }
        (Role::Secondary, Role::Secondary) => {
            report_split_brain_between_secondaries(repl, peer, &theirs);
            idle(repl, peer, link, &mut role_changes).await
        }
        (Role::Primary, Role::Primary) => Err(LinkError::Violation(
            "split brain: both nodes are primary; demote one of them".into(),
        )),
    }
}

/// Two secondaries whose data diverged: nothing flows between them, but
/// the operator learns it now (`status`, `events`, the log), with what the
/// split-brain policy will do once one of them is promoted.
fn report_split_brain_between_secondaries(
    repl: &Replication,
    peer: &PeerReplica,
    theirs: &PeerState,
) {
    use super::split_brain::{outlook, Side};
    let ours = Side::ours(repl);
    let diverged = ours.generation.current != 0
        && super::source::lineage(ours.generation, theirs.generation, (0, repl.config.node.id))
            == super::source::Lineage::Diverged;
    if !diverged {
        return;
    }
    let outlook = outlook(
        repl.tunables().after_split_brain,
        &ours,
        &Side::theirs(theirs),
    );
    let message = if outlook.starts_with("split brain") {
        outlook
    } else {
        format!("split brain: this node's data and the peer's diverged; {outlook}")
    };
    tracing::warn!("{message}");
    peer.set_last_error(Some(message));
}

/// Nothing to replicate (two secondaries, or a failed disk on one end):
/// keep the link alive until either side's role or state changes.
async fn idle(
    repl: &Replication,
    peer: &Arc<PeerReplica>,
    mut link: Link,
    role_changes: &mut tokio::sync::watch::Receiver<super::RoleState>,
) -> Result<(), LinkError> {
    let mut live = Liveness::new(&repl.tunables(), peer);
    let operator_disconnect = peer.admin.down();
    tokio::pin!(operator_disconnect);
    loop {
        tokio::select! {
            biased;
            msg = link.meta_reader.next() => {
                let msg = msg?;
                live.heard();
                match msg {
                    // Liveness only: see `liveness` for why no answer.
                    Message::Ping | Message::PingAck => {}
                    // The peer changed role: start over so the right session runs.
                    Message::State { term, .. } => {
                        repl.check_peer_term(term, &peer.config.name)?;
                        return Ok(());
                    }
                    other => return Err(LinkError::Violation(format!("unexpected {} on a link that replicates nothing", other.message_type()))),
                }
            }
            // Our role changed: drop the link; both sides reconnect and the
            // right session starts.
            _ = role_changes.changed() => return Ok(()),
            _ = &mut operator_disconnect => return Ok(()),
            due = live.due() => match due {
                Due::Ping => link.meta_writer.send(&Message::Ping).await?,
                Due::Dead(e) => return Err(e),
            },
        }
    }
}
