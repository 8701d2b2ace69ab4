//! Becoming primary on the directory's word: the machine switch.
//!
//! The directory hands the new primary the last report of the previous
//! one: its generation ids and, for every node, the blocks that node lacks
//! (the staleness bitmaps S(n) of the design). The new primary takes them
//! over instead of trusting its own data:
//!
//! * its own slot becomes S(self): the blocks it must fetch before serving
//!   them (the on-demand fetch layer does, and the background sync pulls
//!   the rest);
//! * each peer's slot becomes S(peer): what that peer will be resynced;
//! * its new data generation descends from the previous primary's, so the
//!   old primary and every peer that held its data link up as "behind by
//!   the bitmap", not as diverged or ahead.
//!
//! Everything is persisted before the device is exposed: a crash right
//! after must not forget which blocks are missing here.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockdev::meta::{Bitmap, GenerationIds as MetaIds};

use crate::directory::{Grant, PrevReport};
use protocol::{GenerationIds, Role};

use super::source::{lineage, Lineage};
use super::{from_wire, Replication, RoleState};

/// What a promoted node took over from the previous primary, for linking
/// up with the other nodes afterwards.
#[derive(Debug, Clone, Copy)]
pub struct Inherited {
    /// (term, node id) of the previous primary's tenure: a peer holding any
    /// generation it started is behind by the bitmap we took over.
    pub tenure: (u64, u32),
    /// The previous primary's generation at its report.
    pub generation: u64,
    /// The report was final and the handover clean: the bitmaps we took
    /// over are exact, so what a peer of that tenure reports on joining
    /// adds nothing (it would only make us resend what it holds).
    pub exact: bool,
}

impl Inherited {
    /// Whether `generation` (a joining peer's) belongs to the tenure we
    /// took over.
    pub fn covers(&self, generation: u64) -> bool {
        generation == self.generation || MetaIds::origin_of(generation) == self.tenure
    }
}

impl Replication {
    /// Becomes primary of the term the directory granted, taking over the
    /// previous primary's view of who lacks what (see the module docs).
    /// Returns the new role and the blocks this node must fetch.
    pub fn promote_granted(&self, grant: &Grant) -> Result<(RoleState, u64), String> {
        if self.role().role == Role::Primary {
            return Err("already primary".into());
        }
        let me = self.config.node.id;
        let known = self.known_term().max(self.metadata.superblock().term);
        if grant.term > super::MAX_TERM {
            return Err(format!(
                "the directory granted term {}, above the maximum {}; refusing",
                grant.term,
                super::MAX_TERM
            ));
        }
        if grant.term <= known {
            return Err(format!(
                "the directory granted term {}, but this node has seen term {known}; refusing (is the directory's state older than the cluster's?)",
                grant.term
            ));
        }
        let own = self.local.stale_bitmap();
        let generation = match &grant.prev {
            // Our own report (we were primary, then crashed or restarted):
            // our metadata is at least as new as the report.
            Some(prev) if prev.primary == me => self.next_generation(grant.term),
            Some(prev) => {
                self.take_over_bitmaps(prev);
                *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = Some(Inherited {
                    tenure: (prev.term, prev.primary),
                    generation: prev.generation.current,
                    exact: grant.is_clean_handover_to(me),
                });
                let ours = self.generation();
                GenerationIds {
                    current: MetaIds::new_id(grant.term, me),
                    bitmap: prev.generation.current,
                    history: [prev.generation.current, ours.current],
                }
            }
            None => self.next_generation(grant.term),
        };
        // Where we wrote lately a peer may hold other data (writes of a
        // primary that died before reporting them, which reached us and
        // not it): resync it, so every replica ends with ours. After a clean
        // handover the bitmaps we took over are exact: nothing to add.
        if !grant.is_clean_handover_to(me) {
            for peer in self.peers.load().iter() {
                self.metadata.mark_active_extents(&peer.bitmap);
            }
        }
        let missing = own.count_ones() * u64::from(own.block_size());
        self.metadata
            .flush_bitmaps()
            .and_then(|()| {
                self.metadata
                    .set_term_and_generations(grant.term, Some(from_wire(generation)))
            })
            .and_then(|()| self.metadata.set_data_term(grant.term))
            .map_err(|e| format!("cannot persist the new term: {e}"))?;
        if missing > 0 {
            // Not a usable copy on its own until the background sync ends.
            self.set_disk_state(protocol::DiskState::Inconsistent)
                .map_err(|e| format!("cannot persist the disk state: {e}"))?;
        }
        self.known_term.fetch_max(grant.term, Ordering::AcqRel);
        self.fork_pending.store(false, Ordering::Release);
        self.fenced.store(false, Ordering::Release);
        let state = RoleState {
            role: Role::Primary,
            term: grant.term,
        };
        self.set_role(state);
        tracing::info!(
            term = grant.term,
            generation = format!("{:016x}", generation.current),
            missing_bytes = missing,
            "promoted to primary by the directory"
        );
        Ok((state, missing))
    }

    /// Installs the previous primary's bitmaps: ours (what we must fetch)
    /// and each peer's (what it will be resynced).
    fn take_over_bitmaps(&self, prev: &PrevReport) {
        let me = self.config.node.id;
        let own = self.local.stale_bitmap();
        own.clear_all();
        // The report's bitmap for us counts from a generation of the
        // previous primary's tenure; data older than that (or none) is
        // not described by it: fetch everything.
        let ours = self.generation();
        let described =
            lineage(prev.generation, ours, (prev.term, prev.primary)) == Lineage::FromBitmap;
        match prev.bitmaps.get(&me) {
            Some(bitmap) if described => {
                let _ = own.merge_from(bitmap);
            }
            _ => {
                own.set_all();
            }
        }
        // Past what the report covered (the device grew since), our own
        // version of the new area is the one to keep: we lack none of it.
        if prev.covered_blocks < own.nbits() {
            own.clear_range(prev.covered_blocks, own.nbits() - prev.covered_blocks);
        }
        let mut holds = BTreeMap::new();
        for peer in self.peers.load().iter() {
            peer.bitmap.clear_all();
            let lacks = peer.bitmap.new_like();
            match prev.bitmaps.get(&peer.id()) {
                Some(bitmap) => {
                    let _ = lacks.merge_from(bitmap);
                }
                None => {
                    lacks.set_all();
                }
            }
            let _ = peer.bitmap.merge_from(&lacks);
            holds.insert(peer.id(), Arc::new(lacks));
        }
        // Kept apart from the peers' bitmaps, which also grow by what we
        // resync for other reasons (activity-log extents after a forced
        // switch, a joining peer's report): where we lack a block, a peer
        // clear here holds its newest version whatever else we resync there.
        // On disk too, for a restart before the background sync ends. Not
        // having it only means fewer holders (the peers' bitmaps), never
        // a wrong one.
        let path = super::holders::path_for(&self.config.node.metadata);
        if let Err(e) = super::holders::save(&path, &holds) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save who holds which blocks");
        }
        *self.holders.lock().unwrap_or_else(|e| e.into_inner()) = Some(holds);
        tracing::info!(
            previous_primary = prev.primary,
            previous_term = prev.term,
            final_report = prev.last,
            missing_here = own.count_ones(),
            "took over the previous primary's staleness bitmaps"
        );
    }

    /// For each peer, the blocks it lacked at the handover this node took
    /// over (`None` without one: then the peers' bitmaps say who holds
    /// what). Used to pick the nodes to fetch from.
    pub fn handover_holders(&self) -> Option<BTreeMap<u32, Arc<Bitmap>>> {
        self.holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What this node took over at its last promotion, if the directory
    /// made it primary after another node.
    pub fn inherited(&self) -> Option<Inherited> {
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner())
    }
}
