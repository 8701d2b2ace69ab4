//! The lazy push to WAN peers (peers in another `lan_group`).
//!
//! Guest writes are never mirrored to a WAN peer: they only set its bits
//! (see `Replication::replicate`), so the guest never waits for the slow
//! link. This module brings the peer up to date behind the guest's back:
//!
//! * **lazily**: while the guest did I/O in the last [`GUEST_BUSY`] the push
//!   trickles (one window per [`BUSY_PAUSE`]); when the guest is quiet it
//!   runs at the budget;
//! * **within a budget**: `[replication] wan_rate` bytes per second *on the
//!   wire* (compressed data, hashes and framing counted), and never more
//!   than [`MAX_QUEUED`] bytes queued to the socket, so the push adapts to
//!   what the link really carries when that is less;
//! * **once per version**: the bitmap is the queue. A block rewritten any
//!   number of times before the push reaches it is one set bit, and its
//!   data is read (under the range lock) only when it is sent, so it
//!   crosses once, in its latest version. A block rewritten while its push
//!   is in flight is set again and sent again (see `PeerReplica::mark_stale`);
//! * **less on the wire**: before a window of stale blocks is read the peer
//!   is asked for the BLAKE3 hash of each block in it (`HashRequest` over
//!   the fetch connection, answered by `holder.rs`); blocks that match are
//!   not sent. What is sent is compressed when that shrinks it
//!   (`ResyncPacked`; zstd unless `[replication] wan_compression` says
//!   otherwise).
//!
//! * **once per remote LAN group** (the postmaster): of the WAN peers of
//!   one LAN group, the one with the lowest id that is linked to us is the
//!   group's postmaster and gets the data as above. Every other member is
//!   brought up to date *by reference*: for blocks the postmaster already
//!   holds in their current version (its bit is clear: it acknowledged
//!   them, and no write came since) the member gets a small `ResyncFrom`
//!   naming the postmaster and the BLAKE3 of the data, reads the blocks
//!   from the postmaster over its own LAN, checks the hash and writes
//!   them. Bits clear as for any resync: when the member acknowledges the
//!   barrier after them, i.e. once it holds them durably (and the
//!   directory's report says so). If the postmaster goes away, or its copy
//!   does not match, the member cannot apply the epoch and drops its link:
//!   what it had not acknowledged stays stale, the next member in line
//!   becomes postmaster (or this member, for a while, gets its data
//!   directly: see [`RELAY_BACKOFF`]), so no more than the blocks in flight
//!   are sent again.
//!
//! Clearing a matching block's bit at once is safe because nothing else is
//! on its way to the peer for it: the window's blocks are read under the
//! range lock (so no guest write is half done), a pass never visits a block
//! twice, and a pass starts only after the previous one's last barrier was
//! acknowledged. Sent blocks clear as resync chunks always do: when the
//! barrier after them is acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::buffer::AlignedBuf;
use blockdev::pace::RatePacer;
use blockdev::BlockDevice;
use bytes::Bytes;
use protocol::compress::Codec;
use protocol::Message;
use tokio::sync::mpsc;

use super::fetcher::Fetcher;
use super::pacing::GUEST_BUSY;
use super::peer::{PeerMode, PeerReplica};
use super::{transport, Replication};

/// While the guest is busy: one window per this long at most.
const BUSY_PAUSE: Duration = Duration::from_millis(100);
/// Blocks hashed and read together (one hash round trip).
const WINDOW: u64 = 1 << 20;
/// Largest message of pushed data (before compression). Each message is
/// compressed on its own; zstd finds more in 1 MiB (on the WAN
/// benchmark's text 2.88x against 2.58x), but compressing one takes ~4 ms
/// of a CPU the guest shares, and the benchmark's guest-latency p99 went
/// from 0.97 to 1.35-1.55 of the no-WAN baseline (one run each).
const MAX_MESSAGE: u64 = 256 * 1024;
/// Pushed bytes queued to the peer's socket at most: beyond that the link
/// is slower than the budget, and the push waits for it.
const MAX_QUEUED: u64 = 2 * WINDOW;
/// Windows per epoch: their bits clear when the epoch's barrier is acked.
const WINDOWS_PER_EPOCH: u32 = 4;
/// Frame header and record overhead of one message, for the budget.
const FRAME_OVERHEAD: u64 = 64;
/// How long the peer may take to hash a window before we send it anyway.
const HASH_TIMEOUT: Duration = Duration::from_secs(20);
/// A member whose link dropped with references in flight (it could not
/// read from its postmaster) gets its data directly for this long.
pub const RELAY_BACKOFF: Duration = Duration::from_secs(60);
/// A member's pass that found nothing its postmaster holds yet waits this
/// long before looking again.
const RELAY_WAIT: Duration = Duration::from_millis(200);
/// Largest range one `ResyncFrom` names.
const MAX_REFERENCE: u64 = 1 << 20;

/// What the push to one WAN peer did, for `status`.
#[derive(Default)]
pub struct WanStats {
    /// Bytes the push put on the wire (data as sent, hashes, framing).
    pub wire_bytes: AtomicU64,
    /// Stale bytes found identical on the peer by hash (not sent).
    pub saved_by_hash: AtomicU64,
    /// Bytes compression kept off the wire.
    pub saved_by_compression: AtomicU64,
    /// Wire bytes and stale bytes handled (sent or skipped) by the current
    /// pass, and when it started: the push rate and the ETA.
    pass_wire: AtomicU64,
    pass_done: AtomicU64,
    pass_started: std::sync::Mutex<Option<Instant>>,
    /// Bytes this member got by reference from its group's postmaster.
    pub relayed: AtomicU64,
    /// References sent and not yet acknowledged (see `link_lost`).
    references_in_flight: std::sync::atomic::AtomicBool,
    /// Until when this member gets its data directly (see [`RELAY_BACKOFF`]).
    direct_until: std::sync::Mutex<Option<Instant>>,
    /// The postmaster of the current pass: its node id + 1; 0 when none.
    pub postmaster: AtomicU64,
}

impl WanStats {
    /// The link to this peer dropped. If references were in flight, it
    /// could not read from its postmaster (or the postmaster went away):
    /// send it data directly for a while.
    pub fn link_lost(&self) {
        if self.references_in_flight.swap(false, Ordering::AcqRel) {
            *self.direct_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + RELAY_BACKOFF);
        }
    }

    fn must_go_direct(&self) -> bool {
        self.direct_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    fn start_pass(&self) {
        self.pass_wire.store(0, Ordering::Release);
        self.pass_done.store(0, Ordering::Release);
        *self.pass_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn end_pass(&self) {
        *self.pass_started.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn elapsed(&self) -> Option<f64> {
        self.pass_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs_f64().max(0.001))
    }

    /// Wire bytes per second of the current pass (0 between passes).
    pub fn push_rate(&self) -> u64 {
        self.elapsed().map_or(0, |s| {
            (self.pass_wire.load(Ordering::Acquire) as f64 / s) as u64
        })
    }

    /// Stale bytes brought up to date per second by the current pass
    /// (skipped ones included): what the ETA divides by.
    pub fn progress_rate(&self) -> u64 {
        self.elapsed().map_or(0, |s| {
            (self.pass_done.load(Ordering::Acquire) as f64 / s) as u64
        })
    }

    fn wire(&self, bytes: u64) {
        self.wire_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.pass_wire.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// Pushes stale blocks to a WAN peer whenever it is `Resyncing` (has set
/// bits); replaces the LAN resync loop for such a peer.
pub async fn push_loop(
    repl: Arc<Replication>,
    peer: Arc<PeerReplica>,
    meta_tx: mpsc::UnboundedSender<Message>,
) {
    let hashes = match hash_source(&repl, &peer) {
        Ok(fetcher) => Some(fetcher),
        Err(e) => {
            tracing::warn!(error = %e, "no hash comparison for the WAN push: every stale block is sent");
            None
        }
    };
    // Kept across the passes of one catch-up: while the guest writes new
    // data the passes follow each other, and each one that started over
    // asked for the hashes of its first windows again, in vain. Once the
    // peer is current, the next write starts afresh.
    let mut hashing = HashBackoff::default();
    loop {
        peer.resync_wanted.notified().await;
        match peer.mode() {
            PeerMode::Resyncing => {
                if let Err(e) = push_pass(&repl, &peer, hashes.as_ref(), &mut hashing).await {
                    tracing::error!(error = %e, "WAN push stopped");
                    return;
                }
                if peer.mark_up_to_date() {
                    hashing = HashBackoff::default();
                    tracing::info!("WAN peer is up to date");
                    let _ = meta_tx.send(super::source::in_sync_state(&repl));
                } else if peer.mode() == PeerMode::Resyncing {
                    // Written to meanwhile: go again.
                    peer.resync_wanted.notify_one();
                }
            }
            PeerMode::UpToDate => {
                let _ = meta_tx.send(super::source::in_sync_state(&repl));
            }
            _ => {}
        }
    }
}

/// A fetch-connection client used only to ask `peer` for hashes.
fn hash_source(repl: &Replication, peer: &Arc<PeerReplica>) -> anyhow::Result<Fetcher> {
    let identity = transport::LocalIdentity {
        resource: repl.config.resource.name.clone(),
        node_id: repl.config.node.id,
        secret: Arc::new(repl.config.read_secret()?),
    };
    Ok(Fetcher::new(
        identity,
        repl.config.node.lan_group.clone(),
        vec![(Arc::clone(peer), Arc::new(peer.bitmap.new_like()))],
        HASH_TIMEOUT,
    ))
}

/// One pass over the peer's bitmap; returns once everything it sent is
/// acknowledged (or the peer stopped being pushed to).
async fn push_pass(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    hashes: Option<&Fetcher>,
    hashing: &mut HashBackoff,
) -> std::io::Result<()> {
    match postmaster_of(repl, peer) {
        Some(postmaster) => {
            peer.stats
                .wan
                .postmaster
                .store(u64::from(postmaster.id()) + 1, Ordering::Release);
            relay_pass(repl, peer, &postmaster).await
        }
        None => {
            peer.stats.wan.postmaster.store(0, Ordering::Release);
            data_pass(repl, peer, hashes, hashing).await
        }
    }
}

/// The postmaster of `peer`'s LAN group, when that is another node: the
/// lowest-id WAN peer of the group that is linked and being pushed to.
/// None when `peer` is the postmaster itself, or must get data directly.
fn postmaster_of(repl: &Replication, peer: &PeerReplica) -> Option<Arc<PeerReplica>> {
    if peer.stats.wan.must_go_direct() {
        return None;
    }
    repl.peers
        .load()
        .iter()
        .filter(|p| {
            !p.is_lan
                && p.config.lan_group == peer.config.lan_group
                && p.is_connected()
                && p.mode().mirrors()
        })
        .min_by_key(|p| p.id())
        .filter(|p| p.id() != peer.id())
        .cloned()
}

/// One pass of data to `peer` (it is its group's postmaster, or alone).
async fn data_pass(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    hashes: Option<&Fetcher>,
    hashing: &mut HashBackoff,
) -> std::io::Result<()> {
    let bitmap = &peer.bitmap;
    let block = u64::from(bitmap.block_size());
    let window_blocks = (WINDOW / block).max(1);
    let stats = &peer.stats.wan;
    let stale = bitmap.count_ones() * block;
    stats.start_pass();
    *peer
        .stats
        .run_started
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    peer.stats.run_bytes.store(0, Ordering::Release);
    tracing::info!(
        stale_bytes = stale,
        budget = repl.tunables().wan_rate,
        "WAN push starting"
    );
    let mut pacer = RatePacer::default();
    let mut cursor = 0;
    let mut windows = 0u32;
    while let Some(first) = bitmap.find_next_set(cursor) {
        if peer.mode() != PeerMode::Resyncing {
            stats.end_pass();
            return Ok(());
        }
        before_window(repl, peer).await;
        // The window ends after its last stale block.
        let limit = (first + window_blocks).min(bitmap.nbits());
        let mut end = first;
        let mut at = first;
        while let Some(set) = bitmap.find_next_set(at).filter(|&b| b < limit) {
            end = bitmap
                .find_next_clear(set)
                .unwrap_or(bitmap.nbits())
                .min(limit);
            at = end;
        }
        cursor = end;
        let offset = first * block;
        let len = ((end - first) * block).min(repl.local_size() - offset);
        let hash_this = hashes.filter(|_| hashing.should_hash());
        let pushed = push_window(repl, peer, hash_this, offset, len).await?;
        let Some((wire, matched)) = pushed else {
            stats.end_pass();
            return Ok(()); // the peer stopped being pushed to
        };
        if hash_this.is_some() {
            hashing.hashed(matched);
        }
        windows += 1;
        if windows.is_multiple_of(WINDOWS_PER_EPOCH) {
            drop(repl.close_epoch_including(peer, false));
        }
        pacer.spend(wire, repl.tunables().wan_rate).await;
    }
    // Close the last epoch and wait until the peer made it durable; the
    // bits of everything sent clear with that ack.
    let acks = repl.close_epoch_including(peer, true);
    if let Some((_, ack)) = acks.into_iter().find(|(p, _)| p.id() == peer.id()) {
        let _ = ack.await;
    }
    let elapsed = stats.elapsed().unwrap_or(0.0);
    tracing::info!(
        stale_bytes = stale,
        wire_bytes = stats.pass_wire.load(Ordering::Acquire),
        seconds = format!("{elapsed:.1}"),
        "WAN push pass done"
    );
    stats.end_pass();
    Ok(())
}

/// Paces a pass before each window: lazily (while the guest works, one
/// window now and then) and to the link (while it has not taken what we
/// gave it).
async fn before_window(repl: &Replication, peer: &PeerReplica) {
    if repl.guest_io.busy_within(GUEST_BUSY) {
        tokio::time::sleep(BUSY_PAUSE).await;
    }
    while peer.queued.load(Ordering::Acquire) > MAX_QUEUED && peer.mode() == PeerMode::Resyncing {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether to ask the peer for hashes before a window. Hashes cost 32
/// bytes per block on the WAN (0.8 % at 4 KiB) and pay only when blocks
/// match; new data (a file being written) never does. After
/// [`HASH_MISSES_BEFORE_BACKOFF`] windows in a row where nothing matched,
/// windows go unhashed — 4, then 8, ... up to 64 of them — between single
/// probes; any match resets it.
#[derive(Default)]
struct HashBackoff {
    misses: u32,
    skip: u32,
    skip_left: u32,
}

const HASH_MISSES_BEFORE_BACKOFF: u32 = 4;
const MAX_HASH_SKIP: u32 = 64;

impl HashBackoff {
    fn should_hash(&mut self) -> bool {
        if self.skip_left > 0 {
            self.skip_left -= 1;
            false
        } else {
            true
        }
    }

    /// A window was hashed and `matched` bytes were found identical.
    fn hashed(&mut self, matched: u64) {
        if matched > 0 {
            *self = HashBackoff::default();
            return;
        }
        self.misses += 1;
        if self.misses >= HASH_MISSES_BEFORE_BACKOFF {
            self.skip = (self.skip * 2).clamp(HASH_MISSES_BEFORE_BACKOFF, MAX_HASH_SKIP);
            self.skip_left = self.skip;
        }
    }
}

/// Pushes the stale blocks of `offset+len`: those the peer's hashes do not
/// match, compressed when that helps. Returns the bytes put on the wire and
/// the bytes found identical by hash, or `None` when the peer stopped being
/// pushed to.
async fn push_window(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    hashes: Option<&Fetcher>,
    offset: u64,
    len: u64,
) -> std::io::Result<Option<(u64, u64)>> {
    let bitmap = &peer.bitmap;
    let block = u64::from(bitmap.block_size());
    let stats = &peer.stats.wan;
    let first_block = offset / block;
    let mut wire = 0;
    let mut matched = 0;
    // The peer's hashes first, outside the range lock (a round trip over
    // the WAN); our data is read after, so a write in between only makes a
    // block differ, and then it is sent.
    let theirs = match hashes {
        Some(fetcher) => {
            wire += 2 * FRAME_OVERHEAD + len.div_ceil(block) * 32;
            match fetcher.hashes(peer, offset, len, block as u32).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::debug!(offset, len, error = %e, "peer did not hash the window: sending it whole");
                    None
                }
            }
        }
        None => None,
    };
    let range = repl.ranges.acquire(offset, len, || {}).await;
    let mut ours = AlignedBuf::with_len(len as usize); // the read fills it
    repl.local.read(offset, ours.as_mut_slice()).await?;
    let ours = ours.into_bytes();
    // Runs of stale blocks that differ: (first block, count).
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, data) in ours.chunks(block as usize).enumerate() {
        let b = first_block + i as u64;
        if !bitmap.test(b) {
            continue;
        }
        let same = theirs
            .as_ref()
            .and_then(|h| h.get(i))
            .is_some_and(|h| h == blake3::hash(data).as_bytes());
        if same {
            matched += data.len() as u64;
            bitmap.clear_range(b, 1);
            stats
                .saved_by_hash
                .fetch_add(data.len() as u64, Ordering::AcqRel);
            stats
                .pass_done
                .fetch_add(data.len() as u64, Ordering::AcqRel);
            continue;
        }
        match runs.last_mut() {
            Some((start, count)) if *start + *count == b && *count * block < MAX_MESSAGE => {
                *count += 1
            }
            _ => runs.push((b, 1)),
        }
    }
    let term = repl.role().term;
    for (run_first, count) in runs {
        let at = (run_first - first_block) * block;
        let run_len = (count * block).min(len - at);
        let data = ours.slice(at as usize..(at + run_len) as usize);
        let run_offset = run_first * block;
        // Compressing takes about a millisecond (zstd, 256 KiB of text):
        // off the runtime's workers, which serve the guest.
        let codec = repl.tunables().wan_compression;
        let (message, on_wire) =
            tokio::task::spawn_blocking(move || pack(codec, term, run_offset, data))
                .await
                .map_err(std::io::Error::other)?;
        let queued = {
            let epochs = repl.epochs.lock().unwrap_or_else(|e| e.into_inner());
            peer.send_resync(
                epochs.current,
                message,
                run_first,
                count,
                run_offset,
                run_len,
            )
        };
        if !queued {
            return Ok(None);
        }
        wire += on_wire + FRAME_OVERHEAD;
        stats
            .saved_by_compression
            .fetch_add(run_len - on_wire, Ordering::AcqRel);
        stats.pass_done.fetch_add(run_len, Ordering::AcqRel);
        peer.stats.resync_bytes.fetch_add(run_len, Ordering::AcqRel);
        peer.stats.run_bytes.fetch_add(run_len, Ordering::AcqRel);
    }
    drop(range);
    stats.wire(wire);
    Ok(Some((wire, matched)))
}

/// One pass by reference: every stale block of `peer` that `postmaster`
/// holds in its current version is named in a `ResyncFrom`; the rest waits
/// for a later pass (the postmaster is still getting it).
async fn relay_pass(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    postmaster: &Arc<PeerReplica>,
) -> std::io::Result<()> {
    let bitmap = &peer.bitmap;
    let block = u64::from(bitmap.block_size());
    let window_blocks = (WINDOW / block).max(1);
    let stats = &peer.stats.wan;
    stats.start_pass();
    tracing::debug!(postmaster = %postmaster.config.name, stale_bytes = bitmap.count_ones() * block,
        "WAN pass by reference through the group's postmaster");
    let mut pacer = RatePacer::default();
    let mut cursor = 0;
    let mut windows = 0u32;
    let mut referenced = 0u64;
    while let Some(first) = bitmap.find_next_set(cursor) {
        if peer.mode() != PeerMode::Resyncing || !postmaster.is_connected() {
            break;
        }
        before_window(repl, peer).await;
        let limit = (first + window_blocks).min(bitmap.nbits());
        cursor = limit;
        let offset = first * block;
        let len = ((limit - first) * block).min(repl.local_size() - offset);
        // Under the range lock no guest write changes our data or the
        // postmaster's bits, so "its bit is clear" means it holds exactly
        // what we read.
        let range = repl.ranges.acquire(offset, len, || {}).await;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in first..first + len.div_ceil(block) {
            if !bitmap.test(b) || postmaster.bitmap.test(b) {
                continue;
            }
            match runs.last_mut() {
                Some((start, count))
                    if *start + *count == b && (*count + 1) * block <= MAX_REFERENCE =>
                {
                    *count += 1
                }
                _ => runs.push((b, 1)),
            }
        }
        if runs.is_empty() {
            drop(range);
            continue;
        }
        let mut ours = AlignedBuf::with_len(len as usize); // the read fills it
        repl.local.read(offset, ours.as_mut_slice()).await?;
        let term = repl.role().term;
        let mut wire = 0;
        for (run_first, count) in runs {
            let at = ((run_first - first) * block) as usize;
            let run_len = (count * block).min(len - at as u64);
            let data = &ours.as_slice()[at..at + run_len as usize];
            let run_offset = run_first * block;
            let message = Message::ResyncFrom {
                term,
                offset: run_offset,
                len: run_len as u32,
                holder: postmaster.id(),
                hash: *blake3::hash(data).as_bytes(),
            };
            stats.references_in_flight.store(true, Ordering::Release);
            let queued = {
                let epochs = repl.epochs.lock().unwrap_or_else(|e| e.into_inner());
                peer.send_resync(
                    epochs.current,
                    message,
                    run_first,
                    count,
                    run_offset,
                    run_len,
                )
            };
            if !queued {
                drop(range);
                stats.end_pass();
                return Ok(());
            }
            wire += super::peer::RESYNC_REFERENCE_BYTES;
            referenced += run_len;
            stats.relayed.fetch_add(run_len, Ordering::AcqRel);
            stats.pass_done.fetch_add(run_len, Ordering::AcqRel);
            peer.stats.resync_bytes.fetch_add(run_len, Ordering::AcqRel);
        }
        drop(range);
        stats.wire(wire);
        windows += 1;
        if windows.is_multiple_of(WINDOWS_PER_EPOCH) {
            drop(repl.close_epoch_including(peer, false));
        }
        pacer.spend(wire, repl.tunables().wan_rate).await;
    }
    if referenced == 0 {
        // The postmaster holds nothing new yet: look again shortly. No
        // barrier: nothing was sent that needs one (an empty pass every
        // RELAY_WAIT used to put a barrier and its ack on the WAN each
        // time).
        stats.end_pass();
        tokio::time::sleep(RELAY_WAIT).await;
        return Ok(());
    }
    let acks = repl.close_epoch_including(peer, true);
    if let Some((_, ack)) = acks.into_iter().find(|(p, _)| p.id() == peer.id()) {
        if ack.await.is_ok() {
            stats.references_in_flight.store(false, Ordering::Release);
        }
    }
    stats.end_pass();
    tracing::debug!(bytes = referenced, postmaster = %postmaster.config.name,
        "WAN pass by reference done");
    Ok(())
}

/// The message carrying `data`: compressed with `codec` when that shrinks
/// it. Returns it and its data bytes on the wire.
fn pack(codec: Codec, term: u64, offset: u64, data: Bytes) -> (Message, u64) {
    match protocol::compress::compress(codec, &data) {
        Some((codec, packed)) => {
            let on_wire = packed.len() as u64;
            (
                Message::ResyncPacked {
                    term,
                    offset,
                    len: data.len() as u32,
                    codec,
                    data: Bytes::from(packed),
                },
                on_wire,
            )
        }
        None => {
            let on_wire = data.len() as u64;
            (Message::ResyncData { term, offset, data }, on_wire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_backs_off_after_windows_without_a_match_and_resumes_on_one() {
        let mut h = HashBackoff::default();
        let mut pattern = String::new();
        for window in 0..40 {
            let hash = h.should_hash();
            pattern.push(if hash { 'H' } else { '.' });
            if hash {
                // Nothing matches until window 30.
                h.hashed(if window >= 30 { 4096 } else { 0 });
            }
        }
        let want = [
            "HHHH",
            "....",
            "H",
            &".".repeat(8),
            "H",
            &".".repeat(16),
            "H",
            "HHHHH",
        ]
        .concat();
        assert_eq!(pattern, want);
    }

    #[test]
    fn pack_compresses_only_what_shrinks() {
        let zeros = Bytes::from(vec![0u8; 65536]);
        for (codec, number) in [
            (Codec::Zstd, protocol::compress::CODEC_ZSTD),
            (Codec::Lz4, protocol::compress::CODEC_LZ4),
        ] {
            let (message, on_wire) = pack(codec, 1, 4096, zeros.clone());
            assert!(
                matches!(message, Message::ResyncPacked { len: 65536, codec, .. } if codec == number)
            );
            assert!(on_wire < 1024, "{on_wire}");
        }
        let (message, on_wire) = pack(Codec::None, 1, 4096, zeros);
        assert!(matches!(message, Message::ResyncData { .. }));
        assert_eq!(on_wire, 65536);
        let mut noise = vec![0u8; 65536];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let (message, on_wire) = pack(Codec::Zstd, 1, 0, Bytes::from(noise));
        assert!(matches!(message, Message::ResyncData { .. }));
        assert_eq!(on_wire, 65536);
    }
}
