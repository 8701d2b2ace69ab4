//! Who loses a split brain: `[replication] after_split_brain`.
//!
//! A split brain is two nodes that both became writable while cut off from
//! each other: their data generations diverged (`source::lineage`). vmsync
//! meets it when a primary links with the other node as its secondary —
//! data only ever flows from a primary — and decides there, with DRBD's
//! rules:
//!
//! * `disconnect` (the default): nobody; the link is refused and the
//!   operator runs `vmsyncctl discard-my-data` on the node whose changes go;
//! * `discard-secondary` (DRBD's `after-sb-1pri`): the secondary;
//! * `discard-zero-changes` (DRBD's `after-sb-0pri`): the node that wrote
//!   nothing since the split, so nothing is lost; if both wrote, nobody;
//! * `discard-younger-primary` (`after-sb-0pri` too): the node that was
//!   promoted after the split; the one that was primary before it keeps its
//!   changes.
//!
//! A rule that picks the primary cannot be applied (its data is the guest's
//! disk): the link is refused, and the error says which node to promote.
//! Between two secondaries nothing flows; the split brain is reported there
//! with what the policy will do once one of them is promoted.
//!
//! "Wrote nothing since the split" is known exactly: a promotion starts a
//! generation with the metadata's `generation_unwritten` flag set, and the
//! first write in it clears the flag durably before any byte changes. A
//! node whose generation is unwritten holds its parent generation's data
//! (`history[0]`); when the other side holds or descends from that parent,
//! this node made no changes since they parted.

use blockdev::meta::GenerationIds as Ids;
use protocol::GenerationIds;

use crate::config::AfterSplitBrain;

/// One side of a diverged link, as its `State` describes it.
#[derive(Debug, Clone, Copy)]
pub struct Side {
    pub generation: GenerationIds,
    /// It started its current generation and wrote nothing in it.
    pub unwritten: bool,
}

impl Side {
    /// This node, as its `State` describes it.
    pub fn ours(repl: &super::Replication) -> Side {
        Side {
            generation: repl.generation(),
            unwritten: repl.metadata.generation_unwritten(),
        }
    }

    /// The peer, as its `State` said.
    pub fn theirs(state: &super::link::PeerState) -> Side {
        Side {
            generation: state.generation,
            unwritten: state.unwritten,
        }
    }

    /// Whether `id` is a generation this side holds or descends from.
    fn knows(&self, id: u64) -> bool {
        let g = &self.generation;
        id != 0 && [g.current, g.bitmap, g.history[0], g.history[1]].contains(&id)
    }

    /// It wrote nothing since it parted from `other`: its data is its
    /// parent generation's, which `other` holds or descends from.
    pub fn made_no_changes_since(&self, other: &Side) -> bool {
        self.unwritten && other.knows(self.generation.history[0])
    }

    /// The same node seen as holding its parent generation: what it is once
    /// its (empty) generation of its own is dropped.
    pub fn as_parent(&self) -> GenerationIds {
        let g = &self.generation;
        GenerationIds {
            current: g.history[0],
            bitmap: g.history[0],
            history: [g.history[1], 0],
        }
    }

    /// The term in which this side's line split off from `other`'s: of the
    /// first generation of its own after the newest one `other` knows.
    /// None when the common generation is beyond what the ids remember.
    fn split_term(&self, other: &Side) -> Option<u64> {
        let g = &self.generation;
        let line = [g.current, g.history[0], g.history[1]];
        let common = line.iter().position(|&id| other.knows(id))?;
        let root = line[common.checked_sub(1)?];
        Some(Ids::origin_of(root).0)
    }
}

/// What a primary does with a diverged secondary.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The secondary loses and is resynced from us. `made_no_changes`: it
    /// wrote nothing since the split (it holds its parent generation's
    /// data, see [`Side::as_parent`]), so nothing of its own is lost.
    DiscardPeer { made_no_changes: bool },
    /// Nobody is chosen automatically, or the rule chose us: the link is
    /// refused, for this reason (it starts with "split brain").
    Refuse(String),
}

/// The decision of a primary (`ours`) that meets a diverged secondary.
pub fn decide(policy: AfterSplitBrain, ours: &Side, theirs: &Side) -> Decision {
    let peer_made_none = theirs.made_no_changes_since(ours);
    let discard_peer = Decision::DiscardPeer {
        made_no_changes: peer_made_none,
    };
    let name = policy.name();
    match policy {
        AfterSplitBrain::Disconnect => Decision::Refuse(format!(
            "split brain: peer's data (generation {:016x}) and ours ({:016x}) diverged; run `vmsyncctl discard-my-data` on the node whose changes are to go",
            theirs.generation.current, ours.generation.current
        )),
        AfterSplitBrain::DiscardSecondary => discard_peer,
        AfterSplitBrain::DiscardZeroChanges => {
            if peer_made_none {
                discard_peer
            } else if ours.made_no_changes_since(theirs) {
                Decision::Refuse(format!(
                    "split brain: the peer wrote since the split and this primary did not; after_split_brain = {name} keeps the peer's changes: demote this node and promote the peer"
                ))
            } else {
                Decision::Refuse(format!(
                    "split brain: both nodes wrote since the split, so after_split_brain = {name} cannot choose; run `vmsyncctl discard-my-data` on the node whose changes are to go"
                ))
            }
        }
        AfterSplitBrain::DiscardYoungerPrimary => {
            match (ours.split_term(theirs), theirs.split_term(ours)) {
                (Some(o), Some(t)) if t > o => discard_peer,
                (Some(o), Some(t)) if o > t => Decision::Refuse(format!(
                    "split brain: this node became primary after the split (term {o}), the peer before it (term {t}); after_split_brain = {name} keeps the peer's changes: demote this node and promote the peer"
                )),
                (Some(_), Some(_)) => Decision::Refuse(format!(
                    "split brain: both nodes became primary in the same term, so after_split_brain = {name} cannot choose; run `vmsyncctl discard-my-data` on the node whose changes are to go"
                )),
                _ => Decision::Refuse(format!(
                    "split brain: the histories parted too long ago to tell the younger primary (after_split_brain = {name}); run `vmsyncctl discard-my-data` on the node whose changes are to go"
                )),
            }
        }
    }
}

/// What `policy` will do once one of two diverged secondaries (`ours`, the
/// peer's `theirs`) is promoted: for the split-brain report on their link.
pub fn outlook(policy: AfterSplitBrain, ours: &Side, theirs: &Side) -> String {
    let if_we_lead = decide(policy, ours, theirs);
    let if_they_lead = decide(policy, theirs, ours);
    let name = policy.name();
    match (if_we_lead, if_they_lead) {
        (Decision::DiscardPeer { .. }, Decision::DiscardPeer { .. }) => format!(
            "after_split_brain = {name}: whichever node is promoted keeps its data and the other's changes are discarded"
        ),
        (Decision::DiscardPeer { .. }, Decision::Refuse(_)) => format!(
            "after_split_brain = {name}: promote this node and the peer's changes are discarded (promoting the peer is refused)"
        ),
        (Decision::Refuse(_), Decision::DiscardPeer { .. }) => format!(
            "after_split_brain = {name}: promote the peer and this node's changes are discarded (promoting this node is refused)"
        ),
        (Decision::Refuse(why), Decision::Refuse(_)) => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AfterSplitBrain::*;

    /// A generation id started by `node` as primary of `term`.
    fn id(term: u64, node: u32) -> u64 {
        (term << 32) | (u64::from(node) << 24) | 1
    }

    /// A side holding `current`, descended from `parent` then `grandparent`.
    fn side(current: u64, parent: u64, grandparent: u64, unwritten: bool) -> Side {
        Side {
            generation: GenerationIds {
                current,
                bitmap: parent,
                history: [parent, grandparent],
            },
            unwritten,
        }
    }

    /// Node 1 was primary of term 1 in generation `common`, lost node 2,
    /// kept writing (a fork in term 1); node 2 was promoted in term 2.
    const COMMON: u64 = 0x0000_0001_0100_0007;

    fn old_primary(wrote: bool) -> Side {
        side(id(1, 1) + 8, COMMON, 0, !wrote)
    }

    fn promoted(wrote: bool) -> Side {
        side(id(2, 2), COMMON, 0, !wrote)
    }

    fn refused(d: Decision) -> String {
        match d {
            Decision::Refuse(why) => {
                assert!(why.starts_with("split brain"), "{why}");
                why
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn disconnect_refuses_whatever_happened() {
        let why = refused(decide(Disconnect, &old_primary(true), &promoted(false)));
        assert!(why.contains("discard-my-data"), "{why}");
    }

    #[test]
    fn discard_secondary_always_discards_the_secondary() {
        assert_eq!(
            decide(DiscardSecondary, &promoted(true), &old_primary(true)),
            Decision::DiscardPeer {
                made_no_changes: false
            }
        );
        assert_eq!(
            decide(DiscardSecondary, &old_primary(true), &promoted(false)),
            Decision::DiscardPeer {
                made_no_changes: true
            }
        );
    }

    #[test]
    fn zero_changes_discards_the_node_that_wrote_nothing_and_never_one_that_wrote() {
        assert_eq!(
            decide(DiscardZeroChanges, &old_primary(true), &promoted(false)),
            Decision::DiscardPeer {
                made_no_changes: true
            }
        );
        // The primary is the one without changes: it cannot be discarded.
        let why = refused(decide(
            DiscardZeroChanges,
            &promoted(false),
            &old_primary(true),
        ));
        assert!(why.contains("promote the peer"), "{why}");
        // Both wrote: no automatic choice.
        let why = refused(decide(
            DiscardZeroChanges,
            &old_primary(true),
            &promoted(true),
        ));
        assert!(why.contains("both nodes wrote"), "{why}");
        // Neither wrote: the secondary goes, losing nothing.
        assert_eq!(
            decide(DiscardZeroChanges, &promoted(false), &old_primary(false)),
            Decision::DiscardPeer {
                made_no_changes: true
            }
        );
    }

    #[test]
    fn an_unwritten_generation_whose_parent_the_other_never_held_is_a_change() {
        // Node 2's parent is a generation node 1 does not know (it was
        // promoted twice since): its earlier generation may hold writes.
        let far = side(id(3, 2), id(2, 2), COMMON, true);
        assert!(!far.made_no_changes_since(&old_primary(true)));
        refused(decide(DiscardZeroChanges, &old_primary(true), &far));
    }

    #[test]
    fn younger_primary_keeps_the_primary_from_before_the_split() {
        // Node 1 is primary again (a new generation in term 3, after its
        // term-1 fork): the split is still dated by its term-1 line.
        let repromoted = side(id(3, 1), id(1, 1) + 8, COMMON, true);
        assert_eq!(
            decide(DiscardYoungerPrimary, &repromoted, &promoted(true)),
            Decision::DiscardPeer {
                made_no_changes: false
            }
        );
        let why = refused(decide(
            DiscardYoungerPrimary,
            &promoted(true),
            &old_primary(true),
        ));
        assert!(why.contains("term 2") && why.contains("term 1"), "{why}");
        // Two nodes promoted in the same term (no directory): a tie.
        let twin = side(id(2, 1), COMMON, 0, false);
        let why = refused(decide(DiscardYoungerPrimary, &twin, &promoted(true)));
        assert!(why.contains("same term"), "{why}");
        // No common generation in the remembered history.
        let stranger = side(id(5, 1), id(4, 1), id(3, 1), false);
        let why = refused(decide(DiscardYoungerPrimary, &stranger, &promoted(true)));
        assert!(why.contains("too long ago"), "{why}");
    }

    #[test]
    fn a_node_that_wrote_nothing_is_seen_as_its_parent() {
        let p = promoted(false);
        let parent = p.as_parent();
        assert_eq!(parent.current, COMMON);
        assert_eq!(parent.history, [0, 0]);
    }

    #[test]
    fn between_secondaries_the_report_says_whom_to_promote() {
        let me = old_primary(true);
        let peer = promoted(false);
        assert!(outlook(DiscardZeroChanges, &me, &peer).contains("promote this node"));
        assert!(outlook(DiscardZeroChanges, &peer, &me).contains("promote the peer"));
        assert!(outlook(DiscardSecondary, &me, &peer).contains("whichever node"));
        assert!(outlook(Disconnect, &me, &peer).contains("discard-my-data"));
    }
}
