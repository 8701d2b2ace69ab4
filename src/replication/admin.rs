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
    pub fn peer_named(&self, name_or_id: &str) -> Result<&Arc<PeerReplica>, String> {
        self.peers
            .iter()
            .find(|p| p.config.name == name_or_id || p.id().to_string() == name_or_id)
            .ok_or_else(|| {
                let known: Vec<String> = self
                    .peers
                    .iter()
                    .map(|p| format!("{} (id {})", p.config.name, p.id()))
                    .collect();
                format!("no peer '{name_or_id}'; peers: {}", known.join(", "))
            })
    }
}

pub struct AdminSwitch {
    wanted_up: watch::Sender<bool>,
}

impl Default for AdminSwitch {
    fn default() -> Self {
        AdminSwitch {
            wanted_up: watch::Sender::new(true),
        }
    }
}

impl AdminSwitch {
    /// Sets the switch; false when it already was in that position.
    pub fn set(&self, up: bool) -> bool {
        self.wanted_up.send_if_modified(|wanted| {
            let changed = *wanted != up;
            *wanted = up;
            changed
        })
    }

    pub fn is_up(&self) -> bool {
        *self.wanted_up.borrow()
    }

    /// Resolves once the operator takes the link down (at once if it is).
    pub async fn down(&self) {
        let mut rx = self.wanted_up.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|up| !*up).await;
    }

    /// Resolves once the operator lets the link come up (at once if it may).
    pub async fn up(&self) {
        let mut rx = self.wanted_up.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }
}
