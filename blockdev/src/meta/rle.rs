//! Compact encoding of a [`Bitmap`] for the network.
//!
//! Staleness bitmaps are mostly long runs (everything clear after a sync,
//! everything set for a new replica, a few hot regions in between), so they
//! are sent as run lengths. The receiver knows the number of bits from the
//! resource geometry; it is not part of the encoding.
//!
//! ```text
//! encoding := tag body
//! tag 0x00 (runs): body = varint*, the lengths of alternating runs of
//!                  clear and set bits, starting with a CLEAR run (0 if bit 0
//!                  is set). The lengths add up to exactly nbits. Encoders
//!                  emit no other empty run; decoders accept them.
//! tag 0x01 (raw):  body = exactly ceil(nbits / 8) bytes; bit i is bit i % 8
//!                  of byte i / 8 (the on-disk bit order); padding bits are 0.
//! varint := unsigned LEB128: 7 bits per byte, least significant group
//!           first, high bit set on every byte but the last; at most 10 bytes.
//! ```
//!
//! The encoder picks the shorter body, so an encoding never exceeds
//! `ceil(nbits / 8) + 1` bytes even for a random-looking bitmap. Decoding
//! checks everything, never panics, and allocates only the bitmap of `nbits`
//! bits that the caller asked for.

use super::bitmap::Bitmap;
use super::MetaError;

const TAG_RUNS: u8 = 0;
const TAG_RAW: u8 = 1;
/// Bytes needed by the longest varint (a u64 in 7-bit groups).
const MAX_VARINT_LEN: usize = 10;

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, MetaError> {
    let mut value = 0u64;
    for (i, &byte) in input.iter().take(MAX_VARINT_LEN).enumerate() {
        let shift = 7 * i as u32;
        let group = u64::from(byte & 0x7f);
        if group << shift >> shift != group {
            return Err(MetaError::BadEncoding("varint overflows 64 bits"));
        }
        value |= group << shift;
        if byte & 0x80 == 0 {
            *input = &input[i + 1..];
            return Ok(value);
        }
    }
    Err(MetaError::BadEncoding("truncated or overlong varint"))
}

fn raw_len(nbits: u64) -> usize {
    nbits.div_ceil(8) as usize
}

/// The runs encoding, or `None` as soon as it would exceed `limit` bytes.
fn encode_runs(bitmap: &Bitmap, limit: usize) -> Option<Vec<u8>> {
    let nbits = bitmap.nbits();
    let mut out = vec![TAG_RUNS];
    let (mut pos, mut in_set_run) = (0, false);
    while pos < nbits {
        let next = if in_set_run {
            bitmap.find_next_clear(pos)
        } else {
            bitmap.find_next_set(pos)
        };
        let end = next.unwrap_or(nbits);
        put_varint(&mut out, end - pos);
        if out.len() > limit {
            return None;
        }
        pos = end;
        in_set_run = !in_set_run;
    }
    Some(out)
}

fn encode_raw(bitmap: &Bitmap) -> Vec<u8> {
    let mut words = vec![0u8; raw_len(bitmap.nbits()).next_multiple_of(8)];
    bitmap.write_le_bytes(0, &mut words);
    words.truncate(raw_len(bitmap.nbits()));
    let mut out = Vec::with_capacity(1 + words.len());
    out.push(TAG_RAW);
    out.extend_from_slice(&words);
    out
}

fn decode_runs(bitmap: Bitmap, mut body: &[u8]) -> Result<Bitmap, MetaError> {
    let (mut pos, mut in_set_run) = (0u64, false);
    while !body.is_empty() {
        let len = take_varint(&mut body)?;
        if !bitmap.contains_range(pos, len) {
            return Err(MetaError::BadEncoding("runs exceed the bitmap size"));
        }
        if in_set_run {
            bitmap.set_range(pos, len);
        }
        pos += len;
        in_set_run = !in_set_run;
    }
    if pos != bitmap.nbits() {
        return Err(MetaError::BadEncoding("runs do not cover the whole bitmap"));
    }
    Ok(bitmap)
}

impl Bitmap {
    /// The compact network form (see the module docs). Not a snapshot: bits
    /// changed concurrently may or may not be included.
    pub fn encode(&self) -> Vec<u8> {
        let raw_total = 1 + raw_len(self.nbits());
        encode_runs(self, raw_total).unwrap_or_else(|| encode_raw(self))
    }

    /// Decodes [`encode`](Self::encode)'s output for a bitmap of `nbits`
    /// blocks of `block_size` bytes. `nbits` must come from local geometry:
    /// it bounds the allocation, whatever `data` holds.
    pub fn decode(nbits: u64, block_size: u32, data: &[u8]) -> Result<Bitmap, MetaError> {
        if !block_size.is_power_of_two() {
            return Err(MetaError::InvalidParams(format!(
                "block size {block_size} is not a power of two"
            )));
        }
        match data.split_first() {
            Some((&TAG_RUNS, body)) => decode_runs(Bitmap::new(nbits, block_size), body),
            Some((&TAG_RAW, body)) => {
                if body.len() as u64 != nbits.div_ceil(8) {
                    return Err(MetaError::BadEncoding("raw bitmap has the wrong length"));
                }
                let used_in_last = nbits % 8;
                if used_in_last != 0 && body.last().is_some_and(|b| b >> used_in_last != 0) {
                    return Err(MetaError::BadEncoding("raw bitmap sets bits past the end"));
                }
                Ok(Bitmap::from_le_bytes(nbits, block_size, body))
            }
            Some(_) => Err(MetaError::BadEncoding("unknown bitmap encoding tag")),
            None => Err(MetaError::BadEncoding("empty bitmap encoding")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits(bitmap: &Bitmap) -> Vec<bool> {
        (0..bitmap.nbits()).map(|b| bitmap.test(b)).collect()
    }

    /// Builds a bitmap from alternating run lengths, clear first.
    fn from_runs(runs: &[u64]) -> Bitmap {
        let bitmap = Bitmap::new(runs.iter().sum(), 4096);
        let mut pos = 0;
        for (i, &len) in runs.iter().enumerate() {
            if i % 2 == 1 {
                bitmap.set_range(pos, len);
            }
            pos += len;
        }
        bitmap
    }

    #[test]
    fn varints_round_trip_and_reject_overflow() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            let mut input = &buf[..];
            assert_eq!(take_varint(&mut input).unwrap(), value);
            assert!(input.is_empty());
        }
        let mut too_big: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(take_varint(&mut too_big).is_err());
        let mut endless: &[u8] = &[0x80; 20];
        assert!(take_varint(&mut endless).is_err());
        let mut truncated: &[u8] = &[0x80];
        assert!(take_varint(&mut truncated).is_err());
    }

    #[test]
    fn long_runs_are_tiny() {
        let bitmap = from_runs(&[1 << 20, 1 << 18, 1 << 20]);
        let encoded = bitmap.encode();
        assert_eq!(
            encoded,
            vec![0, 0x80, 0x80, 0x40, 0x80, 0x80, 0x10, 0x80, 0x80, 0x40]
        );
        assert_eq!(
            bits(&Bitmap::decode(bitmap.nbits(), 4096, &encoded).unwrap()),
            bits(&bitmap)
        );
        assert_eq!(Bitmap::new(0, 4096).encode(), vec![TAG_RUNS]);
    }

    #[test]
    fn checkerboard_falls_back_to_raw() {
        let bitmap = from_runs(&[1; 1001]);
        let encoded = bitmap.encode();
        assert_eq!(encoded[0], TAG_RAW);
        assert_eq!(encoded.len(), 1 + 126);
        let back = Bitmap::decode(1001, 4096, &encoded).unwrap();
        assert_eq!(bits(&back), bits(&bitmap));
        assert_eq!(back.count_ones(), 500);
    }

    #[test]
    fn rejects_malformed_input() {
        for (nbits, data) in [
            (8, &[][..]),
            (8, &[7, 8][..]),
            (8, &[TAG_RUNS, 4][..]),    // too short
            (8, &[TAG_RUNS, 4, 5][..]), // too long
            (8, &[TAG_RUNS, 0x80][..]), // truncated varint
            (9, &[TAG_RAW, 0xff][..]),  // raw too short
            (9, &[TAG_RAW, 0, 2][..]),  // padding bit set
        ] {
            assert!(
                Bitmap::decode(nbits, 4096, data).is_err(),
                "{data:?} accepted"
            );
        }
        assert!(Bitmap::decode(8, 3, &[TAG_RUNS, 8]).is_err());
        // Empty runs are tolerated.
        let b = Bitmap::decode(8, 4096, &[TAG_RUNS, 0, 0, 0, 8]).unwrap();
        assert_eq!(b.count_ones(), 8);
    }

    proptest! {
        #[test]
        fn round_trip(runs in prop::collection::vec(1u64..300, 0..40), lead_set in any::<bool>()) {
            let mut runs = runs;
            if lead_set {
                runs.insert(0, 0);
            }
            let bitmap = from_runs(&runs);
            let encoded = bitmap.encode();
            prop_assert!(encoded.len() as u64 <= 1 + bitmap.nbits().div_ceil(8));
            let back = Bitmap::decode(bitmap.nbits(), 4096, &encoded).unwrap();
            prop_assert_eq!(bits(&back), bits(&bitmap));
            prop_assert_eq!(back.count_ones(), bitmap.count_ones());
            // Both bodies decode to the same bits, whichever was chosen.
            let raw = Bitmap::decode(bitmap.nbits(), 4096, &encode_raw(&bitmap)).unwrap();
            prop_assert_eq!(bits(&raw), bits(&bitmap));
        }

        #[test]
        fn garbage_never_panics(nbits in 0u64..5_000, data in prop::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(bitmap) = Bitmap::decode(nbits, 4096, &data) {
                prop_assert_eq!(bitmap.nbits(), nbits);
                let again = Bitmap::decode(nbits, 4096, &bitmap.encode()).unwrap();
                prop_assert_eq!(bits(&again), bits(&bitmap));
            }
        }

        #[test]
        fn garbage_runs_never_panic(nbits in 0u64..5_000, data in prop::collection::vec(any::<u8>(), 0..80)) {
            let mut tagged = vec![TAG_RUNS];
            tagged.extend_from_slice(&data);
            let _ = Bitmap::decode(nbits, 4096, &tagged);
        }
    }
}
