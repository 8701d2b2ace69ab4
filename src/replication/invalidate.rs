//! Giving up this node's data for a peer's: `vmsyncctl invalidate` (a full
//! resync from the primary, e.g. after local corruption) and `vmsyncctl
//! discard-my-data` (the split-brain victim keeps nothing of its own), as
//! DRBD's `invalidate` and `connect --discard-my-data`.
//!
//! Both do the same to this node, in this order, each step durable before
//! the next: the disk state becomes `inconsistent` (so it cannot be
//! promoted without force, and a crash here does not make it "good"
//! again), then the data generation becomes "none" — to every primary this
//! node now holds no data, so it sends every block (`source::Lineage::Empty`)
//! instead of refusing a diverged history. Then every link is renegotiated
//! so a connected primary starts that full sync at once. Nothing is
//! overwritten until a primary sends its data; until then the old bytes
//! stay where they are, only no longer trusted.
//!
//! Both are refused on a primary: it serves the data it would discard.
//! (DRBD resyncs only the blocks that differ since the split; here the
//! sync is full — always correct, slower on large devices.)

use blockdev::meta::GenerationIds;
use protocol::{DiskState, Role};

use super::Replication;

/// Which operation, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// A full resync from the primary.
    Invalidate,
    /// After a split brain: this node's divergent writes are dropped.
    DiscardMyData,
}

impl GiveUp {
    fn verb(self) -> &'static str {
        match self {
            GiveUp::Invalidate => "invalidate",
            GiveUp::DiscardMyData => "discard-my-data",
        }
    }
}

impl Replication {
    /// Makes this node a sync target that keeps nothing of its own (see the
    /// module docs). Returns what happens next, for the operator.
    pub fn give_up_data(&self, what: GiveUp) -> Result<String, String> {
        if self.role().role == Role::Primary {
            return Err(format!(
                "this node is primary: it serves the data {} would discard; demote it first",
                what.verb()
            ));
        }
        if self.disk_is_failed() {
            return Err(
                "this node's backing device failed: restart vmsyncd once it works again, and it resyncs".into(),
            );
        }
        let old = self.metadata.generations();
        self.set_disk_state(DiskState::Inconsistent)
            .map_err(|e| format!("cannot mark the disk inconsistent: {e}"))?;
        self.metadata
            .set_generations(GenerationIds {
                current: 0,
                bitmap: 0,
                // Kept for the record only: with no current generation a
                // primary sends everything whatever the history says.
                history: [old.current, old.history[0]],
            })
            .map_err(|e| format!("cannot persist the generation: {e}"))?;
        tracing::warn!(
            operation = what.verb(),
            discarded_generation = format!("{:016x}", old.current),
            "this node's data is given up: a full resync from the primary follows"
        );
        // Sessions end on a role-watch change and relink with the new state.
        self.role.send_modify(|_| {});
        let connected_primary = self
            .peers
            .load()
            .iter()
            .find(|p| p.is_connected() && p.is_peer_primary())
            .map(|p| p.config.name.clone());
        Ok(match connected_primary {
            Some(name) => format!("{}: full resync from {name} started", what.verb()),
            None => format!(
                "{}: data marked inconsistent; a full resync starts when a primary links",
                what.verb()
            ),
        })
    }
}
