//! Bounds on what unauthenticated clients may cost a listener: how many
//! handshakes run at once (each holds a socket and a small buffer until it
//! authenticates or times out) and how many log lines their failures write.
//!
//! A flood of connections (2,000 at once against a daemon limited to 1,024
//! descriptors, say) then costs a fixed amount of memory and a few log
//! lines per window, and the listener keeps accepting, so a real peer that
//! retries gets in as soon as a slot frees.

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
    window: Mutex<Window>,
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
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// A slot for one handshake, held until it is dropped; `None` when all
    /// are taken (close the connection at once).
    pub fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
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

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let gate = HandshakeGate::new(2);
        let a = gate.try_enter().unwrap();
        let _b = gate.try_enter().unwrap();
        assert!(gate.try_enter().is_none());
        assert_eq!(gate.pending(2), 2);
        drop(a);
        assert!(gate.try_enter().is_some());
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
