//! Bounds on what unauthenticated clients may cost a listener: how many
//! handshakes run at once (each holds a socket and a small buffer until it
//! authenticates or times out) and how many log lines their failures write.
//!
//! A flood of connections (2,000 at once against a daemon limited to 1,024
//! descriptors, say) then costs a fixed amount of memory and a few log
//! lines per window, and the listener keeps accepting, so a real peer that
//! retries gets in as soon as a slot frees.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes in progress at once per listener, by default. A peer link
/// needs a few (data, meta, fetch); the rest is headroom for reconnects.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 64;

/// Refusals logged one by one per window; further ones are counted.
const LOGGED_PER_WINDOW: u32 = 10;
/// Length of a logging window.
const WINDOW: Duration = Duration::from_secs(10);

/// A listener's gate: a slot per handshake in progress, and the refusal
/// log's rate limit.
pub struct HandshakeGate {
    slots: Arc<Semaphore>,
    /// Handshakes in progress per source address: one flooding host gets
    /// at most a quarter of the slots, so peers elsewhere still get in.
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_source_max: usize,
    window: Mutex<Window>,
}

/// One handshake's slot; frees it (and its source's count) when dropped.
pub struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// Whether to log one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum LogRefusal {
    /// Log it; `suppressed` more were refused quietly in the window that
    /// just ended (0: none), which the line should say.
    Yes { suppressed: u64 },
    /// Count it only: this window already has its share of lines.
    No,
}

impl HandshakeGate {
    pub fn new(max_pending: usize) -> Self {
        HandshakeGate {
            slots: Arc::new(Semaphore::new(max_pending.max(1))),
            per_source: Arc::new(Mutex::new(HashMap::new())),
            per_source_max: (max_pending / 4).max(1),
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// A slot for a handshake with a client at `source`, held until it is
    /// dropped; `None` when all are taken or that source has its share
    /// (close the connection at once).
    pub fn try_enter(&self, source: IpAddr) -> Option<HandshakeSlot> {
        let mut counts = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(source).or_insert(0);
        if *count >= self.per_source_max {
            return None;
        }
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        *count += 1;
        Some(HandshakeSlot {
            _permit: permit,
            source,
            per_source: Arc::clone(&self.per_source),
        })
    }

    /// Handshakes in progress.
    pub fn pending(&self, max_pending: usize) -> usize {
        max_pending.saturating_sub(self.slots.available_permits())
    }

    /// Counts a refusal and says whether to log it.
    pub fn refusal(&self) -> LogRefusal {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut suppressed = 0;
        if w.started.elapsed() >= WINDOW {
            suppressed = std::mem::take(&mut w.suppressed);
            w.started = Instant::now();
            w.logged = 0;
        }
        if w.logged < LOGGED_PER_WINDOW {
            w.logged += 1;
            LogRefusal::Yes { suppressed }
        } else {
            w.suppressed += 1;
            LogRefusal::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let gate = HandshakeGate::new(2);
        let a = gate.try_enter(A).unwrap();
        let _b = gate.try_enter(B).unwrap();
        assert!(gate
            .try_enter(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
            .is_none());
        assert_eq!(gate.pending(2), 2);
        drop(a);
        assert!(gate.try_enter(A).is_some());
    }

    #[test]
    fn one_source_gets_a_quarter_of_the_slots_and_others_still_get_in() {
        let gate = HandshakeGate::new(8);
        let flood: Vec<_> = (0..2).map(|_| gate.try_enter(A).unwrap()).collect();
        assert!(gate.try_enter(A).is_none(), "a third slot for one source");
        let peer = gate.try_enter(B);
        assert!(peer.is_some(), "another source was starved");
        drop(flood);
        assert!(gate.try_enter(A).is_some());
        assert!(gate.per_source.lock().unwrap().len() <= 2);
    }

    #[test]
    fn refusals_beyond_the_window_share_are_counted_not_logged() {
        let gate = HandshakeGate::new(1);
        for _ in 0..LOGGED_PER_WINDOW {
            assert_eq!(gate.refusal(), LogRefusal::Yes { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(gate.refusal(), LogRefusal::No);
        }
        // The next window's first line reports what was left out.
        gate.window.lock().unwrap().started -= WINDOW;
        assert_eq!(gate.refusal(), LogRefusal::Yes { suppressed: 5 });
    }
}
