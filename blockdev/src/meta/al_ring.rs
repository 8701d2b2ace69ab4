//! The on-disk ring of activity-log transactions.
//!
//! Every transaction is one sealed sector that carries the FULL list of
//! active extents, so the newest valid transaction alone defines the activity
//! log: no replay, no partial updates to reason about. Transaction `seq` goes
//! to ring sector `seq % ring_sectors`, so writing one never overwrites the
//! newest valid one; if the write tears, its checksum fails and the scan at
//! open time falls back to the previous transaction — which is still correct,
//! because the write that needed the torn transaction never started.
//!
//! ```text
//! off  len      field
//!   0    4      magic "VMAL"
//!   4    4      number of extents n (<= al_slots)
//!   8    8      seq (>= 1, increasing)
//!  16    4 * n  extent numbers (u32), least recently used first
//!   ...         zero
//! 4064  32      BLAKE3 of bytes 0..4064
//! ```

use std::collections::HashSet;

use super::codec::{is_sealed, seal, LeReader, LeWriter, Sector, SEALED_PAYLOAD_LEN};
use super::file::MetaFile;
use super::layout::{Layout, SECTOR_SIZE};
use super::MetaError;

const MAGIC: [u8; 4] = *b"VMAL";
const HEADER_LEN: usize = 16;
const EXTENT_LEN: usize = 4;
/// Most extents one transaction sector can list: the upper bound of the
/// activity log's size (1012 × 4 MiB ≈ 4 GiB of hot set).
pub const MAX_AL_SLOTS: u32 = ((SEALED_PAYLOAD_LEN - HEADER_LEN) / EXTENT_LEN) as u32;

/// One activity-log transaction: the complete set of active extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AlTransaction {
    pub(crate) seq: u64,
    /// Least recently used first, so reopening restores the eviction order.
    pub(crate) extents: Vec<u64>,
}

impl AlTransaction {
    fn ring_index(seq: u64, layout: &Layout) -> u32 {
        (seq % u64::from(layout.al_ring_sectors())) as u32
    }

    fn encode(&self) -> Sector {
        let mut sector = [0u8; SECTOR_SIZE];
        let count = u32::try_from(self.extents.len()).expect("at most al_slots extents");
        let mut w = LeWriter::new(&mut sector);
        w.bytes(&MAGIC).u32(count).u64(self.seq);
        for &extent in &self.extents {
            w.u32(u32::try_from(extent).expect("layout bounds extent numbers to u32"));
        }
        seal(&mut sector);
        sector
    }

    /// The transaction in ring sector `index`, if it is a valid one for this
    /// layout; `None` for empty, torn, misplaced or foreign sectors.
    fn decode(sector: &Sector, index: u32, layout: &Layout) -> Option<AlTransaction> {
        if sector[..MAGIC.len()] != MAGIC || !is_sealed(sector) {
            return None;
        }
        let mut r = LeReader::new(&sector[MAGIC.len()..SEALED_PAYLOAD_LEN]);
        let count = r.u32().ok()?;
        let seq = r.u64().ok()?;
        if seq == 0 || Self::ring_index(seq, layout) != index || count > layout.al_slots() {
            return None;
        }
        let mut seen = HashSet::new();
        let extents = (0..count)
            .map(|_| {
                let extent = u64::from(r.u32().ok()?);
                (extent < layout.extents() && seen.insert(extent)).then_some(extent)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(AlTransaction { seq, extents })
    }
}

/// The newest valid transaction in the ring, if any.
pub(crate) fn read_newest(
    file: &MetaFile,
    layout: &Layout,
) -> Result<Option<AlTransaction>, MetaError> {
    let mut ring = vec![0u8; layout.al_ring_sectors() as usize * SECTOR_SIZE];
    file.read_at(&mut ring, layout.al_sector_offset(0), "read activity log")?;
    Ok((0..)
        .zip(ring.chunks_exact(SECTOR_SIZE))
        .filter_map(|(index, sector)| AlTransaction::decode(sector.try_into().ok()?, index, layout))
        .max_by_key(|txn| txn.seq))
}

/// Writes `txn` to its ring sector and makes it durable.
pub(crate) fn write(
    file: &MetaFile,
    layout: &Layout,
    txn: &AlTransaction,
) -> Result<(), MetaError> {
    let offset = layout.al_sector_offset(AlTransaction::ring_index(txn.seq, layout));
    file.write_at(&txn.encode(), offset, "write activity log")?;
    file.sync("sync activity log")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::layout::{Geometry, DEFAULT_BLOCK_SIZE};

    fn layout() -> Layout {
        Layout::new(Geometry {
            device_size: 1 << 30,
            block_size: DEFAULT_BLOCK_SIZE,
            node_slots: 2,
            al_slots: 4,
            al_ring_sectors: 8,
        })
        .unwrap()
    }

    #[test]
    fn max_slots_fill_the_sector() {
        assert_eq!(MAX_AL_SLOTS, 1012);
        let layout = Layout::new(Geometry {
            al_slots: MAX_AL_SLOTS,
            ..layout().geometry()
        })
        .unwrap();
        let txn = AlTransaction {
            seq: 9,
            extents: (0..u64::from(MAX_AL_SLOTS)).map(|e| e % 256).collect(),
        };
        // 256 extents in a 1 GiB device: duplicates make it invalid...
        assert_eq!(AlTransaction::decode(&txn.encode(), 1, &layout), None);
        let txn = AlTransaction {
            seq: 9,
            extents: (0..256).collect(),
        };
        assert_eq!(AlTransaction::decode(&txn.encode(), 1, &layout), Some(txn));
    }

    #[test]
    fn decode_rejects_what_it_must() {
        let layout = layout();
        let txn = AlTransaction {
            seq: 11,
            extents: vec![3, 1, 200],
        };
        let sector = txn.encode();
        assert_eq!(
            AlTransaction::decode(&sector, 3, &layout),
            Some(txn.clone())
        );
        // Misplaced in the ring.
        assert_eq!(AlTransaction::decode(&sector, 4, &layout), None);
        // Torn.
        let mut torn = sector;
        torn[20] ^= 1;
        assert_eq!(AlTransaction::decode(&torn, 3, &layout), None);
        // Empty.
        assert_eq!(AlTransaction::decode(&[0; SECTOR_SIZE], 0, &layout), None);
        // Extent past the device, too many extents.
        for extents in [vec![256], vec![0, 1, 2, 3, 4]] {
            let bad = AlTransaction { seq: 11, extents };
            assert_eq!(AlTransaction::decode(&bad.encode(), 3, &layout), None);
        }
    }
}
