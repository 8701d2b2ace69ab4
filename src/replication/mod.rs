//! The replication layer: a [`BlockDevice`] that mirrors every write of the
//! primary to its LAN peers, and the links that carry it.
//!
//! * [`epochs`]: write ordering (epochs, barriers, range lock).
//! * [`peer`]: the primary's per-peer state (unacked epochs, bitmap, mode).
//! * [`transport`]: framed, authenticated TCP connections.
//! * [`bitmap_exchange`]: a joining secondary reports what may differ.
//! * [`link`]: keeping a link to every peer up, and what runs on it:
//!   [`source`] when we are primary, [`target`] when the peer is.
//! * [`pacing`]: how fast a resync may go without holding the guest up.
//! * [`wan`]: the lazy, budgeted push to peers in another LAN group.

pub mod admin;
mod bitmap_exchange;
mod epochs;
mod fetcher;
mod handover;
mod holder;
mod holders;
pub mod invalidate;
mod link;
mod liveness;
mod membership;
mod pacing;
pub mod peer;
pub mod peer_set;
mod source;
mod split_brain;
mod target;
pub mod transport;
mod verify;
pub mod wan;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use blockdev::lazy::LazyDevice;
use blockdev::meta::{ActivityLog, AlGuard, Metadata};
use blockdev::{BackingStore, BlockDevice};
use bytes::Bytes;
use protocol::{DiskState, GenerationIds, Message, Role, SharedRecord, SharedSealer};
use tokio::sync::{oneshot, watch};

use crate::config::{Config, Protocol};
use crate::events::{props, EventBus, EventKind, Object};
use epochs::{EpochCounter, RangeLock};
pub use handover::Inherited;
pub use link::IncomingConnections;
use peer::{Outgoing, PeerReplica};
use peer_set::PeerSet;
use serde_json::json;
pub use verify::PeerVerify;

/// The local replica as the replication layer sees it: the backing store
/// under the on-demand fetch layer, which after a machine switch fetches
/// the blocks this node lacks before they are read (and is a plain
/// pass-through otherwise). Everything the primary serves or resyncs to
/// its peers is read through it, so a block this node lacks is never
/// served or sent; fetched data lands on this node's disk only.
pub type LocalDisk = LazyDevice<BackingStore>;

/// Highest term a peer may announce or we may take. Generation ids carry the
/// term that started them in 32 bits (`GenerationIds::new_id`), so a larger
/// term would silently alias an older one; and a term at `u64::MAX` would
/// wrap on the next promotion. Four billion promotions is plenty.
pub const MAX_TERM: u64 = u32::MAX as u64;

/// Refuses a term from the wire that this node can never take.
fn valid_term(term: u64) -> Result<(), transport::LinkError> {
    if term > MAX_TERM {
        return Err(transport::LinkError::Violation(format!(
            "peer announced term {term}, above the maximum {MAX_TERM}: refused"
        )));
    }
    Ok(())
}

/// Longest `demote` waits for peers to confirm every write.
const DEMOTE_WAIT: Duration = Duration::from_secs(30);

/// The node's replication engine. When primary it is the device the
/// frontend serves; as secondary it applies what its primary sends.
pub struct Replication {
    pub config: Config,
    pub metadata: Arc<Metadata>,
    pub local: Arc<LocalDisk>,
    pub peers: PeerSet,
    runtime: tokio::runtime::Handle,
    /// Role and term; links restart when it changes.
    role: watch::Sender<RoleState>,
    epochs: Mutex<EpochCounter>,
    ranges: RangeLock,
    /// Highest term seen from anyone; writes of older terms are refused.
    known_term: AtomicU64,
    /// This replica's disk state (Inconsistent while being resynced).
    disk_state: Mutex<DiskState>,
    /// A peer we mirrored to stopped getting our writes (its link dropped,
    /// or it fell behind): the next write starts a new data generation
    /// first (see [`Replication::fork_generation`]). Shared with the peers.
    fork_pending: Arc<AtomicBool>,
    /// Held while the new generation is persisted; writes that find
    /// `fork_pending` wait here so none completes before it.
    fork_lock: Mutex<()>,
    /// What this node took over from the previous primary when the
    /// directory made it primary (see [`handover`]).
    inherited: Mutex<Option<Inherited>>,
    /// Who lacked what at that handover (see `handover_holders`).
    holders: Mutex<Option<std::collections::BTreeMap<u32, Arc<blockdev::meta::Bitmap>>>>,
    /// Writes are refused: the directory handed out a newer term.
    fenced: AtomicBool,
    /// `[replication]` as last loaded: `vmsyncctl adjust` replaces it in a
    /// running daemon; each use reads the current value.
    tunables: std::sync::RwLock<crate::config::Replication>,
    /// The current or last online verify (see `verify`).
    verify_progress: Mutex<verify::VerifyProgress>,
    /// When the guest last did I/O: the WAN push trickles while it works.
    guest_io: pacing::GuestActivity,
    /// State changes, for `vmsyncctl events`.
    pub events: Arc<EventBus>,
    /// Starts link tasks for peers added while running (set by `start`).
    link_starter: std::sync::OnceLock<link::LinkStarter>,
    /// Seals writes once for every LAN peer (see `seal_shared`). Replaced
    /// (a new key) whenever a link comes up or goes down: a key reaches
    /// only the peers linked while it is in use.
    shared_sealer: ArcSwap<SharedSealer>,
}

/// Writes smaller than this are sealed per connection: a shared record is a
/// buffer of its own, which costs more than sealing a few KiB twice.
const SHARED_SEAL_MIN: usize = 16 * 1024;

/// Whether writes may be sealed once for every peer; see
/// [`disable_shared_records_for_benchmarks`]. Process-wide.
static SHARE_RECORDS: AtomicBool = AtomicBool::new(true);

/// Makes every link seal its own records, as before shared records: only
/// for measuring what sharing saves (`benches/links.rs`, through
/// `VMSYNC_BENCH_UNSHARED_RECORDS` in `vmsyncd`). Peers need not agree:
/// the receiving side takes both.
pub fn disable_shared_records_for_benchmarks() {
    SHARE_RECORDS.store(false, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleState {
    pub role: Role,
    pub term: u64,
}

impl Replication {
    pub fn new(
        config: Config,
        metadata: Arc<Metadata>,
        backing: Arc<BackingStore>,
        events: Arc<EventBus>,
    ) -> Arc<Self> {
        let fork_pending = Arc::new(AtomicBool::new(false));
        let own_stale = Arc::clone(
            metadata
                .bitmap(config.node.id)
                .expect("the node id is validated against node slots"),
        );
        let persist_meta = Arc::clone(&metadata);
        let failing = Arc::clone(&backing);
        let local = Arc::new(LazyDevice::new(
            backing,
            own_stale,
            Arc::new(move |blocks| {
                persist_meta
                    .flush_bitmap_blocks(blocks)
                    .map_err(io::Error::other)
            }),
            tokio::runtime::Handle::current(),
        ));
        let peers: Vec<Arc<PeerReplica>> = config
            .peers
            .iter()
            .map(|p| {
                let bitmap = metadata
                    .bitmap(p.id)
                    .expect("peer ids are validated against node slots");
                Arc::new(PeerReplica::new(
                    p.clone(),
                    config.is_lan_peer(p),
                    Arc::clone(bitmap),
                    Arc::clone(&fork_pending),
                    Arc::clone(&events),
                ))
            })
            .collect();
        let peers = PeerSet::new(peers);
        install_eviction_hook(&metadata, &peers);
        let term = metadata.superblock().term;
        let (role, _) = watch::channel(RoleState {
            role: Role::Secondary,
            term,
        });
        let disk_state = if metadata.superblock().inconsistent {
            DiskState::Inconsistent
        } else {
            DiskState::UpToDate
        };
        let repl = Arc::new(Replication {
            tunables: std::sync::RwLock::new(config.replication),
            config,
            metadata,
            local,
            peers,
            runtime: tokio::runtime::Handle::current(),
            role,
            epochs: Mutex::new(EpochCounter::new()),
            ranges: RangeLock::new(),
            known_term: AtomicU64::new(term),
            disk_state: Mutex::new(disk_state),
            fork_pending,
            fork_lock: Mutex::new(()),
            inherited: Mutex::new(None),
            holders: Mutex::new(None),
            fenced: AtomicBool::new(false),
            verify_progress: Mutex::new(verify::VerifyProgress::default()),
            guest_io: pacing::GuestActivity::default(),
            events,
            link_starter: std::sync::OnceLock::new(),
            shared_sealer: ArcSwap::from_pointee(SharedSealer::new()),
        });
        // Detach on the first I/O error, as DRBD's `on-io-error detach`.
        let weak = Arc::downgrade(&repl);
        failing.on_failure(Box::new(move |failure| {
            if let Some(repl) = weak.upgrade() {
                repl.disk_failed(failure);
            }
        }));
        repl
    }

    /// The replication tunables in force (see [`Replication::set_tunables`]).
    pub fn tunables(&self) -> crate::config::Replication {
        *self.tunables.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the tunables (`vmsyncctl adjust`). Each takes effect at its
    /// next use: rates and limits at once (of a resync, verify, WAN push or
    /// background sync already running too), ping settings on the next link.
    pub fn set_tunables(&self, tunables: crate::config::Replication) {
        // Connections made from now on follow it.
        protocol::zerocopy::set_zero_copy_send(tunables.zero_copy_send);
        self.local.set_sync_rate(tunables.sync_rate);
        *self.tunables.write().unwrap_or_else(|e| e.into_inner()) = tunables;
    }

    /// Starts the listener and one link task per peer; returns the
    /// connections the directory opens to this node.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<IncomingConnections> {
        link::start(Arc::clone(self)).await
    }

    /// Changes role and term (links restart on the change) and announces it.
    pub(crate) fn set_role(&self, state: RoleState) {
        self.role.send_replace(state);
        self.emit_resource(props([
            ("role", json!(role_name(state.role))),
            ("term", json!(state.term)),
        ]));
    }

    /// Announces a change of this replica's state.
    fn emit_resource(&self, props: std::collections::BTreeMap<String, serde_json::Value>) {
        self.events
            .emit(EventKind::Change, Object::Resource, None, props);
    }

    pub fn role(&self) -> RoleState {
        *self.role.borrow()
    }

    pub fn subscribe_role(&self) -> watch::Receiver<RoleState> {
        self.role.subscribe()
    }

    pub fn generation(&self) -> GenerationIds {
        to_wire(self.metadata.generations())
    }

    pub fn disk_state(&self) -> DiskState {
        *self.disk_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new disk state (persisting whether it is inconsistent). A
    /// failed disk stays failed until the daemon restarts: see
    /// [`Replication::disk_failed`].
    fn set_disk_state(&self, state: DiskState) -> io::Result<()> {
        let mut current = self.disk_state.lock().unwrap_or_else(|e| e.into_inner());
        if *current == DiskState::Failed {
            return Ok(());
        }
        if *current != state {
            self.metadata
                .set_inconsistent(state == DiskState::Inconsistent)
                .map_err(io::Error::other)?;
            *current = state;
            self.emit_resource(props([("disk", json!(disk_state_name(state)))]));
        }
        Ok(())
    }

    /// The backing device failed an operation: stop using it (DRBD's
    /// `on-io-error detach`). The disk state goes `failed` for the life of
    /// the daemon, and the metadata (a separate file) records the replica
    /// as inconsistent, so that a restart, once the device works again,
    /// resyncs it before it is trusted.
    ///
    /// A secondary ends its links: when they come back up, its `State`
    /// says `failed` and the primary stops mirroring to it, marking in its
    /// bitmap everything it did not acknowledge and everything written
    /// since (`link::run_session`). A primary refuses every further read
    /// and write with EIO; its peers keep what they acknowledged, so a
    /// failover (demote here, promote a peer) loses nothing acknowledged.
    pub fn disk_failed(&self, failure: &blockdev::backing::BackingFailure<'_>) {
        {
            let mut state = self.disk_state.lock().unwrap_or_else(|e| e.into_inner());
            if *state == DiskState::Failed {
                return;
            }
            *state = DiskState::Failed;
        }
        self.emit_resource(props([("disk", json!("failed"))]));
        let role = self.role().role;
        tracing::error!(
            device = %failure.path.display(),
            op = failure.op,
            offset = failure.offset,
            len = failure.len,
            error = %failure.error,
            "backing device failed: {} of {} bytes at offset {} on {}: {}; disk state failed, the device is no longer used ({})",
            failure.op,
            failure.len,
            failure.offset,
            failure.path.display(),
            failure.error,
            match role {
                Role::Primary => "guest I/O gets EIO; demote this node and promote a peer, which holds every acknowledged write",
                Role::Secondary => "the primary stops mirroring here; restart vmsyncd once the device works again to resync",
            }
        );
        if let Err(e) = self.metadata.set_inconsistent(true) {
            tracing::error!(error = %e, "cannot record the failed disk as inconsistent in the metadata");
        }
        if role == Role::Secondary {
            self.restart_links();
        }
    }

    /// Ends every link session; each link reconnects at once and exchanges
    /// `State` again (so the peers learn our new disk state).
    fn restart_links(&self) {
        // The sessions watch the role for changes; an unchanged value still
        // wakes them.
        self.role.send_modify(|_| {});
    }

    fn disk_is_failed(&self) -> bool {
        self.disk_state() == DiskState::Failed
    }

    /// A secondary that the primary reports in sync takes its generation.
    fn adopt_generation(&self, generation: GenerationIds) -> io::Result<()> {
        // Blocks we lacked as a primary that was switched away from before
        // its background sync finished: the primary has resent them too.
        if self.local.stale_bitmap().clear_all() > 0 {
            self.metadata.flush_bitmaps().map_err(io::Error::other)?;
        }
        self.metadata
            .set_generations(from_wire(generation))
            .map_err(io::Error::other)?;
        self.set_disk_state(DiskState::UpToDate)
    }

    /// Starts a new data generation if a peer stopped getting our writes
    /// since the last write (see [`Replication::fork_generation`]).
    fn fork_generation_if_pending(&self) -> io::Result<()> {
        if !self.fork_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let _fork = self.fork_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.fork_pending.swap(false, Ordering::AcqRel) {
            return Ok(()); // another write did it while we waited
        }
        self.fork_generation()
    }

    /// A peer that held our generation misses our writes from now on (its
    /// link dropped, or it fell behind). Those writes go into a new
    /// generation, so that if that peer is promoted meanwhile and writes
    /// too, the two histories are seen to have diverged (split brain) when
    /// they meet, instead of one side's acknowledged writes being resynced
    /// away. The peer itself is resynced from our bitmap as usual: the new
    /// generation id carries our term, and the bitmaps hold everything any
    /// peer missed since a generation of our own term (see
    /// `source::lineage`), so forking as often as peers come and go costs
    /// no full sync.
    fn fork_generation(&self) -> io::Result<()> {
        let generation = self.next_generation(self.role().term);
        self.metadata
            .set_generations(from_wire(generation))
            .map_err(io::Error::other)?;
        tracing::info!(
            generation = format!("{:016x}", generation.current),
            "a peer misses our writes: writing a new data generation"
        );
        // Peers still mirrored hold this generation too: tell them.
        for peer in self.peers.load().iter() {
            peer.resync_wanted.notify_one();
        }
        Ok(())
    }

    /// A new generation started by us as primary of `term`, descending from
    /// the current one (which our bitmaps then count from).
    fn next_generation(&self, term: u64) -> GenerationIds {
        let old = self.generation();
        GenerationIds {
            current: blockdev::meta::GenerationIds::new_id(term, self.config.node.id),
            bitmap: old.current,
            history: [old.current, old.history[0]],
        }
    }

    /// After a promotion: if this node lacks blocks, fetch them on demand
    /// from the nodes that hold them and pull the rest in the background
    /// (hot extents first). No-op when nothing is missing.
    pub fn start_fetching(&self, hot_extents: Vec<u64>) -> anyhow::Result<()> {
        let missing = self.local.stale_bytes();
        if missing == 0 {
            return Ok(());
        }
        let identity = transport::LocalIdentity {
            resource: self.config.resource.name.clone(),
            node_id: self.config.node.id,
            secret: Arc::new(self.config.read_secret()?),
        };
        let layout = self.metadata.layout();
        let handover = self.handover_holders().or_else(|| {
            holders::load(
                &holders::path_for(&self.config.node.metadata),
                layout.blocks(),
                layout.block_size(),
            )
        });
        let holders = self
            .peers
            .load()
            .iter()
            .map(|p| {
                let lacks = handover
                    .as_ref()
                    .and_then(|h| h.get(&p.id()).cloned())
                    .unwrap_or_else(|| Arc::clone(&p.bitmap));
                (Arc::clone(p), lacks)
            })
            .collect();
        let fetcher = fetcher::Fetcher::new(
            identity,
            self.config.node.lan_group.clone(),
            holders,
            Duration::from_millis(self.tunables().fetch_timeout_ms),
        );
        self.local
            .activate(Arc::new(fetcher::NetSource(Arc::new(fetcher))));
        self.local
            .start_background_sync(blockdev::lazy::SyncOptions {
                rate: self.tunables().sync_rate,
                hot_extents,
                chunk: 1 << 20,
                concurrency: 4,
            });
        tracing::info!(
            missing_bytes = missing,
            "serving at once; blocks this node lacks are fetched on demand and pulled in the background"
        );
        Ok(())
    }

    /// Once the background sync has pulled everything, this replica is a
    /// whole copy again. Called periodically; cheap.
    pub fn check_sync_done(&self) {
        if self.disk_state() != DiskState::Inconsistent
            || self.role().role != Role::Primary
            || !self.local.is_active()
            || self.local.stale_bytes() > 0
        {
            return;
        }
        let done = self
            .metadata
            .flush_bitmaps()
            .map_err(io::Error::other)
            .and_then(|()| self.set_disk_state(DiskState::UpToDate));
        match done {
            Ok(()) => tracing::info!("every block is local now: background sync complete"),
            Err(e) => tracing::error!(error = %e, "cannot record the finished background sync"),
        }
    }

    /// Notes a term seen on the wire; persists it when it is newer.
    fn observe_term(&self, term: u64) {
        if self.known_term.fetch_max(term, Ordering::AcqRel) < term {
            if let Err(e) = self.metadata.set_term(term) {
                tracing::error!(error = %e, "cannot persist term {term}");
            }
        }
    }

    /// A peer announced `term` (in its State). Refuses a term that would
    /// wrap; notes a newer one; and if we are primary of an older term, a
    /// newer primary exists (we were frozen or cut off while it was
    /// promoted): stop accepting writes at once, never two writable
    /// primaries that both believe they are current.
    fn check_peer_term(&self, term: u64, peer: &str) -> Result<(), transport::LinkError> {
        valid_term(term)?;
        self.observe_term(term);
        let me = self.role();
        if me.role == Role::Primary && term > me.term {
            self.fence(&format!(
                "peer {peer} knows term {term}, newer than our term {} as primary: another node was promoted; demote this one",
                me.term
            ));
        }
        Ok(())
    }

    pub fn local_size(&self) -> u64 {
        self.local.size()
    }

    pub fn known_term(&self) -> u64 {
        self.known_term.load(Ordering::Acquire)
    }

    /// The LAN peers of a snapshot of the peer set (mirrored to; WAN peers
    /// get the lazy push). Borrowing the snapshot: no allocation per write.
    fn lan_peers(peers: &[Arc<PeerReplica>]) -> impl Iterator<Item = &Arc<PeerReplica>> {
        peers.iter().filter(|p| p.is_lan)
    }

    fn max_peer_wait(&self) -> Duration {
        Duration::from_millis(self.tunables().max_peer_wait_ms)
    }

    /// Becomes primary: refuses if a connected peer is primary, or if this
    /// replica is not fit to serve (inconsistent, or empty while a peer has
    /// data). Bumps the term and starts a new data generation.
    ///
    /// With `force`, a connected primary peer that has sent nothing for more
    /// than two ping intervals (frozen, or its host or network hangs; a live
    /// one pings once per interval) does not
    /// block the promotion: it is fenced by our newer term when it wakes.
    /// One that is answering still does: demote it first.
    pub fn promote(&self, force: bool) -> Result<RoleState, String> {
        if self.role().role == Role::Primary {
            return Err("already primary".into());
        }
        if self.disk_is_failed() {
            return Err("this node's backing device failed (disk state failed): promote a peer; restart vmsyncd here once the device works again, and it resyncs".into());
        }
        let silence = 2 * Duration::from_millis(self.tunables().ping_interval_ms);
        for p in self.peers.load().iter().filter(|p| p.is_peer_primary()) {
            let silent = p.silent_for().is_none_or(|t| t > silence);
            if force && silent {
                tracing::warn!(peer = %p.config.name, silent_ms = p.silent_for().map(|t| t.as_millis() as u64),
                    "forced promotion over a connected primary peer that has stopped answering");
                continue;
            }
            return Err(format!(
                "peer {} (id {}) is primary and answering; demote it first",
                p.config.name,
                p.id()
            ));
        }
        if self.disk_state() == DiskState::Inconsistent && !force {
            return Err("this replica is inconsistent (a resync did not finish); promote a node with good data, or force".into());
        }
        let term = self
            .known_term()
            .max(self.metadata.superblock().term)
            .saturating_add(1);
        if term > MAX_TERM {
            return Err(format!(
                "term {MAX_TERM} reached: no further promotion possible"
            ));
        }
        let generation = self.next_generation(term);
        self.metadata
            .set_term_and_generations(term, Some(from_wire(generation)))
            .and_then(|()| self.metadata.set_data_term(term))
            .map_err(|e| format!("cannot persist the new term: {e}"))?;
        // Where we wrote lately (as a secondary of a lost primary, or as a
        // primary before), a peer may hold other data: resync it.
        for peer in self.peers.load().iter() {
            self.metadata.mark_active_extents(&peer.bitmap);
        }
        self.known_term.fetch_max(term, Ordering::AcqRel);
        // The promotion itself started a generation of its own.
        self.fork_pending.store(false, Ordering::Release);
        let state = RoleState {
            role: Role::Primary,
            term,
        };
        self.set_role(state);
        tracing::info!(
            term,
            generation = format!("{:016x}", generation.current),
            "promoted to primary"
        );
        Ok(state)
    }

    /// Becomes secondary again (the caller has removed the device).
    ///
    /// Whatever the protocol, every write is first handed over: the last
    /// epoch is closed and every mirrored peer's acknowledgement awaited
    /// (for at most [`DEMOTE_WAIT`]), so that a peer promoted next holds
    /// everything this node acknowledged. Returns the peers that do not
    /// (disconnected, behind, still resyncing, or too slow to confirm):
    /// promoting one of them would lose writes.
    pub async fn demote(self: &Arc<Self>) -> io::Result<Vec<String>> {
        if self.role().role != Role::Primary {
            return Ok(Vec::new());
        }
        // A failed disk is not flushed (it is no longer used): the peers
        // hold every write this node acknowledged.
        self.flush_everywhere(true, tokio::time::Instant::now() + DEMOTE_WAIT)
            .await?;
        // Blocks still missing here stay marked in our own slot: they go
        // into the final report, and the next primary brings them back.
        self.local.deactivate().await;
        if self.local.stale_bytes() > 0 {
            self.set_disk_state(DiskState::Inconsistent)?;
        }
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.holders.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.fenced.swap(false, Ordering::AcqRel) {
            self.emit_resource(props([("fenced", json!(false))]));
        }
        let lagging: Vec<String> = self
            .peers
            .load()
            .iter()
            .filter(|p| p.mode() != peer::PeerMode::UpToDate)
            .map(|p| format!("{} ({})", p.config.name, p.mode().name()))
            .collect();
        self.metadata.flush_bitmaps().map_err(io::Error::other)?;
        self.set_role(RoleState {
            role: Role::Secondary,
            term: self.known_term(),
        });
        if lagging.is_empty() {
            tracing::info!("demoted to secondary; every peer holds every write");
        } else {
            tracing::warn!(
                peers = lagging.join(", "),
                "demoted to secondary; these peers lack writes until they resync"
            );
        }
        Ok(lagging)
    }

    /// Closes the open epoch on every peer. Returns barrier-ack receivers
    /// (only when `want_ack`).
    fn close_epoch(&self, want_ack: bool) -> Vec<(Arc<PeerReplica>, oneshot::Receiver<()>)> {
        let term = self.role().term;
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = epochs.close();
        Self::lan_peers(&self.peers.load())
            .filter_map(|p| {
                p.barrier(term, epoch, want_ack)
                    .map(|ack| (Arc::clone(p), ack))
            })
            .collect()
    }

    /// A peer that fell behind resumes once it has acknowledged the epochs
    /// it was sent (see `PeerReplica::backlog_drained`). The last of them
    /// may still be open when the guest goes quiet (no more writes, no
    /// flush): it would then stay behind until the guest's next flush.
    /// Called on the link's ping tick: closes that epoch, so its barrier
    /// goes out and the ack that lets the peer resume can come.
    pub(super) fn nudge_behind_peer(&self, peer: &PeerReplica) {
        let open = self
            .epochs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current;
        if peer.awaits_ack_of(open) {
            drop(self.close_epoch(false));
        }
    }

    /// [`Replication::close_epoch`], also closing it on `resyncing` when it
    /// is a WAN peer (which gets no barriers otherwise: its resync chunks
    /// clear their bits only when a barrier after them is acked).
    fn close_epoch_including(
        &self,
        resyncing: &Arc<PeerReplica>,
        want_ack: bool,
    ) -> Vec<(Arc<PeerReplica>, oneshot::Receiver<()>)> {
        if resyncing.is_lan {
            return self.close_epoch(want_ack);
        }
        let term = self.role().term;
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = epochs.close();
        Self::lan_peers(&self.peers.load())
            .chain(std::iter::once(resyncing))
            .filter_map(|p| {
                p.barrier(term, epoch, want_ack)
                    .map(|ack| (Arc::clone(p), ack))
            })
            .collect()
    }

    /// Waits for peers' acks until `deadline`, then gives up on (and drops
    /// behind) any peer that has not answered.
    async fn wait_for_peers(
        &self,
        acks: Vec<(Arc<PeerReplica>, oneshot::Receiver<()>)>,
        deadline: tokio::time::Instant,
    ) {
        for (peer, ack) in acks {
            match tokio::time::timeout_at(deadline, ack).await {
                Ok(_) => {} // acked, or the link dropped (then the bitmap has it)
                Err(_) => peer.fall_behind("no acknowledgement within max_peer_wait_ms"),
            }
        }
    }

    fn check_primary(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.role().role != Role::Primary {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this node is not primary",
            ));
        }
        blockdev::device::check_range(self.local_size(), offset, len)?;
        if self.disk_is_failed() {
            return Err(self.failed_disk_error());
        }
        Ok(())
    }

    /// What the guest gets once our disk failed: EIO (no raw errno, so
    /// `errno_of` maps it to EIO whatever the device said).
    fn failed_disk_error(&self) -> io::Error {
        io::Error::other(format!(
            "the backing device {} failed (disk state failed): I/O refused; promote a peer",
            self.config.node.backing.display()
        ))
    }

    /// Like [`Replication::check_primary`], and refuses writes once fenced.
    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_primary(offset, len)?;
        if self.is_fenced() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "fenced: the directory made another node primary",
            ));
        }
        Ok(())
    }

    /// Stops serving writes for good (until demoted): the directory knows a
    /// newer term, so another node is, or may become, primary.
    pub fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!("fenced, writes refused from now on: {why}");
            self.emit_resource(props([("fenced", json!(true)), ("reason", json!(why))]));
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// The replicated write path; `make` builds the message for an
    /// (epoch, seq) pair, `apply` does the local part.
    async fn replicate<F>(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        fua: bool,
        make: impl Fn(u64, u64, u64) -> Message,
        apply: F,
    ) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        self.check_writable(offset, len)?;
        self.guest_io.touch();
        // One slow peer may hold this write up for `max_peer_wait` in all,
        // whether by its backlog (below) or by its acks (protocol C).
        let deadline = tokio::time::Instant::now() + self.max_peer_wait();
        let congestion = self.tunables().congestion_bytes;
        // One snapshot of the peer set for the whole write.
        let peers = self.peers.load();
        for peer in Self::lan_peers(&peers) {
            if peer.is_congested(congestion) {
                peer.wait_for_backlog(congestion, deadline).await;
            }
        }
        // After the wait: a peer that fell behind there misses this write.
        self.fork_generation_if_pending()?;
        // The first write in a generation we started: from now on it holds
        // changes of its own (see `split_brain`), durably before any byte.
        self.metadata
            .mark_generation_written()
            .map_err(io::Error::other)?;
        // The extent must be in the persisted activity log before any byte
        // of it changes anywhere, so a crash can find what might differ.
        let _al = enter_activity_log(self.metadata.activity_log(), offset, len).await?;
        let ranges = self
            .ranges
            .acquire(offset, len, || drop(self.close_epoch(false)))
            .await;
        let want_ack = self.config.resource.protocol == Protocol::C;
        let term = self.role().term;
        let mut acks = Vec::new();
        {
            let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
            if epochs.writes >= self.tunables().max_epoch_writes {
                let epoch = epochs.close();
                for p in Self::lan_peers(&peers) {
                    p.barrier(term, epoch, false);
                }
            }
            let (epoch, seq) = epochs.assign();
            let message = make(term, epoch, seq);
            let shared = self.seal_shared(&message, &peers);
            for peer in peers.iter() {
                if !peer.is_lan {
                    // WAN peers are not mirrored: their bits are set and
                    // the lazy push sends the blocks later (see `wan`).
                    peer.resync_range(offset, len);
                    continue;
                }
                if let Some(ack) = peer.mirror(
                    epoch,
                    seq,
                    Outgoing::mirrored(message.clone(), shared.clone()),
                    (offset, len),
                    want_ack,
                    congestion,
                ) {
                    acks.push((Arc::clone(peer), ack));
                }
            }
        }
        let local = apply.await;
        if local.is_err() && self.disk_is_failed() {
            // Our disk failed: the peers keep this write (the guest gets the
            // error, so either content of the range is right) and every
            // write they acknowledged before; nothing is resynced from here.
        } else if let Err(e) = &local {
            // The peers may have applied what our disk refused: make them
            // take our version of the range back, so replicas stay equal.
            tracing::error!(offset, len, error = %e, "local write failed; resyncing the range to the peers");
            for peer in peers.iter() {
                peer.resync_range(offset, len);
            }
        }
        drop(ranges);
        if local.is_err() && self.disk_is_failed() {
            return Err(self.failed_disk_error());
        }
        local?;
        if fua {
            // FUA is a flush point for the peers too.
            acks.extend(self.close_epoch(want_ack));
        }
        self.wait_for_peers(acks, deadline).await;
        // A peer that fell behind while we waited missed this write: it
        // must not be acknowledged in the generation that peer holds.
        self.fork_generation_if_pending()?;
        Ok(())
    }

    /// Seals a large write once for all the LAN peers it goes to, when
    /// there are two or more (see `protocol::SharedSealer`): each peer's
    /// connection then sends the same record, where each would have sealed
    /// its own (a pass over the data per peer). With one peer its
    /// connection's own sealing costs the same, and runs outside the epoch
    /// lock this is called under.
    fn seal_shared(&self, message: &Message, peers: &[Arc<PeerReplica>]) -> Option<SharedRecord> {
        let Message::Write { data, .. } = message else {
            return None;
        };
        if data.len() < SHARED_SEAL_MIN || !SHARE_RECORDS.load(Ordering::Relaxed) {
            return None;
        }
        let receivers = peers
            .iter()
            .filter(|p| p.is_lan && p.mode().mirrors())
            .count();
        if receivers < 2 {
            return None;
        }
        // A write that cannot be sealed fails the same way on each link.
        self.shared_sealer.load().seal(message).ok()
    }

    /// A new key for shared records, from the next write on (see
    /// `shared_sealer`).
    pub(crate) fn replace_shared_sealer(&self) {
        self.shared_sealer.store(Arc::new(SharedSealer::new()));
    }

    async fn replicated_flush(self: Arc<Self>) -> io::Result<()> {
        self.check_writable(0, 0)?;
        let want_ack = self.config.resource.protocol == Protocol::C;
        let deadline = tokio::time::Instant::now() + self.max_peer_wait();
        self.flush_everywhere(want_ack, deadline).await
    }

    /// Closes the epoch on every peer (a flush point there), flushes the
    /// local disk, and, with `want_ack`, waits for the peers until
    /// `deadline` (dropping behind whoever is late).
    async fn flush_everywhere(
        &self,
        want_ack: bool,
        deadline: tokio::time::Instant,
    ) -> io::Result<()> {
        let acks = self.close_epoch(want_ack);
        if !self.disk_is_failed() {
            self.local.flush().await?;
        }
        self.wait_for_peers(acks, deadline).await;
        Ok(())
    }

    /// Runs `work` on the tokio runtime: the ublk queue threads poll our
    /// futures on their own executors, but timers and sockets need tokio.
    /// A caller already on the runtime (the block socket) runs it in place,
    /// saving a task per request; like every caller of a `BlockDevice`, it
    /// must not drop a started request (the block socket server never does).
    async fn on_runtime<F>(&self, work: F) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>> + Send + 'static,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            return work.await;
        }
        self.runtime
            .spawn(work)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("replication task failed: {e}"))))
    }
}

/// Before an extent leaves the activity log, the writes in it that a peer
/// has not acknowledged go into that peer's bitmap, which the eviction then
/// persists (see [`PeerReplica::persist_unacked_in`]).
fn install_eviction_hook(metadata: &Metadata, peers: &PeerSet) {
    use blockdev::meta::EXTENT_SIZE;
    let peers = peers.clone();
    metadata
        .activity_log()
        .set_eviction_hook(Box::new(move |extents: &[u64]| {
            let ranges: Vec<(u64, u64)> = extents
                .iter()
                .map(|&e| (e * EXTENT_SIZE, EXTENT_SIZE))
                .collect();
            for peer in peers.load().iter() {
                let blocks = peer.persist_unacked_in(&ranges);
                if blocks > 0 {
                    tracing::debug!(peer = %peer.config.name, blocks,
                        "unacknowledged writes in an evicted activity-log extent marked stale");
                }
            }
        }));
}

/// Pins the extents of a write in the activity log without ever blocking a
/// runtime thread: a hit takes a mutex; a miss (a transaction to write, or
/// a full log waiting for writes in flight to finish) runs on the blocking
/// pool. Blocking a worker instead can stall every worker while the writes
/// that would free a slot wait for one (a slow peer under protocol C).
async fn enter_activity_log(al: &Arc<ActivityLog>, offset: u64, len: u64) -> io::Result<AlGuard> {
    if let Some(guard) = al.pin_if_active(offset, len) {
        return Ok(guard);
    }
    let al = Arc::clone(al);
    tokio::task::spawn_blocking(move || al.begin_write(offset, len))
        .await
        .map_err(|e| io::Error::other(format!("activity-log task failed: {e}")))?
        .map_err(io::Error::other)
}

fn to_wire(g: blockdev::meta::GenerationIds) -> GenerationIds {
    GenerationIds {
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
    }
}

fn from_wire(g: GenerationIds) -> blockdev::meta::GenerationIds {
    blockdev::meta::GenerationIds {
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
    }
}

/// The primary's device: what the frontend serves.
#[derive(Clone)]
pub struct ReplicatedDevice(pub Arc<Replication>);

impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> u64 {
        self.0.local.size()
    }

    fn io_files(&self) -> Vec<std::os::fd::RawFd> {
        self.0.local.io_files()
    }

    /// A read of blocks this node holds, on a primary whose disk works, is
    /// a plain read of the local disk (see `read`).
    fn read_file(&self) -> Option<blockdev::DirectFile> {
        self.0.local.read_file()
    }

    fn read_directly(&self, offset: u64, len: u64) -> bool {
        if self.0.check_primary(offset, len).is_err() {
            return false;
        }
        self.0.guest_io.touch();
        self.0.local.read_directly(offset, len)
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.0.check_primary(offset, len)?;
        self.0.guest_io.touch();
        if self.0.local.needs_fetch(offset, len) {
            // Fetching needs the network, hence the runtime; the buffer
            // cannot go there, so fetch first, then read as usual.
            let present = self.0.local.ensure_present(offset, len);
            self.0.on_runtime(present).await?;
        }
        self.0.local.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let r = Arc::clone(&self.0);
        let len = data.len() as u64;
        let local = Arc::clone(&r.local);
        let payload = data.clone();
        let work = r.clone().replicate(
            offset,
            len,
            fua,
            move |term, epoch, seq| Message::Write {
                term,
                epoch,
                seq,
                offset,
                fua,
                data: payload.clone(),
            },
            async move { local.write(offset, data, fua).await },
        );
        self.0.on_runtime(work).await
    }

    async fn flush(&self) -> io::Result<()> {
        let r = Arc::clone(&self.0);
        self.0.on_runtime(r.replicated_flush()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.range_op(offset, len, RangeOp::Discard).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.range_op(offset, len, RangeOp::WriteZeroes).await
    }
}

/// A write that carries no data.
#[derive(Clone, Copy)]
enum RangeOp {
    Discard,
    WriteZeroes,
}

/// Longest discard or write-zeroes replicated as one write. A guest may
/// discard the whole device at once (mkfs does), but one write must fit in
/// the activity log: this is 16 extents of the default 4 MiB, where the AL
/// holds 127 by default.
const MAX_RANGE_OP: u64 = 64 << 20;

impl ReplicatedDevice {
    /// Replicates a discard or write-zeroes in pieces the activity log can
    /// hold, one after the other (each is its own replicated write).
    async fn range_op(&self, offset: u64, len: u64, op: RangeOp) -> io::Result<()> {
        self.0.check_writable(offset, len)?;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            // Pieces end on MAX_RANGE_OP boundaries, so they span whole extents.
            let piece = (end - at).min(MAX_RANGE_OP - at % MAX_RANGE_OP);
            self.range_op_piece(at, piece, op).await?;
            at += piece;
        }
        Ok(())
    }

    async fn range_op_piece(&self, offset: u64, len: u64, op: RangeOp) -> io::Result<()> {
        let r = Arc::clone(&self.0);
        let local = Arc::clone(&r.local);
        let work = r.clone().replicate(
            offset,
            len,
            false,
            move |term, epoch, seq| match op {
                RangeOp::Discard => Message::Discard {
                    term,
                    epoch,
                    seq,
                    offset,
                    len,
                },
                RangeOp::WriteZeroes => Message::WriteZeroes {
                    term,
                    epoch,
                    seq,
                    offset,
                    len,
                },
            },
            async move {
                match op {
                    RangeOp::Discard => local.discard(offset, len).await,
                    RangeOp::WriteZeroes => local.write_zeroes(offset, len).await,
                }
            },
        );
        self.0.on_runtime(work).await
    }
}

/// The role as `status` and `events` spell it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
    }
}

/// The disk state as `status` and `events` spell it ("up-to-date", as for
/// peers).
pub fn disk_state_name(state: DiskState) -> &'static str {
    match state {
        DiskState::Diskless => "diskless",
        DiskState::Inconsistent => "inconsistent",
        DiskState::Outdated => "outdated",
        DiskState::Consistent => "consistent",
        DiskState::UpToDate => "up-to-date",
        DiskState::Failed => "failed",
    }
}
