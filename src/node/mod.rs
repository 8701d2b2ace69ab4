//! The node daemon: one resource on one machine.
//!
//! Start-up order matters for "bad input changes nothing": the configuration,
//! the backing store and the metadata are all checked before anything is
//! written; only then is the metadata marked in use and the device exposed.
//!
//! A node without peers is a standalone disk: its device is always exposed.
//! A node with peers starts as secondary (no device) and is made primary
//! with `vmsyncctl promote`.

mod adjust;
mod events;
mod frontend;
mod resize;
mod service;
mod status;
mod switch;

use std::sync::Arc;

use anyhow::Context;
use blockdev::meta::{Expect, Metadata};
use blockdev::{BackingOptions, BackingStore, BlockDevice};
use protocol::Role;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Mutex};
use tracing::Instrument;

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::directory::client::{DirectoryClient, Member};
use crate::events::EventBus;
use crate::metrics::{IoMetrics, Metered};
use crate::replication::invalidate::GiveUp;
use crate::replication::{ReplicatedDevice, Replication};
use frontend::Frontend;
pub use resize::{Exit, Grow};

/// A running node.
pub struct Node {
    config: Config,
    metadata: Arc<Metadata>,
    backing: Arc<BackingStore>,
    /// None for a standalone disk.
    replication: Option<Arc<Replication>>,
    frontend: Mutex<Option<Frontend>>,
    last_shutdown_clean: bool,
    recovered_extents: u64,
    shutdown: watch::Sender<bool>,
    /// The directory, when `[directory]` is configured: it decides
    /// promotions and keeps the primary's reports.
    directory: Option<DirectoryClient>,
    /// One report to the directory at a time (periodic or final).
    report_lock: Mutex<()>,
    /// State changes, for `vmsyncctl events`.
    events: Arc<EventBus>,
    /// Guest I/O counters and latencies, when `[metrics] listen` is set.
    io_metrics: Option<Arc<IoMetrics>>,
    /// Control connections being served: the daemon lets them finish (the
    /// `shutdown` answer, an events stream's `destroy` line) before it
    /// exits, or their clients would see a cut connection.
    control_clients: watch::Sender<usize>,
    /// Set by `vmsyncctl resize`: the run loop replaces this process by one
    /// that grows (see `resize`).
    restart: std::sync::Mutex<Option<Grow>>,
    /// Why this daemon, started to grow, could not (it serves the old size).
    resize_error: Option<String>,
}

impl Node {
    /// Opens the backing store and metadata, refusing (and writing nothing)
    /// when either does not match the configuration.
    /// With `grow` (a daemon that restarted itself for `vmsyncctl resize`),
    /// the metadata is first grown to the configured size.
    pub fn open(mut config: Config, grow: Option<Grow>) -> anyhow::Result<Arc<Node>> {
        let resize_error = grow.and_then(|grow| resize::grow_metadata_at_start(&mut config, grow));
        let backing = BackingStore::open(
            &config.node.backing,
            config.resource.size,
            BackingOptions {
                direct_io: config.node.direct_io,
            },
        )?;
        let expect = Expect::new(
            config.resource.name.clone(),
            config.resource.size,
            config.node.id,
        );
        let metadata = Arc::new(Metadata::open(&config.node.metadata, &expect)?);
        let recovery = metadata.recovery();
        let last_shutdown_clean = !recovery.was_unclean;
        let recovered_extents = recovery.al_extents.len() as u64;
        if !last_shutdown_clean {
            tracing::warn!(
                extents = recovered_extents,
                "previous run did not stop cleanly; activity-log extents marked stale for peers"
            );
        }
        let backing = Arc::new(backing);
        let events = Arc::new(EventBus::default());
        let replication = (!config.is_standalone()).then(|| {
            Replication::new(
                config.clone(),
                Arc::clone(&metadata),
                Arc::clone(&backing),
                Arc::clone(&events),
            )
        });
        let (shutdown, _) = watch::channel(false);
        let directory = match (config.directory, config.node.listen) {
            (Some(address), Some(listen)) => Some(DirectoryClient::new(
                address,
                crate::replication::transport::LocalIdentity {
                    resource: config.resource.name.clone(),
                    node_id: config.node.id,
                    secret: Arc::new(config.read_secret()?),
                },
                Member {
                    name: config.node.name.clone(),
                    address: listen,
                    lan_group: config.node.lan_group.clone(),
                    size: config.resource.size,
                },
            )),
            _ => None,
        };
        Ok(Arc::new(Node {
            metadata,
            backing,
            replication,
            frontend: Mutex::new(None),
            last_shutdown_clean,
            recovered_extents,
            shutdown,
            directory,
            report_lock: Mutex::new(()),
            events,
            io_metrics: config
                .metrics_listen
                .map(|_| Arc::new(IoMetrics::default())),
            control_clients: watch::channel(0).0,
            restart: std::sync::Mutex::new(None),
            resize_error,
            config,
        }))
    }

    /// Exposes the top of the stack (the caller holds the frontend lock).
    async fn expose(&self, slot: &mut Option<Frontend>) -> anyhow::Result<String> {
        let frontend = match &self.replication {
            None => self.start_frontend(Arc::clone(&self.backing)).await?,
            Some(r) => {
                self.start_frontend(Arc::new(ReplicatedDevice(Arc::clone(r))))
                    .await?
            }
        };
        let path = frontend.path();
        *slot = Some(frontend);
        self.announce_device(Some(&path));
        Ok(path)
    }

    /// Serves `device` (with the metrics layer on top when metrics are on).
    async fn start_frontend<D: BlockDevice>(&self, device: Arc<D>) -> anyhow::Result<Frontend> {
        let resource = &self.config.resource.name;
        let socket = self.config.node.block_socket.as_ref();
        let queues = self.config.node.ublk_queues;
        let zero_copy = self.config.node.ublk_zero_copy;
        match &self.io_metrics {
            Some(metrics) => {
                let metered = Metered::new(device, Arc::clone(metrics));
                Frontend::start(Arc::new(metered), resource, queues, zero_copy, socket).await
            }
            None => Frontend::start(device, resource, queues, zero_copy, socket).await,
        }
    }

    /// The text of one Prometheus scrape.
    async fn render_metrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        crate::metrics::snapshot::register(&mut registry, &self.status().await);
        if let Some(io) = &self.io_metrics {
            io.register(&mut registry);
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        text
    }

    async fn promote(&self, force: bool) -> Result<String, String> {
        let Some(repl) = &self.replication else {
            return Err("this node has no peers: it is a standalone disk, always exposed".into());
        };
        let mut slot = self.frontend.lock().await;
        let (state, note) = if self.directory.is_some() {
            self.promote_through_directory(repl, force).await?
        } else {
            settle_demoted_peers(repl).await;
            let state = repl.promote(force)?;
            // Blocks a switch left missing here (a previous promotion by the
            // directory whose background sync did not finish).
            repl.start_fetching(Vec::new())
                .map_err(|e| format!("cannot fetch the blocks this node lacks: {e:#}"))?;
            (state, String::new())
        };
        match self.expose(&mut slot).await {
            Ok(path) => Ok(format!(
                "primary (term {}), device {path}{note}",
                state.term
            )),
            Err(e) => {
                let _ = repl.demote().await;
                let _ = self.report_demotion(repl).await;
                Err(format!(
                    "promoted, but the device could not be exposed: {e:#}; demoted again"
                ))
            }
        }
    }

    async fn demote(&self, force: bool) -> Result<String, String> {
        let Some(repl) = &self.replication else {
            return Err("this node has no peers: it is a standalone disk, always exposed".into());
        };
        let mut slot = self.frontend.lock().await;
        let was_primary = repl.role().role == Role::Primary;
        self.remove_device(&mut slot, force).await?;
        let lagging = repl.demote().await.map_err(|e| format!("demote: {e}"))?;
        let unreported = if was_primary {
            self.report_demotion(repl).await
        } else {
            None
        };
        let mut message = if lagging.is_empty() {
            "secondary; every peer holds every write".to_string()
        } else {
            format!(
                "secondary; not up to date (do not promote before they resync): {}",
                lagging.join(", ")
            )
        };
        if let Some(note) = unreported {
            message.push_str("; ");
            message.push_str(&note);
        }
        Ok(message)
    }

    /// Online verify (see `replication::verify`); the answer names every
    /// differing range.
    async fn verify(&self, repair: bool) -> Result<String, String> {
        let Some(repl) = &self.replication else {
            return Err("this node has no peers: nothing to verify against".into());
        };
        let results = repl.verify(repair).await?;
        let lines: Vec<String> = results
            .iter()
            .map(|peer| {
                let mut line = if peer.differing.is_empty() {
                    format!("{}: identical", peer.name)
                } else {
                    let ranges: Vec<String> = peer
                        .differing
                        .iter()
                        .map(|(offset, len)| format!("{offset}+{len}"))
                        .collect();
                    format!(
                        "{}: {} bytes differ{}: {}",
                        peer.name,
                        peer.differing_bytes(),
                        if repair { " (resyncing from here)" } else { "" },
                        ranges.join(", ")
                    )
                };
                if let Some(e) = &peer.error {
                    line.push_str(&format!(" (not compared: {e})"));
                }
                line
            })
            .collect();
        Ok(lines.join("\n"))
    }

    /// `invalidate` / `discard-my-data` (see `replication::invalidate`).
    fn give_up_data(&self, what: GiveUp) -> Result<String, String> {
        match &self.replication {
            Some(repl) => repl.give_up_data(what),
            None => Err("this node has no peers: there is no other copy to resync from".into()),
        }
    }

    /// `connect` / `disconnect` of one peer (see `replication::admin`).
    fn set_link(&self, name_or_id: &str, up: bool) -> Result<String, String> {
        let Some(repl) = &self.replication else {
            return Err("this node has no peers".into());
        };
        let peer = repl.peer_named(name_or_id)?;
        let name = &peer.config.name;
        Ok(match (peer.admin.set(up), up) {
            (true, true) => format!("link to {name} allowed up; connecting"),
            (true, false) => format!(
                "link to {name} taken down{}",
                if repl.role().role == Role::Primary {
                    "; its missed writes are tracked for a resync on connect"
                } else {
                    ""
                }
            ),
            (false, true) => format!("link to {name} was not taken down"),
            (false, false) => format!("link to {name} is already down"),
        })
    }

    /// Stops cleanly: device removed, data flushed, metadata marked clean.
    async fn stop(&self, force: bool) -> Result<(), String> {
        let mut slot = self.frontend.lock().await;
        self.remove_device(&mut slot, force).await?;
        if let Some(repl) = &self.replication {
            let was_primary = repl.role().role == Role::Primary;
            repl.demote().await.map_err(|e| format!("demote: {e}"))?;
            if was_primary {
                self.report_demotion(repl).await;
            }
        }
        // A failed disk is no longer used, not even flushed: the metadata
        // already says this replica must be resynced.
        let disk_failed = self
            .replication
            .as_ref()
            .is_some_and(|r| r.disk_state() == protocol::DiskState::Failed);
        if !disk_failed {
            self.backing
                .flush()
                .await
                .map_err(|e| format!("flushing the backing store: {e}"))?;
        }
        self.metadata
            .mark_clean()
            .map_err(|e| format!("marking the metadata clean: {e}"))?;
        self.shutdown.send_replace(true);
        Ok(())
    }

    async fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::Status => return Response::status(self.status().await),
            Request::Shutdown { force } => self.stop(force).await.map(|()| "stopped".to_string()),
            Request::Promote { force } => self.promote(force).await,
            Request::Demote { force } => self.demote(force).await,
            Request::Verify { repair } => self.verify(repair).await,
            Request::Invalidate => self.give_up_data(GiveUp::Invalidate),
            Request::DiscardMyData => self.give_up_data(GiveUp::DiscardMyData),
            Request::Disconnect { peer } => self.set_link(&peer, false),
            Request::Connect { peer } => self.set_link(&peer, true),
            Request::Adjust => self.adjust(),
            Request::Resize { assume_clean } => self.resize(Grow { assume_clean }).await,
            Request::Events { .. } => Err("events streams on a connection of its own".into()),
        };
        match result {
            Ok(message) => Response::ok(message),
            Err(e) => Response::error(e),
        }
    }

    async fn serve_control_connection(self: Arc<Self>, mut stream: UnixStream) {
        self.control_clients.send_modify(|n| *n += 1);
        let _served = ControlClientGuard(&self.control_clients);
        let allowed = control::authorize(&stream, self.config.node.control_group.as_ref()).await;
        if let Err(e) = allowed {
            tracing::warn!(error = %e, "control connection refused");
            // Let the (bounded, timed) request arrive first, so the client
            // reads our answer instead of a broken pipe; never act on it.
            let _ = control::read_request(&mut stream).await;
            let _ = control::write_response(&mut stream, &Response::error(e)).await;
            return;
        }
        let response = match control::read_request(&mut stream).await {
            Ok(Request::Events { now }) => return self.stream_events(stream, now).await,
            Ok(request) => {
                tracing::debug!(?request, "control request");
                self.handle(request).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad control request");
                Response::error(e)
            }
        };
        if let Err(e) = control::write_response(&mut stream, &response).await {
            tracing::debug!(error = %e, "control client went away");
        }
    }

    /// Stops the frontend, if one runs (refused while the device is open,
    /// unless forced).
    async fn remove_device(&self, slot: &mut Option<Frontend>, force: bool) -> Result<(), String> {
        if let Some(frontend) = slot.take() {
            if let Err((frontend, e)) = frontend.stop(force).await {
                *slot = Some(frontend);
                return Err(e);
            }
            self.announce_device(None);
        }
        Ok(())
    }

    fn is_primary(&self) -> bool {
        self.replication
            .as_ref()
            .is_some_and(|r| r.role().role == Role::Primary)
    }
}

/// Runs the daemon until a clean stop.
/// Runs the node until it is stopped, or until `vmsyncctl resize` asks
/// for a restart (the caller then replaces the process; see `resize`).
/// `grow`: this process is that restart.
pub async fn run(config: Config, grow: Option<Grow>) -> anyhow::Result<Exit> {
    let span =
        tracing::info_span!("node", resource = %config.resource.name, node = %config.node.name);
    let _entered = span.enter();
    let socket_path = config.node.control_socket.clone();
    let control_group = config.node.control_group.clone();
    // Bound before the metadata is opened: a taken port changes nothing.
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(
            crate::metrics::exporter::bind(address)
                .await
                .with_context(|| format!("[metrics] listen {address}"))?,
        ),
        None => None,
    };
    let node = Node::open(config, grow)?;
    if let Err(e) = start_serving(&node).await {
        let _ = node.metadata.mark_clean();
        return Err(e);
    }
    let listener = match control::bind(&socket_path, control_group.as_ref()).await {
        Ok(l) => l,
        Err(e) => {
            let _ = node.stop(true).await;
            return Err(e).with_context(|| format!("control socket {}", socket_path.display()));
        }
    };
    if let Some(listener) = metrics_listener {
        let scraped = Arc::clone(&node);
        let render = move || {
            let node = Arc::clone(&scraped);
            async move { node.render_metrics().await }
        };
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "metrics at http://{address}/metrics");
        }
        tokio::spawn(crate::metrics::exporter::serve(listener, render).in_current_span());
    }
    tracing::info!(socket = %socket_path.display(), primary = node.is_primary(), "vmsyncd ready");
    tokio::spawn(Arc::clone(&node).report_progress().in_current_span());
    if service::is_managed() {
        tokio::spawn(service::report_readiness(Arc::clone(&node)).in_current_span());
    }

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut stopped = node.shutdown.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(Arc::clone(&node).serve_control_connection(stream).in_current_span()); }
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            },
            _ = terminate.recv() => request_stop(&node, "SIGTERM").await,
            _ = interrupt.recv() => request_stop(&node, "SIGINT").await,
            _ = stopped.changed() => break,
        }
    }
    let restart = *node.restart.lock().unwrap_or_else(|e| e.into_inner());
    if restart.is_none() {
        service::report_stopping();
    }
    let _ = std::fs::remove_file(&socket_path);
    // Let the clients being served read their last line; a client that
    // does not read is not waited for long.
    let mut clients = node.control_clients.subscribe();
    let _ = tokio::time::timeout(CONTROL_DRAIN, clients.wait_for(|n| *n == 0)).await;
    match restart {
        Some(grow) => {
            // Left in use on purpose (see `resize`); what the bitmaps hold
            // now need not be rebuilt from the activity log after.
            if let Err(e) = node.metadata.flush_bitmaps() {
                tracing::warn!(error = %e, "flushing the bitmaps before the restart");
            }
            tracing::info!("vmsyncd restarting to grow");
            Ok(Exit::RestartToGrow(grow))
        }
        None => {
            tracing::info!("vmsyncd stopped cleanly");
            Ok(Exit::Stopped)
        }
    }
}

/// Standalone: expose the device. With peers: start replication, and if a
/// killed primary left its ublk device behind (a file system may be mounted
/// on it, its I/O held by the kernel), become primary again and re-attach.
async fn start_serving(node: &Arc<Node>) -> anyhow::Result<()> {
    let mut slot = node.frontend.lock().await;
    match &node.replication {
        None => {
            node.expose(&mut slot).await?;
        }
        Some(repl) => {
            // Our term before any peer could tell us a newer one.
            let our_term = repl.metadata.superblock().term;
            let from_directory = repl.start().await?;
            tokio::spawn(
                Arc::clone(node)
                    .serve_directory(from_directory)
                    .in_current_span(),
            );
            tokio::spawn(Arc::clone(node).report_periodically().in_current_span());
            let resource = &node.config.resource.name;
            if node.config.node.block_socket.is_none()
                && blockdev::ublk::has_recoverable_device(resource)
            {
                if node.directory.is_none() {
                    if let Some(why) = superseded_while_down(repl, our_term).await {
                        tracing::warn!(
                            "a device of this resource is waiting for recovery, but {why}: failing the I/O the kernel held for it, removing it, staying secondary"
                        );
                        let stale = Frontend::start(
                            Arc::new(frontend::Superseded {
                                size: repl.local_size(),
                            }),
                            resource,
                            1,
                            false,
                            None,
                        )
                        .await?;
                        if let Err((_, e)) = stale.stop(true).await {
                            tracing::error!(error = %e, "cannot remove the superseded device");
                        }
                        return Ok(());
                    }
                }
                tracing::warn!(
                    "a device of this resource is waiting for recovery: resuming as primary"
                );
                node.resume_as_primary(repl).await?;
                node.expose(&mut slot).await?;
            }
        }
    }
    Ok(())
}

/// How long a promotion waits for a peer that still looks primary: one
/// demoted a moment ago is seen as primary until its link restarts with
/// its new role (a few hundred milliseconds).
const PEER_ROLE_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits (at most [`PEER_ROLE_SETTLE`]) until no linked peer claims to be
/// primary, so that `promote` right after `demote` on the other node is not
/// refused on a stale view. A peer that really is primary is still refused
/// afterwards, by `Replication::promote`.
async fn settle_demoted_peers(repl: &Replication) {
    let deadline = tokio::time::Instant::now() + PEER_ROLE_SETTLE;
    while repl.peers.load().iter().any(|p| p.is_peer_primary())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A killed primary restarts with its device held by the kernel. Before it
/// resumes serving it (on its own term, without a directory), it listens to
/// its peers for up to a ping timeout: if one of them was promoted while
/// this node was down (it is primary, or knows a newer term), resuming
/// would make two writable primaries, so it must not. Returns why.
async fn superseded_while_down(repl: &Arc<Replication>, ours: u64) -> Option<String> {
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(repl.tunables().ping_timeout_ms);
    while tokio::time::Instant::now() < deadline
        && !repl.peers.load().iter().all(|p| p.is_connected())
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if let Some(p) = repl.peers.load().iter().find(|p| p.is_peer_primary()) {
        return Some(format!("peer {} (id {}) is primary", p.config.name, p.id()));
    }
    let known = repl.known_term();
    (known > ours).then(|| format!("a peer knows term {known}, newer than ours ({ours})"))
}

async fn request_stop(node: &Arc<Node>, why: &str) {
    tracing::info!(signal = why, "stop requested");
    if let Err(e) = node.stop(false).await {
        tracing::error!("refusing to stop on {why}: {e}; unmount the device, or run `vmsyncctl shutdown --force`");
    }
}

/// `vmsyncctl create-md`: writes fresh metadata for this node's replica.
pub fn create_metadata(config: &Config, overwrite: bool) -> anyhow::Result<()> {
    let params = blockdev::meta::CreateParams::new(
        config.resource.name.clone(),
        config.resource.size,
        config.node.id,
        crate::config::MAX_NODES,
    );
    Metadata::create(&config.node.metadata, &params, overwrite)?;
    Ok(())
}

/// `vmsyncctl resize` with the daemon stopped: grows this node's metadata
/// to `[resource] size` after the backing store grew (see
/// `blockdev::meta::grow`; a running daemon grows online, see `resize`).
/// Returns what to tell the operator.
pub fn resize_metadata(config: &Config, assume_clean: bool) -> anyhow::Result<String> {
    if std::os::unix::net::UnixStream::connect(&config.node.control_socket).is_ok() {
        anyhow::bail!(
            "vmsyncd is running ({} answers): ask it (`vmsyncctl resize` grows a running daemon), or stop it first",
            config.node.control_socket.display()
        );
    }
    let size = config.resource.size;
    // Refuses a backing store smaller than the new size, saying so.
    drop(BackingStore::open(
        &config.node.backing,
        size,
        BackingOptions::default(),
    )?);
    let grown = blockdev::meta::grow(&config.node.metadata, size, assume_clean)?;
    Ok(if grown.old_size == grown.new_size {
        format!("metadata already sized for {size} bytes: nothing to do")
    } else if grown.new_blocks_marked == 0 {
        format!(
            "grown from {} to {} bytes; the new area is assumed identical on every node",
            grown.old_size, grown.new_size
        )
    } else {
        format!(
            "grown from {} to {} bytes; the new area ({} bytes) is resynced from the next primary to each peer",
            grown.old_size,
            grown.new_size,
            grown.new_size - grown.old_size
        )
    })
}

/// How long a stopping daemon waits for its control clients to read their
/// last answer (the `shutdown` reply, an events stream's `destroy` line).
const CONTROL_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts one control connection while it is served.
struct ControlClientGuard<'a>(&'a watch::Sender<usize>);

impl Drop for ControlClientGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
