//! The activity log (AL): the persisted set of extents this node may be
//! writing to.
//!
//! Before a node writes into an extent (as primary, or applying its
//! primary's writes as secondary), the extent must be in the AL on disk. In
//! exchange, staleness bits of AL extents may stay in memory only (see
//! `node_bitmaps`): whenever the data generation changes hands — this node
//! is promoted, or as a secondary meets a primary of another generation —
//! every AL extent is marked stale between the two
//! (`Metadata::mark_active_extents`), which covers whatever a crash lost
//! and whatever one node wrote that the other never saw. The AL holds at
//! most `al_slots` extents; adding one to a full AL evicts the least
//! recently used extent that has no write in flight, after calling the
//! eviction hook (bits that live elsewhere, see
//! [`ActivityLog::set_eviction_hook`]) and persisting the bitmap pages that
//! cover it.
//!
//! # Use from the write path
//!
//! ```text
//! let guard = activity_log.begin_write(offset, len)?;  // may block, may do I/O
//! ... write locally, send to peers, set stale bits of peers that miss it ...
//! drop(guard);  // the write is done here; what a peer has not acked yet
//!               // reaches its bitmap through the eviction hook
//! ```
//!
//! The fast path (all extents already active, [`ActivityLog::pin_if_active`])
//! takes a mutex, bumps counters and does no I/O, even while another thread
//! is writing a transaction. A miss writes one transaction sector plus
//! `fdatasync`, and, when it evicts an extent with dirty bitmap pages, those
//! pages first.
//!
//! When every slot holds an extent with writes in flight, `begin_io` BLOCKS
//! until a guard is dropped. A thread must therefore not wait for a second
//! guard while holding one (unless the AL has room for both), or it can
//! deadlock itself; and an async caller must not wait on a runtime thread
//! that the guard's release needs (take the slow path on a blocking pool).
//!
//! If a transaction or bitmap write fails, the on-disk state is uncertain: the
//! AL refuses further changes (`MetaError::AlFailed`); extents already active
//! keep working. The daemon should treat this like a failed metadata disk.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::al_ring::{self, AlTransaction};
use super::file::MetaFile;
use super::layout::Layout;
use super::node_bitmaps::NodeBitmaps;
use super::MetaError;

/// The activity log of one metadata file. Shared through an [`Arc`] because
/// every [`AlGuard`] keeps it alive.
pub struct ActivityLog {
    file: Arc<MetaFile>,
    layout: Layout,
    bitmaps: Arc<NodeBitmaps>,
    /// Called with the extents about to leave the AL, before their bitmap
    /// pages are persisted (see [`ActivityLog::set_eviction_hook`]).
    eviction_hook: std::sync::OnceLock<EvictionHook>,
    state: Mutex<State>,
    /// Signalled when a transaction completes, an extent's last write ends,
    /// or the AL is closed or fails.
    changed: Condvar,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Writes holding this extent.
    inflight: u32,
    /// Logical time of the last `begin_io` touching it, for LRU eviction.
    last_used: u64,
    /// False while the transaction adding it is being written.
    persisted: bool,
}

#[derive(Debug)]
struct State {
    slots: HashMap<u64, Slot>,
    clock: u64,
    last_seq: u64,
    /// A thread is writing a transaction (without holding the mutex).
    committing: bool,
    /// Threads blocked on `changed`; avoids futile wake-ups on the fast path.
    waiting: usize,
    /// Live guards.
    guards: u64,
    closed: bool,
    failed: bool,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn all_persisted(&self, extents: &Range<u64>) -> bool {
        extents
            .clone()
            .all(|e| self.slots.get(&e).is_some_and(|slot| slot.persisted))
    }

    fn pin(&mut self, extents: &Range<u64>) {
        let now = self.tick();
        for e in extents.clone() {
            let slot = self.slots.get_mut(&e).expect("pinned extents are active");
            slot.inflight += 1;
            slot.last_used = now;
        }
        self.guards += 1;
    }

    /// The `count` least recently used idle extents outside `keep`, or `None`
    /// if there are not that many.
    fn pick_victims(&self, count: usize, keep: &Range<u64>) -> Option<Vec<u64>> {
        if count == 0 {
            return Some(Vec::new());
        }
        let mut idle: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(e, slot)| slot.inflight == 0 && !keep.contains(e))
            .map(|(&e, slot)| (slot.last_used, e))
            .collect();
        if idle.len() < count {
            return None;
        }
        idle.select_nth_unstable(count - 1);
        Some(idle[..count].iter().map(|&(_, e)| e).collect())
    }

    /// Active extents, least recently used first.
    fn lru_order(&self) -> Vec<u64> {
        let mut extents: Vec<(u64, u64)> = self
            .slots
            .iter()
            .map(|(&e, slot)| (slot.last_used, e))
            .collect();
        extents.sort_unstable();
        extents.into_iter().map(|(_, e)| e).collect()
    }
}

/// See [`ActivityLog::set_eviction_hook`].
pub type EvictionHook = Box<dyn Fn(&[u64]) + Send + Sync>;

/// Proof that a range of extents is in the persisted AL and cannot be
/// evicted; dropping it ends the I/O. `Send`, and independent of any borrow,
/// so it can travel with a request across threads and tasks.
#[must_use = "dropping the guard ends the I/O at once"]
pub struct AlGuard {
    log: Arc<ActivityLog>,
    extents: Range<u64>,
}

impl AlGuard {
    /// The extents this guard holds.
    pub fn extents(&self) -> Range<u64> {
        self.extents.clone()
    }
}

impl std::fmt::Debug for AlGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlGuard")
            .field("extents", &self.extents)
            .finish()
    }
}

impl Drop for AlGuard {
    fn drop(&mut self) {
        self.log.end_io(&self.extents);
    }
}

impl ActivityLog {
    /// Loads the newest valid transaction from the ring.
    pub(crate) fn load(
        file: Arc<MetaFile>,
        layout: Layout,
        bitmaps: Arc<NodeBitmaps>,
    ) -> Result<ActivityLog, MetaError> {
        let newest = al_ring::read_newest(&file, &layout)?;
        let (last_seq, extents) = newest.map_or((0, Vec::new()), |txn| (txn.seq, txn.extents));
        let slots: HashMap<u64, Slot> = (1..)
            .zip(extents)
            .map(|(last_used, e)| {
                let slot = Slot {
                    inflight: 0,
                    last_used,
                    persisted: true,
                };
                (e, slot)
            })
            .collect();
        let state = State {
            clock: slots.len() as u64,
            slots,
            last_seq,
            committing: false,
            waiting: 0,
            guards: 0,
            closed: false,
            failed: false,
        };
        Ok(ActivityLog {
            file,
            layout,
            bitmaps,
            eviction_hook: std::sync::OnceLock::new(),
            state: Mutex::new(state),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock leaves nothing half-done worth refusing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.waiting += 1;
        let mut state = self
            .changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
        state.waiting -= 1;
        state
    }

    fn notify(&self, state: &State) {
        if state.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// Installs `hook`, called with the extents about to be evicted, before
    /// their bitmap pages are persisted: a last chance to set bits that
    /// live elsewhere (a primary's writes not yet acknowledged by a peer),
    /// since after eviction a crash no longer marks those extents. Runs
    /// without the AL's lock held. Only the first hook installed counts.
    pub fn set_eviction_hook(&self, hook: EvictionHook) {
        let _ = self.eviction_hook.set(hook);
    }

    /// [`begin_io`](Self::begin_io) for the extents covering a byte range.
    pub fn begin_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<AlGuard, MetaError> {
        self.begin_io(self.layout.extents_covering(offset, len))
    }

    /// Ensures `extents` are in the persisted AL and pins them until the
    /// returned guard is dropped. Blocks while a needed transaction is being
    /// written, or while the AL is full of extents with writes in flight.
    pub fn begin_io(self: &Arc<Self>, extents: Range<u64>) -> Result<AlGuard, MetaError> {
        self.check_request(&extents)?;
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(MetaError::AlClosed {
                    path: self.file.path().to_owned(),
                });
            }
            if state.all_persisted(&extents) {
                state.pin(&extents);
                return Ok(AlGuard {
                    log: Arc::clone(self),
                    extents,
                });
            }
            if state.failed {
                return Err(MetaError::AlFailed {
                    path: self.file.path().to_owned(),
                });
            }
            if state.committing {
                state = self.wait(state);
                continue;
            }
            let missing: Vec<u64> = extents
                .clone()
                .filter(|e| !state.slots.contains_key(e))
                .collect();
            let excess = (state.slots.len() + missing.len()).saturating_sub(self.capacity());
            let Some(victims) = state.pick_victims(excess, &extents) else {
                state = self.wait(state);
                continue;
            };
            state = self.commit(state, &missing, &victims)?;
        }
    }

    /// The fast path of [`begin_write`](Self::begin_write) alone: a guard
    /// if every extent of the range is already in the persisted AL, else
    /// `None`. Never does I/O and never waits (beyond a short mutex), so an
    /// async caller can try it in place and take the slow path elsewhere.
    pub fn pin_if_active(self: &Arc<Self>, offset: u64, len: u64) -> Option<AlGuard> {
        let extents = self.layout.extents_covering(offset, len);
        self.check_request(&extents).ok()?;
        let mut state = self.lock();
        if state.closed || !state.all_persisted(&extents) {
            return None;
        }
        state.pin(&extents);
        Some(AlGuard {
            log: Arc::clone(self),
            extents,
        })
    }

    fn check_request(&self, extents: &Range<u64>) -> Result<(), MetaError> {
        let count = extents.end.saturating_sub(extents.start);
        if extents.start > extents.end || extents.end > self.layout.extents() {
            return Err(MetaError::ExtentOutOfRange {
                first: extents.start,
                count,
                extents: self.layout.extents(),
            });
        }
        if count > self.capacity() as u64 {
            return Err(MetaError::TooManyExtents {
                count,
                capacity: self.capacity() as u64,
            });
        }
        Ok(())
    }

    /// Replaces `victims` by `missing` in memory, then persists the victims'
    /// bitmap pages and the new transaction without holding the mutex.
    ///
    /// Victims have no guard, so the write path sets no bits in them; they
    /// leave the in-memory set before their pages are flushed, so no new
    /// guard can pin them until a later transaction adds them back.
    fn commit<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        missing: &[u64],
        victims: &[u64],
    ) -> Result<MutexGuard<'a, State>, MetaError> {
        for victim in victims {
            state.slots.remove(victim);
        }
        for &extent in missing {
            let last_used = state.tick();
            let slot = Slot {
                inflight: 0,
                last_used,
                persisted: false,
            };
            state.slots.insert(extent, slot);
        }
        state.committing = true;
        state.last_seq += 1;
        let txn = AlTransaction {
            seq: state.last_seq,
            extents: state.lru_order(),
        };
        drop(state);

        if let (Some(hook), false) = (self.eviction_hook.get(), victims.is_empty()) {
            hook(victims);
        }
        let victim_blocks: Vec<Range<u64>> = victims
            .iter()
            .map(|&v| self.layout.extent_blocks(v))
            .collect();
        let result = self
            .bitmaps
            .flush_blocks(&victim_blocks)
            .and_then(|()| al_ring::write(&self.file, &self.layout, &txn));

        let mut state = self.lock();
        state.committing = false;
        match &result {
            Ok(()) => state
                .slots
                .values_mut()
                .for_each(|slot| slot.persisted = true),
            Err(_) => {
                state.failed = true;
                state.slots.retain(|_, slot| slot.persisted);
            }
        }
        self.notify(&state);
        result.map(|()| state)
    }

    fn end_io(&self, extents: &Range<u64>) {
        let mut state = self.lock();
        let mut freed = false;
        for e in extents.clone() {
            if let Some(slot) = state.slots.get_mut(&e) {
                slot.inflight -= 1;
                freed |= slot.inflight == 0;
            }
        }
        state.guards -= 1;
        if freed {
            self.notify(&state);
        }
    }

    /// Refuses all further `begin_io` calls; fails if writes are in flight.
    pub(crate) fn close(&self) -> Result<(), MetaError> {
        let mut state = self.lock();
        if state.guards > 0 {
            return Err(MetaError::Busy {
                path: self.file.path().to_owned(),
                inflight: state.guards,
            });
        }
        state.closed = true;
        self.notify(&state);
        Ok(())
    }

    /// Most extents the AL holds at once.
    pub fn capacity(&self) -> usize {
        self.layout.al_slots() as usize
    }

    /// Extents in the persisted AL, least recently used first.
    pub fn active_extents(&self) -> Vec<u64> {
        let state = self.lock();
        let mut extents = state.lru_order();
        extents.retain(|e| state.slots[e].persisted);
        extents
    }

    /// Whether `extent` is in the persisted AL.
    pub fn is_active(&self, extent: u64) -> bool {
        self.lock()
            .all_persisted(&(extent..extent.saturating_add(1)))
    }

    /// Number of live [`AlGuard`]s.
    pub fn inflight(&self) -> u64 {
        self.lock().guards
    }

    /// Sequence number of the newest transaction written (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("path", &self.file.path())
            .field("state", &*self.lock())
            .finish()
    }
}
