//! On-disk metadata of a replica: superblock, staleness bitmaps, activity log.
//!
//! The metadata lives in its own file (`[node] metadata` in the
//! configuration), laid out as described in [`Layout`]:
//! `[superblock copy 0][superblock copy 1][activity-log ring][bitmap node 0]
//! [bitmap node 1]...`.
//!
//! * [`Superblock`]: identity (resource, node id), geometry, term, data
//!   generation ids and the clean flag; checksummed, versioned, explicit
//!   little-endian encoding; two copies written alternately with a sequence
//!   number, so a torn update falls back to the previous state.
//! * [`Bitmap`]: lock-free staleness bitmap, one per node slot, with a
//!   compact network encoding ([`Bitmap::encode`]/[`Bitmap::decode`]).
//!   [`NodeBitmaps`] persists their dirty pages lazily, each page with its
//!   own checksum; a page that fails it reads as all stale.
//! * [`ActivityLog`]: the persisted set of hot 4 MiB extents that makes lazy
//!   bitmap persistence safe.
//!
//! # Invariants
//!
//! * A block's stale bit may be unpersisted only while its extent is in the
//!   persisted activity log. The AL persists an extent's bitmap pages before
//!   dropping it; `open` after a crash marks every AL extent stale for every
//!   other node.
//! * A write's [`AlGuard`] must live until every peer has acked the write or
//!   had its stale bit set; bits set after the guard is gone are not covered
//!   by the AL (flush them with [`Metadata::flush_bitmaps`]).
//! * While a process has the metadata open it is marked unclean on disk;
//!   only [`Metadata::mark_clean`] marks it clean again. Dropping a
//!   [`Metadata`] without it is treated like a crash at the next open.
//! * A failed check at open time writes nothing.
//! * A superblock update never overwrites the newest valid copy; a damaged
//!   bitmap page is never read as "current", only as "all stale".
//!
//! # Fresh metadata
//!
//! [`Metadata::create`] writes all bitmaps clear, a random data generation id,
//! term 0 and the clean flag. Clear bitmaps claim nothing about peers: a new
//! replica's generation id matches no peer's, which is how the replication
//! layer learns that a full sync is needed (DRBD's "Inconsistent" start), and
//! it then sets the bits itself.

mod activity_log;
mod al_ring;
mod bitmap;
mod codec;
mod error;
mod file;
mod grow;
mod layout;
mod node_bitmaps;
mod rle;
mod superblock;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Arc, Mutex};

pub use activity_log::{ActivityLog, AlGuard, EvictionHook};
pub use al_ring::MAX_AL_SLOTS;
pub use bitmap::Bitmap;
pub use error::MetaError;
pub use grow::{grow, grow_in_use, stored_device_size, Grown};
pub use layout::{
    Geometry, Layout, DEFAULT_AL_RING_SECTORS, DEFAULT_AL_SLOTS, DEFAULT_BLOCK_SIZE, EXTENT_SIZE,
    MAX_AL_RING_SECTORS, MAX_NODE_SLOTS, MIN_AL_RING_SECTORS, MIN_BLOCK_SIZE,
};
pub use node_bitmaps::NodeBitmaps;
pub use superblock::{GenerationIds, Superblock, FORMAT_VERSION, MAX_RESOURCE_NAME_LEN};

use codec::Sector;
use file::MetaFile;
use layout::{superblock_offset, SECTOR_SIZE, SUPERBLOCK_COPIES};
use superblock::SuperblockError;

/// Zero-filling a new file is done in chunks of this size.
const ZERO_CHUNK: usize = 1 << 20;

/// What `vmsyncctl create-md` knows about the new replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    pub resource: String,
    pub device_size: u64,
    pub block_size: u32,
    pub node_id: u32,
    /// Highest node id of the resource + 1 (room for future nodes is cheap:
    /// 32 KiB per GiB of device per slot).
    pub node_slots: u32,
    pub al_slots: u32,
    pub al_ring_sectors: u32,
}

impl CreateParams {
    /// Parameters with the default block size and activity-log geometry.
    pub fn new(
        resource: impl Into<String>,
        device_size: u64,
        node_id: u32,
        node_slots: u32,
    ) -> Self {
        CreateParams {
            resource: resource.into(),
            device_size,
            block_size: DEFAULT_BLOCK_SIZE,
            node_id,
            node_slots,
            al_slots: DEFAULT_AL_SLOTS,
            al_ring_sectors: DEFAULT_AL_RING_SECTORS,
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            device_size: self.device_size,
            block_size: self.block_size,
            node_slots: self.node_slots,
            al_slots: self.al_slots,
            al_ring_sectors: self.al_ring_sectors,
        }
    }
}

/// What the configuration says the metadata must belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub resource: String,
    pub device_size: u64,
    pub node_id: u32,
    pub block_size: u32,
}

impl Expect {
    /// Expectations with the default block size.
    pub fn new(resource: impl Into<String>, device_size: u64, node_id: u32) -> Self {
        Expect {
            resource: resource.into(),
            device_size,
            node_id,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// What [`Metadata::open`] found about the previous run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The previous run did not shut down cleanly (crash, kill, power loss).
    pub was_unclean: bool,
    /// Extents of the persisted activity log, least recently used first: the
    /// hot set of the previous run. Nothing is marked at open: the node is
    /// a secondary until promoted, and a promotion (or meeting a primary of
    /// another generation) marks the AL extents stale for the peers
    /// ([`Metadata::mark_active_extents`]) before anything is written.
    pub al_extents: Vec<u64>,
    /// The superblock copy (0 or 1) that was damaged (torn or corrupted) and
    /// skipped in favour of the other; it has been rewritten by the open.
    pub damaged_superblock_copy: Option<u32>,
    /// `(node, page)` of every bitmap page that failed its checksum and so
    /// was read as all stale (each page covers 32512 blocks).
    pub damaged_bitmap_pages: Vec<(u32, u64)>,
}

/// The newest valid superblock copy: its contents, sequence number and
/// which copy (0 or 1) holds it. The next update goes to the other copy.
#[derive(Debug, Clone)]
struct StoredSuperblock {
    superblock: Superblock,
    sequence: u64,
    copy: u32,
}

impl StoredSuperblock {
    /// Writes `superblock` to the copy that does not hold the newest valid
    /// one, with the next sequence number, and syncs; returns the new newest
    /// copy. Until it returns Ok, the newest valid copy on disk is `self`
    /// (or, after a failed sync, possibly the new one: either is a state
    /// that was requested and not yet reported durable).
    fn write_next(
        &self,
        file: &MetaFile,
        superblock: Superblock,
    ) -> Result<StoredSuperblock, MetaError> {
        let sequence = self
            .sequence
            .checked_add(1)
            .ok_or_else(|| MetaError::Corrupt {
                path: file.path().to_owned(),
                reason: "superblock sequence number exhausted".into(),
            })?;
        let next = StoredSuperblock {
            superblock,
            sequence,
            copy: (self.copy + 1) % SUPERBLOCK_COPIES,
        };
        write_superblock_copy(file, &next)?;
        file.sync("sync superblock")?;
        Ok(next)
    }
}

/// An open, locked metadata file.
///
/// Shared by the whole node through an `Arc`: superblock updates serialise
/// on an internal lock; the bitmaps and the activity log are lock-free or
/// locked on their own.
#[derive(Debug)]
pub struct Metadata {
    file: Arc<MetaFile>,
    superblock: Mutex<StoredSuperblock>,
    /// `superblock.generation_unwritten`, readable without the lock: the
    /// write path asks on every write.
    generation_unwritten: std::sync::atomic::AtomicBool,
    bitmaps: Arc<NodeBitmaps>,
    activity_log: Arc<ActivityLog>,
    recovery: Recovery,
}

impl Metadata {
    /// Initialises the metadata file at `path` (created if missing).
    ///
    /// A file that is not empty is only overwritten with `overwrite`; the
    /// error says what it holds. The new superblock is written last, after
    /// everything else is durable, so an interrupted `create` leaves a file
    /// that `open` rejects rather than half-initialised metadata.
    pub fn create(
        path: impl AsRef<Path>,
        params: &CreateParams,
        overwrite: bool,
    ) -> Result<(), MetaError> {
        let path = path.as_ref();
        let layout = Layout::new(params.geometry()).map_err(MetaError::InvalidParams)?;
        Superblock::check_identity(&params.resource, params.node_id, &layout)
            .map_err(MetaError::InvalidParams)?;
        let (file, created) = MetaFile::open_or_create(path)?;
        if !created {
            if let Some(what) = describe_contents(&file)? {
                if !overwrite {
                    return Err(MetaError::Exists {
                        path: path.to_owned(),
                        what,
                    });
                }
                // From here until the new superblock is written, a crash
                // must leave something `open` refuses, not the old metadata
                // over new bitmaps: both copies go.
                file.write_at(
                    &[0; SECTOR_SIZE * SUPERBLOCK_COPIES as usize],
                    0,
                    "invalidate old superblock",
                )?;
                file.sync("invalidate old superblock")?;
            }
        }
        prepare_space(&file, &layout)?;
        let superblock = Superblock {
            resource: params.resource.clone(),
            node_id: params.node_id,
            layout,
            term: 0,
            // Generation 0: this replica holds no data of any generation
            // yet, so the first primary it meets sends it everything.
            generations: GenerationIds::default(),
            data_term: 0,
            clean: true,
            inconsistent: false,
            generation_unwritten: false,
        };
        // Both copies (sequence 1 and 2), so that from the start a damaged
        // copy has a fallback. A crash between them leaves one complete
        // copy, which is as good as both.
        for copy in 0..SUPERBLOCK_COPIES {
            write_superblock_copy(
                &file,
                &StoredSuperblock {
                    superblock: superblock.clone(),
                    sequence: u64::from(copy) + 1,
                    copy,
                },
            )?;
        }
        file.sync("sync superblock")?;
        if created {
            file.sync_parent_dir()?;
        }
        Ok(())
    }

    /// Opens the metadata at `path` for the node and resource of `expect`.
    ///
    /// Every check (magic, version, checksum, resource, size, node id, block
    /// size, file length) happens before the first write; a failure leaves
    /// the file untouched. The newest valid superblock copy is used (see
    /// `superblock`); bitmap pages that fail their checksum read as all
    /// stale. Then the superblock is marked in use (unclean), written to the
    /// other copy.
    pub fn open(path: impl AsRef<Path>, expect: &Expect) -> Result<Metadata, MetaError> {
        let path = path.as_ref();
        let file = Arc::new(MetaFile::open(path)?);
        let (stored, damaged_superblock_copy) = read_superblock(&file)?;
        let mut superblock = stored.superblock.clone();
        check_expectations(path, &superblock, expect)?;
        let layout = superblock.layout;
        let found = file.len()?;
        if found < layout.file_len() {
            return Err(MetaError::Truncated {
                path: path.to_owned(),
                found,
                needed: layout.file_len(),
            });
        }
        let (bitmaps, damaged_bitmap_pages) = NodeBitmaps::load(Arc::clone(&file), layout)?;
        let bitmaps = Arc::new(bitmaps);
        let activity_log = Arc::new(ActivityLog::load(
            Arc::clone(&file),
            layout,
            Arc::clone(&bitmaps),
        )?);

        // All checks passed: from here on, writing is allowed.
        let recovery = Recovery {
            was_unclean: !superblock.clean,
            al_extents: activity_log.active_extents(),
            damaged_superblock_copy,
            damaged_bitmap_pages,
        };
        superblock.clean = false;
        let stored = stored.write_next(&file, superblock)?;
        Ok(Metadata {
            file,
            generation_unwritten: std::sync::atomic::AtomicBool::new(
                stored.superblock.generation_unwritten,
            ),
            superblock: Mutex::new(stored),
            bitmaps,
            activity_log,
            recovery,
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    fn lock_stored(&self) -> std::sync::MutexGuard<'_, StoredSuperblock> {
        self.superblock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the superblock as last persisted.
    pub fn superblock(&self) -> Superblock {
        self.lock_stored().superblock.clone()
    }

    pub fn layout(&self) -> Layout {
        self.lock_stored().superblock.layout
    }

    pub fn resource(&self) -> String {
        self.lock_stored().superblock.resource.clone()
    }

    pub fn node_id(&self) -> u32 {
        self.lock_stored().superblock.node_id
    }

    pub fn term(&self) -> u64 {
        self.lock_stored().superblock.term
    }

    pub fn generations(&self) -> GenerationIds {
        self.lock_stored().superblock.generations
    }

    /// What `open` found about the previous run.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Node `node`'s staleness bitmap; `None` if `node` is not a node slot.
    pub fn bitmap(&self, node: u32) -> Option<&Arc<Bitmap>> {
        self.bitmaps.get(node)
    }

    /// All staleness bitmaps, shareable with the I/O path.
    pub fn bitmaps(&self) -> &Arc<NodeBitmaps> {
        &self.bitmaps
    }

    /// Sets every bit of the extents now in the activity log in `bitmap`
    /// (one of ours): the blocks this node may have written recently, which
    /// another node may not hold. Returns the number of bits newly set.
    pub fn mark_active_extents(&self, bitmap: &Bitmap) -> u64 {
        let layout = self.layout();
        self.activity_log
            .active_extents()
            .into_iter()
            .map(|extent| {
                let blocks = layout.extent_blocks(extent);
                bitmap.set_range(blocks.start, blocks.end - blocks.start)
            })
            .sum()
    }

    /// The activity log, shareable with the write path.
    pub fn activity_log(&self) -> &Arc<ActivityLog> {
        &self.activity_log
    }

    /// Persists every changed bitmap page.
    pub fn flush_bitmaps(&self) -> Result<(), MetaError> {
        self.bitmaps.flush()
    }

    /// Persists the changed bitmap pages that hold `blocks` (every node's),
    /// then syncs: cheaper than [`Metadata::flush_bitmaps`] when a write path
    /// needs a few bits durable before it completes.
    pub fn flush_bitmap_blocks(&self, blocks: std::ops::Range<u64>) -> Result<(), MetaError> {
        self.bitmaps.flush_blocks(std::slice::from_ref(&blocks))
    }

    /// Durably records a newer term (equal: no-op). Lowering it is refused:
    /// the term is what fences a stale primary.
    pub fn set_term(&self, term: u64) -> Result<(), MetaError> {
        self.set_term_and_generations(term, None)
    }

    /// Durably records new data generation ids: data that has been written
    /// in (a generation taken from a peer, or one forked by a write).
    pub fn set_generations(&self, generations: GenerationIds) -> Result<(), MetaError> {
        self.update_superblock(|sb| {
            sb.generations = generations;
            sb.generation_unwritten = false;
        })
    }

    /// Whether this node started the current generation (a promotion) and
    /// nothing has been written in it yet.
    pub fn generation_unwritten(&self) -> bool {
        self.generation_unwritten
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Before the first write in a generation this node started: durably
    /// records that the generation now holds changes of its own. Cheap
    /// (no I/O) once done; concurrent callers all return only once the
    /// record is durable.
    pub fn mark_generation_written(&self) -> Result<(), MetaError> {
        if !self.generation_unwritten() {
            return Ok(());
        }
        self.update_superblock(|sb| sb.generation_unwritten = false)
    }

    /// Durably records a promotion: a newer term and (when given) a new
    /// generation started here, with nothing written in it yet, in one
    /// superblock write.
    pub fn set_term_and_generations(
        &self,
        term: u64,
        generations: Option<GenerationIds>,
    ) -> Result<(), MetaError> {
        let current = self.term();
        if term < current {
            return Err(MetaError::TermRegression {
                path: self.path().to_owned(),
                current,
                requested: term,
            });
        }
        self.update_superblock(|sb| {
            sb.term = term;
            if let Some(g) = generations {
                sb.generations = g;
                sb.generation_unwritten = true;
            }
        })
    }

    /// Durably records the term of the primary whose writes this replica
    /// takes from now on (equal: no-op).
    pub fn set_data_term(&self, term: u64) -> Result<(), MetaError> {
        self.update_superblock(|sb| sb.data_term = term)
    }

    /// Durably records whether a resync into this replica is unfinished.
    pub fn set_inconsistent(&self, inconsistent: bool) -> Result<(), MetaError> {
        self.update_superblock(|sb| sb.inconsistent = inconsistent)
    }

    /// Clean shutdown: refuses if writes are in flight, then closes the
    /// activity log, persists the bitmaps and marks the superblock clean, so
    /// the next open does not resync the activity log. Afterwards
    /// [`ActivityLog::begin_io`] fails with [`MetaError::AlClosed`].
    pub fn mark_clean(&self) -> Result<(), MetaError> {
        self.activity_log.close()?;
        self.bitmaps.flush()?;
        self.update_superblock(|sb| sb.clean = true)
    }

    /// Writes a modified copy and adopts it only once it is durable. A
    /// change that changes nothing writes nothing (e.g. concurrent first
    /// writes of a generation all clearing its unwritten flag).
    fn update_superblock(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut stored = self.lock_stored();
        let mut updated = stored.superblock.clone();
        change(&mut updated);
        if updated == stored.superblock {
            return Ok(());
        }
        let unwritten = updated.generation_unwritten;
        *stored = stored.write_next(&self.file, updated)?;
        // Still under the lock: a caller that finds the flag clear knows
        // the update that cleared it is durable.
        self.generation_unwritten
            .store(unwritten, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// Writes `stored` to its copy, without syncing.
fn write_superblock_copy(file: &MetaFile, stored: &StoredSuperblock) -> Result<(), MetaError> {
    file.write_at(
        &stored.superblock.encode(stored.sequence),
        superblock_offset(stored.copy),
        "write superblock",
    )
}

/// Reads and decodes superblock copy `copy`; a copy past the end of the
/// file reads as "bad magic".
fn read_copy(
    file: &MetaFile,
    copy: u32,
) -> Result<Result<(Superblock, u64), SuperblockError>, MetaError> {
    let offset = superblock_offset(copy);
    if file.len()? < offset + SECTOR_SIZE as u64 {
        return Ok(Err(SuperblockError::BadMagic));
    }
    let mut sector: Sector = [0; SECTOR_SIZE];
    file.read_at(&mut sector, offset, "read superblock")?;
    Ok(Superblock::decode(&sector))
}

/// The newest valid superblock copy (see `superblock` for the rules) and,
/// if the other copy is damaged, its number; reads only. The error says what
/// is wrong with each copy.
fn read_superblock(file: &MetaFile) -> Result<(StoredSuperblock, Option<u32>), MetaError> {
    let path = file.path().to_owned();
    let copies = [read_copy(file, 0)?, read_copy(file, 1)?];
    let valid: Vec<StoredSuperblock> = (0..)
        .zip(&copies)
        .filter_map(|(copy, decoded)| {
            let (superblock, sequence) = decoded.as_ref().ok()?.clone();
            Some(StoredSuperblock {
                superblock,
                sequence,
                copy,
            })
        })
        .collect();
    match valid.as_slice() {
        [a, b] => {
            if !a.superblock.same_identity(&b.superblock) {
                return Err(MetaError::ConflictingSuperblocks {
                    path,
                    first: a.superblock.to_string(),
                    second: b.superblock.to_string(),
                });
            }
            if a.sequence == b.sequence && a.superblock != b.superblock {
                return Err(MetaError::Corrupt {
                    path,
                    reason: format!(
                        "both superblock copies carry sequence number {} but differ",
                        a.sequence
                    ),
                });
            }
            Ok((if b.sequence > a.sequence { b } else { a }.clone(), None))
        }
        [only] => {
            let other = 1 - only.copy;
            if let Err(e) = &copies[other as usize] {
                // Expected after a crash in the middle of a superblock
                // update; anything else is worth the operator's attention.
                tracing::warn!(
                    metadata = %path.display(),
                    copy = other,
                    problem = %e,
                    using_copy = only.copy,
                    sequence = only.sequence,
                    "superblock copy is damaged (torn write or corruption); using the other \
                     copy (the damaged one is the next to be written)"
                );
            }
            Ok((only.clone(), Some(other)))
        }
        _ => {
            let errors: Vec<&SuperblockError> =
                copies.iter().filter_map(|c| c.as_ref().err()).collect();
            if errors.iter().all(|e| **e == SuperblockError::BadMagic) {
                return Err(MetaError::BadMagic { path });
            }
            if let Some(found) = errors.iter().find_map(|e| match e {
                SuperblockError::UnsupportedVersion(v) => Some(*v),
                _ => None,
            }) {
                return Err(MetaError::UnsupportedVersion {
                    path,
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            let copies = (0..)
                .zip(&errors)
                .map(|(copy, e)| format!("copy {copy} at offset {}: {e}", superblock_offset(copy)))
                .collect::<Vec<_>>()
                .join("; ");
            Err(MetaError::NoValidSuperblock { path, copies })
        }
    }
}

fn check_expectations(path: &Path, sb: &Superblock, expect: &Expect) -> Result<(), MetaError> {
    let path = path.to_owned();
    if sb.resource != expect.resource {
        return Err(MetaError::ResourceMismatch {
            path,
            found: sb.resource.clone(),
            expected: expect.resource.clone(),
        });
    }
    if sb.layout.device_size() != expect.device_size {
        return Err(MetaError::SizeMismatch {
            path,
            found: sb.layout.device_size(),
            expected: expect.device_size,
        });
    }
    if sb.node_id != expect.node_id {
        return Err(MetaError::NodeIdMismatch {
            path,
            found: sb.node_id,
            expected: expect.node_id,
        });
    }
    if sb.layout.block_size() != expect.block_size {
        return Err(MetaError::BlockSizeMismatch {
            path,
            found: sb.layout.block_size(),
            expected: expect.block_size,
        });
    }
    Ok(())
}

/// What an existing file holds, for the refusal message; `None` if empty.
fn describe_contents(file: &MetaFile) -> Result<Option<String>, MetaError> {
    let len = file.len()?;
    if len == 0 {
        return Ok(None);
    }
    let what = match read_superblock(file) {
        Ok((stored, _)) => format!("vmsync metadata ({})", stored.superblock),
        Err(MetaError::BadMagic { .. }) => format!("{len} bytes of other data"),
        Err(MetaError::Io { .. }) => format!("{len} bytes of unreadable data"),
        Err(e) => format!("damaged or incompatible vmsync metadata ({e})"),
    };
    Ok(Some(what))
}

/// Sizes the file (or checks the device is large enough), zeroes the
/// activity-log ring and writes clear, sealed bitmap pages, durably. Writing
/// rather than leaving a sparse file also reserves the space, so a full
/// filesystem cannot fail a bitmap flush later.
fn prepare_space(file: &MetaFile, layout: &Layout) -> Result<(), MetaError> {
    let len = layout.file_len();
    if file.is_regular_file()? {
        file.set_len(len)?;
    } else if file.len()? < len {
        return Err(MetaError::InvalidParams(format!(
            "{} holds {} bytes, the metadata needs {len}",
            file.path().display(),
            file.len()?
        )));
    }
    let zeroes = vec![0u8; ZERO_CHUNK];
    let mut offset = layout.al_sector_offset(0);
    let ring_end = layout.bitmap_offset(0);
    while offset < ring_end {
        let chunk = (ring_end - offset).min(ZERO_CHUNK as u64) as usize;
        file.write_at(&zeroes[..chunk], offset, "zero metadata")?;
        offset += chunk as u64;
    }
    node_bitmaps::write_clear(file, layout)?;
    file.sync("sync zeroed metadata")
}
