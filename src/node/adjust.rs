//! `vmsyncctl adjust`: re-read the configuration file and apply what
//! changed to the running daemon, as `drbdadm adjust` does.
//!
//! What applies live is `[replication]` (rates, limits, timeouts: each
//! takes effect at its next use). Anything else that changed — the
//! resource, this node, the peers, the directory, the secret — needs the
//! daemon restarted; then adjust applies nothing and names those keys, so
//! a half-applied file never runs. An invalid file changes nothing either.

use crate::config::{self, Config};

use super::Node;

impl Node {
    pub(super) fn adjust(&self) -> Result<String, String> {
        let path = &self.config.path;
        let new = config::load(path).map_err(|e| format!("{e}; nothing changed"))?;
        let needs_restart = needs_restart(&self.config, &new);
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
        let changes = tunable_changes(&repl.tunables(), &new.replication);
        if changes.is_empty() {
            return Ok("no change".into());
        }
        repl.set_tunables(new.replication);
        tracing::info!(changes = changes.join(", "), "configuration adjusted");
        Ok(format!("applied: {}", changes.join(", ")))
    }
}

/// The parts of the configuration a running daemon cannot take over.
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
    for peer in &old.peers {
        match new.peers.iter().find(|p| p.id == peer.id) {
            None => keys.push(format!("peer {} removed", peer.name)),
            Some(p) if p != peer => keys.push(format!("peer {}", peer.name)),
            Some(_) => {}
        }
    }
    for peer in &new.peers {
        if !old.peers.iter().any(|p| p.id == peer.id) {
            keys.push(format!("peer {} added", peer.name));
        }
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
    if old.after_split_brain != new.after_split_brain {
        changes.push(format!(
            "after_split_brain {:?} → {:?}",
            old.after_split_brain, new.after_split_brain
        ));
    }
    changes
}
