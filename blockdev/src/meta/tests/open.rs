//! Creating and opening metadata: checks, refusals, crash recovery.

use super::{small_params, Fixture};
use crate::meta::codec::Sector;
use crate::meta::layout::SECTOR_SIZE;
use crate::meta::superblock::Superblock;
use crate::meta::{CreateParams, Expect, GenerationIds, MetaError, Metadata};

fn superblock_on_disk(fx: &Fixture) -> Superblock {
    let bytes = fx.bytes();
    let sector: &Sector = bytes[..SECTOR_SIZE].try_into().unwrap();
    Superblock::decode(sector).unwrap()
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
fn bad_checksum_is_detected_and_nothing_is_written() {
    let fx = Fixture::new();
    fx.patch(200, |b| *b ^= 0x10);
    let err = open_fails(&fx, &fx.expect());
    assert!(matches!(err, MetaError::BadChecksum { .. }), "{err}");
    assert!(
        err.to_string().contains(&*fx.path.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn foreign_files_are_rejected() {
    let fx = Fixture::new();
    fx.patch(0, |b| *b = b'X');
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
fn newer_format_version_is_rejected() {
    let fx = Fixture::new();
    fx.patch(8, |b| *b = 3);
    let err = open_fails(&fx, &fx.expect());
    assert!(
        matches!(err, MetaError::UnsupportedVersion { found: 3, .. }),
        "{err}"
    );
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
