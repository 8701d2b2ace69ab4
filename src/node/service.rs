//! The service manager's view of the daemon (systemd's `Type=notify`
//! protocol through `sd-notify`; nothing is sent when `NOTIFY_SOCKET` is not
//! set, so this costs nothing outside systemd).
//!
//! `READY=1` means "usable": the device exists (a primary or a standalone
//! disk) or, on a secondary, at least one peer has linked, so a unit that
//! orders itself `After=vmsyncd@r0.service` starts once the resource is
//! really there, as DRBD's `drbd@.service` waits for its resource to come
//! up. Until then and afterwards `STATUS=` carries a one-line summary that
//! `systemctl status` shows.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use super::Node;
use crate::control::Status;

/// How often the summary is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// Whether a service manager listens (systemd sets `NOTIFY_SOCKET` for a
/// `Type=notify` unit).
pub(super) fn is_managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells the service manager how the node is doing until it stops.
pub(super) async fn report_readiness(node: Arc<Node>) {
    let mut ready = false;
    let mut last_line = String::new();
    let mut stopped = node.shutdown.subscribe();
    loop {
        let status = node.status().await;
        let line = summary(&status);
        let now_ready = is_usable(&status);
        if line != last_line || (now_ready && !ready) {
            let mut states = vec![NotifyState::Status(&line)];
            if now_ready && !ready {
                states.push(NotifyState::Ready);
                tracing::info!("ready: {line}");
            }
            if let Err(e) = sd_notify::notify(&states) {
                tracing::debug!(error = %e, "cannot notify the service manager");
            }
            ready |= now_ready;
            last_line = line;
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_INTERVAL) => {}
            _ = stopped.changed() => break,
        }
    }
}

/// Tells the service manager the daemon is going down (sent from the main
/// task: spawned tasks die with the runtime before they could).
pub(super) fn report_stopping() {
    if is_managed() {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }
}

/// Whether the resource is there for its users: the device is exposed, or
/// this secondary holds a link to a peer (it receives the primary's writes).
fn is_usable(status: &Status) -> bool {
    status.device.is_some() || status.peers.iter().any(|p| p.connected)
}

/// One line: role, device, disk, linked peers, and any sync in progress.
fn summary(status: &Status) -> String {
    let mut line = format!("{} {}", status.role, status.disk);
    if let Some(device) = &status.device {
        line.push_str(&format!(", {device}"));
    }
    if !status.peers.is_empty() {
        let linked = status.peers.iter().filter(|p| p.connected).count();
        line.push_str(&format!(", {linked}/{} peers linked", status.peers.len()));
        if linked == 0 && status.device.is_none() {
            line.push_str(" (waiting for a peer)");
        }
    }
    if status.sync.stale_bytes > 0 {
        line.push_str(&format!(", {} bytes to fetch", status.sync.stale_bytes));
    }
    if status.fenced {
        line.push_str(", FENCED");
    }
    line
}
