//! Keeping background work (a resync, a verify, the WAN push, the lazy
//! layer's background sync) within a rate the operator set.

use std::time::Duration;

use tokio::time::Instant;

/// Paces a stream of work to a rate in bytes per second (0: unlimited)
/// that may change between calls (`vmsyncctl adjust`). Each call waits
/// until the bytes spent so far are due at the rate each was spent at:
/// idle time earns no credit (a burst after a pause would take the link
/// from the guest), and a changed rate applies from the next call on,
/// never to what went before (a cap lowered in the middle of a pass does
/// not make it sleep for what it sent unlimited).
#[derive(Debug)]
pub struct RatePacer {
    next: Instant,
}

impl Default for RatePacer {
    fn default() -> Self {
        RatePacer {
            next: Instant::now(),
        }
    }
}

impl RatePacer {
    /// Accounts for `bytes` at `rate`, then waits until they are due.
    pub async fn spend(&mut self, bytes: u64, rate: u64) {
        if rate == 0 {
            return;
        }
        self.charge(bytes, rate);
        tokio::time::sleep_until(self.next).await;
    }

    /// Accounts for `bytes` at `rate` without waiting (see [`ready_at`]).
    ///
    /// [`ready_at`]: RatePacer::ready_at
    pub fn charge(&mut self, bytes: u64, rate: u64) {
        if rate > 0 {
            let now = Instant::now();
            self.next = self.next.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
    }

    /// When the next work may start, if not now.
    pub fn ready_at(&self) -> Option<Instant> {
        (self.next > Instant::now()).then_some(self.next)
    }

    /// Holds the next work back until `at` at least.
    pub fn hold_until(&mut self, at: Instant) {
        self.next = self.next.max(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_and_a_changed_rate_counts_from_its_change() {
        let mut pacer = RatePacer::default();
        let started = Instant::now();
        for _ in 0..4 {
            pacer.spend(256 << 10, 2 << 20).await;
        }
        // 1 MiB at 2 MiB/s.
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        // 64 MiB unlimited, then 256 KiB at 2 MiB/s: it waits for itself
        // only (125 ms), not for the 64 MiB (32 s).
        pacer.spend(64 << 20, 0).await;
        let started = Instant::now();
        pacer.spend(256 << 10, 2 << 20).await;
        assert_eq!(started.elapsed(), Duration::from_millis(125));
        // Idle time earns no credit.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = Instant::now();
        pacer.spend(256 << 10, 2 << 20).await;
        pacer.spend(256 << 10, 2 << 20).await;
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }
}
