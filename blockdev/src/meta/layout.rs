//! Geometry of a replica and where each piece of metadata lives in the file.

use std::ops::Range;

use super::al_ring::MAX_AL_SLOTS;
use super::codec::SEALED_PAYLOAD_LEN;

/// Size of the superblock, of one activity-log transaction and of one bitmap
/// page: the unit of every metadata write.
pub const SECTOR_SIZE: usize = 4096;
/// Size of an activity-log extent: the unit of "hot" tracking and of the
/// region that is resynced to peers after a crash.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Default tracking granularity: one staleness bit per 4 KiB block, matching
/// the guest's usual page and filesystem block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest block size: one disk sector.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Most node slots (and so bitmaps) a replica can track; node ids range over
/// `0..node_slots`.
pub const MAX_NODE_SLOTS: u32 = 32;
/// Default number of extents in the activity log: 127 × 4 MiB = 508 MiB of
/// hot set. After a crash of the primary that much is resynced to every peer,
/// which takes about five seconds on a gigabit LAN, while a typical guest's
/// working set fits, so few writes pay for an activity-log transaction.
pub const DEFAULT_AL_SLOTS: u32 = 127;
/// Default number of transaction sectors in the activity-log ring. More than
/// two only spreads wear; two already guarantee that writing a transaction
/// never overwrites the newest valid one.
pub const DEFAULT_AL_RING_SECTORS: u32 = 64;
/// See [`DEFAULT_AL_RING_SECTORS`].
pub const MIN_AL_RING_SECTORS: u32 = 2;
/// Upper bound on the ring, to keep the scan at open time small.
pub const MAX_AL_RING_SECTORS: u32 = 1024;

/// Staleness bits stored in one bitmap page: a page is a sealed sector, so
/// its last 32 bytes are a checksum and 4064 bytes (508 words) hold bits.
pub(crate) const BITMAP_BITS_PER_PAGE: u64 = SEALED_PAYLOAD_LEN as u64 * 8;
/// Number of superblock copies at the start of the file.
pub(crate) const SUPERBLOCK_COPIES: u32 = 2;
const SECTOR: u64 = SECTOR_SIZE as u64;

/// File offset of superblock copy `copy` (0 or 1). Independent of the
/// geometry, which is only known once a superblock has been read.
pub(crate) fn superblock_offset(copy: u32) -> u64 {
    SECTOR * u64::from(copy)
}

/// The parameters that fix the metadata file's layout (unvalidated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the replicated device in bytes; a multiple of `block_size`.
    pub device_size: u64,
    /// Bytes covered by one staleness bit; a power of two.
    pub block_size: u32,
    /// Number of bitmaps, i.e. the highest node id + 1.
    pub node_slots: u32,
    /// Number of extents the activity log holds at once.
    pub al_slots: u32,
    /// Number of transaction sectors in the activity-log ring.
    pub al_ring_sectors: u32,
}

/// A validated [`Geometry`] with the derived sizes and file offsets
/// (format version 3):
///
/// ```text
/// offset 0                      superblock copy 0           1 sector
/// SECTOR_SIZE                   superblock copy 1           1 sector
/// 2 * SECTOR_SIZE               activity-log ring           al_ring_sectors sectors
/// bitmap_offset(0)              staleness bitmap, node 0    bitmap_region_len()
/// bitmap_offset(1)              staleness bitmap, node 1    bitmap_region_len()
/// ...                           ... up to node_slots - 1
/// ```
///
/// A sector is 4 KiB. Every region starts on a 4 KiB boundary so that each
/// sector or bitmap page is written with one aligned write, which storage
/// performs atomically in practice. When it does not, every kind of sector
/// detects the tear with its checksum: the two superblock copies are written
/// alternately, so a torn one leaves the other (see `superblock`); the
/// activity-log ring falls back to the previous transaction (see `al_ring`);
/// a bitmap page that fails its checksum reads as all stale (see
/// [`NodeBitmaps`](super::NodeBitmaps)).
///
/// A bitmap page holds 32512 bits as 508 little-endian u64 words (bytes
/// 0..4064; bit `b` of the bitmap is bit `b % 64` of word `b / 64`), then a
/// 32-byte BLAKE3 checksum of those words, keyed by the node id and the page
/// number so that a page written to the wrong place does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    geometry: Geometry,
    bitmap_region_len: u64,
    file_len: u64,
}

impl Layout {
    /// Validates `geometry`; the error is a human-readable reason.
    pub fn new(geometry: Geometry) -> Result<Layout, String> {
        let Geometry {
            device_size,
            block_size,
            node_slots,
            al_slots,
            al_ring_sectors,
        } = geometry;
        if !block_size.is_power_of_two()
            || block_size < MIN_BLOCK_SIZE
            || u64::from(block_size) > EXTENT_SIZE
        {
            return Err(format!(
                "block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and {EXTENT_SIZE}"
            ));
        }
        // `block_size` is a power of two from here on.
        if device_size == 0 || device_size & (u64::from(block_size) - 1) != 0 {
            return Err(format!(
                "device size {device_size} is not a positive multiple of the block size {block_size}"
            ));
        }
        // Extent numbers are stored as u32 in activity-log transactions.
        if device_size.div_ceil(EXTENT_SIZE) > u64::from(u32::MAX) + 1 {
            return Err(format!("device size {device_size} is too large"));
        }
        if !(1..=MAX_NODE_SLOTS).contains(&node_slots) {
            return Err(format!(
                "node slots {node_slots} is not between 1 and {MAX_NODE_SLOTS}"
            ));
        }
        if !(1..=MAX_AL_SLOTS).contains(&al_slots) {
            return Err(format!(
                "activity log slots {al_slots} is not between 1 and {MAX_AL_SLOTS}"
            ));
        }
        if !(MIN_AL_RING_SECTORS..=MAX_AL_RING_SECTORS).contains(&al_ring_sectors) {
            return Err(format!(
                "activity log ring of {al_ring_sectors} sectors is not between \
                 {MIN_AL_RING_SECTORS} and {MAX_AL_RING_SECTORS}"
            ));
        }
        let blocks = device_size / u64::from(block_size);
        let bitmap_region_len = blocks.div_ceil(BITMAP_BITS_PER_PAGE) * SECTOR;
        let file_len = u64::from(node_slots)
            .checked_mul(bitmap_region_len)
            .and_then(|bitmaps| bitmaps.checked_add(Self::bitmaps_start(al_ring_sectors)))
            .ok_or_else(|| format!("device size {device_size} is too large"))?;
        Ok(Layout {
            geometry,
            bitmap_region_len,
            file_len,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn device_size(&self) -> u64 {
        self.geometry.device_size
    }

    pub fn block_size(&self) -> u32 {
        self.geometry.block_size
    }

    pub fn node_slots(&self) -> u32 {
        self.geometry.node_slots
    }

    pub fn al_slots(&self) -> u32 {
        self.geometry.al_slots
    }

    pub fn al_ring_sectors(&self) -> u32 {
        self.geometry.al_ring_sectors
    }

    /// Number of blocks, i.e. bits per staleness bitmap.
    pub fn blocks(&self) -> u64 {
        self.geometry.device_size / u64::from(self.geometry.block_size)
    }

    pub fn blocks_per_extent(&self) -> u64 {
        EXTENT_SIZE / u64::from(self.geometry.block_size)
    }

    /// Number of extents; the last one may be partial.
    pub fn extents(&self) -> u64 {
        self.geometry.device_size.div_ceil(EXTENT_SIZE)
    }

    /// The blocks of `extent`, clipped to the device.
    pub fn extent_blocks(&self, extent: u64) -> Range<u64> {
        let per = self.blocks_per_extent();
        let start = extent.saturating_mul(per).min(self.blocks());
        start..start.saturating_add(per).min(self.blocks())
    }

    /// The extents touched by the byte range `offset..offset + len` (empty
    /// when `len` is 0). Not clipped: callers check it against
    /// [`extents`](Self::extents).
    pub fn extents_covering(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / EXTENT_SIZE;
        let end = offset.saturating_add(len).div_ceil(EXTENT_SIZE);
        first..end
    }

    /// File offset of activity-log transaction sector `index`.
    pub(crate) fn al_sector_offset(&self, index: u32) -> u64 {
        SECTOR * (u64::from(SUPERBLOCK_COPIES) + u64::from(index))
    }

    /// Where the first bitmap starts: after the superblocks and the ring.
    fn bitmaps_start(al_ring_sectors: u32) -> u64 {
        SECTOR * (u64::from(SUPERBLOCK_COPIES) + u64::from(al_ring_sectors))
    }

    /// File offset of node `node`'s staleness bitmap.
    pub(crate) fn bitmap_offset(&self, node: u32) -> u64 {
        Self::bitmaps_start(self.geometry.al_ring_sectors)
            + u64::from(node) * self.bitmap_region_len
    }

    /// Number of pages in each node's bitmap.
    pub(crate) fn bitmap_pages(&self) -> u64 {
        self.bitmap_region_len / SECTOR
    }

    /// Bytes reserved for each node's bitmap: whole 4 KiB pages.
    pub fn bitmap_region_len(&self) -> u64 {
        self.bitmap_region_len
    }

    /// Total size of the metadata file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(device_size: u64) -> Geometry {
        Geometry {
            device_size,
            block_size: DEFAULT_BLOCK_SIZE,
            node_slots: 3,
            al_slots: DEFAULT_AL_SLOTS,
            al_ring_sectors: DEFAULT_AL_RING_SECTORS,
        }
    }

    #[test]
    fn offsets_follow_the_documented_layout() {
        let layout = Layout::new(geometry(1 << 30)).unwrap();
        assert_eq!(layout.blocks(), 262_144);
        // 262144 bits in pages of 32512: 9 pages, 36 KiB per GiB per node.
        assert_eq!(layout.bitmap_region_len(), 36 << 10);
        assert_eq!(layout.bitmap_pages(), 9);
        assert_eq!(superblock_offset(0), 0);
        assert_eq!(superblock_offset(1), 4096);
        assert_eq!(layout.al_sector_offset(0), 2 * 4096);
        assert_eq!(layout.al_sector_offset(63), 65 * 4096);
        assert_eq!(layout.bitmap_offset(0), 4096 * 66);
        assert_eq!(layout.bitmap_offset(2), 4096 * 66 + 2 * (36 << 10));
        assert_eq!(layout.file_len(), 4096 * 66 + 3 * (36 << 10));
        assert_eq!(layout.extents(), 256);
        assert_eq!(layout.blocks_per_extent(), 1024);
    }

    #[test]
    fn partial_last_extent_and_page() {
        let layout = Layout::new(geometry(5 << 20)).unwrap();
        assert_eq!(layout.extents(), 2);
        assert_eq!(layout.extent_blocks(1), 1024..1280);
        assert_eq!(layout.extent_blocks(7), 1280..1280);
        assert_eq!(layout.bitmap_region_len(), 4096);
    }

    #[test]
    fn extents_covering_rounds_outward() {
        let layout = Layout::new(geometry(64 << 20)).unwrap();
        assert_eq!(layout.extents_covering(0, 0), 0..0);
        assert_eq!(layout.extents_covering(0, 1), 0..1);
        assert_eq!(layout.extents_covering(EXTENT_SIZE - 1, 2), 0..2);
        assert_eq!(layout.extents_covering(EXTENT_SIZE, EXTENT_SIZE), 1..2);
    }

    #[test]
    fn rejects_bad_geometry() {
        let ok = geometry(1 << 30);
        for bad in [
            Geometry {
                block_size: 1000,
                ..ok
            },
            Geometry {
                block_size: 256,
                ..ok
            },
            Geometry {
                device_size: 0,
                ..ok
            },
            Geometry {
                device_size: 4097,
                ..ok
            },
            Geometry {
                device_size: u64::MAX - 4095,
                ..ok
            },
            Geometry {
                node_slots: 0,
                ..ok
            },
            Geometry {
                node_slots: MAX_NODE_SLOTS + 1,
                ..ok
            },
            Geometry { al_slots: 0, ..ok },
            Geometry {
                al_slots: MAX_AL_SLOTS + 1,
                ..ok
            },
            Geometry {
                al_ring_sectors: 1,
                ..ok
            },
        ] {
            assert!(Layout::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
