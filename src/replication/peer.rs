//! The primary's view of one peer: whether writes flow to it, what it has not
//! yet acknowledged, and its staleness bitmap.
//!
//! Invariant: every byte written by the guest is, for every peer, either in
//! an epoch queued to that peer and not yet acknowledged (`unacked`), or
//! marked in the peer's staleness bitmap — so a disconnect at any moment
//! loses nothing: the unacked epochs fold into the bitmap and resync covers
//! them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockdev::meta::Bitmap;
use protocol::{Message, Role, SharedRecord};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::Peer;
use crate::events::{props, EventBus, EventKind, Object};
use serde_json::json;

/// Bytes a `ResyncFrom` message takes on the wire (fields and framing).
pub const RESYNC_REFERENCE_BYTES: u64 = 128;

/// A peer that fell behind resumes only with at most this many epochs
/// unacknowledged.
const MAX_UNACKED_TO_RESUME: usize = 2;

/// Epochs a peer may leave unacknowledged. Each is a record here and a
/// barrier in the send queue; payload bytes are capped by
/// `congestion_limit`, but empty epochs (a guest that flushes often, under
/// protocol A where nobody waits for the peer) carry none. Beyond this a
/// mirrored peer falls behind; a peer already behind, which gets nothing
/// but barriers, has its link dropped: it reconnects and resyncs from its
/// bitmap, as DRBD expels a peer that stops answering (`ko-count`).
pub const MAX_UNACKED_EPOCHS: usize = 4096;

/// Where a peer stands, from the primary's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// No link.
    Disconnected,
    /// Linked, but we are not primary (or it is): nothing flows.
    Idle,
    /// Writes are mirrored and stale blocks are being resent.
    Resyncing,
    /// Writes are mirrored and nothing is stale.
    UpToDate,
    /// Congested: writes only set bits until the backlog drains.
    Behind,
    /// Linked, but its backing device failed (its `State` said so): writes
    /// only set bits, until it is restarted with a working device.
    Failed,
}

impl PeerMode {
    pub fn name(self) -> &'static str {
        match self {
            PeerMode::Disconnected => "disconnected",
            PeerMode::Idle => "connected",
            PeerMode::Resyncing => "resyncing",
            PeerMode::UpToDate => "up-to-date",
            PeerMode::Behind => "behind",
            PeerMode::Failed => "failed",
        }
    }

    pub(crate) fn mirrors(self) -> bool {
        matches!(self, PeerMode::Resyncing | PeerMode::UpToDate)
    }
}

/// A message on its way to the peer's data connection.
pub struct Outgoing {
    pub message: Message,
    /// The message sealed once for every peer (see `SharedSealer`), when
    /// it was.
    pub shared: Option<SharedRecord>,
    /// Payload bytes, for congestion accounting.
    pub bytes: u64,
}

impl Outgoing {
    /// A mirrored request (with `shared` if it was sealed once for every
    /// peer): a write's data counts against the send queue.
    pub fn mirrored(message: Message, shared: Option<SharedRecord>) -> Self {
        let bytes = match &message {
            Message::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        Self {
            message,
            shared,
            bytes,
        }
    }
}

/// What one epoch sent to this peer.
#[derive(Default)]
struct EpochRecord {
    /// Byte ranges written in the epoch (to mark stale if never acked).
    written: Vec<(u64, u64)>,
    /// Resync chunks (first block, count) whose bits clear once acked.
    resynced: Vec<(u64, u64)>,
}

struct Inner {
    mode: PeerMode,
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
    unacked: BTreeMap<u64, EpochRecord>,
    write_waiters: HashMap<u64, oneshot::Sender<()>>,
    barrier_waiters: Vec<(u64, oneshot::Sender<()>)>,
    /// Set when the peer falls behind: the newest epoch then outstanding.
    /// It resumes only once that epoch is acknowledged — proof that it
    /// makes progress. Without this, a stuck peer with little outstanding
    /// resumed at once, and every guest flush waited `max_peer_wait_ms`
    /// for it again before it fell behind again.
    behind_until_acked: Option<u64>,
}

/// Counters for status and tests.
#[derive(Default)]
pub struct PeerStats {
    /// Bytes sent by resync since the daemon started.
    pub resync_bytes: AtomicU64,
    /// Guest write bytes queued to the peer as they happened (mirrored).
    pub mirrored_bytes: AtomicU64,
    /// Bytes sent to the peer in records sealed once for every peer.
    pub shared_record_bytes: AtomicU64,
    /// Bytes the data connections handed to the kernel zero-copy (records
    /// as on the wire).
    pub zero_copy_bytes: AtomicU64,
    /// Bytes sent by the current resync run, and when it started.
    pub run_bytes: AtomicU64,
    pub run_started: Mutex<Option<Instant>>,
    /// The lazy push's counters, for a WAN peer (see `wan`).
    pub wan: super::wan::WanStats,
}

pub struct PeerReplica {
    pub config: Peer,
    pub is_lan: bool,
    pub bitmap: Arc<Bitmap>,
    inner: Mutex<Inner>,
    /// Bytes handed to the sender task and not yet written to the socket.
    pub queued: AtomicU64,
    pub stats: PeerStats,
    /// The role the peer announced on the current link.
    peer_primary: AtomicBool,
    connected: AtomicBool,
    /// Wakes the resync loop.
    pub resync_wanted: Notify,
    /// Wakes guest writes waiting for this peer's backlog to drain.
    pub drained: Notify,
    /// Wakes the link session when the peer must be disconnected (see
    /// [`MAX_UNACKED_EPOCHS`]); the reason is in `expel_reason`.
    pub expel: Notify,
    expel_reason: Mutex<Option<String>>,
    /// Shared with the replication layer: set when this peer stops getting
    /// our writes (its link drops, or it falls behind), so the next write
    /// starts a new data generation (see `Replication::fork_generation`).
    fork_pending: Arc<AtomicBool>,
    /// Why the last link to this peer ended, if it ended in an error (a
    /// split brain, a refused handshake...); cleared when a link comes up.
    pub last_error: Mutex<Option<String>>,
    /// The last failure announced as an event (see `set_last_error`).
    announced_error: Mutex<Option<String>>,
    /// When the last frame arrived from the peer on the current link (see
    /// `liveness`): lets `promote --force` tell a silent primary peer from
    /// one that is answering.
    last_heard: Mutex<Option<Instant>>,
    /// The operator's switch on this link (`vmsyncctl connect`/`disconnect`).
    pub admin: super::admin::AdminSwitch,
    /// Where this peer's state changes are announced (`vmsyncctl events`).
    events: Arc<EventBus>,
}

impl PeerReplica {
    pub fn new(
        config: Peer,
        is_lan: bool,
        bitmap: Arc<Bitmap>,
        fork_pending: Arc<AtomicBool>,
        events: Arc<EventBus>,
    ) -> Self {
        PeerReplica {
            config,
            is_lan,
            bitmap,
            inner: Mutex::new(Inner {
                mode: PeerMode::Disconnected,
                tx: None,
                unacked: BTreeMap::new(),
                write_waiters: HashMap::new(),
                barrier_waiters: Vec::new(),
                behind_until_acked: None,
            }),
            queued: AtomicU64::new(0),
            stats: PeerStats::default(),
            peer_primary: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            resync_wanted: Notify::new(),
            drained: Notify::new(),
            expel: Notify::new(),
            expel_reason: Mutex::new(None),
            fork_pending,
            last_error: Mutex::new(None),
            announced_error: Mutex::new(None),
            last_heard: Mutex::new(None),
            admin: super::admin::AdminSwitch::default(),
            events,
        }
    }

    /// Every change of the replication mode goes through here, so that
    /// `events` sees each one, however short-lived.
    fn set_mode(&self, inner: &mut Inner, mode: PeerMode) {
        if inner.mode == mode {
            return;
        }
        inner.mode = mode;
        self.emit(
            EventKind::Change,
            props([
                ("state", json!(mode.name())),
                ("stale_bytes", json!(self.stale_bytes())),
            ]),
        );
    }

    /// Bytes this peer lacks (set bits × block size).
    pub fn stale_bytes(&self) -> u64 {
        self.bitmap.count_ones() * self.bitmap.block_size() as u64
    }

    /// Announces an event about this peer.
    pub fn emit(&self, kind: EventKind, props: BTreeMap<String, serde_json::Value>) {
        self.events
            .emit(kind, Object::Peer, Some(&self.config.name), props);
    }

    /// Records why the link failed (None: a link came up). A reason is
    /// announced as an event once: a reconnect loop failing the same way
    /// again is not announced again until a link worked (see
    /// [`PeerReplica::link_worked`]) or it fails another way.
    pub fn set_last_error(&self, error: Option<String>) {
        if let Some(message) = &error {
            let mut announced = self
                .announced_error
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if announced.as_ref() != Some(message) {
                let kind = if message.starts_with("split brain") {
                    EventKind::SplitBrain
                } else {
                    EventKind::Error
                };
                self.emit(kind, props([("message", json!(message))]));
                *announced = Some(message.clone());
            }
        }
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// A link session to this peer worked (it lasted, or ended cleanly):
    /// the next failure is news again.
    pub fn link_worked(&self) {
        *self
            .announced_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A frame arrived from the peer.
    pub fn heard(&self) {
        *self.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// How long since the last frame from the peer (None: never heard).
    pub fn silent_for(&self) -> Option<std::time::Duration> {
        self.last_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> u32 {
        self.config.id
    }

    pub fn mode(&self) -> PeerMode {
        self.lock().mode
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn is_peer_primary(&self) -> bool {
        self.is_connected() && self.peer_primary.load(Ordering::Acquire)
    }

    /// A link came up; `role` is what the peer announced.
    pub fn linked(&self, role: Role) {
        self.peer_primary
            .store(role == Role::Primary, Ordering::Release);
        self.connected.store(true, Ordering::Release);
        self.emit(
            EventKind::Change,
            props([
                ("connected", json!(true)),
                (
                    "role",
                    json!(if role == Role::Primary {
                        "primary"
                    } else {
                        "secondary"
                    }),
                ),
            ]),
        );
        // Its State just arrived.
        self.heard();
        let mut inner = self.lock();
        if inner.mode == PeerMode::Disconnected {
            self.set_mode(&mut inner, PeerMode::Idle);
        }
    }

    /// The peer announced that its backing device failed: nothing is
    /// mirrored to it on this link; every write marks its bitmap.
    pub fn disk_failed(&self) {
        let mut inner = self.lock();
        if inner.mode.mirrors() {
            self.fork_pending.store(true, Ordering::Release);
        }
        self.set_mode(&mut inner, PeerMode::Failed);
    }

    /// Starts mirroring to the peer through `tx`. Blocks written before this
    /// point are already in the bitmap.
    pub fn start_mirroring(&self, tx: mpsc::UnboundedSender<Outgoing>) {
        *self.expel_reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut inner = self.lock();
        inner.tx = Some(tx);
        self.set_mode(
            &mut inner,
            if self.bitmap.count_ones() > 0 {
                PeerMode::Resyncing
            } else {
                PeerMode::UpToDate
            },
        );
        drop(inner);
        self.resync_wanted.notify_one();
    }

    /// The link is gone: fold every unacknowledged epoch into the bitmap and
    /// release anyone waiting on this peer.
    pub fn disconnected(&self) {
        self.stats.wan.link_lost();
        if self.connected.swap(false, Ordering::AcqRel) {
            self.emit(EventKind::Change, props([("connected", json!(false))]));
        }
        self.peer_primary.store(false, Ordering::Release);
        let mut inner = self.lock();
        if inner.mode.mirrors() {
            // It misses our writes from now on.
            self.fork_pending.store(true, Ordering::Release);
        }
        self.set_mode(&mut inner, PeerMode::Disconnected);
        inner.behind_until_acked = None;
        inner.tx = None;
        for (_, record) in std::mem::take(&mut inner.unacked) {
            for (offset, len) in record.written {
                self.bitmap.set_bytes(offset, len);
            }
        }
        inner.write_waiters.clear();
        inner.barrier_waiters.clear();
        *self.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.queued.store(0, Ordering::Release);
        drop(inner);
        self.drained.notify_waiters();
    }

    fn send(&self, inner: &Inner, out: Outgoing) -> bool {
        match &inner.tx {
            Some(tx) => {
                self.queued.fetch_add(out.bytes, Ordering::AcqRel);
                tx.send(out).is_ok()
            }
            None => false,
        }
    }

    /// Mirrors one write (called with the epoch lock held, so messages are
    /// queued in epoch order). Returns an ack receiver when `want_ack`.
    /// When the peer cannot take the write, its range goes into the bitmap.
    pub fn mirror(
        &self,
        epoch: u64,
        seq: u64,
        out: Outgoing,
        range: (u64, u64),
        want_ack: bool,
        congestion_limit: u64,
    ) -> Option<oneshot::Receiver<()>> {
        let mut inner = self.lock();
        // Writers wait at `congestion_limit` (see `wait_for_backlog`); this
        // hard cap only bounds memory when many arrive at once.
        let queued = self.queued.load(Ordering::Acquire);
        if inner.mode.mirrors() && queued > congestion_limit.saturating_mul(2) {
            tracing::warn!(peer = %self.config.name, queued,
                "peer is congested: falling behind, resync later");
            self.set_mode(&mut inner, PeerMode::Behind);
            inner.behind_until_acked = inner.unacked.keys().next_back().copied();
            self.fork_pending.store(true, Ordering::Release);
        }
        let payload = out.bytes;
        if !inner.mode.mirrors() || !self.send(&inner, out) {
            self.mark_stale(&mut inner, range);
            return None;
        }
        self.stats
            .mirrored_bytes
            .fetch_add(payload, Ordering::Relaxed);
        inner.unacked.entry(epoch).or_default().written.push(range);
        want_ack.then(|| {
            let (tx, rx) = oneshot::channel();
            inner.write_waiters.insert(seq, tx);
            rx
        })
    }

    /// Marks a range the peer will not receive (or must receive again). A
    /// resync chunk in flight over the same blocks must not clear them when
    /// acked: it carries the older data. Returns the bits newly set.
    fn mark_stale(&self, inner: &mut Inner, (offset, len): (u64, u64)) -> u64 {
        let blocks = self.bitmap.blocks_covering(offset, len);
        for record in inner.unacked.values_mut() {
            record
                .resynced
                .retain(|&(first, count)| first + count <= blocks.start || blocks.end <= first);
        }
        self.bitmap.set_bytes(offset, len)
    }

    /// Queues a resync chunk of the range in `epoch` (epoch lock held): its
    /// data, or a reference to it (`ResyncFrom`), of which only the small
    /// message counts against the send queue. False if the peer stopped
    /// mirroring meanwhile.
    pub fn send_resync(
        &self,
        epoch: u64,
        message: Message,
        first_block: u64,
        blocks: u64,
        offset: u64,
        len: u64,
    ) -> bool {
        let queued = match message {
            Message::ResyncFrom { .. } => RESYNC_REFERENCE_BYTES,
            _ => len,
        };
        let mut inner = self.lock();
        if inner.mode != PeerMode::Resyncing
            || !self.send(
                &inner,
                Outgoing {
                    message,
                    shared: None,
                    bytes: queued,
                },
            )
        {
            return false;
        }
        let record = inner.unacked.entry(epoch).or_default();
        record.written.push((offset, len));
        record.resynced.push((first_block, blocks));
        true
    }

    /// Queues a barrier closing `epoch` (epoch lock held).
    pub fn barrier(&self, term: u64, epoch: u64, want_ack: bool) -> Option<oneshot::Receiver<()>> {
        let mut inner = self.lock();
        if !matches!(
            inner.mode,
            PeerMode::Resyncing | PeerMode::UpToDate | PeerMode::Behind
        ) {
            return None;
        }
        if inner.unacked.len() >= MAX_UNACKED_EPOCHS && !inner.unacked.contains_key(&epoch) {
            if inner.mode.mirrors() {
                let why = format!("{} epochs unacknowledged", inner.unacked.len());
                self.fall_behind_locked(&mut inner, &why);
            } else {
                // Behind, and not even acking barriers: stop queueing to it
                // and drop the link (its unacked epochs fold into the
                // bitmap then).
                let why = format!(
                    "peer left {} epochs unacknowledged while behind; link dropped, it resyncs from the bitmap when it reconnects",
                    inner.unacked.len()
                );
                self.expel_locked(&mut inner, why);
                return None;
            }
        }
        let barrier = Outgoing {
            message: Message::Barrier { term, epoch },
            shared: None,
            bytes: 0,
        };
        if !self.send(&inner, barrier) {
            return None;
        }
        inner.unacked.entry(epoch).or_default();
        // A peer that is behind still gets barriers (its acks are what lets
        // it resume, see `backlog_drained`), but nobody waits for them: it
        // already misses writes, and waiting would make every guest flush
        // take `max_peer_wait_ms` for nothing.
        (want_ack && inner.mode.mirrors()).then(|| {
            let (tx, rx) = oneshot::channel();
            inner.barrier_waiters.push((epoch, tx));
            rx
        })
    }

    /// Sets the bits of every write this peer has not acknowledged that
    /// overlaps one of `ranges` (byte ranges of extents leaving the
    /// activity log, whose bits are about to be persisted), and resyncs
    /// them if the peer is mirrored. Returns the bits newly set.
    ///
    /// Without this, a primary crash after the eviction would lose the
    /// fact that the peer may lack those writes: the unacked epochs live in
    /// memory only, and crash recovery marks only the extents still in the
    /// activity log.
    pub fn persist_unacked_in(&self, ranges: &[(u64, u64)]) -> u64 {
        let inner = self.lock();
        let overlapping: Vec<(u64, u64)> = inner
            .unacked
            .values()
            .flat_map(|record| record.written.iter().copied())
            .filter(|&(offset, len)| {
                ranges
                    .iter()
                    .any(|&(s, l)| offset < s + l && s < offset + len)
            })
            .collect();
        self.resync(inner, &overlapping)
    }

    /// Marks a range stale and, if the peer is mirrored, resyncs it (the
    /// primary's copy of the range is not what the peer was sent).
    pub fn resync_range(&self, offset: u64, len: u64) {
        self.resync(self.lock(), &[(offset, len)]);
    }

    /// Marks `ranges` stale and, if that set any bit of an up-to-date
    /// peer, has the resync loop send them. Returns the bits newly set.
    fn resync(&self, mut inner: std::sync::MutexGuard<'_, Inner>, ranges: &[(u64, u64)]) -> u64 {
        let added: u64 = ranges
            .iter()
            .map(|&range| self.mark_stale(&mut inner, range))
            .sum();
        if added > 0 && inner.mode == PeerMode::UpToDate {
            self.set_mode(&mut inner, PeerMode::Resyncing);
            drop(inner);
            self.resync_wanted.notify_one();
        }
        added
    }

    /// The peer has made every epoch up to `epoch` durable. An ack for an
    /// epoch we never closed on this link is a protocol violation (and
    /// `epoch + 1` must not wrap): refused before anything changes.
    pub fn barrier_acked(&self, epoch: u64, congestion_limit: u64) -> Result<(), String> {
        let mut inner = self.lock();
        let Some(&newest) = inner.unacked.keys().next_back() else {
            // Nothing outstanding: a late duplicate, harmless.
            return Ok(());
        };
        if epoch > newest {
            return Err(format!(
                "BarrierAck for epoch {epoch}, but the newest epoch sent is {newest}"
            ));
        }
        let later = inner.unacked.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut inner.unacked, later);
        for record in done.into_values() {
            for (first, count) in record.resynced {
                self.bitmap.clear_range(first, count);
            }
        }
        let waiters = std::mem::take(&mut inner.barrier_waiters);
        let (ready, pending): (Vec<_>, Vec<_>) =
            waiters.into_iter().partition(|(e, _)| *e <= epoch);
        inner.barrier_waiters = pending;
        drop(inner);
        for (_, tx) in ready {
            let _ = tx.send(());
        }
        self.backlog_drained(congestion_limit);
        Ok(())
    }

    pub fn write_acked(&self, seq: u64) {
        if let Some(tx) = self.lock().write_waiters.remove(&seq) {
            let _ = tx.send(());
        }
    }

    /// Whether a new write must wait before it is queued to this peer: it is
    /// mirrored to, and more than `congestion_limit` bytes are not yet sent.
    pub fn is_congested(&self, congestion_limit: u64) -> bool {
        self.queued.load(Ordering::Acquire) > congestion_limit && self.lock().mode.mirrors()
    }

    /// Waits until the peer is no longer congested. Gives up at `deadline`,
    /// dropping the peer behind so the guest is not held up any longer.
    pub async fn wait_for_backlog(&self, congestion_limit: u64, deadline: tokio::time::Instant) {
        let started = tokio::time::Instant::now();
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.is_congested(congestion_limit) {
                break;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                self.fall_behind("backlog above congestion_limit for max_peer_wait_ms");
                break;
            }
        }
        tracing::trace!(peer = %self.config.name, waited = ?started.elapsed(),
            "guest write waited for the peer's send queue");
    }

    /// A guest write waited too long for this peer: stop waiting for it.
    pub fn fall_behind(&self, why: &str) {
        let mut inner = self.lock();
        self.fall_behind_locked(&mut inner, why);
        drop(inner);
        self.drained.notify_waiters();
    }

    fn fall_behind_locked(&self, inner: &mut Inner, why: &str) {
        if inner.mode.mirrors() {
            tracing::warn!(peer = %self.config.name, "peer falls behind: {why}");
            self.set_mode(inner, PeerMode::Behind);
            inner.behind_until_acked = inner.unacked.keys().next_back().copied();
            self.fork_pending.store(true, Ordering::Release);
        }
        inner.write_waiters.clear();
    }

    /// Stops queueing anything to the peer and asks its link session to
    /// drop the link (`expel_reason` says why). Its writes already go to
    /// the bitmap; what it never acknowledged joins them on disconnect.
    fn expel_locked(&self, inner: &mut Inner, why: String) {
        if inner.tx.take().is_none() {
            return; // already expelled (or never linked)
        }
        tracing::warn!(peer = %self.config.name, "{why}");
        *self.expel_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.expel.notify_one();
    }

    /// Why the current link must be dropped, once `expel` fired (None: a
    /// wake-up left over from an earlier link, to ignore).
    pub fn expel_reason(&self) -> Option<String> {
        self.expel_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether writes of `epoch` were sent and not acknowledged yet.
    pub fn awaits_ack_of(&self, epoch: u64) -> bool {
        self.lock().unacked.contains_key(&epoch)
    }

    /// Called as the backlog drains (by the sender, and when acks arrive):
    /// a peer that fell behind resumes mirroring, and resyncs what it
    /// missed, once half the send limit is free *and* it has acknowledged
    /// all but the last few epochs — socket buffers emptying into a stuck
    /// peer is not progress.
    pub fn backlog_drained(&self, congestion_limit: u64) {
        self.drained.notify_waiters();
        if self.queued.load(Ordering::Acquire) > congestion_limit / 2 {
            return;
        }
        let mut inner = self.lock();
        let progressed = inner.behind_until_acked.is_none_or(|stuck| {
            inner
                .unacked
                .keys()
                .next()
                .is_none_or(|&oldest| oldest > stuck)
        });
        if inner.mode == PeerMode::Behind
            && inner.tx.is_some()
            && progressed
            && inner.unacked.len() <= MAX_UNACKED_TO_RESUME
        {
            tracing::info!(peer = %self.config.name, "backlog drained: resyncing what the peer missed");
            self.set_mode(&mut inner, PeerMode::Resyncing);
            inner.behind_until_acked = None;
            drop(inner);
            self.resync_wanted.notify_one();
        }
    }

    /// The blocks this peer lacks as far as anyone may rely on: its bitmap
    /// plus every write it has not acknowledged yet (for the directory's
    /// report: a crash now must not leave the record claiming the peer
    /// holds writes still in flight to it).
    pub fn lacking(&self) -> Bitmap {
        let copy = self.bitmap.new_like();
        let _ = copy.merge_from(&self.bitmap);
        for record in self.lock().unacked.values() {
            for &(offset, len) in &record.written {
                copy.set_bytes(offset, len);
            }
        }
        copy
    }

    /// A resync run found nothing left and everything acked.
    pub fn mark_up_to_date(&self) -> bool {
        let mut inner = self.lock();
        if inner.mode == PeerMode::Resyncing && self.bitmap.count_ones() == 0 {
            self.set_mode(&mut inner, PeerMode::UpToDate);
            true
        } else {
            false
        }
    }
}

/// A LAN peer mirrored to (its channel kept open, nothing reads it),
/// resyncing when `stale` blocks of its 1024 are set: for unit tests.
#[cfg(test)]
pub(crate) fn test_peer(stale: u64) -> PeerReplica {
    let config = Peer {
        id: 2,
        name: "n2".into(),
        address: "127.0.0.1:1".parse().unwrap(),
        lan_group: "default".into(),
    };
    let bitmap = Arc::new(Bitmap::new(1024, 4096));
    bitmap.set_range(0, stale);
    let replica = PeerReplica::new(
        config,
        true,
        bitmap,
        Arc::new(AtomicBool::new(false)),
        Arc::default(),
    );
    let (tx, rx) = mpsc::unbounded_channel();
    std::mem::forget(rx); // keep the channel open
    replica.start_mirroring(tx);
    replica
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerReplica {
        test_peer(0)
    }

    #[test]
    fn an_ack_for_an_epoch_never_sent_is_refused_and_does_not_wrap() {
        let p = peer();
        // Nothing outstanding: a (late) ack of anything is harmless.
        assert!(p.barrier_acked(u64::MAX, 1 << 20).is_ok());
        assert!(p.barrier(1, 7, false).is_none());
        let write = Message::Barrier { term: 1, epoch: 8 };
        p.mirror(
            8,
            1,
            Outgoing::mirrored(write, None),
            (0, 4096),
            false,
            1 << 20,
        );
        for bogus in [9, u64::MAX] {
            let err = p.barrier_acked(bogus, 1 << 20).unwrap_err();
            assert!(err.contains("newest epoch sent is 8"), "{err}");
        }
        // Nothing was cleared by the refused acks.
        assert_eq!(p.lock().unacked.len(), 2);
        assert!(p.barrier_acked(8, 1 << 20).is_ok());
        assert!(p.lock().unacked.is_empty());
    }

    #[test]
    fn a_behind_peer_gets_barriers_but_nobody_waits_for_them() {
        let p = peer();
        p.fall_behind("test");
        assert_eq!(p.mode(), PeerMode::Behind);
        assert!(p.barrier(1, 1, true).is_none(), "a flush would wait for it");
        assert_eq!(p.lock().unacked.len(), 1, "the barrier was not sent");
    }

    #[test]
    fn unacked_epochs_are_capped_then_a_behind_peer_is_expelled() {
        let p = peer();
        // Empty epochs (flushes with nothing written) carry no payload bytes,
        // so only the epoch cap stops them from piling up.
        for epoch in 1..=MAX_UNACKED_EPOCHS as u64 {
            p.barrier(1, epoch, false);
        }
        assert_eq!(p.mode(), PeerMode::UpToDate);
        p.barrier(1, MAX_UNACKED_EPOCHS as u64 + 1, false);
        assert_eq!(
            p.mode(),
            PeerMode::Behind,
            "a mirrored peer falls behind first"
        );
        assert!(p.expel_reason().is_none());
        // Behind: still barriers, up to the cap, then the link is dropped.
        let next = MAX_UNACKED_EPOCHS as u64 + 2;
        assert!(p.barrier(1, next, false).is_none());
        let why = p.expel_reason().expect("expelled");
        assert!(why.contains("unacknowledged while behind"), "{why}");
        assert!(p.lock().tx.is_none(), "nothing more is queued to it");
        let unacked = p.lock().unacked.len();
        p.barrier(1, next + 1, false);
        assert_eq!(p.lock().unacked.len(), unacked, "no growth once expelled");
        // Its writes go to the bitmap meanwhile.
        let write = Message::Barrier { term: 1, epoch: 0 };
        assert!(p
            .mirror(
                next + 1,
                9,
                Outgoing::mirrored(write, None),
                (8192, 4096),
                false,
                1 << 20
            )
            .is_none());
        assert_eq!(p.bitmap.count_ones(), 1);
        p.disconnected();
        assert!(p.lock().unacked.is_empty());
    }
}
