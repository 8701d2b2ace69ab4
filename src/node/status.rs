//! What `vmsyncctl status` reports.

use std::sync::atomic::Ordering;

use protocol::Role;

use super::Node;
use crate::control::{PeerStatus, Status, SyncStatus, VerifyStatus, WanPushStatus};
use crate::replication::peer::{PeerMode, PeerReplica};
use crate::replication::{disk_state_name, role_name, Replication};

impl Node {
    pub async fn status(&self) -> Status {
        let device = self.frontend.lock().await.as_ref().map(|f| f.path());
        let sb = self.metadata.superblock();
        let (role, disk, peers) = match &self.replication {
            None => (
                "standalone".to_string(),
                "up-to-date".to_string(),
                Vec::new(),
            ),
            Some(r) => (
                role_name(r.role().role).to_string(),
                disk_state_name(r.disk_state()).to_string(),
                r.peers.load().iter().map(|p| peer_status(r, p)).collect(),
            ),
        };
        Status {
            resource: self.config.resource.name.clone(),
            node_id: self.config.node.id,
            node: self.config.node.name.clone(),
            role,
            device,
            size: self.backing_size(),
            term: self
                .replication
                .as_ref()
                .map_or(sb.term, |r| r.known_term()),
            metadata: if sb.clean { "clean" } else { "unclean" }.to_string(),
            last_shutdown: if self.last_shutdown_clean {
                "clean"
            } else {
                "crash"
            }
            .to_string(),
            recovered_extents: self.recovered_extents,
            disk,
            peers,
            directory: self.config.directory.map(|a| a.to_string()),
            fenced: self.replication.as_ref().is_some_and(|r| r.is_fenced()),
            sync: self
                .replication
                .as_ref()
                .map(|r| sync_status(r))
                .unwrap_or_else(|| SyncStatus {
                    state: "none".into(),
                    ..SyncStatus::default()
                }),
            verify: self
                .replication
                .as_ref()
                .map(|r| r.verify_status())
                .unwrap_or_else(|| VerifyStatus {
                    state: "none".into(),
                    ..VerifyStatus::default()
                }),
            resize_error: self.resize_error.clone(),
        }
    }

    fn backing_size(&self) -> u64 {
        blockdev::BlockDevice::size(&*self.backing)
    }
}

fn peer_status(repl: &Replication, peer: &PeerReplica) -> PeerStatus {
    let block = peer.bitmap.block_size() as u64;
    let stale_bytes = peer.bitmap.count_ones() * block;
    let mode = peer.mode();
    let started = *peer
        .stats
        .run_started
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let rate = match (mode, started) {
        (PeerMode::Resyncing, Some(t)) => {
            (peer.stats.run_bytes.load(Ordering::Acquire) as f64
                / t.elapsed().as_secs_f64().max(0.001)) as u64
        }
        _ => 0,
    };
    PeerStatus {
        id: peer.id(),
        name: peer.config.name.clone(),
        address: peer.config.address.to_string(),
        link: if peer.is_lan { "lan" } else { "wan" }.to_string(),
        connected: peer.is_connected(),
        disconnected_by_operator: !peer.admin.is_up(),
        state: if repl.role().role == Role::Primary || mode == PeerMode::Disconnected {
            mode.name().to_string()
        } else if peer.is_peer_primary() {
            "primary".to_string()
        } else {
            "secondary".to_string()
        },
        protocol: format!("{:?}", repl.config.resource.protocol),
        stale_bytes,
        resync_rate_bytes_per_sec: rate,
        eta_seconds: (rate > 0).then(|| stale_bytes / rate),
        resynced_bytes: peer.stats.resync_bytes.load(Ordering::Acquire),
        replicated_bytes: peer.stats.mirrored_bytes.load(Ordering::Acquire),
        shared_record_bytes: peer.stats.shared_record_bytes.load(Ordering::Acquire),
        zero_copy_bytes: peer.stats.zero_copy_bytes.load(Ordering::Acquire),
        send_queue_bytes: peer.queued.load(Ordering::Acquire),
        last_error: peer.last_error(),
        wan: (!peer.is_lan).then(|| wan_status(repl, peer, stale_bytes)),
    }
}

fn wan_status(repl: &Replication, peer: &PeerReplica, stale_bytes: u64) -> WanPushStatus {
    use std::sync::atomic::Ordering::Acquire;
    let stats = &peer.stats.wan;
    let progress = stats.progress_rate();
    WanPushStatus {
        stale_bytes,
        budget_bytes_per_sec: repl.tunables().wan_rate,
        push_rate_bytes_per_sec: stats.push_rate(),
        pushed_wire_bytes: stats.wire_bytes.load(Acquire),
        saved_by_hash_bytes: stats.saved_by_hash.load(Acquire),
        saved_by_compression_bytes: stats.saved_by_compression.load(Acquire),
        eta_seconds: (progress > 0).then(|| stale_bytes / progress),
        postmaster: match stats.postmaster.load(Acquire) {
            0 => None,
            id => repl
                .peers
                .get((id - 1) as u32)
                .map(|p| p.config.name.clone()),
        },
        relayed_bytes: stats.relayed.load(Acquire),
    }
}

fn sync_status(repl: &Replication) -> SyncStatus {
    let stats = repl.local.sync_stats();
    let stale_bytes = repl.local.stale_bytes();
    SyncStatus {
        state: if stale_bytes == 0 {
            "none"
        } else if repl.local.is_active() {
            "syncing"
        } else {
            "paused"
        }
        .into(),
        stale_bytes,
        fetched_bytes: stats.fetched_bytes,
        same_bytes: stats.same_bytes,
        on_demand_fetches: stats.on_demand_fetches,
        rate_bytes_per_sec: stats.rate_bytes_per_sec,
        eta_seconds: stats.eta_seconds,
        last_error: stats.last_error,
    }
}
