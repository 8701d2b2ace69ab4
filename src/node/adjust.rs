//! `vmsyncctl adjust`: re-read the configuration file and apply what
//! changed to the running daemon, as `drbdadm adjust` does.
//!
//! What applies live: `[replication]` (rates, limits, timeouts: each takes
//! effect at its next use), and `[[peer]]` sections added or removed (see
//! `replication::membership`: a new peer is fully synced once linked, a
//! removed one's link is taken down). Anything else that changed — the
//! resource, this node, a peer's address, name or group, the directory, the
//! secret, metrics — needs the daemon restarted; then adjust applies
//! nothing and names those keys, so a half-applied file never runs. An
//! invalid file changes nothing either.

use crate::config::{self, Config, Peer};

use super::Node;

impl Node {
    pub(super) fn adjust(&self) -> Result<String, String> {
        let path = &self.config.path;
        let new = config::load(path).map_err(|e| format!("{e}; nothing changed"))?;
        let (mut needs_restart, plan) = self.compare_with(&new);
        match (&self.replication, new.peers.is_empty()) {
            (None, false) => needs_restart.push("[[peer]] added to a standalone node".into()),
            (Some(_), true) => needs_restart.push("every [[peer]] removed".into()),
            _ => {}
        }
        if !needs_restart.is_empty() {
            return Err(format!(
                "{} changed, which needs a daemon restart (vmsyncd re-reads it on start; a primary's device survives a restart): {}; nothing was applied",
                path.display(),
                needs_restart.join(", ")
            ));
        }
        let Some(repl) = &self.replication else {
            return Ok("no change".into());
        };
        let mut changes = tunable_changes(&repl.tunables(), &new.replication);
        if !changes.is_empty() {
            repl.set_tunables(new.replication);
        }
        for peer in &plan.removed {
            repl.remove_peer(peer.id)?;
            changes.push(format!("peer {} (id {}) removed", peer.name, peer.id));
        }
        for peer in plan.added {
            let what = format!(
                "peer {} (id {}, {}) added: full sync once linked",
                peer.name, peer.id, peer.address
            );
            repl.add_peer(peer)?;
            changes.push(what);
        }
        if changes.is_empty() {
            return Ok("no change".into());
        }
        tracing::info!(changes = changes.join(", "), "configuration adjusted");
        Ok(format!("applied: {}", changes.join(", ")))
    }
}

impl Node {
    /// How `new` differs from the running daemon: the keys only a restart
    /// applies, and the peers to add or remove. Peers are compared with the
    /// running set (earlier adjusts may have changed it), everything else
    /// with what the daemon started with.
    pub(super) fn compare_with(&self, new: &Config) -> (Vec<String>, PeerPlan) {
        let running: Vec<Peer> = match &self.replication {
            Some(repl) => repl.peers.load().iter().map(|p| p.config.clone()).collect(),
            None => Vec::new(),
        };
        let mut plan = PeerPlan::new(&running, &new.peers);
        let mut keys = needs_restart(&self.config, new);
        keys.append(&mut plan.needs_restart);
        (keys, plan)
    }
}

/// How the `[[peer]]` sections differ from the running peers.
#[derive(Debug, Default)]
pub(super) struct PeerPlan {
    pub(super) added: Vec<Peer>,
    pub(super) removed: Vec<Peer>,
    /// Peers whose id stayed but whose name, address or group changed.
    needs_restart: Vec<String>,
}

impl PeerPlan {
    fn new(running: &[Peer], wanted: &[Peer]) -> Self {
        let mut plan = PeerPlan::default();
        for peer in running {
            match wanted.iter().find(|p| p.id == peer.id) {
                None => plan.removed.push(peer.clone()),
                Some(p) if p != peer => plan.needs_restart.push(format!(
                    "peer {} (id {}) changed its name, address or lan_group",
                    peer.name, peer.id
                )),
                Some(_) => {}
            }
        }
        for peer in wanted {
            if !running.iter().any(|p| p.id == peer.id) {
                plan.added.push(peer.clone());
            }
        }
        plan
    }
}

/// The parts of the configuration a running daemon cannot take over
/// (peers apart: see [`PeerPlan`]).
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if old.resource != new.resource {
        keys.push("[resource]".to_string());
    }
    if old.node != new.node {
        keys.push("[node]".to_string());
    }
    if old.directory != new.directory || old.report_interval_ms != new.report_interval_ms {
        keys.push("[directory]".to_string());
    }
    if old.metrics_listen != new.metrics_listen {
        keys.push("[metrics] listen".to_string());
    }
    if old.secret_file != new.secret_file {
        keys.push("[security] secret_file".to_string());
    }
    keys
}

/// "key old → new" for every tunable that differs.
fn tunable_changes(old: &config::Replication, new: &config::Replication) -> Vec<String> {
    let mut changes = Vec::new();
    let mut compare = |key: &str, a: u64, b: u64| {
        if a != b {
            changes.push(format!("{key} {a} → {b}"));
        }
    };
    compare(
        "max_epoch_writes",
        old.max_epoch_writes.into(),
        new.max_epoch_writes.into(),
    );
    compare(
        "congestion_limit",
        old.congestion_bytes,
        new.congestion_bytes,
    );
    compare(
        "max_peer_wait_ms",
        old.max_peer_wait_ms,
        new.max_peer_wait_ms,
    );
    compare("resync_rate", old.resync_rate, new.resync_rate);
    compare("resync_min_rate", old.resync_min_rate, new.resync_min_rate);
    compare("sync_rate", old.sync_rate, new.sync_rate);
    compare("verify_rate", old.verify_rate, new.verify_rate);
    compare("wan_rate", old.wan_rate, new.wan_rate);
    compare(
        "fetch_timeout_ms",
        old.fetch_timeout_ms,
        new.fetch_timeout_ms,
    );
    compare(
        "ping_interval_ms",
        old.ping_interval_ms,
        new.ping_interval_ms,
    );
    compare("ping_timeout_ms", old.ping_timeout_ms, new.ping_timeout_ms);
    for (key, old, new) in [
        (
            "wan_compression",
            old.wan_compression.name(),
            new.wan_compression.name(),
        ),
        (
            "after_split_brain",
            old.after_split_brain.name(),
            new.after_split_brain.name(),
        ),
        (
            "zero_copy_send",
            old.zero_copy_send.name(),
            new.zero_copy_send.name(),
        ),
    ] {
        if old != new {
            changes.push(format!("{key} {old} → {new}"));
        }
    }
    changes
}
