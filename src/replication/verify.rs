//! Online verify (DRBD's `verify`): the primary compares its blocks with
//! every up-to-date peer's by BLAKE3 hash while the guest runs, and reports
//! the blocks that differ; with `repair` they are resynced from the primary.
//!
//! It uses the fetch connections (`holder.rs`): a `ReadRequest` carrying the
//! hash of our copy is answered `ReadSame` when the peer's copy matches, and
//! with the peer's data otherwise, which narrows the difference down to the
//! blocks. A write still in flight to a peer can look like a difference, so
//! every difference is checked again after a barrier every peer has
//! acknowledged (all earlier writes applied), and only what still differs
//! is reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blockdev::buffer::AlignedBuf;
use blockdev::pace::RatePacer;
use blockdev::BlockDevice;
use protocol::Role;

use super::fetcher::Fetcher;
use super::peer::{PeerMode, PeerReplica};
use super::{transport, Replication};
use crate::control::VerifyStatus;

/// Bytes compared per request.
const CHUNK: u64 = 1 << 20;

/// What verify found on one peer.
#[derive(Debug, Clone)]
pub struct PeerVerify {
    pub name: String,
    /// Byte ranges (offset, length) where the peer's copy differs.
    pub differing: Vec<(u64, u64)>,
    /// Why part of the device could not be compared, if it could not.
    pub error: Option<String>,
}

impl PeerVerify {
    pub fn differing_bytes(&self) -> u64 {
        self.differing.iter().map(|&(_, len)| len).sum()
    }
}

/// Where the current (or last) verify run stands, for `status`.
#[derive(Default)]
pub struct VerifyProgress {
    running: bool,
    /// Set once a run ended (with its error, if it failed).
    ended: Option<Result<(), String>>,
    repair: bool,
    bytes_done: u64,
    total_bytes: u64,
    /// Blocks of peers already finished (confirmed) plus the current peer's
    /// candidates.
    confirmed_blocks: u64,
    candidate_blocks: u64,
    started: Option<(Instant, SystemTime)>,
    finished: Option<SystemTime>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VerifyProgress {
    pub fn status(&self) -> VerifyStatus {
        let state = match (&self.ended, self.running) {
            (_, true) => "running",
            (Some(Ok(())), _) => "done",
            (Some(Err(_)), _) => "failed",
            (None, false) => "none",
        };
        let rate = match (self.running, self.started) {
            (true, Some((t, _))) => {
                (self.bytes_done as f64 / t.elapsed().as_secs_f64().max(0.001)) as u64
            }
            _ => 0,
        };
        VerifyStatus {
            state: state.into(),
            repair: self.repair,
            bytes_done: self.bytes_done,
            total_bytes: self.total_bytes,
            rate_bytes_per_sec: rate,
            eta_seconds: (rate > 0)
                .then(|| self.total_bytes.saturating_sub(self.bytes_done) / rate),
            differing_blocks: self.confirmed_blocks + self.candidate_blocks,
            started_at: self.started.map(|(_, t)| unix_secs(t)),
            finished_at: self.finished.map(unix_secs),
            last_error: self.ended.as_ref().and_then(|r| r.clone().err()),
        }
    }
}

/// Marks the run ended when dropped: a verify whose control client went
/// away (its future dropped) must not show `running` forever.
struct RunGuard<'a> {
    progress: &'a Mutex<VerifyProgress>,
    result: Option<Result<(), String>>,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.running = false;
        p.finished = Some(SystemTime::now());
        p.ended = Some(
            self.result
                .take()
                .unwrap_or_else(|| Err("interrupted".into())),
        );
    }
}

impl Replication {
    fn verify_progress(&self) -> std::sync::MutexGuard<'_, VerifyProgress> {
        self.verify_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Progress of the current or last verify, for `status`.
    pub fn verify_status(&self) -> VerifyStatus {
        self.verify_progress().status()
    }

    /// Compares every block with every up-to-date peer (see the module
    /// docs); with `repair`, resyncs what differs from our copy. One run at
    /// a time; progress in [`Replication::verify_status`].
    pub async fn verify(self: &Arc<Self>, repair: bool) -> Result<Vec<PeerVerify>, String> {
        if self.role().role != Role::Primary {
            return Err("verify runs on the primary".into());
        }
        if self.verify_progress().running {
            return Err("a verify is already running (see status)".into());
        }
        let peers: Vec<Arc<PeerReplica>> = self
            .peers
            .load()
            .iter()
            .filter(|p| p.is_connected() && p.mode() == PeerMode::UpToDate)
            .cloned()
            .collect();
        if peers.is_empty() {
            return Err("no connected up-to-date peer to compare with".into());
        }
        let identity = transport::LocalIdentity {
            resource: self.config.resource.name.clone(),
            node_id: self.config.node.id,
            secret: Arc::new(self.config.read_secret().map_err(|e| e.to_string())?),
        };
        let fetcher = Fetcher::new(
            identity,
            self.config.node.lan_group.clone(),
            peers
                .iter()
                .map(|p| (Arc::clone(p), Arc::clone(&p.bitmap)))
                .collect(),
            Duration::from_secs(1),
        );
        let size = self.local_size();
        let started = Instant::now();
        {
            let mut p = self.verify_progress();
            if p.running {
                return Err("a verify is already running (see status)".into());
            }
            *p = VerifyProgress {
                running: true,
                repair,
                total_bytes: size * peers.len() as u64,
                started: Some((started, SystemTime::now())),
                ..VerifyProgress::default()
            };
        }
        let mut guard = RunGuard {
            progress: &self.verify_progress,
            result: None,
        };
        tracing::info!(peers = peers.len(), bytes = size, repair, "verify starting");
        let mut results = Vec::new();
        let mut compared = 0u64;
        let mut pacer = RatePacer::default();
        for peer in &peers {
            let mut found = PeerVerify {
                name: peer.config.name.clone(),
                differing: Vec::new(),
                error: None,
            };
            let mut suspects = Vec::new();
            let mut offset = 0;
            while offset < size {
                let len = CHUNK.min(size - offset);
                match self.compare(&fetcher, peer, offset, len).await {
                    Ok(ranges) => suspects.extend(ranges),
                    Err(e) => found.error = Some(format!("{offset}+{len}: {e}")),
                }
                offset += len;
                compared += len;
                {
                    let mut p = self.verify_progress();
                    p.bytes_done = compared;
                    p.candidate_blocks = blocks_in(&suspects, block_size(peer));
                }
                // Within `verify_rate` over all peers (it reads the whole
                // device here and on every peer).
                pacer.spend(len, self.tunables().verify_rate).await;
            }
            // Writes in flight looked like differences: once every earlier
            // write is applied on the peer, look again.
            let acks = self.close_epoch(true);
            if let Some((_, ack)) = acks.into_iter().find(|(p, _)| p.id() == peer.id()) {
                let _ = tokio::time::timeout(Duration::from_secs(30), ack).await;
            }
            for (offset, len) in suspects {
                match self.compare(&fetcher, peer, offset, len).await {
                    Ok(ranges) => found.differing.extend(ranges),
                    Err(e) => found.error = Some(format!("{offset}+{len}: {e}")),
                }
            }
            if repair {
                for &(offset, len) in &found.differing {
                    peer.resync_range(offset, len);
                }
            }
            {
                let mut p = self.verify_progress();
                p.candidate_blocks = 0;
                p.confirmed_blocks += blocks_in(&found.differing, block_size(peer));
            }
            tracing::info!(
                peer = %found.name,
                differing_bytes = found.differing_bytes(),
                ranges = found.differing.len(),
                repair,
                seconds = started.elapsed().as_secs_f64(),
                "verify finished for a peer"
            );
            results.push(found);
        }
        guard.result = Some(match results.iter().find_map(|r| r.error.as_ref()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        });
        Ok(results)
    }

    /// The blocks of `offset+len` in which `peer`'s copy differs from ours.
    async fn compare(
        &self,
        fetcher: &Fetcher,
        peer: &PeerReplica,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, String> {
        // Ours, read under the range lock so no guest write is half done.
        let ours = {
            let _range = self.ranges.acquire(offset, len, || {}).await;
            let mut buf = AlignedBuf::with_len(len as usize); // the read fills it
            self.local
                .read(offset, buf.as_mut_slice())
                .await
                .map_err(|e| format!("reading our copy: {e}"))?;
            buf
        };
        let hash = *blake3::hash(ours.as_slice()).as_bytes();
        let Some(theirs) = fetcher.compare_with(peer, offset, len, hash).await? else {
            return Ok(Vec::new());
        };
        let block = u64::from(peer.bitmap.block_size());
        let mut differing: Vec<(u64, u64)> = Vec::new();
        for (i, (a, b)) in ours
            .as_slice()
            .chunks(block as usize)
            .zip(theirs.chunks(block as usize))
            .enumerate()
        {
            if a != b {
                let at = offset + i as u64 * block;
                match differing.last_mut() {
                    Some((start, l)) if *start + *l == at => *l += a.len() as u64,
                    _ => differing.push((at, a.len() as u64)),
                }
            }
        }
        Ok(differing)
    }
}

fn block_size(peer: &PeerReplica) -> u64 {
    u64::from(peer.bitmap.block_size())
}

/// Blocks covered by byte ranges aligned to `block`.
fn blocks_in(ranges: &[(u64, u64)], block: u64) -> u64 {
    ranges.iter().map(|&(_, len)| len.div_ceil(block)).sum()
}
