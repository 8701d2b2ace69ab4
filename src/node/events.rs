//! `vmsyncctl events`: streams the node's state changes over a control
//! connection (see [`crate::events`]).
//!
//! The connection gets an `ok` response line, one `exists` event per object
//! (the state when it subscribed), then every change as it happens, and
//! `progress` events about once a second while a resync, background sync,
//! verify or WAN push runs. It ends when the client closes the connection or
//! the daemon stops (a `destroy` event).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use super::Node;
use crate::control::{self, Response, Status};
use crate::events::{props, Event, EventBus, EventKind, Object};

/// How often long work reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the background sync and verify states are looked at (they
/// change rarely; their transitions are announced from here).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

impl Node {
    /// Serves one `events` subscription until the client leaves or the
    /// daemon stops.
    pub(super) async fn stream_events(&self, mut stream: UnixStream, now_only: bool) {
        let mut changes = self.events.subscribe();
        let mut stopped = self.shutdown.subscribe();
        let result: std::io::Result<()> = async {
            control::write_response(&mut stream, &Response::ok("events")).await?;
            let status = self.status().await;
            write_events(&mut stream, exists_events(&self.events, &status)).await?;
            if now_only {
                return Ok(());
            }
            let (mut read, mut write) = stream.split();
            let mut probe = [0u8; 64];
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(event) => write_event(&mut write, &event).await?,
                        Err(RecvError::Lagged(count)) => {
                            let lost = self.events.make(EventKind::Lost, Object::Resource, None,
                                props([("count", json!(count))]));
                            write_event(&mut write, &lost).await?;
                            let status = self.status().await;
                            for event in exists_events(&self.events, &status) {
                                write_event(&mut write, &event).await?;
                            }
                        }
                        Err(RecvError::Closed) => return Ok(()),
                    },
                    // The client sends nothing more: EOF (or an error)
                    // means it is gone.
                    read = read.read(&mut probe) => if matches!(read, Ok(0) | Err(_)) { return Ok(()) },
                    _ = stopped.changed() => {
                        // A daemon growing online comes back at once (same
                        // pid): followers may subscribe again.
                        let restarting = self.restart.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                        let reason = if restarting { "restart to grow" } else { "stop" };
                        let destroy = self.events.make(EventKind::Destroy, Object::Resource, None,
                            props([("reason", json!(reason))]));
                        return write_event(&mut write, &destroy).await;
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "events client went away");
        }
    }

    /// Announces progress of long work and the transitions of the
    /// background sync and verify, while anyone is subscribed; without a
    /// subscriber it sleeps (no wake-ups of an idle daemon). Runs for the
    /// life of the daemon.
    pub(super) async fn report_progress(self: Arc<Self>) {
        let mut last_progress = tokio::time::Instant::now();
        let mut last: Option<Status> = None;
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.events.has_subscribers() {
                last = None;
                self.events.until_subscribed().await;
                tick.reset();
            }
            tick.tick().await;
            let status = self.status().await;
            if let Some(before) = &last {
                announce_transitions(&self.events, before, &status);
            }
            if last_progress.elapsed() >= PROGRESS_INTERVAL {
                last_progress = tokio::time::Instant::now();
                announce_progress(&self.events, &status);
            }
            last = Some(status);
        }
    }

    /// The device came or went.
    pub(super) fn announce_device(&self, path: Option<&str>) {
        self.events.emit(
            EventKind::Change,
            Object::Device,
            None,
            props([("path", json!(path))]),
        );
    }
}

/// The present state as one `exists` event per object.
fn exists_events(bus: &EventBus, status: &Status) -> Vec<Event> {
    let mut events = vec![
        bus.make(
            EventKind::Exists,
            Object::Resource,
            None,
            props([
                ("name", json!(status.resource)),
                ("node", json!(status.node)),
                ("role", json!(status.role)),
                ("disk", json!(status.disk)),
                ("term", json!(status.term)),
                ("fenced", json!(status.fenced)),
            ]),
        ),
        bus.make(
            EventKind::Exists,
            Object::Device,
            None,
            props([("path", json!(status.device))]),
        ),
    ];
    for peer in &status.peers {
        events.push(bus.make(
            EventKind::Exists,
            Object::Peer,
            Some(&peer.name),
            props([
                ("connected", json!(peer.connected)),
                ("state", json!(peer.state)),
                ("link", json!(peer.link)),
                ("stale_bytes", json!(peer.stale_bytes)),
            ]),
        ));
    }
    events.push(bus.make(
        EventKind::Exists,
        Object::Sync,
        None,
        props([
            ("state", json!(status.sync.state)),
            ("stale_bytes", json!(status.sync.stale_bytes)),
        ]),
    ));
    events.push(bus.make(
        EventKind::Exists,
        Object::Verify,
        None,
        props([("state", json!(status.verify.state))]),
    ));
    events
}

/// The background sync's and the verify's state changes since `before`.
fn announce_transitions(bus: &EventBus, before: &Status, now: &Status) {
    if before.sync.state != now.sync.state {
        bus.emit(
            EventKind::Change,
            Object::Sync,
            None,
            props([
                ("state", json!(now.sync.state)),
                ("stale_bytes", json!(now.sync.stale_bytes)),
                ("fetched_bytes", json!(now.sync.fetched_bytes)),
            ]),
        );
    }
    if before.verify.state != now.verify.state || before.verify.started_at != now.verify.started_at
    {
        bus.emit(
            EventKind::Change,
            Object::Verify,
            None,
            props([
                ("state", json!(now.verify.state)),
                ("differing_blocks", json!(now.verify.differing_blocks)),
            ]),
        );
    }
}

/// One `progress` event per piece of long work under way.
fn announce_progress(bus: &EventBus, status: &Status) {
    for peer in &status.peers {
        if peer.state == "resyncing" {
            bus.emit(
                EventKind::Progress,
                Object::Peer,
                Some(&peer.name),
                props([
                    ("work", json!("resync")),
                    ("stale_bytes", json!(peer.stale_bytes)),
                    ("done_bytes", json!(peer.resynced_bytes)),
                    ("rate_bytes_per_sec", json!(peer.resync_rate_bytes_per_sec)),
                    ("eta_seconds", json!(peer.eta_seconds)),
                ]),
            );
        } else if let Some(wan) = peer.wan.as_ref().filter(|w| w.push_rate_bytes_per_sec > 0) {
            bus.emit(
                EventKind::Progress,
                Object::Peer,
                Some(&peer.name),
                props([
                    ("work", json!("wan-push")),
                    ("stale_bytes", json!(wan.stale_bytes)),
                    ("done_bytes", json!(wan.pushed_wire_bytes)),
                    ("rate_bytes_per_sec", json!(wan.push_rate_bytes_per_sec)),
                    ("eta_seconds", json!(wan.eta_seconds)),
                ]),
            );
        }
    }
    if status.sync.state == "syncing" {
        bus.emit(
            EventKind::Progress,
            Object::Sync,
            None,
            props([
                ("work", json!("background-sync")),
                ("stale_bytes", json!(status.sync.stale_bytes)),
                ("done_bytes", json!(status.sync.fetched_bytes)),
                ("rate_bytes_per_sec", json!(status.sync.rate_bytes_per_sec)),
                ("eta_seconds", json!(status.sync.eta_seconds)),
            ]),
        );
    }
    if status.verify.state == "running" {
        bus.emit(
            EventKind::Progress,
            Object::Verify,
            None,
            props([
                ("work", json!("verify")),
                ("done_bytes", json!(status.verify.bytes_done)),
                ("total_bytes", json!(status.verify.total_bytes)),
                (
                    "rate_bytes_per_sec",
                    json!(status.verify.rate_bytes_per_sec),
                ),
                ("eta_seconds", json!(status.verify.eta_seconds)),
            ]),
        );
    }
}

async fn write_events(stream: &mut UnixStream, events: Vec<Event>) -> std::io::Result<()> {
    for event in events {
        write_event(stream, &event).await?;
    }
    Ok(())
}

async fn write_event<W: AsyncWriteExt + Unpin>(out: &mut W, event: &Event) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    out.write_all(&line).await
}
