//! The background sync: pulls every stale block, hot extents first.
//!
//! It claims chunks of consecutive stale blocks in the same table as the
//! on-demand path ([`super::inflight`]), so the two never fetch one block
//! twice and neither overwrites a guest write. Each fetch sends the BLAKE3 of
//! our local copy, so a holder can answer `Same` instead of data.
//!
//! Guest I/O comes first: while a guest operation waits for the network the
//! driver starts nothing new; while the guest is busy at all (I/O within
//! [`GUEST_BUSY`]) it keeps one fetch in flight and pauses [`TRICKLE_PAUSE`]
//! between them, and runs at full concurrency only when the guest is idle
//! (adaptive, as the thesis's background sync: hashing and copying the
//! whole disk competes with the guest for CPU and disk); `rate` caps it. A failed fetch
//! is logged, the driver backs off for [`BACKOFF`] and retries the range on a
//! later pass; it keeps going until no stale bit remains.

use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use super::{FetchKind, Shared, SyncOptions, MAX_SOURCE_REQUEST};
use crate::device::BlockDevice;
use crate::meta::EXTENT_SIZE;
use crate::pace::RatePacer;

/// Pause after a failed fetch before starting new ones.
pub(crate) const BACKOFF: Duration = Duration::from_secs(1);
/// Pause while guest I/O waits for the network.
const YIELD_TO_GUEST: Duration = Duration::from_millis(2);
/// Guest I/O this recent makes the sync trickle.
const GUEST_BUSY: Duration = Duration::from_millis(100);
/// Pause between fetch starts while the guest is busy.
const TRICKLE_PAUSE: Duration = Duration::from_millis(20);
/// Pause after a pass that found only blocks others are handling.
const IDLE_PASS: Duration = Duration::from_millis(50);
/// Progress is logged at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

type TaskResult = (Range<u64>, std::io::Result<()>);

/// The order in which block ranges are visited: the hot extents, then the
/// whole device; later passes visit the whole device again.
struct Cursor {
    segments: Vec<Range<u64>>,
    index: usize,
    pos: u64,
}

impl Cursor {
    fn new(segments: Vec<Range<u64>>) -> Self {
        let pos = segments.first().map_or(0, |s| s.start);
        Cursor {
            segments,
            index: 0,
            pos,
        }
    }

    /// The rest of the current segment, moving on when it is used up.
    fn remaining(&mut self) -> Option<Range<u64>> {
        loop {
            let segment = self.segments.get(self.index)?;
            if self.pos < segment.end {
                return Some(self.pos.max(segment.start)..segment.end);
            }
            self.index += 1;
            if let Some(next) = self.segments.get(self.index) {
                self.pos = next.start;
            }
        }
    }
}

/// Rate, ETA and the periodic progress line.
struct Progress {
    started: Instant,
    first_done: u64,
    last_at: Instant,
    last_done: u64,
}

impl Progress {
    fn new<D: BlockDevice>(shared: &Shared<D>) -> Self {
        let done = resolved_bytes(shared);
        let now = Instant::now();
        Progress {
            started: now,
            first_done: done,
            last_at: now,
            last_done: done,
        }
    }

    fn tick<D: BlockDevice>(&mut self, shared: &Shared<D>) {
        let now = Instant::now();
        let elapsed = now - self.last_at;
        if elapsed < PROGRESS_INTERVAL {
            return;
        }
        let done = resolved_bytes(shared);
        let rate = ((done - self.last_done) as f64 / elapsed.as_secs_f64()) as u64;
        shared.counters.rate.store(rate, SeqCst);
        self.last_at = now;
        self.last_done = done;
        let stale_bytes = shared.stale_bytes();
        let eta_seconds = (rate > 0).then(|| stale_bytes.div_ceil(rate));
        tracing::info!(
            done_bytes = done - self.first_done,
            stale_bytes,
            rate_bytes_per_sec = rate,
            eta_seconds,
            "background sync progress"
        );
    }
}

/// Bytes made present so far (data and `Same`, on demand and background).
fn resolved_bytes<D: BlockDevice>(shared: &Shared<D>) -> u64 {
    shared.counters.fetched_bytes.load(SeqCst) + shared.counters.same_bytes.load(SeqCst)
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleeps until `deadline` or until told to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, deadline: Instant) {
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => {}
        _ = stop.changed() => {}
    }
}

/// The driver; runs until nothing is stale, the layer is deactivated or
/// `stop` says so, and always waits for its own fetches before returning.
pub(super) async fn run<D: BlockDevice>(
    shared: Arc<Shared<D>>,
    options: SyncOptions,
    mut stop: watch::Receiver<bool>,
) {
    let block_size = shared.block_size;
    let nbits = shared.stale.nbits();
    let defaults = SyncOptions::default();
    let chunk = match options.chunk {
        0 => defaults.chunk,
        chunk => chunk,
    };
    let chunk_blocks = chunk.clamp(block_size, MAX_SOURCE_REQUEST) / block_size;
    let concurrency = match options.concurrency {
        0 => defaults.concurrency,
        n => n,
    };
    let extent_blocks = (EXTENT_SIZE / block_size).max(1);
    let hot = options.hot_extents.iter().filter_map(|&extent| {
        let start = extent.checked_mul(extent_blocks)?;
        (start < nbits).then(|| start..(start + extent_blocks).min(nbits))
    });
    let mut cursor = Cursor::new(hot.chain(std::iter::once(0..nbits)).collect());
    // Starts are paced to `sync_rate`, read before each (`set_sync_rate`).
    let mut pacer = RatePacer::default();
    let mut progress = Progress::new(&shared);
    let mut backoff_until: Option<Instant> = None;
    let mut started_this_pass = 0u64;
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();
    let mut complete = false;
    tracing::info!(
        stale_bytes = shared.stale_bytes(),
        rate = options.rate,
        hot_extents = options.hot_extents.len(),
        "background sync started"
    );

    let finished = |joined: Result<TaskResult, JoinError>, backoff: &mut Option<Instant>| {
        let failure = match joined {
            Ok((_, Ok(()))) => return,
            Ok((blocks, Err(e))) => {
                let (offset, len) = shared.byte_range(&blocks);
                tracing::warn!(offset, len, error = %e, "background sync fetch failed; will retry");
                format!("background fetch of {offset}+{len} failed: {e}")
            }
            Err(e) => {
                tracing::warn!(error = %e, "background sync task failed; will retry");
                format!("background fetch task failed: {e}")
            }
        };
        shared.set_last_error(failure);
        *backoff = Some(Instant::now() + BACKOFF);
    };

    while !stopped(&stop) {
        while let Some(joined) = tasks.try_join_next() {
            finished(joined, &mut backoff_until);
        }
        progress.tick(&shared);
        let busy = shared.guest_busy(GUEST_BUSY);
        if tasks.len() >= if busy { 1 } else { concurrency } {
            tokio::select! {
                Some(joined) = tasks.join_next() => finished(joined, &mut backoff_until),
                _ = stop.changed() => {}
            }
            continue;
        }
        if let Some(until) = backoff_until.take().filter(|&t| t > Instant::now()) {
            backoff_until = Some(until);
            sleep_or_stop(&mut stop, until).await;
            continue;
        }
        if shared.demand_waiting.load(SeqCst) > 0 {
            sleep_or_stop(&mut stop, Instant::now() + YIELD_TO_GUEST).await;
            continue;
        }
        if let Some(at) = pacer.ready_at() {
            sleep_or_stop(&mut stop, at).await;
            continue;
        }
        let Some(range) = cursor.remaining() else {
            // End of a pass.
            if !tasks.is_empty() {
                tokio::select! {
                    Some(joined) = tasks.join_next() => finished(joined, &mut backoff_until),
                    _ = stop.changed() => {}
                }
                continue;
            }
            if shared.stale.count_ones() == 0 {
                complete = true;
                break;
            }
            if started_this_pass == 0 {
                // Only blocks others are fetching or writing remain.
                sleep_or_stop(&mut stop, Instant::now() + IDLE_PASS).await;
            }
            started_this_pass = 0;
            cursor = Cursor::new(std::iter::once(0..nbits).collect());
            continue;
        };
        let Some(claim) =
            shared
                .inflight
                .claim_next_stale(&shared.stale, range.clone(), chunk_blocks)
        else {
            cursor.pos = range.end;
            continue;
        };
        let blocks = claim.blocks();
        cursor.pos = blocks.end;
        let (Some(op), Ok(source)) = (shared.begin_op(), shared.source()) else {
            break; // deactivated
        };
        pacer.charge(
            shared.byte_range(&blocks).1,
            shared.counters.sync_rate.load(SeqCst),
        );
        if busy {
            // Leave the guest room between fetches.
            pacer.hold_until(Instant::now() + TRICKLE_PAUSE);
        }
        started_this_pass += 1;
        let task_shared = Arc::clone(&shared);
        tasks.spawn_on(
            async move {
                let result = task_shared
                    .fetch_claimed(&source, blocks.clone(), FetchKind::Background)
                    .await;
                drop((claim, op));
                (blocks, result)
            },
            &shared.runtime,
        );
    }

    while let Some(joined) = tasks.join_next().await {
        finished(joined, &mut backoff_until);
    }
    shared.counters.rate.store(0, SeqCst);
    let seconds = progress.started.elapsed().as_secs_f64();
    let bytes = resolved_bytes(&shared) - progress.first_done;
    if complete {
        tracing::info!(bytes, seconds, "background sync complete: nothing is stale");
    } else {
        tracing::info!(
            bytes,
            seconds,
            stale_bytes = shared.stale_bytes(),
            "background sync stopped"
        );
    }
}
