//! Little-endian field reader/writer and checksummed ("sealed") sectors.
//!
//! The superblock and the activity-log transactions are both one 4 KiB sector
//! whose last [`CHECKSUM_LEN`] bytes are the BLAKE3 hash of everything before
//! them. Hashing the whole payload, padding included, means any flipped byte
//! anywhere in the sector is detected, and a torn write (part old, part new)
//! is rejected rather than half-trusted. Bitmap pages are sealed the same
//! way, with a checksum that also covers their node and page number
//! ([`seal_bitmap_page`]).

use super::layout::SECTOR_SIZE;

/// Bytes of BLAKE3 output stored at the end of every sealed sector.
pub(crate) const CHECKSUM_LEN: usize = 32;
/// Bytes of a sealed sector available for fields.
pub(crate) const SEALED_PAYLOAD_LEN: usize = SECTOR_SIZE - CHECKSUM_LEN;

/// One metadata sector.
pub(crate) type Sector = [u8; SECTOR_SIZE];

/// Writes the checksum of `sector[..SEALED_PAYLOAD_LEN]` into its tail.
pub(crate) fn seal(sector: &mut Sector) {
    let hash = blake3::hash(&sector[..SEALED_PAYLOAD_LEN]);
    sector[SEALED_PAYLOAD_LEN..].copy_from_slice(hash.as_bytes());
}

/// Whether the sector's stored checksum matches its payload.
pub(crate) fn is_sealed(sector: &Sector) -> bool {
    let hash = blake3::hash(&sector[..SEALED_PAYLOAD_LEN]);
    hash.as_bytes()[..] == sector[SEALED_PAYLOAD_LEN..]
}

/// Domain separation for bitmap page checksums, so a bitmap page can never
/// verify as (or be confused with) any other kind of sealed sector.
const BITMAP_PAGE_DOMAIN: &[u8] = b"vmsync bitmap page v3\0";

/// Checksum of bitmap page `page` of node `node`: BLAKE3 over a domain tag,
/// the node id, the page number and the page's payload. Binding the position
/// in means a page written at the wrong offset (or copied from another
/// node's bitmap) fails the check instead of silently moving bits.
fn bitmap_page_checksum(sector: &Sector, node: u32, page: u64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update(BITMAP_PAGE_DOMAIN)
        .update(&node.to_le_bytes())
        .update(&page.to_le_bytes())
        .update(&sector[..SEALED_PAYLOAD_LEN]);
    hasher.finalize()
}

/// Writes the checksum of bitmap page `page` of node `node` into its tail.
pub(crate) fn seal_bitmap_page(sector: &mut Sector, node: u32, page: u64) {
    let hash = bitmap_page_checksum(sector, node, page);
    sector[SEALED_PAYLOAD_LEN..].copy_from_slice(hash.as_bytes());
}

/// Whether `sector` is a valid bitmap page `page` of node `node`.
pub(crate) fn is_sealed_bitmap_page(sector: &Sector, node: u32, page: u64) -> bool {
    bitmap_page_checksum(sector, node, page).as_bytes()[..] == sector[SEALED_PAYLOAD_LEN..]
}

/// Appends little-endian fields to a buffer.
///
/// Encoders only write formats whose size is bounded by validated geometry,
/// so running past the end is a programming error and panics.
pub(crate) struct LeWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> LeWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        LeWriter { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
}

/// Reads little-endian fields from untrusted bytes; never panics.
pub(crate) struct LeReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A field ran past the end of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShortBuffer;

impl<'a> LeReader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        LeReader { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], ShortBuffer> {
        let end = self.pos.checked_add(len).ok_or(ShortBuffer)?;
        let out = self.buf.get(self.pos..end).ok_or(ShortBuffer)?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ShortBuffer> {
        let bytes = self.bytes(N)?;
        Ok(bytes.try_into().expect("bytes(N) returns N bytes"))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ShortBuffer> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ShortBuffer> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ShortBuffer> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_agree() {
        let mut buf = [0u8; 16];
        LeWriter::new(&mut buf)
            .u16(0x0102)
            .u32(0x0304_0506)
            .u64(7)
            .bytes(b"x");
        assert_eq!(&buf[..2], &[0x02, 0x01]);
        let mut r = LeReader::new(&buf);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u32(), Ok(0x0304_0506));
        assert_eq!(r.u64(), Ok(7));
        assert_eq!(r.bytes(1), Ok(&b"x"[..]));
        assert_eq!(r.u16(), Err(ShortBuffer));
        assert_eq!(r.bytes(usize::MAX), Err(ShortBuffer));
    }

    #[test]
    fn bitmap_pages_are_bound_to_their_place() {
        let mut sector = [0u8; SECTOR_SIZE];
        sector[7] = 0x80;
        seal_bitmap_page(&mut sector, 2, 5);
        assert!(is_sealed_bitmap_page(&sector, 2, 5));
        assert!(!is_sealed_bitmap_page(&sector, 1, 5));
        assert!(!is_sealed_bitmap_page(&sector, 2, 4));
        assert!(!is_sealed(&sector), "not a plain sealed sector");
        let mut flipped = sector;
        flipped[100] ^= 1;
        assert!(!is_sealed_bitmap_page(&flipped, 2, 5));
        // An all-zero page (unwritten, or zeroed by mistake) is not valid.
        assert!(!is_sealed_bitmap_page(&[0; SECTOR_SIZE], 0, 0));
    }

    #[test]
    fn seal_detects_any_flipped_byte() {
        let mut sector = [0u8; SECTOR_SIZE];
        sector[10] = 42;
        seal(&mut sector);
        assert!(is_sealed(&sector));
        for at in [
            0,
            10,
            SEALED_PAYLOAD_LEN - 1,
            SEALED_PAYLOAD_LEN,
            SECTOR_SIZE - 1,
        ] {
            let mut bad = sector;
            bad[at] ^= 1;
            assert!(!is_sealed(&bad), "flip at {at} undetected");
        }
    }
}
