//! The operator's switch on one peer's link: `vmsyncctl disconnect PEER`
//! takes it down and keeps it down (DRBD's `StandAlone` for that
//! connection), `vmsyncctl connect PEER` lets it come up again. While down,
//! this node neither dials nor accepts that peer; as primary it keeps what
//! the peer misses in the peer's bitmap, and the peer is resynced from it
//! once reconnected. Not persisted: a restarted daemon connects to every
//! configured peer, as `drbdadm up` does.

use std::sync::Arc;

use tokio::sync::watch;

use super::peer::PeerReplica;
use super::Replication;

impl Replication {
    /// The configured peer called `name_or_id` (its name, or its id).
    pub fn peer_named(&self, name_or_id: &str) -> Result<Arc<PeerReplica>, String> {
        let peers = self.peers.load();
        peers
            .iter()
            .find(|p| p.config.name == name_or_id || p.id().to_string() == name_or_id)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<String> = peers
                    .iter()
                    .map(|p| format!("{} (id {})", p.config.name, p.id()))
                    .collect();
                format!("no peer '{name_or_id}'; peers: {}", known.join(", "))
            })
    }
}

/// What the operator wants of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wish {
    Up,
    /// `vmsyncctl disconnect`.
    Down,
    /// The peer left the configuration (`vmsyncctl adjust`): the link goes
    /// down and its task ends.
    Removed,
}

pub struct AdminSwitch {
    wish: watch::Sender<Wish>,
}

impl Default for AdminSwitch {
    fn default() -> Self {
        AdminSwitch {
            wish: watch::Sender::new(Wish::Up),
        }
    }
}

impl AdminSwitch {
    /// Sets the switch; false when it already was in that position (or the
    /// peer was removed).
    pub fn set(&self, up: bool) -> bool {
        let wanted = if up { Wish::Up } else { Wish::Down };
        self.wish.send_if_modified(|wish| {
            let changed = *wish != wanted && *wish != Wish::Removed;
            if changed {
                *wish = wanted;
            }
            changed
        })
    }

    /// Takes the link down for good: the peer was removed.
    pub fn remove(&self) {
        self.wish.send_replace(Wish::Removed);
    }

    pub fn is_up(&self) -> bool {
        *self.wish.borrow() == Wish::Up
    }

    pub fn is_removed(&self) -> bool {
        *self.wish.borrow() == Wish::Removed
    }

    /// Resolves once the link must go down (at once if it must).
    pub async fn down(&self) {
        let mut rx = self.wish.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|wish| *wish != Wish::Up).await;
    }

    /// Resolves once the link may come up again, or the peer was removed.
    pub async fn up(&self) {
        let mut rx = self.wish.subscribe();
        let _ = rx.wait_for(|wish| *wish != Wish::Down).await;
    }
}
