//! The claims table: which block ranges are being fetched or written now.
//!
//! Every fetch (on demand or background) and every guest write of an active
//! [`LazyDevice`](super::LazyDevice) first *claims* its blocks here. Claims
//! never overlap, which gives the layer its two safety rules without any
//! lock held across I/O:
//!
//! * one block is fetched at most once at a time (a second reader finds the
//!   claim and waits for it instead of fetching again), and
//! * a fetch never overwrites a guest write: a write waits for the fetches of
//!   its blocks to end, then holds its claim until its data is in the inner
//!   device and the bits are clear; a fetch planned later sees the bits clear
//!   and skips those blocks.
//!
//! Claims and bit checks are made under one short `std` mutex; waiting
//! happens outside it on a `watch` channel whose sender lives in the table
//! entry: dropping the [`Claim`] removes the entry, dropping the sender wakes
//! every waiter (and a waiter that subscribes after that sees it at once).
//! Dropping is also what releases a claim on error or cancellation.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::meta::Bitmap;

/// Resolves (with an error, which is the signal) once the claim it was
/// subscribed to is released.
pub(crate) type Released = watch::Receiver<()>;

/// Waits until the claim behind `released` is gone.
pub(crate) async fn wait_released(mut released: Released) {
    // `changed` fails exactly when the sender (the claim) is dropped; the
    // sender never sends, so it cannot return Ok.
    while released.changed().await.is_ok() {}
}

struct Entry {
    end: u64,
    released: watch::Sender<()>,
}

/// Claimed block ranges, keyed by first block; they never overlap.
#[derive(Default)]
pub(crate) struct InFlight {
    map: Mutex<BTreeMap<u64, Entry>>,
}

/// Ownership of a block range in the table; released on drop.
pub(crate) struct Claim {
    table: Arc<InFlight>,
    blocks: Range<u64>,
}

impl Claim {
    pub(crate) fn blocks(&self) -> Range<u64> {
        self.blocks.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let removed = self.table.lock().remove(&self.blocks.start);
        debug_assert!(removed.is_some_and(|e| e.end == self.blocks.end));
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claim({:?})", self.blocks)
    }
}

/// What a reader must do to get a range present: fetch the claims it made,
/// and wait for the claims others hold.
#[derive(Debug, Default)]
pub(crate) struct ReadPlan {
    pub fetch: Vec<Claim>,
    pub wait: Vec<Released>,
}

impl ReadPlan {
    pub fn is_empty(&self) -> bool {
        self.fetch.is_empty() && self.wait.is_empty()
    }
}

type Map = BTreeMap<u64, Entry>;

/// The claim containing `block`, if any: `(start, entry)`.
fn containing(map: &Map, block: u64) -> Option<(u64, &Entry)> {
    map.range(..=block)
        .next_back()
        .filter(|(_, e)| e.end > block)
        .map(|(&s, e)| (s, e))
}

/// First block at or after `block` that is claimed (start of a claim), or
/// `limit` if none before it.
fn next_claim_start(map: &Map, block: u64, limit: u64) -> u64 {
    map.range(block..limit).next().map_or(limit, |(&s, _)| s)
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(self: &Arc<Self>, map: &mut Map, blocks: Range<u64>) -> Claim {
        debug_assert!(blocks.start < blocks.end);
        let (released, _) = watch::channel(());
        map.insert(
            blocks.start,
            Entry {
                end: blocks.end,
                released,
            },
        );
        Claim {
            table: Arc::clone(self),
            blocks,
        }
    }

    /// Number of claims held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Claims all of `blocks` if nothing in it is claimed; otherwise returns
    /// a handle to wait for the first claim in the way (then try again).
    pub fn try_claim(self: &Arc<Self>, blocks: Range<u64>) -> Result<Claim, Released> {
        let mut map = self.lock();
        let in_way = containing(&map, blocks.start).or_else(|| {
            map.range(blocks.start..blocks.end)
                .next()
                .map(|(&s, e)| (s, e))
        });
        if let Some((_, entry)) = in_way {
            return Err(entry.released.subscribe());
        }
        Ok(self.insert(&mut map, blocks))
    }

    /// Plans making `blocks` present: every run of stale blocks nobody has
    /// claimed is claimed (for the caller to fetch), every claim over stale
    /// blocks in the range is to be waited for. If the last run reaches the
    /// end of `blocks`, it is extended forward through stale, unclaimed
    /// blocks up to `read_ahead_end` (read-ahead). Runs are split into
    /// claims of at most `max_blocks`.
    pub fn plan_read(
        self: &Arc<Self>,
        stale: &Bitmap,
        blocks: Range<u64>,
        read_ahead_end: u64,
        max_blocks: u64,
    ) -> ReadPlan {
        let mut map = self.lock();
        let mut plan = ReadPlan::default();
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut pos = blocks.start;
        while let Some(first) = stale.next_set_in(pos..blocks.end) {
            if let Some((_, entry)) = containing(&map, first) {
                plan.wait.push(entry.released.subscribe());
                pos = entry.end;
                continue;
            }
            let limit = next_claim_start(&map, first, blocks.end);
            let end = stale.next_clear_in(first..limit).unwrap_or(limit);
            runs.push(first..end);
            pos = end;
        }
        if let Some(last) = runs.last_mut() {
            if last.end == blocks.end && read_ahead_end > blocks.end {
                let limit = next_claim_start(&map, blocks.end, read_ahead_end.min(stale.nbits()));
                last.end = stale.next_clear_in(blocks.end..limit).unwrap_or(limit);
            }
        }
        for run in runs {
            let mut start = run.start;
            while start < run.end {
                let end = run.end.min(start + max_blocks);
                plan.fetch.push(self.insert(&mut map, start..end));
                start = end;
            }
        }
        plan
    }

    /// For the background sync: claims the first run of stale, unclaimed
    /// blocks in `range`, at most `max_blocks` long. Returns `None` when
    /// there is none (stale blocks others have claimed are skipped: their
    /// owner makes them present, or a later pass retries them).
    pub fn claim_next_stale(
        self: &Arc<Self>,
        stale: &Bitmap,
        range: Range<u64>,
        max_blocks: u64,
    ) -> Option<Claim> {
        let mut map = self.lock();
        let mut pos = range.start;
        while let Some(first) = stale.next_set_in(pos..range.end) {
            if let Some((_, entry)) = containing(&map, first) {
                pos = entry.end;
                continue;
            }
            let limit = next_claim_start(&map, first, range.end.min(first + max_blocks));
            let end = stale.next_clear_in(first..limit).unwrap_or(limit);
            return Some(self.insert(&mut map, first..end));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_exclude_each_other_and_release_on_drop() {
        let table = Arc::new(InFlight::default());
        let a = table.try_claim(10..20).unwrap();
        assert!(table.try_claim(15..16).is_err());
        assert!(table.try_claim(0..11).is_err());
        assert!(table.try_claim(19..30).is_err());
        let b = table.try_claim(20..30).unwrap();
        let waiter = table.try_claim(5..25).unwrap_err();
        drop(a);
        assert!(
            waiter.has_changed().is_err(),
            "released claim wakes waiters"
        );
        drop(b);
        assert_eq!(table.len(), 0);
        assert!(table.try_claim(0..100).is_ok());
    }

    #[test]
    fn read_plan_claims_stale_runs_waits_for_claims_and_reads_ahead() {
        let table = Arc::new(InFlight::default());
        let stale = Bitmap::new(100, 4096);
        stale.set_range(2, 3); // 2..5
        stale.set_range(7, 20); // 7..27
        let other = table.try_claim(8..10).unwrap();
        let plan = table.plan_read(&stale, 0..12, 16, 4);
        let claimed: Vec<_> = plan.fetch.iter().map(Claim::blocks).collect();
        // 2..5; 7 (before the foreign claim); 10..12 extended to 16, split by 4.
        assert_eq!(claimed, vec![2..5, 7..8, 10..14, 14..16]);
        assert_eq!(plan.wait.len(), 1);
        drop(other);
        // Everything claimed by the plan is skipped by the background sync.
        let next = table.claim_next_stale(&stale, 0..100, 100).unwrap();
        assert_eq!(next.blocks(), 8..10);
        let next = table.claim_next_stale(&stale, 0..100, 5).unwrap();
        assert_eq!(next.blocks(), 16..21);
    }
}
