//! A staleness bitmap that many threads update at once without locks.
//!
//! Bit `b` set in node `n`'s bitmap means node `n` does not hold the newest
//! version of block `b`. The write path, acks, fetches and resync all flip
//! bits concurrently, so every operation takes `&self` and works on
//! [`AtomicU64`] words with `fetch_or`/`fetch_and`.
//!
//! Besides the bits, a [`Bitmap`] keeps
//! * a counter of set bits, so "how much is stale" is O(1), and
//! * a second, tiny atomic bitmap with one bit per on-disk page of words that
//!   marks the pages changed since they were last persisted, so flushing
//!   writes only those pages (see `node_bitmaps`).
//!
//! All atomics use `SeqCst`. The dirty-page protocol relies on it: a writer
//! changes a word and then, only if the page is not already marked, marks it;
//! the flusher clears the mark and then reads the words. In the single total
//! order of `SeqCst` operations either the flusher's clear comes after the
//! writer's check (and so its word read sees the change), or the writer sees
//! the page unmarked and marks it again for the next flush. The cost is
//! irrelevant next to the I/O these bits describe.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};

use super::codec::{Sector, SEALED_PAYLOAD_LEN};
use super::layout::BITMAP_BITS_PER_PAGE;

const WORD_BITS: u64 = u64::BITS as u64;
const WORD_BYTES: usize = std::mem::size_of::<u64>();
/// Words per page of the on-disk bitmap (508: a 4 KiB sector less its
/// checksum).
pub(crate) const WORDS_PER_PAGE: usize = (BITMAP_BITS_PER_PAGE / WORD_BITS) as usize;
const _: () = assert!(WORDS_PER_PAGE * WORD_BYTES == SEALED_PAYLOAD_LEN);

/// Concurrent bitmap of the blocks of one device, for one node.
pub struct Bitmap {
    nbits: u64,
    block_shift: u32,
    words: Box<[AtomicU64]>,
    /// Set-bit counter. Signed because a clear racing with the set of the
    /// same bit may subtract before the set adds; exact whenever quiescent.
    ones: AtomicI64,
    /// One bit per page of `words`: changed since last persisted.
    dirty_pages: Box<[AtomicU64]>,
}

fn atomic_zeroes(len: usize) -> Box<[AtomicU64]> {
    (0..len).map(|_| AtomicU64::new(0)).collect()
}

/// Bits `lo..hi` of a word, `lo < hi <= 64`.
fn bit_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == WORD_BITS {
        u64::MAX
    } else {
        (1 << hi) - 1
    };
    upper & !((1 << lo) - 1)
}

/// `(word index, mask)` for every word touched by bits `first..first + count`.
fn word_masks(first: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first + count;
    let words = if count == 0 {
        0..0
    } else {
        first / WORD_BITS..(end - 1) / WORD_BITS + 1
    };
    words.map(move |w| {
        let base = w * WORD_BITS;
        let lo = first.max(base) - base;
        let hi = end.min(base + WORD_BITS) - base;
        (w as usize, bit_mask(lo, hi))
    })
}

impl Bitmap {
    /// An all-clear bitmap of `nbits` blocks of `block_size` bytes.
    ///
    /// # Panics
    /// If `block_size` is not a power of two. Memory is `nbits / 8` bytes:
    /// `nbits` must come from trusted geometry, never from the network.
    pub fn new(nbits: u64, block_size: u32) -> Bitmap {
        assert!(
            block_size.is_power_of_two(),
            "block size {block_size} is not a power of two"
        );
        let words = nbits.div_ceil(WORD_BITS) as usize;
        let pages = words.div_ceil(WORDS_PER_PAGE);
        Bitmap {
            nbits,
            block_shift: block_size.trailing_zeros(),
            words: atomic_zeroes(words),
            ones: AtomicI64::new(0),
            dirty_pages: atomic_zeroes(pages.div_ceil(WORD_BITS as usize)),
        }
    }

    /// An all-clear bitmap of the same size and block size as `self`.
    pub fn new_like(&self) -> Bitmap {
        Bitmap::new(self.nbits, self.block_size())
    }

    /// Number of bits (blocks).
    pub fn nbits(&self) -> u64 {
        self.nbits
    }

    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// Number of set bits. Exact when no update is in flight; while updates
    /// race it may be off by the bits being changed (never negative).
    pub fn count_ones(&self) -> u64 {
        self.ones.load(SeqCst).max(0) as u64
    }

    /// Whether `first..first + count` lies inside the bitmap. Use it to check
    /// ranges that come from the network before calling the panicking methods.
    pub fn contains_range(&self, first: u64, count: u64) -> bool {
        first
            .checked_add(count)
            .is_some_and(|end| end <= self.nbits)
    }

    fn check_range(&self, first: u64, count: u64) {
        assert!(
            self.contains_range(first, count),
            "block range {first}+{count} outside bitmap of {} bits",
            self.nbits
        );
    }

    /// Sets bits `first..first + count`; returns how many were clear before.
    ///
    /// # Panics
    /// If the range is outside the bitmap (like slice indexing).
    pub fn set_range(&self, first: u64, count: u64) -> u64 {
        self.check_range(first, count);
        let mut added = 0;
        for (w, mask) in word_masks(first, count) {
            let newly = mask & !self.words[w].fetch_or(mask, SeqCst);
            if newly != 0 {
                added += u64::from(newly.count_ones());
                self.mark_word_dirty(w);
            }
        }
        if added != 0 {
            self.ones.fetch_add(added as i64, SeqCst);
        }
        added
    }

    /// Clears bits `first..first + count`; returns how many were set before.
    ///
    /// # Panics
    /// If the range is outside the bitmap.
    pub fn clear_range(&self, first: u64, count: u64) -> u64 {
        self.check_range(first, count);
        let mut removed = 0;
        for (w, mask) in word_masks(first, count) {
            let gone = mask & self.words[w].fetch_and(!mask, SeqCst);
            if gone != 0 {
                removed += u64::from(gone.count_ones());
                self.mark_word_dirty(w);
            }
        }
        if removed != 0 {
            self.ones.fetch_sub(removed as i64, SeqCst);
        }
        removed
    }

    /// Whether bit `block` is set.
    ///
    /// # Panics
    /// If `block` is outside the bitmap.
    pub fn test(&self, block: u64) -> bool {
        self.check_range(block, 1);
        self.words[(block / WORD_BITS) as usize].load(SeqCst) & (1 << (block % WORD_BITS)) != 0
    }

    /// Whether any bit of `first..first + count` is set.
    ///
    /// # Panics
    /// If the range is outside the bitmap.
    pub fn any_in_range(&self, first: u64, count: u64) -> bool {
        self.check_range(first, count);
        word_masks(first, count).any(|(w, mask)| self.words[w].load(SeqCst) & mask != 0)
    }

    /// Number of set bits in `first..first + count`.
    ///
    /// # Panics
    /// If the range is outside the bitmap.
    pub fn count_range(&self, first: u64, count: u64) -> u64 {
        self.check_range(first, count);
        word_masks(first, count)
            .map(|(w, mask)| u64::from((self.words[w].load(SeqCst) & mask).count_ones()))
            .sum()
    }

    /// The first set bit at or after `from`.
    pub fn find_next_set(&self, from: u64) -> Option<u64> {
        // Bits past `nbits` are never set, so no end check is needed.
        self.find_next(from, 0)
    }

    /// The first clear bit at or after `from`.
    pub fn find_next_clear(&self, from: u64) -> Option<u64> {
        self.find_next(from, u64::MAX)
            .filter(|&bit| bit < self.nbits)
    }

    /// The first set bit in `range` (clipped to the bitmap). Unlike
    /// [`find_next_set`](Self::find_next_set) it stops scanning at
    /// `range.end`, so callers may hold a lock while they look.
    pub fn next_set_in(&self, range: Range<u64>) -> Option<u64> {
        self.find_next_below(range, 0)
    }

    /// The first clear bit in `range` (clipped to the bitmap).
    pub fn next_clear_in(&self, range: Range<u64>) -> Option<u64> {
        self.find_next_below(range, u64::MAX)
    }

    /// First bit in `range` whose value XOR `invert` is 1.
    fn find_next_below(&self, range: Range<u64>, invert: u64) -> Option<u64> {
        let end = range.end.min(self.nbits);
        if range.start >= end {
            return None;
        }
        let last = ((end - 1) / WORD_BITS) as usize;
        let mut w = (range.start / WORD_BITS) as usize;
        let mut bits =
            (self.words[w].load(SeqCst) ^ invert) & (u64::MAX << (range.start % WORD_BITS));
        loop {
            if bits != 0 {
                let bit = w as u64 * WORD_BITS + u64::from(bits.trailing_zeros());
                return (bit < end).then_some(bit);
            }
            if w == last {
                return None;
            }
            w += 1;
            bits = self.words[w].load(SeqCst) ^ invert;
        }
    }

    /// First bit at or after `from` whose value XOR `invert` is 1.
    fn find_next(&self, from: u64, invert: u64) -> Option<u64> {
        if from >= self.nbits {
            return None;
        }
        let mut w = (from / WORD_BITS) as usize;
        let mut bits = (self.words[w].load(SeqCst) ^ invert) & (u64::MAX << (from % WORD_BITS));
        loop {
            if bits != 0 {
                return Some(w as u64 * WORD_BITS + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            bits = self.words.get(w)?.load(SeqCst) ^ invert;
        }
    }

    /// ORs `other` into `self` (e.g. a peer's report); returns bits newly set.
    pub fn merge_from(&self, other: &Bitmap) -> Result<u64, super::MetaError> {
        if other.nbits != self.nbits {
            return Err(self.size_mismatch(other));
        }
        Ok(self.merge_words(other))
    }

    /// ORs a bitmap of fewer (or as many) blocks into the first blocks of
    /// `self`: the bits of a device before it grew. Returns bits newly set.
    pub fn merge_prefix_from(&self, other: &Bitmap) -> Result<u64, super::MetaError> {
        if other.nbits > self.nbits {
            return Err(self.size_mismatch(other));
        }
        Ok(self.merge_words(other))
    }

    /// A copy of the first `nbits` bits (at most all of them): the part of
    /// a grown device's bitmap that a peer not yet grown has blocks for.
    pub fn prefix(&self, nbits: u64) -> Bitmap {
        let nbits = nbits.min(self.nbits);
        let prefix = Bitmap::new(nbits, self.block_size());
        let mut ones = 0;
        for (w, (mine, copy)) in self.words.iter().zip(prefix.words.iter()).enumerate() {
            let base = w as u64 * WORD_BITS;
            let word = mine.load(SeqCst) & bit_mask(0, (nbits - base).min(WORD_BITS));
            copy.store(word, SeqCst);
            ones += i64::from(word.count_ones());
        }
        prefix.ones.store(ones, SeqCst);
        prefix
    }

    fn size_mismatch(&self, other: &Bitmap) -> super::MetaError {
        super::MetaError::BitmapSizeMismatch {
            left: self.nbits,
            right: other.nbits,
        }
    }

    /// ORs `other`'s words into ours, word by word (no bit is set past a
    /// bitmap's `nbits`, so a shorter `other` touches only its blocks).
    fn merge_words(&self, other: &Bitmap) -> u64 {
        let mut added = 0;
        for (w, (mine, theirs)) in self.words.iter().zip(other.words.iter()).enumerate() {
            let mask = theirs.load(SeqCst);
            let newly = mask & !mine.fetch_or(mask, SeqCst);
            if newly != 0 {
                added += u64::from(newly.count_ones());
                self.mark_word_dirty(w);
            }
        }
        if added != 0 {
            self.ones.fetch_add(added as i64, SeqCst);
        }
        added
    }

    /// Sets every bit.
    pub fn set_all(&self) -> u64 {
        self.set_range(0, self.nbits)
    }

    /// Clears every bit.
    pub fn clear_all(&self) -> u64 {
        self.clear_range(0, self.nbits)
    }

    /// Blocks touched by the byte range, rounded OUTWARD: the blocks a write
    /// of these bytes changes, so the ones to mark stale.
    pub fn blocks_covering(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset >> self.block_shift;
        let end = ((offset.saturating_add(len) - 1) >> self.block_shift) + 1;
        first..end
    }

    /// Blocks wholly inside the byte range, rounded INWARD: the only blocks a
    /// write of these bytes makes up to date, so the only ones it may clear.
    pub fn blocks_within(&self, offset: u64, len: u64) -> Range<u64> {
        let mask = (1u64 << self.block_shift) - 1;
        let first = offset.saturating_add(mask) >> self.block_shift;
        let end = offset.saturating_add(len) >> self.block_shift;
        first..end.max(first)
    }

    /// Marks the blocks touched by the byte range stale (rounds outward).
    ///
    /// # Panics
    /// If the range extends past the device.
    pub fn set_bytes(&self, offset: u64, len: u64) -> u64 {
        let blocks = self.blocks_covering(offset, len);
        self.set_range(blocks.start, blocks.end - blocks.start)
    }

    /// Clears the blocks wholly covered by the byte range (rounds inward).
    ///
    /// # Panics
    /// If the range extends past the device.
    pub fn clear_bytes(&self, offset: u64, len: u64) -> u64 {
        self.check_range(0, self.blocks_covering(offset, len).end);
        let blocks = self.blocks_within(offset, len);
        self.clear_range(blocks.start, blocks.end - blocks.start)
    }

    /// Whether any block touched by the byte range is stale (rounds outward).
    ///
    /// # Panics
    /// If the range extends past the device.
    pub fn any_in_bytes(&self, offset: u64, len: u64) -> bool {
        let blocks = self.blocks_covering(offset, len);
        self.any_in_range(blocks.start, blocks.end - blocks.start)
    }

    // ---- persistence support (see `node_bitmaps`) and raw encoding ----

    /// Builds a bitmap from little-endian words as stored on disk: bit `i` is
    /// bit `i % 8` of byte `i / 8`. Missing bytes read as zero; bits past
    /// `nbits` are ignored. The result has no dirty pages.
    pub(crate) fn from_le_bytes(nbits: u64, block_size: u32, bytes: &[u8]) -> Bitmap {
        let bitmap = Bitmap::new(nbits, block_size);
        let mut ones = 0;
        for (word, chunk) in bitmap.words.iter().zip(bytes.chunks(WORD_BYTES)) {
            let mut le = [0u8; WORD_BYTES];
            le[..chunk.len()].copy_from_slice(chunk);
            let value = u64::from_le_bytes(le);
            word.store(value, SeqCst);
            ones += u64::from(value.count_ones());
        }
        if let Some(last) = bitmap.words.last() {
            let tail = nbits % WORD_BITS;
            if tail != 0 {
                let dropped = last.fetch_and(bit_mask(0, tail), SeqCst) & !bit_mask(0, tail);
                ones -= u64::from(dropped.count_ones());
            }
        }
        bitmap.ones.store(ones as i64, SeqCst);
        bitmap
    }

    /// Writes words from `first_word` on into `out` (whose length is a
    /// multiple of 8) in the [`from_le_bytes`](Self::from_le_bytes) format,
    /// zero-filling past the last word.
    pub(crate) fn write_le_bytes(&self, first_word: usize, out: &mut [u8]) {
        for (i, chunk) in out.chunks_exact_mut(WORD_BYTES).enumerate() {
            let value = first_word
                .checked_add(i)
                .and_then(|w| self.words.get(w))
                .map_or(0, |word| word.load(SeqCst));
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// The pages holding blocks `blocks` (clipped to the bitmap).
    pub(crate) fn pages_for_blocks(&self, blocks: Range<u64>) -> Range<usize> {
        let end = blocks.end.min(self.nbits);
        if blocks.start >= end {
            return 0..0;
        }
        let first = (blocks.start / BITMAP_BITS_PER_PAGE) as usize;
        let last = ((end - 1) / BITMAP_BITS_PER_PAGE) as usize;
        first..last + 1
    }

    /// Writes page `page`'s words in on-disk form into the payload of
    /// `out` (its first `SEALED_PAYLOAD_LEN` bytes); the caller seals it.
    pub(crate) fn encode_page(&self, page: usize, out: &mut Sector) {
        self.write_le_bytes(page * WORDS_PER_PAGE, &mut out[..SEALED_PAYLOAD_LEN]);
    }

    /// Clears page `page`'s dirty mark; returns whether it was set. Call
    /// BEFORE reading the page's words (see the module docs).
    pub(crate) fn take_dirty(&self, page: usize) -> bool {
        let bit = 1 << (page % WORD_BITS as usize);
        self.dirty_pages[page / WORD_BITS as usize].fetch_and(!bit, SeqCst) & bit != 0
    }

    pub(crate) fn mark_page_dirty(&self, page: usize) {
        let bit = 1 << (page % WORD_BITS as usize);
        let word = &self.dirty_pages[page / WORD_BITS as usize];
        // Check first: most updates hit an already-dirty page, and a plain
        // load keeps the cache line shared between threads.
        if word.load(SeqCst) & bit == 0 {
            word.fetch_or(bit, SeqCst);
        }
    }

    /// Number of pages changed since last persisted.
    pub fn dirty_page_count(&self) -> u64 {
        self.dirty_pages
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }

    fn mark_word_dirty(&self, word: usize) {
        self.mark_page_dirty(word / WORDS_PER_PAGE);
    }
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitmap")
            .field("nbits", &self.nbits)
            .field("block_size", &self.block_size())
            .field("ones", &self.count_ones())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn ones(bitmap: &Bitmap) -> Vec<u64> {
        (0..bitmap.nbits()).filter(|&b| bitmap.test(b)).collect()
    }

    #[test]
    fn ranges_across_word_boundaries() {
        let bm = Bitmap::new(200, 4096);
        assert_eq!(bm.set_range(60, 10), 10);
        assert_eq!(bm.set_range(65, 10), 5);
        assert_eq!(ones(&bm), (60..75).collect::<Vec<_>>());
        assert_eq!(bm.count_ones(), 15);
        assert!(bm.any_in_range(74, 1));
        assert!(!bm.any_in_range(75, 125));
        assert_eq!(bm.count_range(0, 64), 4);
        assert_eq!(bm.clear_range(62, 3), 3);
        assert_eq!(bm.count_ones(), 12);
        assert_eq!(bm.set_range(0, 200), 188);
        assert_eq!(bm.clear_all(), 200);
        assert_eq!(bm.count_ones(), 0);
        assert_eq!(bm.set_range(10, 0), 0);
    }

    #[test]
    fn a_prefix_holds_exactly_the_first_bits() {
        let bm = Bitmap::new(300, 4096);
        bm.set_range(60, 10);
        bm.set_range(126, 4);
        bm.set_range(250, 50);
        for (nbits, want) in [
            (
                128,
                [(60..70).collect::<Vec<_>>(), (126..128).collect()].concat(),
            ),
            (
                129,
                [(60..70).collect::<Vec<_>>(), (126..129).collect()].concat(),
            ),
            (64, (60..64).collect()),
            (0, Vec::new()),
            (1000, ones(&bm)),
        ] {
            let prefix = bm.prefix(nbits);
            assert_eq!(prefix.nbits(), nbits.min(300));
            assert_eq!(prefix.block_size(), 4096);
            assert_eq!(ones(&prefix), want, "first {nbits} bits");
            assert_eq!(prefix.count_ones(), want.len() as u64);
        }
    }

    #[test]
    #[should_panic(expected = "outside bitmap")]
    fn out_of_range_panics() {
        Bitmap::new(100, 4096).set_range(90, 11);
    }

    #[test]
    fn find_next_across_words() {
        let bm = Bitmap::new(300, 4096);
        assert_eq!(bm.find_next_set(0), None);
        bm.set_range(63, 1);
        bm.set_range(64, 1);
        bm.set_range(299, 1);
        assert_eq!(bm.find_next_set(0), Some(63));
        assert_eq!(bm.find_next_set(64), Some(64));
        assert_eq!(bm.find_next_set(65), Some(299));
        assert_eq!(bm.find_next_set(300), None);
        assert_eq!(bm.find_next_clear(63), Some(65));
        bm.set_range(200, 99);
        assert_eq!(bm.find_next_clear(200), None);
        assert_eq!(bm.find_next_clear(1_000), None);
    }

    #[test]
    fn bounded_find_stops_at_the_end_of_the_range() {
        let bm = Bitmap::new(300, 4096);
        bm.set_range(70, 5);
        bm.set_range(299, 1);
        assert_eq!(bm.next_set_in(0..70), None);
        assert_eq!(bm.next_set_in(0..71), Some(70));
        assert_eq!(bm.next_set_in(72..300), Some(72));
        assert_eq!(bm.next_set_in(75..299), None);
        assert_eq!(bm.next_set_in(75..1_000), Some(299));
        assert_eq!(bm.next_clear_in(70..75), None);
        assert_eq!(bm.next_clear_in(70..76), Some(75));
        assert_eq!(bm.next_clear_in(299..1_000), None);
        assert_eq!(bm.next_set_in(10..10), None);
    }

    #[test]
    fn byte_ranges_round_outward_to_set_and_inward_to_clear() {
        let bm = Bitmap::new(16, 4096);
        assert_eq!(bm.blocks_covering(4095, 2), 0..2);
        assert_eq!(bm.blocks_within(4095, 2), 1..1);
        assert_eq!(bm.blocks_within(100, 8192), 1..2);
        assert_eq!(bm.set_bytes(4095, 2), 2);
        // A partial write over block 1 does not make it up to date...
        assert_eq!(bm.clear_bytes(4096, 4095), 0);
        // ...a full one does.
        assert_eq!(bm.clear_bytes(4000, 4096 + 96), 1);
        assert_eq!(ones(&bm), vec![0]);
        assert!(bm.any_in_bytes(0, 1));
        assert!(!bm.any_in_bytes(4096, 60 << 10));
        assert_eq!(bm.set_bytes(0, 0), 0);
    }

    #[test]
    #[should_panic(expected = "outside bitmap")]
    fn clear_bytes_past_the_end_panics_even_if_no_whole_block() {
        Bitmap::new(16, 4096).clear_bytes(16 * 4096 - 1, 2);
    }

    #[test]
    fn concurrent_set_and_clear_keep_the_count_exact() {
        let bm = Arc::new(Bitmap::new(100_000, 4096));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let bm = Arc::clone(&bm);
                thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let first = (i * 7919 + t * 131) % 99_000;
                        let count = (i % 97) + 1;
                        if (i + t) % 3 == 0 {
                            bm.clear_range(first, count);
                        } else {
                            bm.set_range(first, count);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(bm.count_ones(), ones(&bm).len() as u64);
        assert!(bm.count_ones() > 0);
    }

    #[test]
    fn merge_ors_and_counts() {
        let a = Bitmap::new(130, 4096);
        let b = a.new_like();
        a.set_range(0, 10);
        b.set_range(5, 125);
        assert_eq!(a.merge_from(&b).unwrap(), 120);
        assert_eq!(a.count_ones(), 130);
        assert!(a.merge_from(&Bitmap::new(131, 4096)).is_err());
    }

    #[test]
    fn dirty_pages_track_changes_only() {
        let bm = Bitmap::new(3 * BITMAP_BITS_PER_PAGE, 4096);
        assert_eq!(bm.pages_for_blocks(0..bm.nbits()), 0..3);
        bm.set_range(BITMAP_BITS_PER_PAGE + 5, 1);
        assert_eq!(bm.dirty_page_count(), 1);
        assert!(!bm.take_dirty(0));
        assert!(bm.take_dirty(1));
        assert!(!bm.take_dirty(1));
        // Setting an already-set bit changes nothing and dirties nothing.
        bm.set_range(BITMAP_BITS_PER_PAGE + 5, 1);
        assert_eq!(bm.dirty_page_count(), 0);
        assert_eq!(bm.pages_for_blocks(0..1), 0..1);
        assert_eq!(
            bm.pages_for_blocks(BITMAP_BITS_PER_PAGE - 1..BITMAP_BITS_PER_PAGE + 1),
            0..2
        );
    }

    #[test]
    fn le_bytes_round_trip_and_ignore_tail_bits() {
        let bm = Bitmap::new(70, 4096);
        bm.set_range(3, 1);
        bm.set_range(64, 6);
        let mut page = [0u8; crate::meta::layout::SECTOR_SIZE];
        bm.encode_page(0, &mut page);
        assert_eq!(page[0], 0b1000);
        page[8] = 0xff; // bits 64..72: 70 and 71 are past the end
        let back = Bitmap::from_le_bytes(70, 4096, &page);
        assert_eq!(ones(&back), vec![3, 64, 65, 66, 67, 68, 69]);
        assert_eq!(back.count_ones(), 7);
        assert_eq!(back.dirty_page_count(), 0);
        assert_eq!(back.find_next_clear(64), None);
    }
}
