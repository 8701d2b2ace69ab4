//! Growing a replica's metadata to a larger device, offline.
//!
//! The layout depends on the device size (the bitmaps come after the
//! activity log, one after the other), so growing rewrites the file: a new
//! one is built next to it with the same identity, state and bits, then
//! renamed over it. A crash before the rename leaves the old file as it
//! was; after it, the new one is complete and durable.
//!
//! Blocks in the new area are marked stale in every peer's bitmap (unless
//! the caller knows them equal everywhere): whoever is primary next sends
//! its version of them, so the replicas end identical whatever the grown
//! backing stores held there. Nothing else is resynced.

use std::path::{Path, PathBuf};

use super::file::MetaFile;
use super::layout::{Layout, SECTOR_SIZE};
use super::{read_superblock, CreateParams, Expect, MetaError, Metadata};

/// What [`grow`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub old_size: u64,
    pub new_size: u64,
    /// Blocks of the new area marked stale per peer bitmap (0 when clean).
    pub new_blocks_marked: u64,
}

/// Grows the metadata at `path` (a regular file) to `new_size` bytes,
/// keeping terms, generations, disk state and every bitmap bit. Refuses to
/// shrink, and refuses metadata of a daemon that did not stop cleanly (it
/// may still run, and its activity log says where the peers may differ).
/// `assume_clean`: the new area is known identical on every node (e.g.
/// zeros everywhere), so it is not marked for resync.
pub fn grow(path: &Path, new_size: u64, assume_clean: bool) -> Result<Grown, MetaError> {
    grow_metadata(path, new_size, assume_clean, false)
}

/// [`grow`] for a daemon restarting itself to grow online (`vmsyncctl
/// resize` with the daemon running): its previous run left the metadata
/// in use, as a crash would. The activity log is carried over as it is
/// and the metadata stays marked unclean, so the restarted daemon treats
/// the hot extents exactly as after a crash (resynced to peers where a
/// write may have reached one replica and not another). The caller must
/// be the only user of the file.
pub fn grow_in_use(path: &Path, new_size: u64, assume_clean: bool) -> Result<Grown, MetaError> {
    grow_metadata(path, new_size, assume_clean, true)
}

/// The device size the metadata at `path` is laid out for.
pub fn stored_device_size(path: &Path) -> Result<u64, MetaError> {
    let file = MetaFile::open(path)?;
    let (stored, _) = read_superblock(&file)?;
    Ok(stored.superblock.layout.geometry().device_size)
}

fn grow_metadata(
    path: &Path,
    new_size: u64,
    assume_clean: bool,
    in_use: bool,
) -> Result<Grown, MetaError> {
    let invalid = |why: String| MetaError::InvalidParams(format!("{}: {why}", path.display()));
    let file = MetaFile::open(path)?;
    if !file.is_regular_file()? {
        return Err(invalid(
            "metadata on a block device cannot be grown in place; create new metadata on a larger device and let it resync".into(),
        ));
    }
    let (stored, _) = read_superblock(&file)?;
    drop(file);
    let old = stored.superblock;
    let geometry = old.layout.geometry();
    if !old.clean && !in_use {
        return Err(invalid(
            "the daemon did not stop cleanly (or still runs): start vmsyncd and stop it, then resize".into(),
        ));
    }
    if new_size < geometry.device_size {
        return Err(invalid(format!(
            "shrinking from {} to {new_size} bytes is not supported",
            geometry.device_size
        )));
    }
    if new_size == geometry.device_size {
        return Ok(Grown {
            old_size: new_size,
            new_size,
            new_blocks_marked: 0,
        });
    }
    let params = CreateParams {
        resource: old.resource.clone(),
        device_size: new_size,
        block_size: geometry.block_size,
        node_id: old.node_id,
        node_slots: geometry.node_slots,
        al_slots: geometry.al_slots,
        al_ring_sectors: geometry.al_ring_sectors,
    };
    let temp = temp_path(path);
    Metadata::create(&temp, &params, true)?;
    let expect = |device_size| Expect {
        resource: old.resource.clone(),
        device_size,
        node_id: old.node_id,
        block_size: geometry.block_size,
    };
    let from = Metadata::open(path, &expect(geometry.device_size))?;
    let to = Metadata::open(&temp, &expect(new_size))?;
    let old_blocks = old.layout.blocks();
    let new_blocks = to.layout().blocks() - old_blocks;
    let mut marked = 0;
    for node in 0..geometry.node_slots {
        let (Some(src), Some(dst)) = (from.bitmap(node), to.bitmap(node)) else {
            continue;
        };
        dst.merge_prefix_from(src)?;
        if !assume_clean && node != old.node_id {
            marked = dst.set_range(old_blocks, new_blocks);
        }
    }
    to.update_superblock(|sb| {
        sb.term = old.term;
        sb.generations = old.generations;
        sb.data_term = old.data_term;
        sb.inconsistent = old.inconsistent;
        sb.generation_unwritten = old.generation_unwritten;
    })?;
    if old.clean {
        to.mark_clean()?;
        from.mark_clean()?;
        drop((from, to));
    } else {
        // Left as the previous run left it: unclean, with its activity log
        // (whose place in the file does not depend on the device size).
        to.flush_bitmaps()?;
        drop((from, to));
        copy_activity_log(path, &temp, &old.layout)?;
    }
    std::fs::rename(&temp, path).map_err(|e| MetaError::Io {
        path: path.to_owned(),
        op: "replace with the grown metadata",
        source: e,
    })?;
    MetaFile::open(path)?.sync_parent_dir()?;
    Ok(Grown {
        old_size: geometry.device_size,
        new_size,
        new_blocks_marked: marked,
    })
}

/// Copies the activity-log ring of `from` into `to`, sector for sector, and
/// makes it durable.
fn copy_activity_log(from: &Path, to: &Path, layout: &Layout) -> Result<(), MetaError> {
    let (from, to) = (MetaFile::open(from)?, MetaFile::open(to)?);
    let mut sector = vec![0u8; SECTOR_SIZE];
    for index in 0..layout.al_ring_sectors() {
        let offset = layout.al_sector_offset(index);
        from.read_at(&mut sector, offset, "read the activity log")?;
        to.write_at(&sector, offset, "copy the activity log")?;
    }
    to.sync("sync the copied activity log")
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".grow");
    path.with_file_name(name)
}
