//! The superblock: identity, geometry and state of one replica's metadata.
//!
//! Sectors 0 and 1 of the metadata file hold two copies, each sealed with a
//! BLAKE3 checksum (see `codec`). Fields are little-endian at fixed offsets,
//! so the format does not depend on any serialization library and can be read
//! by future versions:
//!
//! ```text
//! off  len  field
//!   0    8  magic "VMSYNCMD"
//!   8    4  format version (3)
//!  12    4  flags: bit 0 = clean (no writer had the metadata open),
//!           bit 1 = inconsistent (a resync into this replica is unfinished),
//!           bit 2 = unwritten (this node started the current generation
//!           and nothing has been written in it yet)
//!  16    8  device size in bytes
//!  24    4  block size in bytes
//!  28    4  this node's id
//!  32    4  node slots
//!  36    4  activity-log slots
//!  40    4  activity-log ring sectors
//!  44    8  term
//!  52    8  generation: current
//!  60    8  generation: bitmap
//!  68    8  generation: history[0]
//!  76    8  generation: history[1]
//!  84    8  data term (term of the primary whose writes this replica
//!           last took; 0: none or unknown)
//!  92    8  sequence number of this copy (>= 1; +1 on every update)
//! 100    2  resource name length n
//! 102    n  resource name, UTF-8
//!   ...     zero
//! 4064  32  BLAKE3 of bytes 0..4064
//! ```
//!
//! # Two copies
//!
//! An update never overwrites the newest valid copy: it writes the OTHER
//! copy with the sequence number + 1 and `fdatasync`s before the change is
//! adopted (so updates alternate between the copies). At open, the valid
//! copy (magic, version, checksum and fields all correct) with the highest
//! sequence number wins; if both are valid they must describe the same
//! replica (resource, node id, geometry), or open refuses. A write torn by a
//! crash or power loss therefore leaves the previous state in the other copy,
//! which is exactly the state before the interrupted update — and that update
//! had not been reported durable to anyone, so falling back to it is correct.
//! Only when both copies are unreadable does open refuse (nothing is trusted;
//! the operator decides). Version 2 had a single superblock and is refused.

use std::fmt;

use super::codec::{is_sealed, seal, LeReader, LeWriter, Sector, ShortBuffer, SEALED_PAYLOAD_LEN};
use super::layout::{Geometry, Layout, SECTOR_SIZE};

/// First bytes of every vmsync metadata file.
pub const MAGIC: [u8; 8] = *b"VMSYNCMD";
/// The on-disk format this code reads and writes.
/// Version 3: two superblock copies with sequence numbers, checksummed
/// bitmap pages.
pub const FORMAT_VERSION: u32 = 3;
/// Longest resource name, in bytes.
pub const MAX_RESOURCE_NAME_LEN: usize = 255;

const FLAG_CLEAN: u32 = 1 << 0;
const FLAG_INCONSISTENT: u32 = 1 << 1;
const FLAG_UNWRITTEN: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_CLEAN | FLAG_INCONSISTENT | FLAG_UNWRITTEN;

/// DRBD-style data generation identifiers.
///
/// `current` names the data this node holds; it changes whenever the data
/// starts to diverge from what peers may have (a new primary term writing
/// while a peer is away). `bitmap` remembers the generation at which the
/// staleness bitmaps started tracking differences, and `history` the ones
/// before. Two nodes comparing these can tell "same data", "one is behind by
/// the bitmap" and "diverged" apart. 0 means "none". This module only stores
/// them; the replication layer owns their rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenerationIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl GenerationIds {
    /// A new generation id for node `node` as primary of `term`: the term
    /// in the high 32 bits, the node id in the next 8, 24 random bits below
    /// (never all 0: id 0 means "none"). Term and node tell whether a
    /// generation was started by the current primary (two nodes promoted
    /// to the same term while cut off from each other differ by node).
    pub fn new_id(term: u64, node: u32) -> u64 {
        let random = rand::random::<u32>() & 0xff_ffff;
        (term << 32) | (u64::from(node & 0xff) << 24) | u64::from(random.max(1))
    }

    /// The (term, node) of the primary that started generation `id`.
    pub fn origin_of(id: u64) -> (u64, u32) {
        (id >> 32, ((id >> 24) & 0xff) as u32)
    }
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Name of the replicated resource; must match the configuration.
    pub resource: String,
    /// This node's id; its own bitmap is `node_id`'s.
    pub node_id: u32,
    /// Device size, block size, node slots and activity-log geometry.
    pub layout: Layout,
    /// Highest promotion term this node has seen; fences stale primaries.
    pub term: u64,
    pub generations: GenerationIds,
    /// Term of the primary whose writes this replica last took (its own
    /// when it was primary); 0 when unknown. Tells a secondary whether the
    /// primary it meets is the one it followed (see the activity log).
    pub data_term: u64,
    /// False while a process has the metadata open for writing: a superblock
    /// found unclean at open time means that process crashed.
    pub clean: bool,
    /// A resync into this replica started and has not finished: its data
    /// is a mix of old and new and must not be served or promoted.
    pub inconsistent: bool,
    /// This node started the current generation (a promotion) and no write
    /// has been made in it since: its data is its parent generation's. What
    /// `after_split_brain = "discard-zero-changes"` goes by. False when in
    /// doubt (a generation taken from a peer, files of older versions).
    pub generation_unwritten: bool,
}

/// Why a sector is not an acceptable superblock; the caller adds the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SuperblockError {
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u32),
    Corrupt(String),
}

impl fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuperblockError::BadMagic => write!(f, "bad magic"),
            SuperblockError::BadChecksum => {
                write!(f, "checksum mismatch (corrupted or torn write)")
            }
            SuperblockError::UnsupportedVersion(v) => write!(f, "format version {v}"),
            SuperblockError::Corrupt(reason) => write!(f, "invalid: {reason}"),
        }
    }
}

impl From<ShortBuffer> for SuperblockError {
    fn from(_: ShortBuffer) -> Self {
        SuperblockError::Corrupt("resource name runs past the end of the superblock".into())
    }
}

impl fmt::Display for Superblock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resource '{}', node {}, {} bytes",
            self.resource,
            self.node_id,
            self.layout.device_size()
        )
    }
}

impl Superblock {
    /// Checks the fields that are not covered by [`Layout::new`].
    pub(crate) fn check_identity(
        resource: &str,
        node_id: u32,
        layout: &Layout,
    ) -> Result<(), String> {
        if resource.is_empty() || resource.len() > MAX_RESOURCE_NAME_LEN {
            return Err(format!(
                "resource name must be 1 to {MAX_RESOURCE_NAME_LEN} bytes long, got {}",
                resource.len()
            ));
        }
        if node_id >= layout.node_slots() {
            return Err(format!(
                "node id {node_id} does not fit in {} node slots",
                layout.node_slots()
            ));
        }
        Ok(())
    }

    /// Whether `other` describes the same replica: same resource, node and
    /// geometry. Two valid copies that disagree on this are not two versions
    /// of one replica's state, and neither can be trusted over the other.
    pub(crate) fn same_identity(&self, other: &Superblock) -> bool {
        self.resource == other.resource
            && self.node_id == other.node_id
            && self.layout == other.layout
    }

    /// The sealed on-disk form of a copy with sequence number `sequence`.
    pub(crate) fn encode(&self, sequence: u64) -> Sector {
        let g = self.layout.geometry();
        let flags = if self.clean { FLAG_CLEAN } else { 0 }
            | if self.inconsistent {
                FLAG_INCONSISTENT
            } else {
                0
            }
            | if self.generation_unwritten {
                FLAG_UNWRITTEN
            } else {
                0
            };
        let name_len = u16::try_from(self.resource.len()).expect("resource name length validated");
        let mut sector = [0u8; SECTOR_SIZE];
        LeWriter::new(&mut sector)
            .bytes(&MAGIC)
            .u32(FORMAT_VERSION)
            .u32(flags)
            .u64(g.device_size)
            .u32(g.block_size)
            .u32(self.node_id)
            .u32(g.node_slots)
            .u32(g.al_slots)
            .u32(g.al_ring_sectors)
            .u64(self.term)
            .u64(self.generations.current)
            .u64(self.generations.bitmap)
            .u64(self.generations.history[0])
            .u64(self.generations.history[1])
            .u64(self.data_term)
            .u64(sequence)
            .u16(name_len)
            .bytes(self.resource.as_bytes());
        seal(&mut sector);
        sector
    }

    /// Decodes and validates a sector read from disk, returning the
    /// superblock and the copy's sequence number; never panics.
    pub(crate) fn decode(sector: &Sector) -> Result<(Superblock, u64), SuperblockError> {
        if sector[..MAGIC.len()] != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        // The version sits at offset 8 in every format version, so it is
        // checked before the checksum, whose placement a future format might
        // change.
        let mut r = LeReader::new(&sector[MAGIC.len()..SEALED_PAYLOAD_LEN]);
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        if !is_sealed(sector) {
            return Err(SuperblockError::BadChecksum);
        }
        let flags = r.u32()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(SuperblockError::Corrupt(format!(
                "unknown flags {flags:#x}"
            )));
        }
        let device_size = r.u64()?;
        let block_size = r.u32()?;
        let node_id = r.u32()?;
        let geometry = Geometry {
            device_size,
            block_size,
            node_slots: r.u32()?,
            al_slots: r.u32()?,
            al_ring_sectors: r.u32()?,
        };
        let term = r.u64()?;
        let generations = GenerationIds {
            current: r.u64()?,
            bitmap: r.u64()?,
            history: [r.u64()?, r.u64()?],
        };
        let data_term = r.u64()?;
        let sequence = r.u64()?;
        if sequence == 0 {
            return Err(SuperblockError::Corrupt("sequence number 0".into()));
        }
        let name_len = usize::from(r.u16()?);
        let resource = std::str::from_utf8(r.bytes(name_len)?)
            .map_err(|_| SuperblockError::Corrupt("resource name is not UTF-8".into()))?
            .to_owned();
        let layout = Layout::new(geometry).map_err(SuperblockError::Corrupt)?;
        Self::check_identity(&resource, node_id, &layout).map_err(SuperblockError::Corrupt)?;
        let superblock = Superblock {
            resource,
            node_id,
            layout,
            term,
            generations,
            data_term,
            clean: flags & FLAG_CLEAN != 0,
            inconsistent: flags & FLAG_INCONSISTENT != 0,
            generation_unwritten: flags & FLAG_UNWRITTEN != 0,
        };
        Ok((superblock, sequence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::layout::{DEFAULT_AL_RING_SECTORS, DEFAULT_AL_SLOTS, DEFAULT_BLOCK_SIZE};

    fn sample() -> Superblock {
        Superblock {
            resource: "work-vm".into(),
            node_id: 2,
            layout: Layout::new(Geometry {
                device_size: 16 << 30,
                block_size: DEFAULT_BLOCK_SIZE,
                node_slots: 4,
                al_slots: DEFAULT_AL_SLOTS,
                al_ring_sectors: DEFAULT_AL_RING_SECTORS,
            })
            .unwrap(),
            term: 7,
            generations: GenerationIds {
                current: 1,
                bitmap: 2,
                history: [3, 4],
            },
            data_term: 6,
            clean: true,
            inconsistent: false,
            generation_unwritten: false,
        }
    }

    /// Re-seals after editing a field so the checksum is not what fails.
    fn with_patch(offset: usize, bytes: &[u8]) -> Sector {
        let mut sector = sample().encode(9);
        sector[offset..offset + bytes.len()].copy_from_slice(bytes);
        seal(&mut sector);
        sector
    }

    #[test]
    fn generation_ids_carry_their_origin_and_are_never_zero() {
        for _ in 0..1000 {
            let id = GenerationIds::new_id(7, 3);
            assert_ne!(id, 0);
            assert_eq!(GenerationIds::origin_of(id), (7, 3));
        }
        assert_eq!(
            GenerationIds::origin_of(GenerationIds::new_id(0, 0)),
            (0, 0)
        );
        assert_ne!(GenerationIds::new_id(0, 0), 0);
    }

    #[test]
    fn round_trip() {
        for clean in [true, false] {
            let sb = Superblock { clean, ..sample() };
            assert_eq!(Superblock::decode(&sb.encode(5)), Ok((sb, 5)));
        }
    }

    #[test]
    fn fields_sit_at_documented_offsets() {
        let sector = sample().encode(0x0102_0304);
        assert_eq!(&sector[..8], b"VMSYNCMD");
        assert_eq!(&sector[8..12], &3u32.to_le_bytes());
        assert_eq!(&sector[16..24], &(16u64 << 30).to_le_bytes());
        assert_eq!(&sector[44..52], &7u64.to_le_bytes());
        assert_eq!(&sector[84..92], &6u64.to_le_bytes());
        assert_eq!(&sector[92..100], &0x0102_0304u64.to_le_bytes());
        assert_eq!(&sector[100..102], &7u16.to_le_bytes());
        assert_eq!(&sector[102..109], b"work-vm");
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let mut flipped = sample().encode(1);
        flipped[100] ^= 0x40;
        assert_eq!(
            Superblock::decode(&flipped),
            Err(SuperblockError::BadChecksum)
        );
        let mut tail = sample().encode(1);
        tail[SEALED_PAYLOAD_LEN + 3] ^= 1;
        assert_eq!(Superblock::decode(&tail), Err(SuperblockError::BadChecksum));
        assert_eq!(
            Superblock::decode(&[0; SECTOR_SIZE]),
            Err(SuperblockError::BadMagic)
        );
        for old_or_new in [1u32, 2, 4] {
            assert_eq!(
                Superblock::decode(&with_patch(8, &old_or_new.to_le_bytes())),
                Err(SuperblockError::UnsupportedVersion(old_or_new))
            );
        }
        for (offset, bytes) in [
            (12, &8u32.to_le_bytes()[..]),     // unknown flag
            (24, &1000u32.to_le_bytes()[..]),  // block size
            (28, &4u32.to_le_bytes()[..]),     // node id >= slots
            (92, &0u64.to_le_bytes()[..]),     // sequence 0
            (100, &0u16.to_le_bytes()[..]),    // empty name
            (100, &5000u16.to_le_bytes()[..]), // name past the end
            (102, &[0xff][..]),                // invalid UTF-8
        ] {
            let result = Superblock::decode(&with_patch(offset, bytes));
            assert!(
                matches!(result, Err(SuperblockError::Corrupt(_))),
                "patch at {offset}: {result:?}"
            );
        }
    }
}
