//! The on-demand fetch layer: a [`BlockDevice`] that makes stale blocks
//! present before anyone reads them.
//!
//! After a machine switch the new primary exposes its device at once, while
//! many of its blocks are older than another node's copy (bit set in its
//! *stale* bitmap). [`LazyDevice`] wraps the local store and, while active,
//!
//! * fetches the stale blocks a read touches from a [`BlockSource`] (the
//!   network, in the daemon) before reading them locally, coalescing the run
//!   of stale neighbours and reading ahead;
//! * fetches the stale edge blocks a write covers only partly, so the write
//!   merges into the newest version; a block a write covers whole needs no
//!   fetch: the write makes it newest and clears its bit;
//! * pulls the rest in the background ([`LazyDevice::start_background_sync`]).
//!
//! # Safety rules and why they hold
//!
//! * **No read returns stale data.** A read first makes every block it
//!   touches non-stale; a bit is cleared only after the newest data is in the
//!   inner device.
//! * **A fetch never overwrites a guest write.** Fetches and writes claim
//!   their blocks in a table ([`inflight`]) whose claims never overlap; a
//!   fetch writes back only the blocks still stale when its data arrives
//!   (a guest write over them has cleared their bits meanwhile).
//! * **An acknowledged write is never re-fetched over after a crash.** When
//!   a guest write, discard or write-zeroes completes, the *persisted* stale
//!   bit of every block it touched is clear (see [`PersistStale`] and
//!   `Shared::modify`).
//! * **A persisted clear bit always has durable data behind it.** Fetched
//!   data is written with FUA before its bits are cleared, and a guest write
//!   that clears set bits is made durable (FUA, or a flush for discard and
//!   write-zeroes) before them. So whoever persists the bitmap, whenever, the
//!   disk never says "newest" over an old copy.

mod background;
mod inflight;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::device::{check_range, BlockDevice};
use crate::meta::Bitmap;
use inflight::{wait_released, Claim, InFlight};

/// A boxed, sendable future (what [`BlockSource`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a holder answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The newest contents of exactly the requested range.
    Data(Bytes),
    /// The holder's copy hashes like the `local_hash` we sent: ours is newest.
    Same,
}

/// Where the newest version of stale blocks comes from (the network, in the
/// daemon). It picks holders, retries and times out (then fails with `EIO`);
/// the layer does not care how.
pub trait BlockSource: Send + Sync + 'static {
    /// The newest contents of `[offset, offset + len)` (block-aligned, except
    /// that the range ends at the device size; `len <= 8 MiB`).
    ///
    /// `local_hash` is the BLAKE3 of our current local copy of exactly that
    /// range; the source may answer [`Fetched::Same`] when the holder's copy
    /// hashes the same (only then: `Same` without a hash is an error).
    fn fetch(
        &self,
        offset: u64,
        len: u64,
        local_hash: Option<[u8; 32]>,
    ) -> BoxFuture<'_, io::Result<Fetched>>;
}

/// Makes cleared stale bits durable, for the given block numbers (the daemon
/// passes a closure over its metadata, e.g. `NodeBitmaps::flush`). Blocking
/// I/O: the layer calls it through `spawn_blocking`.
///
/// It must not return before every clear made before the call, in those
/// blocks' bitmap pages, is durable — including pages whose dirty mark a
/// concurrent flush has already taken but not yet written. `NodeBitmaps`
/// guarantees that with its flush lock; on failure it must leave the pages
/// marked dirty.
pub type PersistStale = Arc<dyn Fn(Range<u64>) -> io::Result<()> + Send + Sync>;

/// Bytes read ahead past the end of a read, through stale blocks.
pub const READ_AHEAD: u64 = 256 << 10;
/// Largest single on-demand fetch; longer runs become concurrent fetches.
pub const MAX_FETCH: u64 = 1 << 20;
/// Largest range a [`BlockSource`] is ever asked for.
pub const MAX_SOURCE_REQUEST: u64 = 8 << 20;

/// Options of the background sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOptions {
    /// Bytes per second requested from the source; 0 = unlimited.
    pub rate: u64,
    /// 4 MiB extents (e.g. the old primary's activity log) to pull first.
    pub hot_extents: Vec<u64>,
    /// Bytes per fetch (rounded down to whole blocks, at least one, at most
    /// [`MAX_SOURCE_REQUEST`]; 0 = the default, 1 MiB).
    pub chunk: u64,
    /// Fetches in flight at once (0 = the default, 4).
    pub concurrency: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            rate: 0,
            hot_extents: Vec::new(),
            chunk: 1 << 20,
            concurrency: 4,
        }
    }
}

/// A snapshot of the fetch layer's progress (for `vmsyncctl status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// A background sync is running.
    pub running: bool,
    /// Bytes still stale locally.
    pub stale_bytes: u64,
    /// Data received, on demand and background.
    pub fetched_bytes: u64,
    /// Ranges the holder said were the same as our copy.
    pub same_bytes: u64,
    /// Fetches made for guest I/O.
    pub on_demand_fetches: u64,
    /// Recent rate at which stale bytes are resolved (0 when not running).
    pub rate_bytes_per_sec: u64,
    /// At the current rate; `Some(0)` when nothing is stale.
    pub eta_seconds: Option<u64>,
    /// The last fetch error, if any.
    pub last_error: Option<String>,
}

/// The on-demand fetch layer over `D` (see the module docs).
pub struct LazyDevice<D: BlockDevice> {
    shared: Arc<Shared<D>>,
}

/// Who a fetch is for: on-demand fetches skip the local hash (a local read
/// would only add latency to a guest read waiting for the network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchKind {
    OnDemand,
    Background,
}

/// A guest modification, applied under a claim.
enum Modify {
    Write(Bytes, bool),
    Discard,
    Zeroes,
}

struct SyncHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Counters {
    /// The background sync's cap in bytes per second (0: unlimited); set by
    /// `start_background_sync` and `set_sync_rate`, read before every fetch.
    sync_rate: AtomicU64,
    fetched_bytes: AtomicU64,
    same_bytes: AtomicU64,
    on_demand_fetches: AtomicU64,
    rate: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Everything the device and its spawned tasks share.
pub(crate) struct Shared<D: BlockDevice> {
    inner: Arc<D>,
    stale: Arc<Bitmap>,
    persist: PersistStale,
    runtime: Handle,
    size: u64,
    block_size: u64,
    active: AtomicBool,
    source: Mutex<Option<Arc<dyn BlockSource>>>,
    inflight: Arc<InFlight>,
    /// Operations using the source or the claims table; `deactivate` waits
    /// for 0.
    ops: watch::Sender<usize>,
    /// Guest operations waiting for the network: the background sync starts
    /// nothing new while this is non-zero.
    demand_waiting: AtomicUsize,
    /// When the guest last did I/O (milliseconds since `epoch`): while it
    /// is busy the background sync only trickles (see `background`).
    last_guest_io_ms: AtomicU64,
    epoch: std::time::Instant,
    /// Blocks whose stale bit a fetch cleared and that may not be persisted
    /// yet. A guest write over one must persist before it completes.
    /// Set after the stale bit is cleared; cleared only after a persist that
    /// covers it (or, by `flush`, before one, with `persists_in_flight` up).
    unpersisted: Bitmap,
    /// Persist calls of this layer under way: a write that sees one must
    /// persist too (its block's dirty mark may be in that call's hands).
    persists_in_flight: AtomicUsize,
    /// A persist failed: every write persists until a full flush succeeds.
    persist_failed: AtomicBool,
    counters: Counters,
    sync: Mutex<Option<SyncHandle>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error the kernel sees as `EIO` (see `device::errno_of`).
fn eio(message: String) -> io::Error {
    io::Error::other(message)
}

fn join_error(err: tokio::task::JoinError) -> io::Error {
    eio(format!("lazy fetch task failed: {err}"))
}

/// Holds `deactivate` off while alive.
pub(crate) struct OpGuard<D: BlockDevice>(Arc<Shared<D>>);

impl<D: BlockDevice> Drop for OpGuard<D> {
    fn drop(&mut self) {
        self.0.ops.send_modify(|n| *n -= 1);
    }
}

/// Counts a guest operation waiting for the network while alive.
struct DemandGuard<'a>(&'a AtomicUsize);

impl<'a> DemandGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, SeqCst);
        DemandGuard(counter)
    }
}

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Counts a persist call of this layer while alive.
struct PersistGuard<'a>(&'a AtomicUsize);

impl<'a> PersistGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, SeqCst);
        PersistGuard(counter)
    }
}

impl Drop for PersistGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl<D: BlockDevice> Shared<D> {
    fn is_active(&self) -> bool {
        self.active.load(SeqCst)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Notes guest I/O (only counted while active: nothing else needs it).
    fn guest_io(&self) {
        if self.is_active() {
            self.last_guest_io_ms.store(self.now_ms(), SeqCst);
        }
    }

    /// Whether the guest did I/O within the last `window`.
    pub(crate) fn guest_busy(&self, window: std::time::Duration) -> bool {
        let last = self.last_guest_io_ms.load(SeqCst);
        last != 0 && self.now_ms().saturating_sub(last) < window.as_millis() as u64
    }

    fn source(&self) -> io::Result<Arc<dyn BlockSource>> {
        lock(&self.source)
            .clone()
            .ok_or_else(|| eio("the fetch layer has no block source".into()))
    }

    /// Registers an operation, unless the layer is inactive. Registering
    /// before checking `active` (which `deactivate` clears before waiting for
    /// 0) means `deactivate` either sees this operation or it sees inactive.
    pub(crate) fn begin_op(self: &Arc<Self>) -> Option<OpGuard<D>> {
        self.ops.send_modify(|n| *n += 1);
        let guard = OpGuard(Arc::clone(self));
        self.is_active().then_some(guard)
    }

    /// Another registration for a task spawned by a registered operation.
    fn hold_op(self: &Arc<Self>) -> OpGuard<D> {
        self.ops.send_modify(|n| *n += 1);
        OpGuard(Arc::clone(self))
    }

    fn stale_bytes(&self) -> u64 {
        (self.stale.count_ones() * self.block_size).min(self.size)
    }

    /// Byte range of `blocks`, clipped to the device.
    fn byte_range(&self, blocks: &Range<u64>) -> (u64, u64) {
        let start = blocks.start * self.block_size;
        let end = (blocks.end * self.block_size).min(self.size);
        (start, end - start)
    }

    fn set_last_error(&self, message: String) {
        *lock(&self.counters.last_error) = Some(message);
    }

    /// Runs `persist(blocks)` on a blocking thread.
    async fn persist(self: &Arc<Self>, blocks: Range<u64>) -> io::Result<()> {
        let _counted = PersistGuard::new(&self.persists_in_flight);
        let persist = Arc::clone(&self.persist);
        let range = blocks.clone();
        let result = self
            .runtime
            .spawn_blocking(move || persist(range))
            .await
            .unwrap_or_else(|e| Err(join_error(e)));
        if let Err(e) = &result {
            self.persist_failed.store(true, SeqCst);
            tracing::warn!(blocks = ?blocks, error = %e, "persisting cleared stale bits failed");
        }
        result
    }

    /// Fetches `blocks`, which the caller has claimed, and makes them
    /// present: the blocks still stale get the newest data (written with FUA
    /// first, see the module docs) and lose their bit.
    pub(crate) async fn fetch_claimed(
        self: &Arc<Self>,
        source: &Arc<dyn BlockSource>,
        blocks: Range<u64>,
        kind: FetchKind,
    ) -> io::Result<()> {
        let (offset, len) = self.byte_range(&blocks);
        let local_hash = match kind {
            FetchKind::OnDemand => None,
            FetchKind::Background => {
                let mut local = vec![0u8; len as usize];
                self.inner.read(offset, &mut local).await?;
                Some(*blake3::hash(&local).as_bytes())
            }
        };
        if kind == FetchKind::OnDemand {
            self.counters.on_demand_fetches.fetch_add(1, SeqCst);
        }
        let fetched = source.fetch(offset, len, local_hash).await.map_err(|e| {
            if kind == FetchKind::OnDemand {
                // The guest I/O that needed it fails; the bits stay set.
                tracing::warn!(offset, len, error = %e, "on-demand fetch failed");
            }
            self.set_last_error(format!("fetching {offset}+{len} failed: {e}"));
            e
        })?;
        let data = match fetched {
            Fetched::Data(data) if data.len() as u64 == len => {
                self.counters.fetched_bytes.fetch_add(len, SeqCst);
                Some(data)
            }
            Fetched::Data(data) => {
                let message = format!(
                    "the source answered {} bytes for {offset}+{len}",
                    data.len()
                );
                self.set_last_error(message.clone());
                return Err(eio(message));
            }
            Fetched::Same if local_hash.is_some() => {
                self.counters.same_bytes.fetch_add(len, SeqCst);
                None
            }
            Fetched::Same => {
                let message = format!("the source answered Same for {offset}+{len} without a hash");
                self.set_last_error(message.clone());
                return Err(eio(message));
            }
        };
        // We hold the claim, so no guest write can clear bits meanwhile; a
        // bit found clear was cleared before our claim by someone whose data
        // is newer than ours. Only the runs still stale are written.
        let mut pos = blocks.start;
        while let Some(first) = self.stale.next_set_in(pos..blocks.end) {
            let end = self
                .stale
                .next_clear_in(first..blocks.end)
                .unwrap_or(blocks.end);
            if let Some(data) = &data {
                let (run_offset, run_len) = self.byte_range(&(first..end));
                let at = (run_offset - offset) as usize;
                let slice = data.slice(at..at + run_len as usize);
                self.inner.write(run_offset, slice, true).await?;
            }
            // Clear first, then mark unpersisted: see `flush`.
            self.stale.clear_range(first, end - first);
            self.unpersisted.set_range(first, end - first);
            pos = end;
        }
        Ok(())
    }

    /// Makes every block of the byte range present (the body of
    /// [`LazyDevice::ensure_present`]).
    async fn ensure_present(self: Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 || !self.is_active() {
            return Ok(());
        }
        let blocks = self.stale.blocks_covering(offset, len);
        if !self
            .stale
            .any_in_range(blocks.start, blocks.end - blocks.start)
        {
            return Ok(());
        }
        let Some(_op) = self.begin_op() else {
            return Ok(());
        };
        let _waiting = DemandGuard::new(&self.demand_waiting);
        let source = self.source()?;
        let read_ahead_end = blocks.end + READ_AHEAD / self.block_size;
        let max_blocks = (MAX_FETCH / self.block_size).max(1);
        loop {
            let plan =
                self.inflight
                    .plan_read(&self.stale, blocks.clone(), read_ahead_end, max_blocks);
            if plan.is_empty() {
                return Ok(());
            }
            // Spawned, so a fetch completes (and releases its claim) even if
            // this future is dropped, and several run at once.
            let fetches: Vec<_> = plan
                .fetch
                .into_iter()
                .map(|claim| {
                    let shared = Arc::clone(&self);
                    let source = Arc::clone(&source);
                    let op = self.hold_op();
                    self.runtime.spawn(async move {
                        let result = shared
                            .fetch_claimed(&source, claim.blocks(), FetchKind::OnDemand)
                            .await;
                        drop((claim, op));
                        result
                    })
                })
                .collect();
            let mut result = Ok(());
            for fetch in fetches {
                let outcome = fetch.await.unwrap_or_else(|e| Err(join_error(e)));
                if result.is_ok() {
                    result = outcome;
                }
            }
            result?;
            for released in plan.wait {
                wait_released(released).await;
            }
            // Whatever we waited for may have failed: look again.
        }
    }

    /// A guest write, discard or write-zeroes while active (see the module
    /// docs for the rules).
    async fn modify(self: &Arc<Self>, offset: u64, len: u64, op: Modify) -> io::Result<()> {
        let Some(_op) = self.begin_op() else {
            return self.apply(offset, len, op, false).await;
        };
        let touched = self.stale.blocks_covering(offset, len);
        let whole = self.stale.blocks_within(offset, len);
        // Wait until no fetch (or other write) holds any touched block.
        let claim = loop {
            match self.inflight.try_claim(touched.clone()) {
                Ok(claim) => break claim,
                Err(released) => {
                    let _waiting = DemandGuard::new(&self.demand_waiting);
                    wait_released(released).await;
                }
            }
        };
        // Partly covered stale edges get the newest data to merge into.
        let mut edges = vec![touched.start, touched.end - 1];
        edges.dedup();
        edges.retain(|edge| !whole.contains(edge) && self.stale.test(*edge));
        let claim = if edges.is_empty() {
            claim
        } else {
            self.fetch_edges(claim, edges).await?
        };
        let clears = !whole.is_empty()
            && self
                .stale
                .any_in_range(whole.start, whole.end - whole.start);
        // Clearing set bits: the data must be durable before the clear can
        // be persisted (by us below, or by anyone later).
        self.apply(offset, len, op, clears).await?;
        if clears {
            self.stale.clear_range(whole.start, whole.end - whole.start);
        }
        // Order matters: `unpersisted` before `persists_in_flight` (see
        // `flush`, which raises the counter before it clears the set).
        let must_persist = clears
            || self.persist_failed.load(SeqCst)
            || self
                .unpersisted
                .any_in_range(touched.start, touched.end - touched.start)
            || self.persists_in_flight.load(SeqCst) > 0;
        if must_persist {
            self.persist(touched.clone()).await?;
            // Our claim keeps fetches off these blocks: nothing set these
            // bits since the persist.
            self.unpersisted
                .clear_range(touched.start, touched.end - touched.start);
        }
        drop(claim);
        Ok(())
    }

    /// Fetches the stale `edges` of a write's claimed range on the runtime
    /// (the source may need tokio, the caller's executor may not be tokio).
    /// The task owns the claim while it fetches, so a write dropped
    /// mid-fetch cannot let another write in under the fetch; it hands the
    /// claim back when done.
    async fn fetch_edges(self: &Arc<Self>, claim: Claim, edges: Vec<u64>) -> io::Result<Claim> {
        let _waiting = DemandGuard::new(&self.demand_waiting);
        let source = self.source()?;
        let shared = Arc::clone(self);
        let task = self.runtime.spawn(async move {
            for edge in edges {
                shared
                    .fetch_claimed(&source, edge..edge + 1, FetchKind::OnDemand)
                    .await?;
            }
            Ok(claim)
        });
        task.await.unwrap_or_else(|e| Err(join_error(e)))
    }

    /// Applies a modification to the inner device; `durable` forces it to
    /// stable storage before returning.
    async fn apply(&self, offset: u64, len: u64, op: Modify, durable: bool) -> io::Result<()> {
        match op {
            Modify::Write(data, fua) => self.inner.write(offset, data, fua || durable).await,
            Modify::Discard => {
                self.inner.discard(offset, len).await?;
                if durable {
                    self.inner.flush().await?;
                }
                Ok(())
            }
            Modify::Zeroes => {
                self.inner.write_zeroes(offset, len).await?;
                if durable {
                    self.inner.flush().await?;
                }
                Ok(())
            }
        }
    }

    async fn flush(self: &Arc<Self>) -> io::Result<()> {
        self.inner.flush().await?;
        let Some(_op) = self.begin_op() else {
            return Ok(());
        };
        // Raise the counter before emptying `unpersisted`: a write that finds
        // its block's mark gone from the set then sees the counter and
        // persists too (serialising behind this persist).
        let _counted = PersistGuard::new(&self.persists_in_flight);
        self.persist_failed.store(false, SeqCst);
        if self.unpersisted.count_ones() > 0 {
            self.unpersisted.clear_all();
        }
        self.persist(0..self.stale.nbits()).await
    }
}

impl<D: BlockDevice> LazyDevice<D> {
    /// A layer over `inner` with stale bitmap `stale` (ours); inactive until
    /// [`activate`](Self::activate). `runtime` runs fetches, the background
    /// sync and `persist` (via `spawn_blocking`).
    pub fn new(inner: Arc<D>, stale: Arc<Bitmap>, persist: PersistStale, runtime: Handle) -> Self {
        let size = inner.size();
        let block_size = u64::from(stale.block_size());
        let unpersisted = stale.new_like();
        LazyDevice {
            shared: Arc::new(Shared {
                inner,
                stale,
                persist,
                runtime,
                size,
                block_size,
                active: AtomicBool::new(false),
                source: Mutex::new(None),
                inflight: Arc::new(InFlight::default()),
                ops: watch::Sender::new(0),
                demand_waiting: AtomicUsize::new(0),
                last_guest_io_ms: AtomicU64::new(0),
                epoch: std::time::Instant::now(),
                unpersisted,
                persists_in_flight: AtomicUsize::new(0),
                persist_failed: AtomicBool::new(false),
                counters: Counters::default(),
                sync: Mutex::new(None),
            }),
        }
    }

    pub fn inner(&self) -> &Arc<D> {
        &self.shared.inner
    }

    pub fn stale_bitmap(&self) -> &Arc<Bitmap> {
        &self.shared.stale
    }

    /// From now on stale blocks are fetched from `source` (replacing any
    /// previous source).
    pub fn activate(&self, source: Arc<dyn BlockSource>) {
        *lock(&self.shared.source) = Some(source);
        self.shared.active.store(true, SeqCst);
    }

    /// Stops the background sync, waits for every operation that uses the
    /// source or the claims table (fetches, and guest writes waiting for
    /// them), persists the bits fetches cleared (a later pass-through write
    /// over such a block would not), then drops the source. Afterwards the
    /// layer is a pure pass-through; the bits stay as they are.
    ///
    /// A pass-through write does not clear bits: blocks still stale then
    /// must not be written by the guest if the layer is to be activated
    /// again (a fetch would overwrite those writes).
    pub async fn deactivate(&self) {
        self.shared.active.store(false, SeqCst);
        let sync = lock(&self.shared.sync).take();
        if let Some(sync) = sync {
            let _ = sync.stop.send(true);
            let _ = sync.task.await;
        }
        let mut ops = self.shared.ops.subscribe();
        let _ = ops.wait_for(|&n| n == 0).await;
        let shared = &self.shared;
        if shared.unpersisted.count_ones() > 0 || shared.persist_failed.load(SeqCst) {
            let _counted = PersistGuard::new(&shared.persists_in_flight);
            shared.persist_failed.store(false, SeqCst);
            shared.unpersisted.clear_all();
            // A failure is logged by `persist`. What is at stake is a later
            // pass-through write over a fetched block: with its clear lost,
            // a re-activation after a crash would fetch over it.
            let _ = shared.persist(0..shared.stale.nbits()).await;
        }
        *lock(&self.shared.source) = None;
    }

    pub fn is_active(&self) -> bool {
        self.shared.is_active()
    }

    /// Whether the layer is active and any block of the byte range is stale
    /// (cheap; false for an invalid range).
    pub fn needs_fetch(&self, offset: u64, len: u64) -> bool {
        self.shared.is_active()
            && len > 0
            && check_range(self.shared.size, offset, len).is_ok()
            && self.shared.stale.any_in_bytes(offset, len)
    }

    /// Fetches whatever of the byte range is stale. `'static`, so a caller
    /// can spawn it on tokio and then do a plain read of the inner device.
    pub fn ensure_present(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        Arc::clone(&self.shared).ensure_present(offset, len)
    }

    /// Bytes still stale locally.
    pub fn stale_bytes(&self) -> u64 {
        self.shared.stale_bytes()
    }

    /// Starts pulling every stale block in the background (replacing any
    /// running sync). Call it after [`activate`](Self::activate): the sync
    /// ends at once when the layer is inactive.
    pub fn start_background_sync(self: &Arc<Self>, options: SyncOptions) {
        self.set_sync_rate(options.rate);
        let (stop, stopped) = watch::channel(false);
        let task =
            self.shared
                .runtime
                .spawn(background::run(Arc::clone(&self.shared), options, stopped));
        let old = lock(&self.shared.sync).replace(SyncHandle { stop, task });
        if let Some(old) = old {
            let _ = old.stop.send(true);
        }
    }

    /// Changes the background sync's cap (bytes per second, 0: unlimited),
    /// for a sync already running too.
    pub fn set_sync_rate(&self, rate: u64) {
        self.shared.counters.sync_rate.store(rate, SeqCst);
    }

    pub fn sync_stats(&self) -> SyncStats {
        let shared = &self.shared;
        let running = lock(&shared.sync)
            .as_ref()
            .is_some_and(|sync| !sync.task.is_finished());
        let stale_bytes = shared.stale_bytes();
        let rate = if running {
            shared.counters.rate.load(SeqCst)
        } else {
            0
        };
        let eta_seconds = match (stale_bytes, rate) {
            (0, _) => Some(0),
            (_, 0) => None,
            (stale, rate) => Some(stale.div_ceil(rate)),
        };
        SyncStats {
            running,
            stale_bytes,
            fetched_bytes: shared.counters.fetched_bytes.load(SeqCst),
            same_bytes: shared.counters.same_bytes.load(SeqCst),
            on_demand_fetches: shared.counters.on_demand_fetches.load(SeqCst),
            rate_bytes_per_sec: rate,
            eta_seconds,
            last_error: lock(&shared.counters.last_error).clone(),
        }
    }
}

impl<D: BlockDevice> Drop for LazyDevice<D> {
    /// Stops the background sync (it holds the shared state alive).
    fn drop(&mut self) {
        if let Some(sync) = lock(&self.shared.sync).take() {
            let _ = sync.stop.send(true);
        }
    }
}

impl<D: BlockDevice> BlockDevice for LazyDevice<D> {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn io_files(&self) -> Vec<std::os::fd::RawFd> {
        self.shared.inner.io_files()
    }

    /// Reads of blocks this node holds go to the inner device unchanged.
    fn read_file(&self) -> Option<crate::device::DirectFile> {
        self.shared.inner.read_file()
    }

    /// As `read` decides: a range with no stale block (or with fetching
    /// over) is read from the inner device as it is.
    fn read_directly(&self, offset: u64, len: u64) -> bool {
        if check_range(self.shared.size, offset, len).is_err() {
            return false;
        }
        self.shared.guest_io();
        !self.needs_fetch(offset, len) && self.shared.inner.read_directly(offset, len)
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        check_range(self.shared.size, offset, len)?;
        self.shared.guest_io();
        if self.shared.is_active() && len > 0 && self.shared.stale.any_in_bytes(offset, len) {
            Arc::clone(&self.shared).ensure_present(offset, len).await?;
        }
        self.shared.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        check_range(self.shared.size, offset, len)?;
        self.shared.guest_io();
        if len == 0 || !self.shared.is_active() {
            return self.shared.inner.write(offset, data, fua).await;
        }
        self.shared
            .modify(offset, len, Modify::Write(data, fua))
            .await
    }

    async fn flush(&self) -> io::Result<()> {
        if !self.shared.is_active() {
            return self.shared.inner.flush().await;
        }
        self.shared.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.shared.size, offset, len)?;
        self.shared.guest_io();
        if len == 0 || !self.shared.is_active() {
            return self.shared.inner.discard(offset, len).await;
        }
        self.shared.modify(offset, len, Modify::Discard).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.shared.size, offset, len)?;
        self.shared.guest_io();
        if len == 0 || !self.shared.is_active() {
            return self.shared.inner.write_zeroes(offset, len).await;
        }
        self.shared.modify(offset, len, Modify::Zeroes).await
    }
}
