//! Growing metadata offline (`vmsyncctl resize`).

use super::{Fixture, EXTENT_SIZE};
use crate::meta::{
    grow, grow_in_use, stored_device_size, Expect, GenerationIds, MetaError, Metadata,
};

const OLD: u64 = 16 * EXTENT_SIZE;
const NEW: u64 = 40 * EXTENT_SIZE;

fn open_grown(f: &Fixture) -> Metadata {
    Metadata::open(
        &f.path,
        &Expect {
            device_size: NEW,
            ..f.expect()
        },
    )
    .unwrap()
}

#[test]
fn growing_keeps_every_bit_and_the_state_and_marks_the_new_area_for_the_peers() {
    let f = Fixture::new();
    let generations = GenerationIds {
        current: 0x0000_0003_0100_0042,
        bitmap: 7,
        history: [7, 6],
    };
    {
        let md = f.open();
        md.bitmap(0).unwrap().set_range(10, 5);
        md.bitmap(2).unwrap().set_range(1000, 1);
        md.bitmap(1).unwrap().set_range(0, 3); // our own: blocks we lack
        md.set_term_and_generations(3, Some(generations)).unwrap();
        md.set_data_term(2).unwrap();
        md.mark_clean().unwrap();
    }
    let grown = grow(&f.path, NEW, false).unwrap();
    assert_eq!((grown.old_size, grown.new_size), (OLD, NEW));
    let new_blocks = (NEW - OLD) / 4096;
    assert_eq!(grown.new_blocks_marked, new_blocks);

    let md = open_grown(&f);
    assert_eq!(md.layout().device_size(), NEW);
    let sb = md.superblock();
    assert_eq!((sb.term, sb.data_term, sb.generations), (3, 2, generations));
    assert!(sb.generation_unwritten, "the flag must survive the rewrite");
    let old_blocks = OLD / 4096;
    for (node, own_bits) in [(0, 5), (2, 1)] {
        let bitmap = md.bitmap(node).unwrap();
        assert_eq!(bitmap.count_range(0, old_blocks), own_bits, "node {node}");
        assert_eq!(bitmap.count_range(old_blocks, new_blocks), new_blocks);
    }
    assert!(md.bitmap(0).unwrap().contains_range(10, 5));
    assert!(md.bitmap(2).unwrap().test(1000));
    // Our own bitmap: what we lack. The new area is ours as it is.
    let own = md.bitmap(1).unwrap();
    assert_eq!(own.count_ones(), 3);
    assert!(own.contains_range(0, 3));
    assert!(!std::path::Path::new(&format!("{}.grow", f.path.display())).exists());
}

#[test]
fn assume_clean_marks_nothing_new() {
    let f = Fixture::new();
    f.open().mark_clean().unwrap();
    let grown = grow(&f.path, NEW, true).unwrap();
    assert_eq!(grown.new_blocks_marked, 0);
    let md = open_grown(&f);
    for node in 0..3 {
        assert_eq!(md.bitmap(node).unwrap().count_ones(), 0);
    }
}

#[test]
fn shrinking_an_unclean_or_a_same_size_replica_changes_nothing() {
    let f = Fixture::new();
    f.open().mark_clean().unwrap();
    let before = f.bytes();
    let e = grow(&f.path, OLD - EXTENT_SIZE, false).unwrap_err();
    assert!(
        matches!(&e, MetaError::InvalidParams(m) if m.contains("shrinking")),
        "{e}"
    );
    let same = grow(&f.path, OLD, false).unwrap();
    assert_eq!(same.old_size, same.new_size);
    assert_eq!(f.bytes(), before);

    // In use (a daemon runs): refused.
    let md = f.open();
    let e = grow(&f.path, NEW, false).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    // Left unclean (the daemon crashed): refused, the activity log is needed.
    drop(md);
    let e = grow(&f.path, NEW, false).unwrap_err();
    assert!(
        matches!(&e, MetaError::InvalidParams(m) if m.contains("did not stop cleanly")),
        "{e}"
    );
    assert_eq!(
        Metadata::open(&f.path, &f.expect())
            .unwrap()
            .layout()
            .device_size(),
        OLD
    );
}

#[test]
fn growing_in_use_keeps_the_activity_log_and_the_crash_state() {
    // What a daemon restarting itself to grow online leaves: metadata in
    // use, writes in flight in two extents, a bit set for a peer.
    let f = Fixture::new();
    {
        let md = f.open();
        let al = std::sync::Arc::clone(md.activity_log());
        let _first = al.begin_write(3 * EXTENT_SIZE, 4096).unwrap();
        let _second = al.begin_write(9 * EXTENT_SIZE + 8192, 4096).unwrap();
        md.bitmap(0).unwrap().set_range(7, 2);
        md.flush_bitmaps().unwrap();
        // Dropped without `mark_clean`: as a process that went away.
    }
    let grown = grow_in_use(&f.path, NEW, false).unwrap();
    assert_eq!((grown.old_size, grown.new_size), (OLD, NEW));
    assert_eq!(stored_device_size(&f.path).unwrap(), NEW);

    let md = open_grown(&f);
    let recovery = md.recovery();
    assert!(
        recovery.was_unclean,
        "the restarted daemon must see a crash"
    );
    let mut extents = recovery.al_extents.clone();
    extents.sort_unstable();
    assert_eq!(extents, vec![3, 9]);
    let old_blocks = OLD / 4096;
    let peer = md.bitmap(0).unwrap();
    assert!(peer.contains_range(7, 2));
    assert_eq!(peer.count_range(0, old_blocks), 2);
    assert_eq!(
        peer.count_range(old_blocks, (NEW - OLD) / 4096),
        (NEW - OLD) / 4096
    );
    // And the activity log still marks those extents for the peers.
    let fresh = crate::meta::Bitmap::new(NEW / 4096, 4096);
    assert_eq!(md.mark_active_extents(&fresh), 2 * EXTENT_SIZE / 4096);
}
