//! Activity-log behaviour: eviction, blocking, ring recovery, concurrency.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{small_params, Fixture};
use crate::meta::layout::SECTOR_SIZE;
use crate::meta::{CreateParams, MetaError, EXTENT_SIZE};

fn set(extents: &[u64]) -> BTreeSet<u64> {
    extents.iter().copied().collect()
}

#[test]
fn hits_do_no_io() {
    let fx = Fixture::new();
    let md = fx.open();
    let al = md.activity_log();
    drop(al.begin_io(0..2).unwrap());
    assert_eq!(al.last_seq(), 1);
    let a = al.begin_io(0..1).unwrap();
    let b = al.begin_write(EXTENT_SIZE, EXTENT_SIZE).unwrap();
    assert_eq!(b.extents(), 1..2);
    assert_eq!(al.inflight(), 2);
    assert_eq!(al.last_seq(), 1);
    drop((a, b));
    assert_eq!(al.inflight(), 0);
}

#[test]
fn pin_if_active_pins_active_extents_only_and_never_waits() {
    let fx = Fixture::new();
    let md = fx.open();
    let al = md.activity_log();
    assert!(al.pin_if_active(0, 4096).is_none(), "not in the AL yet");
    assert_eq!(al.last_seq(), 0, "the fast path wrote a transaction");
    // Fill every slot with an extent that has I/O in flight.
    let busy: Vec<_> = (0..4).map(|e| al.begin_io(e..e + 1).unwrap()).collect();
    let pinned = al.pin_if_active(EXTENT_SIZE, 2 * EXTENT_SIZE).unwrap();
    assert_eq!(pinned.extents(), 1..3);
    assert_eq!(al.inflight(), 5);
    // A full log: begin_io would block here; the fast path says no at once.
    assert!(al.pin_if_active(4 * EXTENT_SIZE, 1).is_none());
    assert!(al.pin_if_active(u64::MAX - 10, 1).is_none(), "out of range");
    drop((busy, pinned));
    assert_eq!(al.inflight(), 0);
}

#[test]
fn full_log_evicts_the_least_recently_used_idle_extent() {
    let fx = Fixture::new();
    let md = fx.open();
    let al = md.activity_log();
    let busy = al.begin_io(0..1).unwrap();
    for extent in 1..4 {
        drop(al.begin_io(extent..extent + 1).unwrap());
    }
    drop(al.begin_io(1..2).unwrap()); // 1 is now more recent than 2 and 3
    drop(al.begin_io(4..5).unwrap());
    // 0 is older but busy; 2 is the least recently used idle extent.
    assert_eq!(set(&al.active_extents()), set(&[0, 1, 3, 4]));
    drop(al.begin_io(5..7).unwrap());
    assert_eq!(set(&al.active_extents()), set(&[0, 4, 5, 6]));
    drop(busy);
}

#[test]
fn begin_io_blocks_while_every_slot_is_busy() {
    let fx = Fixture::new();
    let md = fx.open();
    let al = Arc::clone(md.activity_log());
    let mut guards: Vec<_> = (0..4).map(|e| al.begin_io(e..e + 1).unwrap()).collect();
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let al = Arc::clone(&al);
        thread::spawn(move || tx.send(al.begin_io(4..5)).unwrap())
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "did not block"
    );
    drop(guards.remove(2)); // frees extent 2
    let guard = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    waiter.join().unwrap();
    assert_eq!(set(&al.active_extents()), set(&[0, 1, 3, 4]));
    drop((guard, guards));
}

#[test]
fn impossible_requests_fail_at_once() {
    let fx = Fixture::new();
    let md = fx.open();
    let al = md.activity_log();
    let err = al.begin_io(0..5).unwrap_err();
    assert!(
        matches!(
            err,
            MetaError::TooManyExtents {
                count: 5,
                capacity: 4
            }
        ),
        "{err}"
    );
    let err = al.begin_io(15..17).unwrap_err();
    assert!(matches!(err, MetaError::ExtentOutOfRange { .. }), "{err}");
    let err = al.begin_write(16 * EXTENT_SIZE, 1).unwrap_err();
    assert!(matches!(err, MetaError::ExtentOutOfRange { .. }), "{err}");
    // An empty request needs nothing.
    drop(al.begin_write(0, 0).unwrap());
    assert_eq!(al.last_seq(), 0);
}

/// Runs a fixed pattern of misses; returns the active set after each one.
fn churn(fx: &Fixture) -> Vec<Vec<u64>> {
    let md = fx.open();
    let al = md.activity_log();
    (0..23u64)
        .map(|i| {
            let extent = (i * 7) % 16;
            drop(al.begin_io(extent..extent + 1).unwrap());
            al.active_extents()
        })
        .collect()
    // Dropped without mark_clean: a crash.
}

#[test]
fn reopen_recovers_the_active_set_after_the_ring_wrapped() {
    let fx = Fixture::new();
    let history = churn(&fx);
    let md = fx.open();
    assert!(md.activity_log().last_seq() > 4 * 4, "ring did not wrap");
    assert_eq!(&md.recovery().al_extents, history.last().unwrap());
    assert_eq!(md.activity_log().active_extents(), md.recovery().al_extents);
}

#[test]
fn torn_newest_transaction_falls_back_to_the_previous_one() {
    let fx = Fixture::new();
    let history = churn(&fx);
    let newest_seq = {
        let md = fx.open();
        md.activity_log().last_seq()
    };
    let ring_sectors = u64::from(fx.params.al_ring_sectors);
    let sector = 2 + (newest_seq % ring_sectors) as usize; // after 2 superblocks
    fx.patch(sector * SECTOR_SIZE + 40, |b| *b ^= 0xff);
    let md = fx.open();
    assert_eq!(md.activity_log().last_seq(), newest_seq - 1);
    assert_eq!(&md.recovery().al_extents, &history[history.len() - 2]);
}

#[test]
fn eviction_persists_the_evicted_extents_bits() {
    // Put each extent's bits in its own bitmap page, so flushing one extent
    // does not incidentally flush another.
    let fx = Fixture::with(CreateParams {
        block_size: 512,
        ..small_params()
    });
    let md = fx.open();
    let al = md.activity_log();
    let peer = md.bitmap(0).unwrap();
    {
        let _write = al.begin_write(0, 4096).unwrap();
        peer.set_bytes(0, 4096);
    }
    let in_extent_4 = 4 * EXTENT_SIZE;
    {
        let _write = al.begin_write(in_extent_4, 512).unwrap();
        peer.set_bytes(in_extent_4, 512);
    }
    for extent in 1..4 {
        drop(al.begin_io(extent..extent + 1).unwrap());
    }
    // Extent 0 was evicted: its page is persisted, extent 4's is not.
    assert!(!al.is_active(0));
    assert_eq!(md.bitmaps().dirty_page_count(), 1);
    drop(md); // crash

    let md = fx.open();
    assert_eq!(md.recovery().al_extents, vec![4, 1, 2, 3]);
    let peer = md.bitmap(0).unwrap();
    assert_eq!(peer.count_range(0, 8), 8, "evicted extent lost its bits");
    // Extent 4's lost page is restored by marking the AL's extents, as a
    // promotion does.
    md.mark_active_extents(peer);
    assert_eq!(peer.count_ones(), 8 + 4 * 8192);
}

#[test]
fn the_eviction_hook_sees_the_victims_and_its_bits_are_persisted() {
    let fx = Fixture::with(CreateParams {
        block_size: 512,
        ..small_params()
    });
    let md = fx.open();
    let al = Arc::clone(md.activity_log());
    let peer = Arc::clone(md.bitmap(0).unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (peer, seen) = (Arc::clone(&peer), Arc::clone(&seen));
        al.set_eviction_hook(Box::new(move |victims: &[u64]| {
            seen.lock().unwrap().extend_from_slice(victims);
            // What a primary does for a write its peer has not acked.
            for &v in victims {
                peer.set_bytes(v * EXTENT_SIZE + 1024, 512);
            }
        }));
    }
    for extent in 0..4 {
        drop(al.begin_io(extent..extent + 1).unwrap());
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing evicted yet");
    drop(al.begin_io(4..5).unwrap());
    assert_eq!(*seen.lock().unwrap(), vec![0]);
    assert_eq!(
        md.bitmaps().dirty_page_count(),
        0,
        "the hook's bit was not persisted"
    );
    drop((al, peer, md)); // crash

    let md = fx.open();
    assert!(
        md.bitmap(0).unwrap().test(2),
        "evicted extent lost the hook's bit"
    );
}

#[test]
fn concurrent_writers_share_the_log() {
    let fx = Fixture::with(CreateParams {
        al_slots: 8,
        ..small_params()
    });
    let md = fx.open();
    let al = md.activity_log();
    thread::scope(|s| {
        for t in 0..6u64 {
            s.spawn(move || {
                for i in 0..200u64 {
                    let offset = ((i * 13 + t * 5) % 62) * (EXTENT_SIZE / 4) + 100;
                    let guard = al.begin_write(offset, EXTENT_SIZE / 2).unwrap();
                    for extent in guard.extents() {
                        assert!(al.is_active(extent));
                    }
                }
            });
        }
    });
    assert_eq!(al.inflight(), 0);
    assert!(al.active_extents().len() <= 8);
}
