//! On-disk metadata of a replica: superblock, staleness bitmaps, activity log.
//!
//! The metadata lives in its own file (`[node] metadata` in the
//! configuration), laid out as described in [`Layout`]:
//! `[superblock][activity-log ring][bitmap node 0][bitmap node 1]...`.
//!
//! * [`Superblock`]: identity (resource, node id), geometry, term, data
//!   generation ids and the clean flag; checksummed, versioned, explicit
//!   little-endian encoding.
//! * [`Bitmap`]: lock-free staleness bitmap, one per node slot, with a
//!   compact network encoding ([`Bitmap::encode`]/[`Bitmap::decode`]).
//!   [`NodeBitmaps`] persists their dirty pages lazily.
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
pub use layout::{
    Geometry, Layout, DEFAULT_AL_RING_SECTORS, DEFAULT_AL_SLOTS, DEFAULT_BLOCK_SIZE, EXTENT_SIZE,
    MAX_AL_RING_SECTORS, MAX_NODE_SLOTS, MIN_AL_RING_SECTORS, MIN_BLOCK_SIZE,
};
pub use node_bitmaps::NodeBitmaps;
pub use superblock::{GenerationIds, Superblock, FORMAT_VERSION, MAX_RESOURCE_NAME_LEN};

use codec::Sector;
use file::MetaFile;
use layout::SECTOR_SIZE;
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
}

/// An open, locked metadata file.
///
/// Shared by the whole node through an `Arc`: superblock updates serialise
/// on an internal lock; the bitmaps and the activity log are lock-free or
/// locked on their own.
#[derive(Debug)]
pub struct Metadata {
    file: Arc<MetaFile>,
    superblock: Mutex<Superblock>,
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
                // over new bitmaps.
                file.write_at(&[0; SECTOR_SIZE], 0, "invalidate old superblock")?;
                file.sync("invalidate old superblock")?;
            }
        }
        prepare_space(&file, layout.file_len())?;
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
        };
        write_superblock(&file, &superblock)?;
        if created {
            file.sync_parent_dir()?;
        }
        Ok(())
    }

    /// Opens the metadata at `path` for the node and resource of `expect`.
    ///
    /// Every check (magic, version, checksum, resource, size, node id, block
    /// size, file length) happens before the first write; a failure leaves
    /// the file untouched. Then, if the previous run crashed, the activity-log
    /// extents are marked stale for every other node and persisted, and the
    /// superblock is marked in use (unclean).
    pub fn open(path: impl AsRef<Path>, expect: &Expect) -> Result<Metadata, MetaError> {
        let path = path.as_ref();
        let file = Arc::new(MetaFile::open(path)?);
        let mut superblock = read_superblock(&file)?;
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
        let bitmaps = Arc::new(NodeBitmaps::load(Arc::clone(&file), layout)?);
        let activity_log = Arc::new(ActivityLog::load(
            Arc::clone(&file),
            layout,
            Arc::clone(&bitmaps),
        )?);

        // All checks passed: from here on, writing is allowed.
        let recovery = Recovery {
            was_unclean: !superblock.clean,
            al_extents: activity_log.active_extents(),
        };
        superblock.clean = false;
        write_superblock(&file, &superblock)?;
        Ok(Metadata {
            file,
            superblock: Mutex::new(superblock),
            bitmaps,
            activity_log,
            recovery,
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    fn lock_superblock(&self) -> std::sync::MutexGuard<'_, Superblock> {
        self.superblock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the superblock as last persisted.
    pub fn superblock(&self) -> Superblock {
        self.lock_superblock().clone()
    }

    pub fn layout(&self) -> Layout {
        self.lock_superblock().layout
    }

    pub fn resource(&self) -> String {
        self.lock_superblock().resource.clone()
    }

    pub fn node_id(&self) -> u32 {
        self.lock_superblock().node_id
    }

    pub fn term(&self) -> u64 {
        self.lock_superblock().term
    }

    pub fn generations(&self) -> GenerationIds {
        self.lock_superblock().generations
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

    /// Durably records new data generation ids.
    pub fn set_generations(&self, generations: GenerationIds) -> Result<(), MetaError> {
        self.update_superblock(|sb| sb.generations = generations)
    }

    /// Durably records a promotion: a newer term and a new generation, in
    /// one superblock write.
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
        if term == current && generations.is_none() {
            return Ok(());
        }
        self.update_superblock(|sb| {
            sb.term = term;
            if let Some(g) = generations {
                sb.generations = g;
            }
        })
    }

    /// Durably records the term of the primary whose writes this replica
    /// takes from now on (equal: no-op).
    pub fn set_data_term(&self, term: u64) -> Result<(), MetaError> {
        if self.lock_superblock().data_term == term {
            return Ok(());
        }
        self.update_superblock(|sb| sb.data_term = term)
    }

    /// Durably records whether a resync into this replica is unfinished.
    pub fn set_inconsistent(&self, inconsistent: bool) -> Result<(), MetaError> {
        if self.lock_superblock().inconsistent == inconsistent {
            return Ok(());
        }
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

    /// Writes a modified copy and adopts it only once it is durable.
    fn update_superblock(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut superblock = self.lock_superblock();
        let mut updated = superblock.clone();
        change(&mut updated);
        write_superblock(&self.file, &updated)?;
        *superblock = updated;
        Ok(())
    }
}

fn write_superblock(file: &MetaFile, superblock: &Superblock) -> Result<(), MetaError> {
    file.write_at(&superblock.encode(), 0, "write superblock")?;
    file.sync("sync superblock")
}

fn read_superblock(file: &MetaFile) -> Result<Superblock, MetaError> {
    let path = file.path().to_owned();
    if file.len()? < SECTOR_SIZE as u64 {
        return Err(MetaError::BadMagic { path });
    }
    let mut sector: Sector = [0; SECTOR_SIZE];
    file.read_at(&mut sector, 0, "read superblock")?;
    Superblock::decode(&sector).map_err(|e| match e {
        SuperblockError::BadMagic => MetaError::BadMagic { path },
        SuperblockError::BadChecksum => MetaError::BadChecksum { path },
        SuperblockError::UnsupportedVersion(found) => MetaError::UnsupportedVersion {
            path,
            found,
            supported: FORMAT_VERSION,
        },
        SuperblockError::Corrupt(reason) => MetaError::Corrupt { path, reason },
    })
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
        Ok(sb) => format!("vmsync metadata ({sb})"),
        Err(MetaError::BadMagic { .. }) => format!("{len} bytes of other data"),
        Err(MetaError::Io { .. }) => format!("{len} bytes of unreadable data"),
        Err(e) => format!("damaged or incompatible vmsync metadata ({e})"),
    };
    Ok(Some(what))
}

/// Sizes the file (or checks the device is large enough) and zeroes
/// everything after the superblock, durably. Writing zeroes rather than
/// leaving a sparse file also reserves the space, so a full filesystem
/// cannot fail a bitmap flush later.
fn prepare_space(file: &MetaFile, len: u64) -> Result<(), MetaError> {
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
    let mut offset = SECTOR_SIZE as u64;
    while offset < len {
        let chunk = (len - offset).min(ZERO_CHUNK as u64) as usize;
        file.write_at(&zeroes[..chunk], offset, "zero metadata")?;
        offset += chunk as u64;
    }
    file.sync("sync zeroed metadata")
}
