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

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::buffer::AlignedBuf;
use blockdev::BlockDevice;
use protocol::Role;

use super::fetcher::Fetcher;
use super::peer::{PeerMode, PeerReplica};
use super::{transport, Replication};

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

impl Replication {
    /// Compares every block with every up-to-date peer (see the module
    /// docs); with `repair`, resyncs what differs from our copy.
    pub async fn verify(self: &Arc<Self>, repair: bool) -> Result<Vec<PeerVerify>, String> {
        if self.role().role != Role::Primary {
            return Err("verify runs on the primary".into());
        }
        let peers: Vec<Arc<PeerReplica>> = self
            .peers
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
        tracing::info!(peers = peers.len(), bytes = size, repair, "verify starting");
        let mut results = Vec::new();
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
                self.pace(offset, started).await;
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
            let mut buf = AlignedBuf::zeroed(len as usize);
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

    /// Keeps verify within `resync_rate` (it reads the whole device here and
    /// on every peer), when one is set.
    async fn pace(&self, done: u64, started: Instant) {
        let rate = self.tunables().resync_rate;
        if rate > 0 {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
