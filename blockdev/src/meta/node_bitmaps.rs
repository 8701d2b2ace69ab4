//! The staleness bitmaps of all node slots and their lazy persistence.
//!
//! Bits change in memory at I/O speed; pages reach the disk only on
//! [`NodeBitmaps::flush`], or when the activity log evicts an extent. That is
//! safe because of the invariant the activity log maintains:
//!
//! > **A block's stale bit may be unpersisted only while its extent is in the
//! > persisted activity log.**
//!
//! After a crash every activity-log extent is marked stale for every peer, so
//! whatever bits were lost there are restored (conservatively); everywhere
//! else the bitmap on disk is exact. Losing a *clear* is always safe (it only
//! causes an extra resync), so clears need no such care.
//!
//! Bits changed outside the write path (merging a bitmap from the directory or
//! a peer, marking a whole region stale when a peer disconnects after its
//! writes completed) are not covered by the activity log: follow them with
//! [`flush`](NodeBitmaps::flush) if they must survive a crash.
//!
//! A torn page write is harmless: each bit is independent, so a page that is
//! part old and part new holds, for every bit, a value it really had, and the
//! bits of extents outside the activity log are the same in both versions.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use super::bitmap::Bitmap;
use super::file::MetaFile;
use super::layout::{Layout, SECTOR_SIZE};
use super::MetaError;

/// One [`Bitmap`] per node slot, backed by the metadata file.
pub struct NodeBitmaps {
    file: Arc<MetaFile>,
    layout: Layout,
    bitmaps: Vec<Arc<Bitmap>>,
    /// Held for the whole write-then-sync of a flush. Without it, a flush
    /// could skip a page because a concurrent flush already took its dirty
    /// mark but has not written it yet, and then report it durable.
    flush_lock: Mutex<()>,
}

impl NodeBitmaps {
    /// Reads every node's bitmap region.
    pub(crate) fn load(file: Arc<MetaFile>, layout: Layout) -> Result<NodeBitmaps, MetaError> {
        let mut region = vec![0u8; layout.bitmap_region_len() as usize];
        let bitmaps = (0..layout.node_slots())
            .map(|node| {
                file.read_at(&mut region, layout.bitmap_offset(node), "read bitmap")?;
                Ok(Arc::new(Bitmap::from_le_bytes(
                    layout.blocks(),
                    layout.block_size(),
                    &region,
                )))
            })
            .collect::<Result<_, MetaError>>()?;
        Ok(NodeBitmaps {
            file,
            layout,
            bitmaps,
            flush_lock: Mutex::new(()),
        })
    }

    /// Node `node`'s bitmap, or `None` if `node` is not a node slot.
    pub fn get(&self, node: u32) -> Option<&Arc<Bitmap>> {
        self.bitmaps.get(node as usize)
    }

    /// `(node id, bitmap)` for every node slot.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Bitmap)> {
        (0..).zip(self.bitmaps.iter().map(|b| &**b))
    }

    pub fn node_slots(&self) -> u32 {
        self.layout.node_slots()
    }

    /// Writes every dirty page of every bitmap, then `fdatasync`s.
    pub fn flush(&self) -> Result<(), MetaError> {
        let everything = 0..self.layout.blocks();
        self.flush_blocks(std::slice::from_ref(&everything))
    }

    /// Persists the dirty pages holding `blocks` in every node's bitmap, then
    /// `fdatasync`s: what the activity log must do before it drops extents.
    pub(crate) fn flush_blocks(&self, blocks: &[Range<u64>]) -> Result<(), MetaError> {
        let _serialized = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut written = Vec::new();
        let mut buf = [0u8; SECTOR_SIZE];
        let result = (|| {
            for (node, bitmap) in self.iter() {
                let pages = blocks
                    .iter()
                    .flat_map(|range| bitmap.pages_for_blocks(range.clone()));
                for page in pages {
                    // Take the mark before reading the words (see `bitmap`).
                    if !bitmap.take_dirty(page) {
                        continue;
                    }
                    written.push((node, page));
                    bitmap.encode_page(page, &mut buf);
                    let offset = self.layout.bitmap_offset(node) + (page * SECTOR_SIZE) as u64;
                    self.file.write_at(&buf, offset, "write bitmap page")?;
                }
            }
            if written.is_empty() {
                return Ok(());
            }
            self.file.sync("sync bitmap pages")
        })();
        if result.is_err() {
            // Not known to be durable: keep them for the next attempt.
            for &(node, page) in &written {
                self.bitmaps[node as usize].mark_page_dirty(page);
            }
        }
        result
    }

    /// Total number of pages not yet persisted, over all nodes.
    pub fn dirty_page_count(&self) -> u64 {
        self.bitmaps.iter().map(|b| b.dirty_page_count()).sum()
    }
}

impl std::fmt::Debug for NodeBitmaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.bitmaps.iter()).finish()
    }
}
