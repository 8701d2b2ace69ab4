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
//! Every page carries a checksum (see [`Layout`]). A page whose checksum
//! fails at open (a torn page write, a bad sector, garbage written over it)
//! reads as **all stale**: every bit of that page is set, a warning names the
//! node, the page and its blocks, and the page is marked dirty so the next
//! flush rewrites it sealed. Setting bits never loses data, it only causes
//! resync (or fetches) of blocks that may have been current; clearing them
//! could silently serve or keep stale data. So a torn page costs a resync of
//! at most `BITMAP_BITS_PER_PAGE` blocks and never correctness. (Before
//! checksums a torn page was argued harmless because each bit is independent;
//! that still holds for a tear that keeps each bit's old or new value, but a
//! checksum also catches the tears and corruptions that do not.)

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use super::bitmap::Bitmap;
use super::codec::{is_sealed_bitmap_page, seal_bitmap_page, Sector, SEALED_PAYLOAD_LEN};
use super::file::MetaFile;
use super::layout::{Layout, BITMAP_BITS_PER_PAGE, SECTOR_SIZE};
use super::MetaError;

/// Writes every node's bitmap as all-clear, sealed pages (for `create`),
/// without syncing. Zero bytes would not do: an all-zero page fails its
/// checksum and would read as all stale.
pub(crate) fn write_clear(file: &MetaFile, layout: &Layout) -> Result<(), MetaError> {
    // Up to 256 pages (1 MiB) per write.
    const PAGES_PER_WRITE: u64 = 256;
    let pages = layout.bitmap_pages();
    let mut chunk = vec![0u8; (PAGES_PER_WRITE.min(pages) as usize) * SECTOR_SIZE];
    for node in 0..layout.node_slots() {
        let mut first = 0;
        while first < pages {
            let count = PAGES_PER_WRITE.min(pages - first);
            let bytes = &mut chunk[..count as usize * SECTOR_SIZE];
            for (page, sector) in (first..).zip(bytes.chunks_exact_mut(SECTOR_SIZE)) {
                let sector: &mut Sector = sector.try_into().expect("chunks of SECTOR_SIZE");
                sector[..SEALED_PAYLOAD_LEN].fill(0);
                seal_bitmap_page(sector, node, page);
            }
            let offset = layout.bitmap_offset(node) + first * SECTOR_SIZE as u64;
            file.write_at(bytes, offset, "write clear bitmaps")?;
            first += count;
        }
    }
    Ok(())
}

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
    /// Reads every node's bitmap region. A page that fails its checksum
    /// reads as all stale (see the module docs); this writes nothing, the
    /// page is only marked dirty for the next flush. Also returns the
    /// `(node, page)` of every such page.
    pub(crate) fn load(
        file: Arc<MetaFile>,
        layout: Layout,
    ) -> Result<(NodeBitmaps, Vec<(u32, u64)>), MetaError> {
        let mut damaged = Vec::new();
        let pages = layout.bitmap_pages() as usize;
        let mut region = vec![0u8; layout.bitmap_region_len() as usize];
        // The bits alone, page payloads back to back: the format
        // `Bitmap::from_le_bytes` takes.
        let mut bits = vec![0u8; pages * SEALED_PAYLOAD_LEN];
        let bitmaps = (0..layout.node_slots())
            .map(|node| {
                file.read_at(&mut region, layout.bitmap_offset(node), "read bitmap")?;
                let mut bad_pages = Vec::new();
                for (page, (sector, out)) in region
                    .chunks_exact(SECTOR_SIZE)
                    .zip(bits.chunks_exact_mut(SEALED_PAYLOAD_LEN))
                    .enumerate()
                {
                    let sector: &Sector = sector.try_into().expect("chunks of SECTOR_SIZE");
                    if is_sealed_bitmap_page(sector, node, page as u64) {
                        out.copy_from_slice(&sector[..SEALED_PAYLOAD_LEN]);
                    } else {
                        out.fill(0xff);
                        bad_pages.push(page);
                    }
                }
                let bitmap = Bitmap::from_le_bytes(layout.blocks(), layout.block_size(), &bits);
                for page in bad_pages {
                    let first = page as u64 * BITMAP_BITS_PER_PAGE;
                    let end = (first + BITMAP_BITS_PER_PAGE).min(layout.blocks());
                    tracing::warn!(
                        metadata = %file.path().display(),
                        node,
                        page,
                        blocks = ?(first..end),
                        "bitmap page fails its checksum (torn write or corruption): \
                         treating all its blocks as stale for this node"
                    );
                    bitmap.mark_page_dirty(page);
                    damaged.push((node, page as u64));
                }
                Ok(Arc::new(bitmap))
            })
            .collect::<Result<_, MetaError>>()?;
        let bitmaps = NodeBitmaps {
            file,
            layout,
            bitmaps,
            flush_lock: Mutex::new(()),
        };
        Ok((bitmaps, damaged))
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
        let mut buf: Sector = [0u8; SECTOR_SIZE];
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
                    seal_bitmap_page(&mut buf, node, page as u64);
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
