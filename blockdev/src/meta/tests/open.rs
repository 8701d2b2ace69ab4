//! Creating and opening metadata: checks, refusals, crash recovery.

use super::{small_params, Fixture};
use crate::meta::codec::Sector;
use crate::meta::layout::SECTOR_SIZE;
use crate::meta::superblock::Superblock;
use crate::meta::{CreateParams, Expect, GenerationIds, MetaError, Metadata};

/// Both superblock copies as decoded from disk: `(superblock, sequence)`.
fn copies_on_disk(fx: &Fixture) -> [Option<(Superblock, u64)>; 2] {
    let bytes = fx.bytes();
    [0, 1].map(|copy| {
        let sector: &Sector = bytes[copy * SECTOR_SIZE..(copy + 1) * SECTOR_SIZE]
            .try_into()
            .unwrap();
        Superblock::decode(sector).ok()
    })
}

/// The copy that holds the newest valid superblock (0 or 1).
fn newest_copy(fx: &Fixture) -> usize {
    let [a, b] = copies_on_disk(fx);
    match (a, b) {
        (Some((_, sa)), Some((_, sb))) => usize::from(sb > sa),
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        (None, None) => panic!("no valid superblock"),
    }
}

/// The newest valid superblock on disk.
fn superblock_on_disk(fx: &Fixture) -> Superblock {
    copies_on_disk(fx)[newest_copy(fx)].clone().unwrap().0
}

/// Writes half a sector of garbage over the first half of copy `copy`.
fn tear_copy(fx: &Fixture, copy: usize) {
    let mut bytes = fx.bytes();
    let start = copy * SECTOR_SIZE;
    for (i, b) in bytes[start..start + SECTOR_SIZE / 2].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) ^ 0x5a;
    }
    std::fs::write(&fx.path, bytes).unwrap();
}

/// Opens with `expect`, asserts it fails and that the file did not change.
fn open_fails(fx: &Fixture, expect: &Expect) -> MetaError {
    let before = fx.bytes();
    let err = Metadata::open(&fx.path, expect).unwrap_err();
    assert_eq!(fx.bytes(), before, "failed open modified the file");
    err
}

#[test]
fn create_then_open() {
    let fx = Fixture::new();
    let created = superblock_on_disk(&fx);
    assert!(created.clean);
    assert_eq!(created.term, 0);
    assert_eq!(
        created.generations.current, 0,
        "a fresh replica holds no generation yet"
    );
    let layout = created.layout;
    assert_eq!(fx.bytes().len() as u64, layout.file_len());

    let md = fx.open();
    assert_eq!(md.resource(), "work-vm");
    assert_eq!(md.node_id(), 1);
    assert_eq!(md.layout().node_slots(), 3);
    assert_eq!(md.generations(), created.generations);
    assert!(!md.recovery().was_unclean);
    assert!(md.recovery().al_extents.is_empty());
    assert!((0..3).all(|n| md.bitmap(n).unwrap().count_ones() == 0));
    assert!(md.bitmap(3).is_none());
    // In use: marked unclean on disk.
    assert!(!superblock_on_disk(&fx).clean);
}

#[test]
fn create_refuses_to_overwrite_without_permission() {
    let fx = Fixture::new();
    let before = fx.bytes();
    let err = Metadata::create(&fx.path, &fx.params, false).unwrap_err();
    assert!(matches!(err, MetaError::Exists { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("vmsync metadata (resource 'work-vm'"),
        "{err}"
    );
    assert_eq!(fx.bytes(), before);

    {
        let md = fx.open();
        md.set_term(7).unwrap();
        md.mark_clean().unwrap();
    }
    assert_eq!(superblock_on_disk(&fx).term, 7);
    Metadata::create(&fx.path, &fx.params, true).unwrap();
    assert_eq!(
        superblock_on_disk(&fx).term,
        0,
        "overwritten with fresh metadata"
    );

    std::fs::write(&fx.path, b"not metadata").unwrap();
    let err = Metadata::create(&fx.path, &fx.params, false).unwrap_err();
    assert!(err.to_string().contains("12 bytes of other data"), "{err}");
    assert_eq!(std::fs::read(&fx.path).unwrap(), b"not metadata");

    std::fs::write(&fx.path, b"").unwrap();
    Metadata::create(&fx.path, &fx.params, false).unwrap();
    fx.open();
}

#[test]
fn overwrite_clears_old_state() {
    let fx = Fixture::new();
    let md = fx.open();
    md.bitmap(0).unwrap().set_all();
    let guard = md.activity_log().begin_io(0..2).unwrap();
    md.flush_bitmaps().unwrap();
    drop(guard);
    drop(md);
    Metadata::create(&fx.path, &fx.params, true).unwrap();
    let md = fx.open();
    assert!(!md.recovery().was_unclean);
    assert!(md.recovery().al_extents.is_empty());
    assert_eq!(md.bitmap(0).unwrap().count_ones(), 0);
}

#[test]
fn create_rejects_bad_params() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.meta");
    for params in [
        CreateParams {
            node_id: 3,
            ..small_params()
        },
        CreateParams {
            resource: String::new(),
            ..small_params()
        },
        CreateParams {
            device_size: 1000,
            ..small_params()
        },
        CreateParams {
            al_slots: 0,
            ..small_params()
        },
    ] {
        let err = Metadata::create(&path, &params, false).unwrap_err();
        assert!(matches!(err, MetaError::InvalidParams(_)), "{err}");
    }
    assert!(!path.exists());
}

#[test]
fn bad_checksum_on_both_copies_is_refused_and_nothing_is_written() {
    let fx = Fixture::new();
    fx.patch(200, |b| *b ^= 0x10);
    fx.patch(SECTOR_SIZE + 200, |b| *b ^= 0x10);
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::NoValidSuperblock { .. }), "{err}");
    assert!(
        err.to_string().contains(&*fx.path.to_string_lossy()),
        "{err}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

#[test]
fn foreign_files_are_rejected() {
    let fx = Fixture::new();
    fx.patch(0, |b| *b = b'X');
    fx.patch(SECTOR_SIZE, |b| *b = b'X');
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::BadMagic { .. }), "{err}");

    std::fs::write(&fx.path, b"short").unwrap();
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::BadMagic { .. }), "{err}");

    std::fs::remove_file(&fx.path).unwrap();
    let err = Metadata::open(&fx.path, &fx.expect()).unwrap_err();
    assert!(matches!(err, MetaError::Io { op: "open", .. }), "{err}");
}

#[test]
fn other_format_versions_are_rejected() {
    for version in [2, 4] {
        let fx = Fixture::new();
        fx.patch(8, |b| *b = version);
        fx.patch(SECTOR_SIZE + 8, |b| *b = version);
        let err = open_fails(&fx, &fx.expect());
        assert!(
            matches!(err, MetaError::UnsupportedVersion { found, supported: 3, .. } if found == u32::from(version)),
            "{err}"
        );
        assert!(
            err.to_string().contains(&*fx.path.to_string_lossy()),
            "{err}"
        );
    }
}

/// A version-2 file: one superblock in sector 0, the activity-log ring
/// from sector 1 on. Refused by its version, not misread.
#[test]
fn a_version_2_file_is_refused_with_its_version() {
    let fx = Fixture::new();
    let mut bytes = fx.bytes();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    bytes[SECTOR_SIZE..2 * SECTOR_SIZE].fill(0);
    bytes[SECTOR_SIZE..SECTOR_SIZE + 4].copy_from_slice(b"VMAL");
    std::fs::write(&fx.path, bytes).unwrap();
    let err = open_fails(&fx, &fx.expect());
    assert!(
        matches!(err, MetaError::UnsupportedVersion { found: 2, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "metadata {} has format version 2; this vmsync supports version 3",
            fx.path.display()
        )
    );
}

#[test]
fn updates_alternate_between_the_copies_with_increasing_sequence() {
    let fx = Fixture::new();
    let [a, b] = copies_on_disk(&fx);
    assert_eq!(a.unwrap().1, 1, "create writes copy 0 with sequence 1");
    assert_eq!(b.unwrap().1, 2, "and copy 1 with sequence 2");
    let md = fx.open(); // marks unclean: copy 0, sequence 3
    assert_eq!(newest_copy(&fx), 0);
    for term in 1..=4u64 {
        md.set_term(term).unwrap();
        let [a, b] = copies_on_disk(&fx);
        let (a, b) = (a.unwrap(), b.unwrap());
        let (newest, older) = if term % 2 == 1 { (b, a) } else { (a, b) };
        assert_eq!(newest.1, older.1 + 1);
        assert_eq!(newest.1, 3 + term);
        assert_eq!(newest.0.term, term);
        assert_eq!(
            older.0.term,
            term - 1,
            "the older copy keeps the previous state"
        );
    }
}

/// Brings the fixture to a known history and returns the generations
/// of the last state before the newest copy:
/// open (unclean) → term 5 → generations G → mark clean (newest).
fn history(fx: &Fixture) -> GenerationIds {
    let generations = GenerationIds {
        current: 21,
        bitmap: 22,
        history: [23, 24],
    };
    let md = fx.open();
    md.set_term(5).unwrap();
    md.set_generations(generations).unwrap();
    md.mark_clean().unwrap();
    drop(md);
    let newest = superblock_on_disk(fx);
    assert!(newest.clean);
    assert_eq!(newest.term, 5);
    generations
}

#[test]
fn torn_newest_superblock_falls_back_to_the_previous_state() {
    let fx = Fixture::new();
    let generations = history(&fx);
    let newest = newest_copy(&fx);
    tear_copy(&fx, newest);

    // The previous state: term 5 and generations G are there, but it was
    // written while the metadata was in use, so it says "not clean" and
    // the open reports the previous run as unclean (the activity log is
    // resynced: conservative, since the clean shutdown did not complete).
    let md = fx.open();
    assert_eq!(md.term(), 5);
    assert_eq!(md.generations(), generations);
    assert!(md.recovery().was_unclean);
    assert_eq!(md.recovery().damaged_superblock_copy, Some(newest as u32));
    assert_eq!(md.resource(), "work-vm");
    // The open wrote the damaged copy, so both are valid again.
    let [a, b] = copies_on_disk(&fx);
    assert!(a.is_some() && b.is_some());
    assert_eq!(newest_copy(&fx), newest, "the torn copy was rewritten");
    drop(md);
    let md = fx.open();
    assert_eq!(md.term(), 5);
    assert_eq!(md.recovery().damaged_superblock_copy, None);
}

#[test]
fn torn_older_superblock_is_ignored() {
    let fx = Fixture::new();
    history(&fx);
    tear_copy(&fx, 1 - newest_copy(&fx));
    let md = fx.open();
    assert_eq!(md.term(), 5);
    assert!(!md.recovery().was_unclean, "the newest copy says clean");
    assert!(md.recovery().damaged_superblock_copy.is_some());
}

#[test]
fn garbage_over_both_superblocks_is_refused_naming_the_file() {
    let fx = Fixture::new();
    history(&fx);
    tear_copy(&fx, 0);
    tear_copy(&fx, 1);
    let err = open_fails(&fx, &fx.expect());
    let message = err.to_string();
    assert!(
        matches!(
            err,
            MetaError::BadMagic { .. } | MetaError::NoValidSuperblock { .. }
        ),
        "{err}"
    );
    assert!(message.contains(&*fx.path.to_string_lossy()), "{message}");

    // Garbage after the magic and version: each copy is named with its
    // problem.
    let fx = Fixture::new();
    history(&fx);
    for copy in 0..2 {
        let mut bytes = fx.bytes();
        bytes[copy * SECTOR_SIZE + 12..copy * SECTOR_SIZE + 2048].fill(0xa5);
        std::fs::write(&fx.path, bytes).unwrap();
    }
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::NoValidSuperblock { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&*fx.path.to_string_lossy()), "{message}");
    assert!(
        message.contains("copy 0 at offset 0: checksum mismatch"),
        "{message}"
    );
    assert!(
        message.contains("copy 1 at offset 4096: checksum mismatch"),
        "{message}"
    );
}

/// A crash during a superblock update: the update writes only one copy
/// (the one not holding the newest state). Interrupted half way, the
/// previous state wins; completed (even if the process dies right after),
/// the new one does.
#[test]
fn crash_during_an_update_keeps_the_newest_complete_copy() {
    let fx = Fixture::new();
    let md = fx.open();
    md.set_term(3).unwrap();
    let before = fx.bytes();
    let target = 1 - newest_copy(&fx);
    md.set_term(4).unwrap();
    drop(md);
    assert_eq!(newest_copy(&fx), target);
    let after = fx.bytes();

    // Only the first half of the new copy reached the disk.
    let mut torn = before.clone();
    let start = target * SECTOR_SIZE;
    torn[start..start + SECTOR_SIZE / 2].copy_from_slice(&after[start..start + SECTOR_SIZE / 2]);
    std::fs::write(&fx.path, &torn).unwrap();
    assert_eq!(fx.open().term(), 3);

    // The new copy complete: it wins.
    std::fs::write(&fx.path, &after).unwrap();
    assert_eq!(fx.open().term(), 4);
}

/// `create` writes copy 0, then copy 1; a crash in between leaves copy 0.
#[test]
fn crash_between_the_two_copies_of_create_leaves_a_usable_file() {
    let fx = Fixture::new();
    let mut bytes = fx.bytes();
    bytes[SECTOR_SIZE..2 * SECTOR_SIZE].fill(0);
    std::fs::write(&fx.path, bytes).unwrap();
    let md = fx.open();
    assert_eq!(md.term(), 0);
    assert!(!md.recovery().was_unclean);
}

#[test]
fn two_valid_copies_of_different_replicas_are_refused() {
    let fx = Fixture::new();
    let other = Fixture::with(CreateParams {
        resource: "other-vm".into(),
        ..small_params()
    });
    let mut bytes = fx.bytes();
    bytes[SECTOR_SIZE..2 * SECTOR_SIZE]
        .copy_from_slice(&other.bytes()[SECTOR_SIZE..2 * SECTOR_SIZE]);
    std::fs::write(&fx.path, bytes).unwrap();
    let err = open_fails(&fx, &fx.expect());
    assert!(
        matches!(err, MetaError::ConflictingSuperblocks { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("other-vm"), "{err}");
}

#[test]
fn a_damaged_bitmap_page_reads_all_stale_and_other_pages_are_intact() {
    // 16 extents of 4 MiB at 512-byte blocks: 131072 blocks, 5 pages.
    let fx = Fixture::with(CreateParams {
        block_size: 512,
        ..small_params()
    });
    let per_page = crate::meta::layout::BITMAP_BITS_PER_PAGE;
    let (layout, blocks) = {
        let md = fx.open();
        let layout = md.layout();
        assert_eq!(layout.bitmap_pages(), 5);
        let peer = md.bitmap(2).unwrap();
        // A few bits in pages 0, 1 and 3 of node 2.
        for block in [5, per_page + 7, 3 * per_page + 11] {
            peer.set_range(block, 1);
        }
        md.mark_clean().unwrap();
        (layout, layout.blocks())
    };
    // Half a page of garbage over page 1 of node 2.
    let offset = layout.bitmap_offset(2) as usize + SECTOR_SIZE;
    let mut bytes = fx.bytes();
    bytes[offset..offset + SECTOR_SIZE / 2].fill(0x3c);
    std::fs::write(&fx.path, bytes).unwrap();

    let md = fx.open();
    let peer = md.bitmap(2).unwrap();
    assert_eq!(
        peer.count_range(per_page, per_page),
        per_page,
        "page 1: all stale"
    );
    assert_eq!(
        peer.count_ones(),
        per_page + 2,
        "count_ones covers the page"
    );
    assert!(
        peer.test(5) && peer.test(3 * per_page + 11),
        "other pages intact"
    );
    assert_eq!(peer.count_range(0, per_page), 1);
    assert_eq!(peer.count_range(2 * per_page, blocks - 2 * per_page), 1);
    for node in [0, 1] {
        assert_eq!(
            md.bitmap(node).unwrap().count_ones(),
            0,
            "other nodes intact"
        );
    }
    // The page is rewritten sealed by the next flush; then it reads back as
    // what it holds in memory (still all stale: nothing is cleared).
    assert_eq!(md.bitmaps().dirty_page_count(), 1);
    md.bitmap(2).unwrap().clear_range(per_page, 100);
    md.mark_clean().unwrap();
    drop(md);
    let md = fx.open();
    assert!(md.recovery().damaged_bitmap_pages.is_empty());
    let peer = md.bitmap(2).unwrap();
    assert_eq!(peer.count_ones(), per_page + 2 - 100);
    assert_eq!(md.bitmaps().dirty_page_count(), 0);
}

#[test]
fn a_damaged_last_partial_page_sets_only_bits_inside_the_device() {
    let fx = Fixture::new(); // 16384 blocks: one partial page
    let layout = fx.open().layout();
    fx.patch(layout.bitmap_offset(0) as usize + 100, |b| *b ^= 1);
    let md = fx.open();
    assert_eq!(md.bitmap(0).unwrap().count_ones(), layout.blocks());
    assert_eq!(md.bitmap(1).unwrap().count_ones(), 0);
}

#[test]
fn a_bitmap_page_copied_to_another_place_does_not_verify() {
    let fx = Fixture::new();
    let layout = {
        let md = fx.open();
        md.bitmap(0).unwrap().set_range(10, 1);
        md.mark_clean().unwrap();
        md.layout()
    };
    // Node 0's only page copied over node 1's: its checksum binds it to
    // node 0, so node 1 reads all stale rather than inheriting bit 10.
    let mut bytes = fx.bytes();
    let (from, to) = (
        layout.bitmap_offset(0) as usize,
        layout.bitmap_offset(1) as usize,
    );
    let page = bytes[from..from + SECTOR_SIZE].to_vec();
    bytes[to..to + SECTOR_SIZE].copy_from_slice(&page);
    std::fs::write(&fx.path, bytes).unwrap();
    let md = fx.open();
    assert_eq!(md.bitmap(0).unwrap().count_ones(), 1);
    assert_eq!(md.bitmap(1).unwrap().count_ones(), layout.blocks());
}

#[test]
fn each_mismatch_has_its_own_error() {
    let fx = Fixture::new();
    let err = open_fails(
        &fx,
        &Expect {
            resource: "other".into(),
            ..fx.expect()
        },
    );
    assert!(matches!(err, MetaError::ResourceMismatch { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "metadata {} belongs to resource 'work-vm', configuration says 'other'",
            fx.path.display()
        )
    );
    let err = open_fails(
        &fx,
        &Expect {
            device_size: 1 << 30,
            ..fx.expect()
        },
    );
    assert!(
        matches!(err, MetaError::SizeMismatch { found, expected: 1_073_741_824, .. } if found == fx.params.device_size)
    );
    let err = open_fails(
        &fx,
        &Expect {
            node_id: 2,
            ..fx.expect()
        },
    );
    assert!(matches!(
        err,
        MetaError::NodeIdMismatch {
            found: 1,
            expected: 2,
            ..
        }
    ));
    let err = open_fails(
        &fx,
        &Expect {
            block_size: 512,
            ..fx.expect()
        },
    );
    assert!(matches!(
        err,
        MetaError::BlockSizeMismatch {
            found: 4096,
            expected: 512,
            ..
        }
    ));
}

#[test]
fn truncated_file_is_rejected() {
    let fx = Fixture::new();
    let mut bytes = fx.bytes();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&fx.path, &bytes).unwrap();
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::Truncated { .. }), "{err}");
}

#[test]
fn a_second_opener_is_locked_out() {
    let fx = Fixture::new();
    let _md = fx.open();
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::Locked { .. }), "{err}");
    let err = Metadata::create(&fx.path, &fx.params, true).unwrap_err();
    assert!(matches!(err, MetaError::Locked { .. }), "{err}");
}

#[test]
fn term_and_generations_persist() {
    let fx = Fixture::new();
    let md = fx.open();
    md.set_term(5).unwrap();
    let generations = GenerationIds {
        current: 10,
        bitmap: 11,
        history: [12, 13],
    };
    md.set_generations(generations).unwrap();
    let err = md.set_term(4).unwrap_err();
    assert!(matches!(
        err,
        MetaError::TermRegression {
            current: 5,
            requested: 4,
            ..
        }
    ));
    md.set_term(5).unwrap();
    drop(md);
    let md = fx.open();
    assert_eq!(md.term(), 5);
    assert_eq!(md.generations(), generations);
}

#[test]
fn unclean_open_reports_the_al_and_marking_it_covers_whole_extents() {
    let fx = Fixture::new();
    let md = fx.open();
    let layout = md.layout();
    let al = md.activity_log();
    drop(al.begin_io(2..3).unwrap());
    drop(
        al.begin_write(5 * crate::meta::EXTENT_SIZE + 10, 1)
            .unwrap(),
    );
    drop(md); // crash: never marked clean

    let md = fx.open();
    assert!(md.recovery().was_unclean);
    assert_eq!(md.recovery().al_extents, vec![2, 5]);
    for node in 0..3 {
        assert_eq!(
            md.bitmap(node).unwrap().count_ones(),
            0,
            "opening marks nothing: a promotion does"
        );
    }
    let per_extent = layout.blocks_per_extent();
    let bitmap = md.bitmap(2).unwrap();
    assert_eq!(md.mark_active_extents(bitmap), 2 * per_extent);
    assert_eq!(bitmap.count_ones(), 2 * per_extent);
    assert_eq!(bitmap.count_range(2 * per_extent, per_extent), per_extent);
    assert_eq!(bitmap.count_range(5 * per_extent, per_extent), per_extent);
    assert_eq!(md.mark_active_extents(bitmap), 0, "already set");
}

#[test]
fn clean_shutdown_needs_no_recovery_and_keeps_bits() {
    let fx = Fixture::new();
    let md = fx.open();
    let guard = md.activity_log().begin_io(3..4).unwrap();
    md.bitmap(0).unwrap().set_range(3 * 1024 + 7, 1);
    let err = md.mark_clean().unwrap_err();
    assert!(matches!(err, MetaError::Busy { inflight: 1, .. }), "{err}");
    drop(guard);
    md.mark_clean().unwrap();
    let err = md.activity_log().begin_io(3..4).unwrap_err();
    assert!(matches!(err, MetaError::AlClosed { .. }), "{err}");
    assert!(superblock_on_disk(&fx).clean);
    drop(md);

    let md = fx.open();
    assert!(!md.recovery().was_unclean);
    assert_eq!(md.recovery().al_extents, vec![3]);
    assert_eq!(md.bitmap(0).unwrap().count_ones(), 1);
    assert!(md.bitmap(0).unwrap().test(3 * 1024 + 7));
    assert_eq!(md.bitmap(2).unwrap().count_ones(), 0);
}
