//! How fast a LAN resync may go without holding the guest up.
//!
//! A resync and the guest's mirrored writes share one ordered stream to
//! the peer: a write queued behind N bytes of resync data waits N ÷ the
//! link's rate before the peer even sees it, and with protocol C the guest
//! waits for that. When a resync kept up to a quarter of
//! `congestion_limit` queued (16 MiB by default), a 4 KiB write took
//! 140 ms at 1 Gbit/s and 1.5 s at 100 Mbit/s (`benches/resync.rs`). So a
//! resync keeps little queued, and less while the guest works:
//!
//! * **guest idle**: enough queued to keep the link busy while the next
//!   chunk is read from the local disk: [`IDLE_FILL_TIME`] of the rate the
//!   pass has reached, at least two chunks (DRBD's `c-fill-target`, sized
//!   by time instead of bytes so it suits 100 Mbit/s and 10 Gbit/s alike);
//! * **guest busy** (I/O within [`GUEST_BUSY`]): one chunk at a time, each
//!   queued only when nothing waits in the peer's queue and the kernel
//!   holds at most [`MIN_BUSY_CHUNK`] for the connection (sent but
//!   unacknowledged included: on a slow link what TCP has in flight would
//!   otherwise keep the link busy through any pause), then a pause as long
//!   as that wait. The resync takes part of the link (measured: about
//!   three quarters of 1 Gbit/s, a third of 100 Mbit/s), and a guest write
//!   finds at most about one chunk ahead of it. The chunk is sized to the
//!   link, between [`MIN_BUSY_CHUNK`] and [`IDLE_CHUNK`]: it doubles while
//!   one is gone before it is even checked (a fast link, where the 1 ms
//!   timer tick of the wait would otherwise be most of each cycle) and
//!   halves while one takes longer than [`BUSY_CHUNK_TIME`]. No wait lasts
//!   more than [`GUEST_BUSY`], so a guest writing as fast as the link goes
//!   still lets a chunk through every two windows (at least 160 KiB/s; as
//!   DRBD, which throttles a resync to `c-min-rate`, 250 KiB/s by default,
//!   while the application does I/O, and never to nothing).
//! * the operator bounds both ([`RateBounds`], read before every chunk so
//!   `vmsyncctl adjust` applies to a running pass): `resync_rate` caps the
//!   pass, and `resync_min_rate` is a floor while the guest is busy (DRBD's
//!   `c-min-rate`): a pass behind the floor's schedule ([`Floor`]) stops
//!   yielding until it has caught up: it keeps one busy-sized chunk
//!   queued ahead, each waiting for the queue no longer than it takes at
//!   twice the floor's rate (however full guest writes keep it), so guest
//!   writes then wait behind more resync data (the trade the operator
//!   chose);
//! * what the kernel holds unsent for the connection is capped as well
//!   while the peer resyncs ([`UNSENT_WHILE_RESYNCING`], applied by the
//!   sender as `TCP_NOTSENT_LOWAT`): otherwise the socket's send buffer
//!   (autotuned up to `tcp_wmem`'s 4 MiB) would become the queue instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockdev::pace::RatePacer;

use super::peer::{PeerMode, PeerReplica};
use super::transport::SocketProbe;

/// Guest I/O this recent counts as a busy guest: the LAN resync yields
/// and the WAN push trickles (as the lazy layer's background sync does).
pub const GUEST_BUSY: Duration = Duration::from_millis(100);
/// Largest resync chunk while the guest is idle (one read, one message).
pub const IDLE_CHUNK: u64 = 256 * 1024;
/// Smallest resync chunk while the guest is busy.
pub const MIN_BUSY_CHUNK: u64 = 32 * 1024;
/// While the guest is busy a chunk should drain in about this long (a guest
/// write waits about that long behind one).
const BUSY_CHUNK_TIME: Duration = Duration::from_millis(4);
/// The timer's resolution: what the kernel holds is polled this often.
const TICK: Duration = Duration::from_millis(1);
/// While the guest is idle, a resync keeps this long of its rate queued.
const IDLE_FILL_TIME: Duration = Duration::from_millis(10);
/// Bytes the kernel may hold unsent on a connection to a resyncing peer.
pub const UNSENT_WHILE_RESYNCING: u32 = 64 * 1024;
/// How far a pass may fall behind the floor's schedule and still make it
/// up (beyond, the debt is forgiven): a busy-guest wait and the pause
/// after it. It bounds the burst a pass sends to catch up.
const FLOOR_SLACK: Duration = Duration::from_millis(200);
/// A wait for the peer's queue re-checks the peer's mode this often (a
/// drained queue wakes it at once).
const RECHECK: Duration = Duration::from_millis(20);

/// When the guest last did I/O on the primary.
pub struct GuestActivity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Default for GuestActivity {
    fn default() -> Self {
        GuestActivity {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl GuestActivity {
    /// The guest did I/O now.
    pub fn touch(&self) {
        let now = self.since.elapsed().as_millis() as u64 + 1;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Whether the guest did I/O within `window`.
    pub fn busy_within(&self, window: Duration) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        last != 0 && self.since.elapsed().as_millis() as u64 + 1 - last <= window.as_millis() as u64
    }

    fn busy(&self) -> bool {
        self.busy_within(GUEST_BUSY)
    }
}

/// The operator's bounds on a resync's rate, in bytes per second (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateBounds {
    /// `resync_rate`: the pass never goes faster.
    pub max: u64,
    /// `resync_min_rate`: while the guest is busy the pass stops yielding
    /// to it below this rate.
    pub min: u64,
}

/// The floor's schedule: a virtual clock that each chunk advances by its
/// time at the floor's rate. A pass whose clock is in the past is behind.
#[derive(Debug, Clone, Copy)]
struct Floor {
    due: Instant,
}

impl Floor {
    fn new() -> Self {
        Floor {
            due: Instant::now(),
        }
    }

    /// Counts `bytes` at `rate` (a debt older than [`FLOOR_SLACK`] is
    /// forgiven, so a long pause never turns into a long burst).
    fn count(&mut self, bytes: u64, rate: u64) {
        if rate == 0 {
            return;
        }
        let now = Instant::now();
        let oldest = now.checked_sub(FLOOR_SLACK).unwrap_or(now);
        self.due = self.due.max(oldest) + Duration::from_secs_f64(bytes as f64 / rate as f64);
    }

    fn behind(&self, rate: u64) -> bool {
        rate > 0 && self.due <= Instant::now()
    }

    /// How long until the pass falls behind (no floor: forever).
    fn until_due(&self, rate: u64) -> Duration {
        if rate == 0 {
            return Duration::MAX;
        }
        self.due.saturating_duration_since(Instant::now())
    }
}

/// The pace of one resync pass to one peer.
pub struct ResyncPace<'a> {
    started: Instant,
    /// Bytes queued by this pass.
    sent: u64,
    /// The most an idle-guest pass keeps queued.
    max_fill: u64,
    /// What the kernel still holds for the data connection.
    socket: Option<&'a SocketProbe>,
    /// The chunk while the guest is busy, sized to the link.
    busy_chunk: u64,
    /// The floor of the last chunk and its schedule; the cap's pacer.
    floor_rate: u64,
    floor: Floor,
    capped: RatePacer,
}

impl<'a> ResyncPace<'a> {
    /// `max_fill`: see [`ResyncPace::set_max_fill`]. `socket`: the data
    /// connection's.
    pub fn new(max_fill: u64, socket: Option<&'a SocketProbe>) -> ResyncPace<'a> {
        ResyncPace {
            started: Instant::now(),
            sent: 0,
            max_fill: max_fill.max(2 * IDLE_CHUNK),
            socket,
            busy_chunk: 2 * MIN_BUSY_CHUNK,
            floor_rate: 0,
            floor: Floor::new(),
            capped: RatePacer::default(),
        }
    }

    /// The most ever kept queued (a share of `congestion_limit`, so guest
    /// writes always find room), at least two idle chunks; set before
    /// every chunk, so a changed `congestion_limit` applies at once.
    pub fn set_max_fill(&mut self, max_fill: u64) {
        self.max_fill = max_fill.max(2 * IDLE_CHUNK);
    }

    /// Whether the pass yields to the guest now: the guest is busy and the
    /// pass is not behind the operator's floor.
    fn yields(&self, guest: &GuestActivity) -> bool {
        guest.busy() && !self.floor.behind(self.floor_rate)
    }

    /// The largest chunk to read next.
    pub fn chunk(&self, guest: &GuestActivity) -> u64 {
        if guest.busy() {
            self.busy_chunk
        } else {
            IDLE_CHUNK
        }
    }

    /// After a chunk of `bytes` was queued to `peer`: waits until the next
    /// may be (see the module's comment), within `bounds`. Returns early
    /// when the peer stops resyncing.
    pub async fn after_chunk(
        &mut self,
        bytes: u64,
        peer: &PeerReplica,
        guest: &GuestActivity,
        bounds: RateBounds,
    ) {
        self.sent += bytes;
        self.count(bytes, bounds.min);
        if self.yields(guest) {
            let started = Instant::now();
            // Not forever: a guest writing as fast as the link goes would
            // otherwise keep the queue from ever draining, and the peer
            // stale (inconsistent) for as long. Nor past the floor's
            // schedule, if there is a floor.
            let patience = GUEST_BUSY.min(self.floor.until_due(bounds.min));
            wait_for_queue(peer, 0, patience).await;
            let drained = self.wait_for_socket(peer, patience).await;
            self.busy_chunk = if drained.is_zero() {
                (self.busy_chunk * 2).min(IDLE_CHUNK)
            } else if drained > BUSY_CHUNK_TIME {
                (self.busy_chunk / 2).max(MIN_BUSY_CHUNK)
            } else {
                self.busy_chunk
            };
            if peer.mode() == PeerMode::Resyncing {
                // At most a guest-busy window: then look again.
                let pause = started.elapsed().min(GUEST_BUSY);
                tokio::time::sleep(pause.min(self.floor.until_due(bounds.min))).await;
            }
        } else {
            // Behind the floor while the guest is busy: busy-sized chunks,
            // one ahead (a guest write waits behind about one, not behind
            // an idle pass's fill), and its writes may keep the queue from
            // ever draining, so wait for it no longer than this chunk
            // takes at twice the floor's rate (the pass makes up what it is
            // behind, never more than [`FLOOR_SLACK`] of it).
            let (limit, ahead) = if guest.busy() {
                let limit = Duration::from_secs_f64(bytes as f64 / (2 * bounds.min.max(1)) as f64);
                (limit, self.busy_chunk)
            } else {
                (Duration::MAX, self.idle_fill().saturating_sub(IDLE_CHUNK))
            };
            wait_for_queue(peer, ahead, limit).await;
        }
        self.capped.spend(bytes, bounds.max).await;
    }

    /// Counts a chunk against the floor's schedule (afresh when the floor
    /// changed).
    fn count(&mut self, bytes: u64, floor_rate: u64) {
        if floor_rate != self.floor_rate {
            self.floor = Floor::new();
            self.floor_rate = floor_rate;
        }
        self.floor.count(bytes, floor_rate);
    }

    /// Waits until the kernel holds at most the smallest busy chunk for the
    /// peer (sent and unacknowledged included), for at most `limit`;
    /// returns how long that took (zero: it held no more when first asked).
    async fn wait_for_socket(&self, peer: &PeerReplica, limit: Duration) -> Duration {
        let Some(socket) = self.socket else {
            return Duration::ZERO;
        };
        let too_much = || {
            socket
                .held_bytes()
                .is_some_and(|held| held > MIN_BUSY_CHUNK)
        };
        if !too_much() {
            return Duration::ZERO;
        }
        let started = Instant::now();
        while too_much() && peer.mode() == PeerMode::Resyncing && started.elapsed() < limit {
            // No wake-up exists for "acknowledged": poll.
            tokio::time::sleep(TICK).await;
        }
        started.elapsed()
    }

    /// What an idle-guest pass keeps queued: [`IDLE_FILL_TIME`] of its rate.
    fn idle_fill(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.sent as f64 / secs;
        ((rate * IDLE_FILL_TIME.as_secs_f64()) as u64).clamp(2 * IDLE_CHUNK, self.max_fill)
    }
}

/// Waits until at most `at_most` bytes are queued to `peer`, it stops
/// resyncing, or `limit` passed.
async fn wait_for_queue(peer: &PeerReplica, at_most: u64, limit: Duration) {
    let started = Instant::now();
    loop {
        let drained = peer.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if peer.queued.load(Ordering::Acquire) <= at_most
            || peer.mode() != PeerMode::Resyncing
            || started.elapsed() >= limit
        {
            return;
        }
        let left = limit.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(RECHECK.min(left), drained).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_activity_is_recent_only_within_the_window() {
        let activity = GuestActivity::default();
        assert!(!activity.busy_within(GUEST_BUSY), "never touched");
        activity.touch();
        assert!(activity.busy_within(GUEST_BUSY));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!activity.busy_within(GUEST_BUSY));
    }

    #[test]
    fn an_idle_pass_keeps_its_fill_time_of_its_rate_queued() {
        let mut pace = ResyncPace::new(16 << 20, None);
        // Nothing sent yet: two chunks, so the link never waits for a read.
        assert_eq!(pace.idle_fill(), 2 * IDLE_CHUNK);
        // 100 MB in about a second: 10 ms of it is about 1 MB.
        pace.started = Instant::now() - Duration::from_secs(1);
        pace.sent = 100_000_000;
        let fill = pace.idle_fill();
        assert!((900_000..=1_000_000).contains(&fill), "{fill}");
        // Never more than the cap, however fast.
        pace.sent = 100_000_000_000;
        assert_eq!(pace.idle_fill(), 16 << 20);
        // A cap changed during the pass (`adjust` of congestion_limit)
        // applies to the next chunk; never below two chunks.
        pace.set_max_fill(4 << 20);
        assert_eq!(pace.idle_fill(), 4 << 20);
        pace.set_max_fill(0);
        assert_eq!(pace.idle_fill(), 2 * IDLE_CHUNK);
    }

    /// A guest that keeps the peer's queue from ever draining (as one
    /// writing as fast as the link goes would) does not stop the resync:
    /// a chunk still goes every guest-busy window at least.
    #[tokio::test]
    async fn a_guest_that_never_lets_the_queue_drain_does_not_stall_the_resync() {
        let peer = super::super::peer::test_peer(8);
        assert_eq!(peer.mode(), PeerMode::Resyncing);
        peer.queued.store(4096, Ordering::Release); // never sent
        let guest = GuestActivity::default();
        guest.touch();
        let mut pace = ResyncPace::new(16 << 20, None);
        let started = Instant::now();
        let waited = tokio::time::timeout(
            Duration::from_secs(2),
            pace.after_chunk(MIN_BUSY_CHUNK, &peer, &guest, RateBounds::default()),
        )
        .await;
        assert!(waited.is_ok(), "the resync waits for the guest forever");
        let took = started.elapsed();
        // The wait (one window) and the pause as long as it (one more).
        assert!(took >= GUEST_BUSY, "{took:?}");
        assert!(took < 4 * GUEST_BUSY, "{took:?}");
    }

    #[test]
    fn a_busy_guest_gets_small_chunks() {
        let guest = GuestActivity::default();
        let pace = ResyncPace::new(16 << 20, None);
        assert_eq!(pace.chunk(&guest), IDLE_CHUNK);
        guest.touch();
        assert_eq!(pace.chunk(&guest), 2 * MIN_BUSY_CHUNK);
    }

    /// Bytes a busy-guest pass gets through in `time` to a peer whose
    /// queue never drains (a guest writing as fast as the link goes), its
    /// guest writes filling it beyond any resync fill.
    async fn busy_pass_bytes(bounds: RateBounds, time: Duration) -> u64 {
        let peer = super::super::peer::test_peer(8);
        peer.queued.store(64 << 20, Ordering::Release); // never sent
        let guest = GuestActivity::default();
        let mut pace = ResyncPace::new(16 << 20, None);
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < time {
            guest.touch();
            let chunk = pace.chunk(&guest);
            pace.after_chunk(chunk, &peer, &guest, bounds).await;
            sent += chunk;
        }
        sent
    }

    /// `resync_min_rate`: below it a pass stops yielding to a busy guest.
    #[tokio::test]
    async fn a_busy_guest_does_not_hold_a_pass_below_its_floor() {
        let time = Duration::from_millis(1500);
        let pass = |bounds| async move {
            tokio::time::timeout(3 * time, busy_pass_bytes(bounds, time))
                .await
                .expect("the pass stalled behind the guest's writes")
        };
        let yielding = pass(RateBounds::default()).await;
        let floor = 8 << 20;
        let floored = pass(RateBounds { max: 0, min: floor }).await;
        // Yielding fully: a chunk (at most the idle one) every two
        // guest-busy windows.
        let windows = (time.as_millis() / (2 * GUEST_BUSY).as_millis()) as u64 + 1;
        assert!(yielding <= windows * IDLE_CHUNK, "{yielding}");
        // With the floor: about the floor's rate (it catches up in bursts,
        // a chunk at a time).
        let expected = floor as f64 * time.as_secs_f64();
        assert!(floored as f64 >= 0.8 * expected, "{floored} < {expected}");
        assert!(
            floored as f64 <= 1.3 * expected + IDLE_CHUNK as f64,
            "{floored} > {expected}"
        );
        // A floor the pass cannot keep (the timer alone makes every wait
        // a millisecond or more) keeps it behind: it still goes on, never
        // waiting for the queue the guest keeps full.
        let behind = pass(RateBounds {
            max: 0,
            min: 1 << 30,
        })
        .await;
        assert!(behind > floored, "{behind} <= {floored}");
    }
}
