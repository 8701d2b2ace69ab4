//! State changes as a stream of events (`vmsyncctl events`), modelled on
//! DRBD's `drbdsetup events2`: a subscriber first gets one `exists` event
//! per object describing the present state, then one event per change, in
//! the order the daemon made them.
//!
//! Changes are emitted where they happen (a peer's mode, the role, the disk
//! state...), not found by comparing snapshots, so a transition that lasts
//! a millisecond (a resync of one block) is still seen. Emitting never
//! blocks: a subscriber that falls more than [`CAPACITY`] events behind is
//! told how many it lost and gets a fresh set of `exists` events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

/// Events kept for a slow subscriber before it is told it lost some.
pub const CAPACITY: usize = 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The state at the time of subscribing (one per object).
    Exists,
    /// A property of the object changed; `props` holds the new values.
    Change,
    /// Long work (resync, background sync, verify) advanced.
    Progress,
    /// Two histories diverged; the link to the peer is refused.
    SplitBrain,
    /// A link to a peer failed (refused handshake, protocol violation...).
    Error,
    /// The subscriber fell behind; `props.count` events were dropped.
    Lost,
    /// The daemon stopped; the stream ends.
    Destroy,
}

impl EventKind {
    fn name(self) -> &'static str {
        match self {
            EventKind::Exists => "exists",
            EventKind::Change => "change",
            EventKind::Progress => "progress",
            EventKind::SplitBrain => "split-brain",
            EventKind::Error => "error",
            EventKind::Lost => "lost",
            EventKind::Destroy => "destroy",
        }
    }
}

/// The thing an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Object {
    /// This node's replica: role, disk state, term, fencing.
    Resource,
    /// The exposed device (`/dev/ublkbN` or the block socket).
    Device,
    /// One peer: its link and, on a primary, its replication state.
    Peer,
    /// Blocks this node lacks after a machine switch (background sync).
    Sync,
    /// The online verify.
    Verify,
}

impl Object {
    fn name(self) -> &'static str {
        match self {
            Object::Resource => "resource",
            Object::Device => "device",
            Object::Peer => "peer",
            Object::Sync => "sync",
            Object::Verify => "verify",
        }
    }
}

/// One line of `vmsyncctl events --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per emitted event (gaps mean lost events).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub kind: EventKind,
    pub object: Object,
    /// The peer's name, for peer events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The new values (for a change, only what changed).
    #[serde(default)]
    pub props: BTreeMap<String, Value>,
}

impl Event {
    /// The text form: `change peer:b state=resyncing`, like events2.
    pub fn to_line(&self) -> String {
        let mut line = format!("{} {}", self.kind.name(), self.object.name());
        if let Some(peer) = &self.peer {
            line.push(':');
            line.push_str(peer);
        }
        for (key, value) in &self.props {
            let value = match value {
                Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => s.clone(),
                Value::Null => "-".to_string(),
                other => other.to_string(),
            };
            line.push_str(&format!(" {key}={value}"));
        }
        line
    }
}

/// Builds the properties of an event: `props![("state", "up-to-date")]`.
pub fn props<const N: usize>(pairs: [(&str, Value); N]) -> BTreeMap<String, Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

/// Where changes are announced; shared by every part of the daemon.
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// Told of every new subscriber (see [`EventBus::until_subscribed`]).
    subscribed: tokio::sync::Notify,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            sender: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(0),
            subscribed: tokio::sync::Notify::new(),
        }
    }
}

impl EventBus {
    /// Announces an event. Never blocks; a no-op without subscribers.
    pub fn emit(
        &self,
        kind: EventKind,
        object: Object,
        peer: Option<&str>,
        props: BTreeMap<String, Value>,
    ) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let _ = self.sender.send(self.make(kind, object, peer, props));
    }

    /// An event stamped with the next sequence number and the time, not
    /// sent (the `exists` events of one subscriber).
    pub fn make(
        &self,
        kind: EventKind,
        object: Object,
        peer: Option<&str>,
        props: BTreeMap<String, Value>,
    ) -> Event {
        Event {
            seq: self.seq.fetch_add(1, Ordering::AcqRel),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            kind,
            object,
            peer: peer.map(str::to_string),
            props,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        let receiver = self.sender.subscribe();
        // A stored permit if nobody waits yet: a subscriber that comes
        // between a waiter's look and its wait is not missed.
        self.subscribed.notify_one();
        receiver
    }

    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Returns once there is a subscriber (at once if there is one now),
    /// so that samplers sleep instead of polling while nobody listens.
    pub async fn until_subscribed(&self) {
        while !self.has_subscribers() {
            self.subscribed.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_form_names_object_peer_and_values() {
        let bus = EventBus::default();
        let event = bus.make(
            EventKind::Change,
            Object::Peer,
            Some("b"),
            props([
                ("state", json!("resyncing")),
                ("stale_bytes", json!(4096)),
                ("last_error", json!("split brain: both primary")),
                ("eta_seconds", Value::Null),
            ]),
        );
        assert_eq!(
            event.to_line(),
            "change peer:b eta_seconds=- last_error=\"split brain: both primary\" stale_bytes=4096 state=resyncing"
        );
    }

    #[test]
    fn json_form_round_trips() {
        let bus = EventBus::default();
        let event = bus.make(
            EventKind::SplitBrain,
            Object::Peer,
            Some("a"),
            props([("message", json!("x"))]),
        );
        let line = serde_json::to_string(&event).unwrap();
        assert!(line.contains("\"kind\":\"split-brain\""), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event);
    }

    #[test]
    fn emitting_without_subscribers_costs_nothing_and_subscribers_see_order() {
        let bus = EventBus::default();
        bus.emit(EventKind::Change, Object::Resource, None, props([]));
        let mut rx = bus.subscribe();
        for role in ["primary", "secondary"] {
            bus.emit(
                EventKind::Change,
                Object::Resource,
                None,
                props([("role", json!(role))]),
            );
        }
        let first = rx.try_recv().unwrap();
        let second = rx.try_recv().unwrap();
        assert_eq!(first.props["role"], json!("primary"));
        assert_eq!(second.props["role"], json!("secondary"));
        assert_eq!(second.seq, first.seq + 1);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_sampler_waiting_for_subscribers_wakes_for_the_first_one() {
        let bus = std::sync::Arc::new(EventBus::default());
        let waiter = tokio::spawn({
            let bus = std::sync::Arc::clone(&bus);
            async move { bus.until_subscribed().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "returned with nobody subscribed");
        let _rx = bus.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("still waiting after a subscriber came")
            .unwrap();
        // With a subscriber present it returns at once.
        bus.until_subscribed().await;
    }
}
