//! The set of peers a node replicates with. `vmsyncctl adjust` adds and
//! removes peers while the daemon runs, so the set is swapped as a whole
//! (arc-swap) and every user works on a snapshot: a write that started
//! before a peer was added simply does not go to it (the new peer's bitmap
//! is all set: it is fully synced), and one that still holds a removed peer
//! only marks that peer's bitmap.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::peer::PeerReplica;

#[derive(Clone)]
pub struct PeerSet(Arc<ArcSwap<Vec<Arc<PeerReplica>>>>);

impl PeerSet {
    pub fn new(peers: Vec<Arc<PeerReplica>>) -> Self {
        PeerSet(Arc::new(ArcSwap::from_pointee(peers)))
    }

    /// The peers as of now.
    pub fn load(&self) -> Arc<Vec<Arc<PeerReplica>>> {
        self.0.load_full()
    }

    pub fn get(&self, id: u32) -> Option<Arc<PeerReplica>> {
        self.load().iter().find(|p| p.id() == id).cloned()
    }

    /// Adds `peer` (its id must not be in the set).
    pub(super) fn add(&self, peer: Arc<PeerReplica>) {
        self.0.rcu(|peers| {
            let mut next = Vec::clone(peers);
            next.push(Arc::clone(&peer));
            next
        });
    }

    /// Removes the peer with `id`; returns it, if it was there.
    pub(super) fn remove(&self, id: u32) -> Option<Arc<PeerReplica>> {
        let removed = self.get(id)?;
        self.0.rcu(|peers| {
            peers
                .iter()
                .filter(|p| p.id() != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        Some(removed)
    }
}
