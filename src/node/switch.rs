//! The machine switch, seen from the node: promotion and demotion through
//! the directory, the primary's periodic reports, and the directory's
//! request that this node step down.
//!
//! `vmsyncctl promote` on a node with `[directory]` asks the directory,
//! which asks the current primary to demote (it refuses while its device is
//! open, unless forced), raises the term and answers with the previous
//! primary's last report; this node takes over its bitmaps, exposes the
//! device at once and fetches what it lacks (see `replication::handover`).

use std::sync::Arc;
use std::time::Duration;

use protocol::Role;

use super::Node;
use crate::directory::client::{DirError, Grant, Report};
use crate::replication::Replication;

impl Node {
    /// Promotion through the directory. Returns the message for the user.
    pub(super) async fn promote_through_directory(
        &self,
        repl: &Arc<Replication>,
        force: bool,
    ) -> Result<(crate::replication::RoleState, String), String> {
        let Some(directory) = &self.directory else {
            unreachable!("only called with a directory configured");
        };
        if repl.role().role == Role::Primary {
            return Err("already primary".into());
        }
        let layout = self.metadata.layout();
        let grant = directory
            .promote(force, layout.blocks(), layout.block_size())
            .await
            .map_err(|e| e.to_string())?;
        let note = describe_grant(&grant, self.config.node.id);
        let hot_extents = grant
            .prev
            .as_ref()
            .map(|p| p.hot_extents.clone())
            .unwrap_or_default();
        let (state, missing) = repl.promote_granted(&grant)?;
        if let Err(e) = repl.start_fetching(hot_extents) {
            tracing::error!(error = %e, "cannot start fetching the blocks this node lacks");
        }
        let mut message = String::new();
        if missing > 0 {
            message.push_str(&format!(
                "; {missing} bytes are fetched from other nodes (on demand, and in the background)"
            ));
        }
        if let Some(note) = note {
            message.push_str("; ");
            message.push_str(&note);
        }
        Ok((state, message))
    }

    /// A killed primary's device waits in the kernel: become primary again
    /// to re-attach it. With a directory, only if it still names this node
    /// primary (or none): otherwise another node may be writing, and this
    /// one must not. An unreachable directory does not stop the recovery
    /// (the peers still fence us if a newer term exists).
    pub(super) async fn resume_as_primary(&self, repl: &Arc<Replication>) -> anyhow::Result<()> {
        let me = self.config.node.id;
        if let Some(directory) = &self.directory {
            match directory.info().await {
                Ok(info) if info.primary.is_none_or(|p| p == me) => {
                    self.promote_through_directory(repl, false)
                        .await
                        .map_err(anyhow::Error::msg)?;
                    return Ok(());
                }
                Ok(info) => anyhow::bail!(
                    "the directory names node {} primary of term {}: not resuming this node's device (promote there, or here with --force)",
                    info.primary.unwrap_or_default(),
                    info.term
                ),
                Err(e) => tracing::warn!(error = %e, "directory unreachable: resuming on our own term"),
            }
        }
        repl.promote(true).map_err(anyhow::Error::msg)?;
        // Blocks still missing after a switch must not be served from the
        // disk: keep fetching them.
        repl.start_fetching(Vec::new())?;
        Ok(())
    }

    /// Tells the directory this node demoted (its final report). Returns a
    /// note for the user when that failed.
    pub(super) async fn report_demotion(&self, repl: &Replication) -> Option<String> {
        let directory = self.directory.as_ref()?;
        let _one_at_a_time = self.report_lock.lock().await;
        match directory.report(&build_report(repl, true, false)).await {
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot give the directory the final report");
                Some(format!(
                    "the directory was not told ({e}): promoting another node needs --force until this node reports again"
                ))
            }
        }
    }

    /// While primary, reports the staleness bitmaps every
    /// `report_interval_ms`; a refusal means the directory has a newer
    /// term, and this node stops serving writes (fenced). Also notices the
    /// end of a background sync.
    pub(super) async fn report_periodically(self: Arc<Self>) {
        let (Some(repl), Some(directory)) = (&self.replication, &self.directory) else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.report_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreachable_logged = false;
        loop {
            tick.tick().await;
            repl.check_sync_done();
            if repl.role().role != Role::Primary || repl.is_fenced() {
                continue;
            }
            let _one_at_a_time = self.report_lock.lock().await;
            // Demoted while we waited for the lock: the final report is sent.
            if repl.role().role != Role::Primary {
                continue;
            }
            match directory.report(&build_report(repl, false, false)).await {
                Ok(_) => unreachable_logged = false,
                // (Demoted meanwhile: the refusal only says so.)
                Err(DirError::Refused(why)) if repl.role().role == Role::Primary => {
                    repl.fence(&why)
                }
                Err(DirError::Refused(_)) => {}
                Err(e) => {
                    // The primary and its mirroring carry on without it.
                    if !unreachable_logged {
                        tracing::warn!(error = %e, "cannot report to the directory; serving on");
                        unreachable_logged = true;
                    }
                }
            }
        }
    }

    /// Serves the directory's connections: each asks this node to demote.
    pub(super) async fn serve_directory(
        self: Arc<Self>,
        mut incoming: crate::replication::IncomingConnections,
    ) {
        while let Some(conn) = incoming.recv().await {
            let node = Arc::clone(&self);
            tokio::spawn(async move {
                let demoting = Arc::clone(&node);
                let result =
                    crate::directory::client::answer_demote(conn, move |force, term| async move {
                        demoting.demote_for_directory(force, term).await
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "the directory's demote request failed");
                }
            });
        }
    }

    /// The directory asks us to step down for another node: demote (refused
    /// while the device is open, unless `force`), then hand over the final
    /// report.
    async fn demote_for_directory(&self, force: bool, term: u64) -> Result<Report, String> {
        let repl = self.replication.as_ref().ok_or("this node has no peers")?;
        tracing::info!(
            force,
            directory_term = term,
            "the directory asks this node to demote"
        );
        let mut slot = self.frontend.lock().await;
        // No periodic report may overtake the final one.
        let _one_at_a_time = self.report_lock.lock().await;
        let was_primary = repl.role().role == Role::Primary;
        self.remove_device(&mut slot, force).await?;
        let lagging = repl.demote().await.map_err(|e| format!("demote: {e}"))?;
        if !lagging.is_empty() {
            tracing::warn!(
                peers = lagging.join(", "),
                "demoted for the directory; these peers lack writes (the report says which)"
            );
        }
        Ok(build_report(repl, true, !was_primary))
    }
}

/// The node's report: generation, hot extents and, for itself and every
/// peer, the blocks it lacks. With `restarted` (the directory still takes
/// us for primary, but we are not: we restarted after a crash) the
/// activity-log extents go into every peer's bitmap too, as a promotion
/// after that crash would have marked them.
pub(super) fn build_report(repl: &Replication, last: bool, restarted: bool) -> Report {
    let mut bitmaps = vec![(repl.config.node.id, Arc::clone(repl.local.stale_bitmap()))];
    for peer in repl.peers.load().iter() {
        let lacking = peer.lacking();
        if restarted {
            repl.metadata.mark_active_extents(&lacking);
        }
        bitmaps.push((peer.id(), Arc::new(lacking)));
    }
    Report {
        // Demoted or not, the term we were primary of is the newest we know.
        term: repl.known_term(),
        generation: repl.generation(),
        last,
        hot_extents: repl.metadata.activity_log().active_extents(),
        bitmaps,
    }
}

/// What the user must know about a grant: a forced promotion may lose the
/// previous primary's last writes.
fn describe_grant(grant: &Grant, me: u32) -> Option<String> {
    let prev = grant.prev.as_ref()?;
    if prev.primary == me || grant.is_clean_handover_to(me) {
        return None;
    }
    Some(format!(
        "forced: node {} did not hand over; writes it made after its last report ({:.1} s old) may be lost",
        prev.primary,
        prev.age.as_secs_f64()
    ))
}
