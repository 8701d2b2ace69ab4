//! `vmsyncctl resize` with the daemon running: growing a replica online.
//!
//! Every layer of the stack (metadata and its bitmaps, the fetch layer,
//! replication, the ublk queues) is built for one size. Rather than teach
//! each to grow in place, the daemon replaces itself (`exec`, same process
//! id) with one started for the new size, the way a killed daemon is
//! replaced, which is a path the whole stack already survives:
//!
//! 1. Here, everything that could refuse is checked first (a larger size
//!    in the configuration file and nothing else changed, the backing store
//!    large enough, metadata in a file, and for a device the kernel's
//!    `UBLK_U_CMD_UPDATE_SIZE`); a refusal changes nothing.
//! 2. The daemon answers, lets its control clients read their answers, and
//!    `exec`s itself with `--grow-metadata`. Its ublk device stays (user
//!    recovery: the kernel holds the guest's I/O meanwhile, and reissues
//!    what was in flight); peers see the link drop.
//! 3. The new process grows the metadata before opening it
//!    (`blockdev::meta::grow_in_use`: bits and activity log kept, the new
//!    area marked stale for every peer unless `--assume-clean`), re-attaches
//!    to the device, and tells the kernel the new size (`blockdev::ublk`).
//!
//! Peers refuse to link while their sizes differ, so the cluster runs
//! degraded until every node has grown (secondaries first keeps the
//! window short). If the new process cannot grow, it runs at the old size
//! and says why in `status` (`resize_error`).

use blockdev::meta;

use super::Node;
use crate::config::{self, Config};

/// A grow asked of the daemon's next start (`vmsyncd --grow-metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grow {
    /// The new area is identical on every node: do not resync it.
    pub assume_clean: bool,
}

/// How a daemon's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped: exit.
    Stopped,
    /// `vmsyncctl resize`: replace this process by one that grows (see the
    /// module's comment); the device and the metadata are left in use.
    RestartToGrow(Grow),
}

impl Node {
    /// `vmsyncctl resize` on a running daemon: checks everything, then asks
    /// the run loop to restart this process grown. Returns the answer.
    pub(super) async fn resize(&self, grow: Grow) -> Result<String, String> {
        let path = &self.config.path;
        let new = config::load(path).map_err(|e| format!("{e}; nothing changed"))?;
        let (old_size, new_size) = (self.config.resource.size, new.resource.size);
        if new_size == old_size {
            return Ok(format!(
                "{} says {new_size} bytes, the size this daemon serves: nothing to do (set the new [resource] size first)",
                path.display()
            ));
        }
        if new_size < old_size {
            return Err(format!(
                "{} says {new_size} bytes, less than the {old_size} served: shrinking is not supported; nothing changed",
                path.display()
            ));
        }
        let others = self.changes_besides_size(&new);
        if !others.is_empty() {
            return Err(format!(
                "{} changed in more than [resource] size ({}): apply those first (`vmsyncctl adjust`, or a restart); nothing changed",
                path.display(),
                others.join(", ")
            ));
        }
        blockdev::backing::check_capacity(&new.node.backing, new_size)
            .map_err(|e| format!("{e}: grow it first, on every node; nothing changed"))?;
        let metadata = &new.node.metadata;
        if !std::fs::metadata(metadata).is_ok_and(|m| m.is_file()) {
            return Err(format!(
                "{}: metadata on a block device cannot be grown in place; nothing changed",
                metadata.display()
            ));
        }
        self.check_frontend_can_grow().await?;
        tracing::info!(
            from = old_size,
            to = new_size,
            assume_clean = grow.assume_clean,
            "growing online: restarting under the device"
        );
        *self.restart.lock().unwrap_or_else(|e| e.into_inner()) = Some(grow);
        self.shutdown.send_replace(true);
        Ok(format!(
            "growing from {old_size} to {new_size} bytes: vmsyncd restarts itself under the device"
        ))
    }

    /// What differs between the running configuration and `new`, besides
    /// the size (the keys `adjust` would name, and added or removed peers).
    fn changes_besides_size(&self, new: &Config) -> Vec<String> {
        let mut probe = new.clone();
        probe.resource.size = self.config.resource.size;
        let (mut changes, peers) = self.compare_with(&probe);
        if !peers.added.is_empty() || !peers.removed.is_empty() {
            changes.push("[[peer]]".into());
        }
        changes
    }

    /// A device served on ublk can grow under the guest only where the
    /// kernel can change its size; a block socket's clients would see their
    /// connections cut.
    async fn check_frontend_can_grow(&self) -> Result<(), String> {
        let slot = self.frontend.lock().await;
        match &*slot {
            None => Ok(()),
            Some(super::frontend::Frontend::Socket { .. }) => Err(
                "the device is served on a block socket, whose clients a restart would cut off: stop using it (demote, or shut down) and resize; nothing changed".into(),
            ),
            Some(super::frontend::Frontend::Ublk(_)) if !blockdev::ublk::can_grow_online() => Err(
                "this kernel cannot grow a live ublk device (UBLK_U_CMD_UPDATE_SIZE needs Linux 6.16): unmount or stop the VM, `vmsyncctl shutdown`, then `vmsyncctl resize` offline; nothing changed".into(),
            ),
            Some(super::frontend::Frontend::Ublk(_)) => Ok(()),
        }
    }
}

/// For a daemon started with `--grow-metadata`: grows its metadata to the
/// configured size before anything opens it. When that fails, the daemon
/// runs at the size the metadata has (as before the resize) rather than not
/// at all (its device is waiting for it): `config`'s size is set back, and
/// the reason is returned for `status`.
pub(super) fn grow_metadata_at_start(config: &mut Config, grow: Grow) -> Option<String> {
    let path = config.node.metadata.clone();
    let wanted = config.resource.size;
    let grown = blockdev::backing::check_capacity(&config.node.backing, wanted)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            meta::grow_in_use(&path, wanted, grow.assume_clean).map_err(|e| e.to_string())
        });
    match grown {
        Ok(grown) => {
            tracing::info!(
                from = grown.old_size,
                to = grown.new_size,
                new_blocks_marked_per_peer = grown.new_blocks_marked,
                "metadata grown"
            );
            None
        }
        Err(e) => {
            let why = format!("cannot grow to {wanted} bytes: {e}");
            match meta::stored_device_size(&path) {
                Ok(size) => {
                    tracing::error!("{why}; serving the {size} bytes the metadata has");
                    config.resource.size = size;
                }
                Err(e) => tracing::error!("{why}; and reading the metadata's size: {e}"),
            }
            Some(why)
        }
    }
}
