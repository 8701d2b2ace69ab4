//! Whether the peer at the other end of a link is still alive.
//!
//! One rule for every session (source, target, two idle secondaries): each
//! side pings every `ping_interval_ms`, and a peer from which no frame at all
//! arrived for `ping_timeout_ms` is dead. The deadline moves only when a frame
//! arrives ([`Liveness::heard`]), never when we send or when a timer of the
//! session's `select!` fires: a per-read `timeout()` inside a `select!` that
//! also ticks is re-armed on every tick and never fires, which is how a frozen
//! peer (SIGSTOP: sockets open, nothing answers) stayed "connected" forever.
//!
//! A Ping is not answered (since protocol version 7): both sides ping on
//! their own, so an answer would only double the idle traffic — on an
//! idle WAN link the pings, their answers and the TCP acks of each were
//! most of what crossed. So a live peer is heard at least once per ping
//! interval, not twice: whoever judges silence allows two intervals.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::peer::PeerReplica;
use super::transport::LinkError;
use crate::config;

/// What the session must do next.
pub enum Due {
    /// Send a Ping.
    Ping,
    /// Nothing arrived for the whole timeout: drop the link.
    Dead(LinkError),
}

pub struct Liveness {
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    ping: Interval,
    peer: Arc<PeerReplica>,
}

impl Liveness {
    /// Starts counting now (the link just delivered the peer's State).
    pub fn new(settings: &config::Replication, peer: &Arc<PeerReplica>) -> Self {
        let timeout = ping_timeout(settings);
        let mut ping = tokio::time::interval(Duration::from_millis(settings.ping_interval_ms));
        // After a stall of our own, one ping is enough, not a burst.
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        peer.heard();
        Liveness {
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            ping,
            peer: Arc::clone(peer),
        }
    }

    /// A frame arrived from the peer: it is alive.
    pub fn heard(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
        self.peer.heard();
    }

    /// Resolves when a ping is due or the peer has been silent too long.
    /// Cancel-safe: a `select!` may drop it at any time.
    pub async fn due(&mut self) -> Due {
        tokio::select! {
            // Death first: after a stall of our own (a frozen process, a
            // busy runtime) a frame may be waiting; the session polls its
            // readers before this, so such a frame counts first.
            biased;
            () = self.deadline.as_mut() => Due::Dead(LinkError::Violation(format!(
                "peer silent for {} ms (ping_timeout_ms); link dropped",
                self.timeout.as_millis()
            ))),
            _ = self.ping.tick() => Due::Ping,
        }
    }
}

pub fn ping_timeout(settings: &config::Replication) -> Duration {
    Duration::from_millis(settings.ping_timeout_ms)
}
