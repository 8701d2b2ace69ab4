//! Write ordering on the primary: epochs, sequence numbers and a range lock.
//!
//! Writes between two barriers form an epoch; a peer may apply them in any
//! order but finishes (and flushes) an epoch before starting the next. The
//! range lock keeps two operations on the same bytes from overlapping:
//! overlapping guest writes run one after the other (and the second starts a
//! new epoch, so peers keep their order too), and a resync read of a range
//! cannot interleave with a guest write to it.

use std::sync::Mutex;

use tokio::sync::Notify;

/// The ranges currently being written or resync-read (byte offsets).
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// Holds a range until dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    pub fn new() -> Self {
        RangeLock {
            held: Mutex::new(Vec::new()),
            next_id: 0.into(),
            released: Notify::new(),
        }
    }

    /// Takes `offset..offset+len`. `on_conflict` runs (once) if the range is
    /// busy before waiting — the primary closes the epoch there.
    pub async fn acquire(
        &self,
        offset: u64,
        len: u64,
        mut on_conflict: impl FnMut(),
    ) -> RangeGuard<'_> {
        let end = offset + len.max(1);
        let mut reported = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && offset < e) {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    held.push((offset, end, id));
                    return RangeGuard { lock: self, id };
                }
            }
            if !reported {
                reported = true;
                on_conflict();
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|&(_, _, id)| id != self.id);
        drop(held);
        self.lock.released.notify_waiters();
    }
}

/// Epoch and sequence counters. Callers hold the lock while they assign a
/// number *and* queue the message to every peer, so the order on every link
/// is the order of assignment.
pub struct EpochCounter {
    /// The open epoch.
    pub current: u64,
    /// Writes assigned to the open epoch.
    pub writes: u32,
    next_seq: u64,
}

impl EpochCounter {
    pub fn new() -> Self {
        EpochCounter {
            current: 1,
            writes: 0,
            next_seq: 1,
        }
    }

    /// Assigns the next write to the open epoch.
    pub fn assign(&mut self) -> (u64, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.writes += 1;
        (self.current, seq)
    }

    /// Closes the open epoch; returns its number.
    pub fn close(&mut self) -> u64 {
        let closed = self.current;
        self.current += 1;
        self.writes = 0;
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_report_the_conflict_once() {
        let lock = Arc::new(RangeLock::new());
        let first = lock
            .acquire(0, 8192, || panic!("no conflict expected"))
            .await;
        let _disjoint = lock
            .acquire(8192, 4096, || panic!("disjoint ranges do not conflict"))
            .await;
        let conflicts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (l2, c2) = (lock.clone(), conflicts.clone());
        let waiter = tokio::spawn(async move {
            let _g = l2
                .acquire(4096, 4096, || {
                    c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
                .await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping acquire must wait");
        drop(first);
        waiter.await.unwrap();
        assert_eq!(conflicts.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn epochs_advance_on_close_and_sequences_never_repeat() {
        let mut c = EpochCounter::new();
        assert_eq!(c.assign(), (1, 1));
        assert_eq!(c.assign(), (1, 2));
        assert_eq!(c.writes, 2);
        assert_eq!(c.close(), 1);
        assert_eq!(c.writes, 0);
        assert_eq!(c.assign(), (2, 3));
    }
}
