//! Compressed block data ([`crate::Message::ResyncPacked`]): what the
//! primary pushes to a WAN peer is compressed when that shrinks it, and
//! the frame names the codec.
//!
//! Two codecs, picked by `[replication] wan_compression`:
//!
//! * **zstd** (level [`ZSTD_LEVEL`], the default): on the WAN benchmark's
//!   text about 40 % fewer bytes than LZ4 (2.58x against 1.46x per
//!   256 KiB), at some 225 MB/s of one core — hundreds of times what a
//!   7 Mbit/s uplink carries, so the link, not the CPU, stays the limit;
//! * **LZ4** (block format, `lz4_flex`): about twice as fast (430 MB/s on
//!   that text), for a fast WAN where the CPU would become the limit.
//!
//! Both decoders write into a buffer of the announced size and fail
//! rather than grow it, so a hostile frame can never make the receiver
//! allocate more than [`MAX_DATA_LEN`] bytes.

use crate::frame::MAX_DATA_LEN;

/// LZ4 block format, the decompressed length carried beside it.
pub const CODEC_LZ4: u8 = 1;
/// One zstd frame.
pub const CODEC_ZSTD: u8 = 2;

/// zstd's level for the WAN push: its default, the knee of its
/// ratio-for-speed curve.
pub const ZSTD_LEVEL: i32 = 3;

/// How data is compressed before it crosses a WAN link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Sent as is.
    None,
    /// [`CODEC_LZ4`].
    Lz4,
    /// [`CODEC_ZSTD`].
    #[default]
    Zstd,
}

impl Codec {
    /// The names the configuration accepts.
    pub const NAMES: &'static str = "zstd, lz4, none";

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Option<Codec> {
        [Codec::None, Codec::Lz4, Codec::Zstd]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// Whether this version knows `codec`.
pub fn is_known(codec: u8) -> bool {
    codec == CODEC_LZ4 || codec == CODEC_ZSTD
}

/// `data` compressed with `codec`, with the codec's wire number, or `None`
/// when that would not save at least 1/16 of it (incompressible data is
/// then sent as is, without paying for a decompression on the other side).
pub fn compress(codec: Codec, data: &[u8]) -> Option<(u8, Vec<u8>)> {
    if data.is_empty() || data.len() > MAX_DATA_LEN {
        return None;
    }
    let (wire_codec, packed) = match codec {
        Codec::None => return None,
        Codec::Lz4 => (CODEC_LZ4, lz4_flex::block::compress(data)),
        // Only a failure to allocate zstd's context can fail here; the
        // data then goes uncompressed.
        Codec::Zstd => (CODEC_ZSTD, zstd::bulk::compress(data, ZSTD_LEVEL).ok()?),
    };
    (packed.len() < data.len() - data.len() / 16).then_some((wire_codec, packed))
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
    let got = if codec == CODEC_LZ4 {
        lz4_flex::block::decompress_into(data, &mut out)
            .map_err(|e| DecompressError::Corrupt(e.to_string()))?
    } else {
        // Into a slice: zstd fails with "destination too small" rather
        // than write past `len`, whatever the frame claims.
        zstd::bulk::decompress_to_buffer(data, &mut out)
            .map_err(|e| DecompressError::Corrupt(e.to_string()))?
    };
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

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Words of a small vocabulary in a skewed random order: text that
    /// compresses about as well as source code or logs do.
    fn prose(len: usize) -> Vec<u8> {
        const WORDS: [&str; 16] = [
            "the", "block", "of", "a", "device", "write", "epoch", "and", "peer", "to", "replica",
            "is", "stale", "bitmap", "primary", "sync",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pick = ((x % 16) * ((x >> 8) % 16) / 16) as usize;
            out.extend_from_slice(WORDS[pick].as_bytes());
            out.push(if (x >> 20).is_multiple_of(9) {
                b'\n'
            } else {
                b' '
            });
            out.extend_from_slice(format!("{}", (x >> 32) % 1000).as_bytes());
            out.push(b' ');
        }
        out.truncate(len);
        out
    }

    #[test]
    fn compressible_data_round_trips_with_either_codec_and_incompressible_is_left_alone() {
        let text: Vec<u8> = b"a file system block full of text. "
            .iter()
            .cycle()
            .take(256 * 1024)
            .copied()
            .collect();
        for (codec, number) in [(Codec::Lz4, CODEC_LZ4), (Codec::Zstd, CODEC_ZSTD)] {
            let (wire, packed) = compress(codec, &text).expect("text compresses");
            assert_eq!(wire, number);
            assert!(
                packed.len() < text.len() / 10,
                "{codec:?}: {} bytes",
                packed.len()
            );
            assert_eq!(decompress(wire, &packed, text.len() as u32).unwrap(), text);
            assert_eq!(compress(codec, &noise(64 * 1024)), None, "{codec:?}");
        }
        assert_eq!(compress(Codec::None, &text), None);
    }

    #[test]
    fn zstd_leaves_fewer_bytes_than_lz4_on_text() {
        let text = prose(256 * 1024);
        let (_, lz4) = compress(Codec::Lz4, &text).expect("lz4 shrinks text");
        let (_, zstd) = compress(Codec::Zstd, &text).expect("zstd shrinks text");
        assert!(
            (zstd.len() as f64) < 0.85 * lz4.len() as f64,
            "zstd {} bytes, lz4 {} bytes of {}",
            zstd.len(),
            lz4.len(),
            text.len()
        );
        assert_eq!(
            decompress(CODEC_ZSTD, &zstd, text.len() as u32).unwrap(),
            text
        );
    }

    #[test]
    fn codec_names_round_trip() {
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            assert_eq!(Codec::from_name(codec.name()), Some(codec));
        }
        assert_eq!(Codec::from_name("gzip"), None);
        assert_eq!(Codec::default(), Codec::Zstd);
    }

    #[test]
    fn a_wrong_length_an_unknown_codec_or_a_huge_length_is_refused() {
        for codec in [Codec::Lz4, Codec::Zstd] {
            let (wire, packed) = compress(codec, &[7u8; 8192]).unwrap();
            assert!(matches!(
                decompress(wire, &packed, 4096),
                Err(DecompressError::Corrupt(_) | DecompressError::WrongLength { .. })
            ));
            assert!(matches!(
                decompress(wire, &packed, 16384),
                Err(DecompressError::WrongLength { .. } | DecompressError::Corrupt(_))
            ));
            assert_eq!(
                decompress(9, &packed, 8192),
                Err(DecompressError::UnknownCodec(9))
            );
            assert!(matches!(
                decompress(wire, &packed, u32::MAX),
                Err(DecompressError::TooLong(_))
            ));
        }
    }

    proptest! {
        /// Arbitrary bytes never panic either decoder, and what they
        /// accept has exactly the announced length.
        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048), len in 0u32..70_000, zstd in any::<bool>()) {
            let codec = if zstd { CODEC_ZSTD } else { CODEC_LZ4 };
            if let Ok(out) = decompress(codec, &data, len) {
                prop_assert_eq!(out.len(), len as usize);
            }
        }

        /// A valid zstd frame of more than the announced length is refused,
        /// never written past it.
        #[test]
        fn a_zstd_frame_larger_than_announced_is_refused(extra in 1usize..5000) {
            let text = prose(8192 + extra);
            let (wire, packed) = compress(Codec::Zstd, &text).unwrap();
            prop_assert!(decompress(wire, &packed, 8192).is_err());
        }
    }
}
