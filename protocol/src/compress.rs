//! Compressed block data ([`crate::Message::ResyncPacked`]): what the
//! primary pushes to a WAN peer is compressed when that shrinks it.
//!
//! The codec is LZ4 (block format, `lz4_flex`): fast enough to compress a
//! 7 Mbit/s link's worth of data with a sliver of one core, and its
//! decoder writes into a buffer of the announced size, so a hostile frame
//! can never make the receiver allocate more than [`MAX_DATA_LEN`] bytes.

use crate::frame::MAX_DATA_LEN;

/// LZ4 block format, the decompressed length carried beside it.
pub const CODEC_LZ4: u8 = 1;

/// Whether this version knows `codec`.
pub fn is_known(codec: u8) -> bool {
    codec == CODEC_LZ4
}

/// `data` compressed with [`CODEC_LZ4`], or `None` when that would not
/// save at least 1/16 of it (incompressible data is then sent as is,
/// without paying for a decompression on the other side).
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.is_empty() || data.len() > MAX_DATA_LEN {
        return None;
    }
    let packed = lz4_flex::block::compress(data);
    (packed.len() < data.len() - data.len() / 16).then_some(packed)
}

/// Why a compressed payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("announced length {0} exceeds the maximum of {MAX_DATA_LEN}")]
    TooLong(u64),
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
    #[error("decompressed to {got} bytes, {announced} were announced")]
    WrongLength { got: usize, announced: usize },
}

/// Decompresses `data` (compressed with `codec`) to exactly `len` bytes.
/// Never allocates more than `len` (itself at most [`MAX_DATA_LEN`]) and
/// never panics, whatever the input.
pub fn decompress(codec: u8, data: &[u8], len: u32) -> Result<Vec<u8>, DecompressError> {
    if !is_known(codec) {
        return Err(DecompressError::UnknownCodec(codec));
    }
    let len = len as usize;
    if len > MAX_DATA_LEN {
        return Err(DecompressError::TooLong(len as u64));
    }
    let mut out = vec![0u8; len];
    let got = lz4_flex::block::decompress_into(data, &mut out)
        .map_err(|e| DecompressError::Corrupt(e.to_string()))?;
    if got != len {
        return Err(DecompressError::WrongLength {
            got,
            announced: len,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_data_round_trips_and_incompressible_is_left_alone() {
        let text: Vec<u8> = b"a file system block full of text. "
            .iter()
            .cycle()
            .take(256 * 1024)
            .copied()
            .collect();
        let packed = compress(&text).expect("text compresses");
        assert!(packed.len() < text.len() / 10, "{} bytes", packed.len());
        assert_eq!(
            decompress(CODEC_LZ4, &packed, text.len() as u32).unwrap(),
            text
        );
        let mut noise = vec![0u8; 64 * 1024];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(compress(&noise), None);
    }

    #[test]
    fn a_wrong_length_an_unknown_codec_or_a_huge_length_is_refused() {
        let packed = compress(&[7u8; 8192]).unwrap();
        assert!(matches!(
            decompress(CODEC_LZ4, &packed, 4096),
            Err(DecompressError::Corrupt(_) | DecompressError::WrongLength { .. })
        ));
        assert!(matches!(
            decompress(CODEC_LZ4, &packed, 16384),
            Err(DecompressError::WrongLength { .. } | DecompressError::Corrupt(_))
        ));
        assert_eq!(
            decompress(9, &packed, 8192),
            Err(DecompressError::UnknownCodec(9))
        );
        assert!(matches!(
            decompress(CODEC_LZ4, &packed, u32::MAX),
            Err(DecompressError::TooLong(_))
        ));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and what it accepts
        /// has exactly the announced length.
        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048), len in 0u32..70_000) {
            if let Ok(out) = decompress(CODEC_LZ4, &data, len) {
                prop_assert_eq!(out.len(), len as usize);
            }
        }
    }
}
