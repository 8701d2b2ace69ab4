//! Peers joining and leaving a running node (`vmsyncctl adjust` after the
//! `[[peer]]` sections changed), as `drbdadm adjust` adds and deletes
//! connections without taking the device down.
//!
//! A new peer starts with every bit of its bitmap set (it is fully synced
//! from the primary when its link comes up: whatever it holds, we know
//! nothing of it), persisted before its link starts. A removed peer's link
//! is taken down (its unacknowledged writes fold into its bitmap, as on any
//! disconnect, so writes waiting for it are released) and its link task
//! ends; its metadata slot is kept, but a peer added again later is fully
//! synced again.

use std::sync::Arc;

use serde_json::json;

use super::link::LinkStarter;
use super::peer::PeerReplica;
use super::Replication;
use crate::config::Peer;
use crate::events::{props, EventKind};

impl Replication {
    /// Called once by `link::start`: peers added later get their link
    /// tasks from it.
    pub(super) fn set_link_starter(&self, starter: LinkStarter) {
        let _ = self.link_starter.set(starter);
    }

    /// Adds a peer and starts its link.
    pub fn add_peer(&self, config: Peer) -> Result<(), String> {
        if config.id == self.config.node.id {
            return Err(format!(
                "peer {} has this node's own id {}",
                config.name, config.id
            ));
        }
        if let Some(known) = self.peers.get(config.id) {
            return Err(format!(
                "id {} is already peer {}",
                config.id, known.config.name
            ));
        }
        let Some(starter) = self.link_starter.get() else {
            return Err("replication has not started yet; try again".into());
        };
        let bitmap = self
            .metadata
            .bitmap(config.id)
            .ok_or_else(|| format!("peer id {} is outside the metadata's node slots", config.id))?;
        let blocks = bitmap.set_all();
        self.metadata
            .flush_bitmaps()
            .map_err(|e| format!("cannot persist the new peer's bitmap: {e}"))?;
        let peer = Arc::new(PeerReplica::new(
            config.clone(),
            self.config.is_lan_peer(&config),
            Arc::clone(bitmap),
            Arc::clone(&self.fork_pending),
            Arc::clone(&self.events),
        ));
        self.peers.add(Arc::clone(&peer));
        peer.emit(
            EventKind::Change,
            props([
                ("added", json!(true)),
                ("address", json!(config.address.to_string())),
                ("state", json!(peer.mode().name())),
            ]),
        );
        tracing::info!(peer = %config.name, id = config.id, address = %config.address, blocks,
            "peer added: it is fully synced once linked");
        starter.start(peer);
        Ok(())
    }

    /// Takes the peer's link down for good and forgets the peer.
    pub fn remove_peer(&self, id: u32) -> Result<(), String> {
        let peer: Arc<PeerReplica> = self
            .peers
            .remove(id)
            .ok_or_else(|| format!("no peer with id {id}"))?;
        peer.admin.remove();
        peer.emit(EventKind::Change, props([("removed", json!(true))]));
        tracing::info!(peer = %peer.config.name, id, "peer removed: link taken down");
        Ok(())
    }
}
