//! Field-level encoding: the [`Wire`] trait and the bounded [`Reader`].
//!
//! Every message is a flat sequence of fields, and every field type knows how
//! to put itself into a `BytesMut` and get itself back out of a [`Reader`].
//! Message encoders and decoders are therefore just lists of fields (generated
//! in `message.rs`), and all of the defensive checks live here, once:
//!
//! * integers are fixed-width little-endian;
//! * byte strings and UTF-8 strings carry a `u32` length prefix, and a length
//!   is checked against the bytes actually remaining *before* anything is
//!   sliced or allocated, so a hostile length can never cause a large
//!   allocation (a `Bytes` field is even zero-copy: it shares the frame);
//! * booleans and option tags must be exactly 0 or 1, so every value has one
//!   encoding and decode-then-encode reproduces the input byte for byte.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why a single field could not be read. `message.rs` adds the message type
/// and field name to turn this into a [`crate::ProtocolError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FieldError {
    /// The field needs more bytes than the payload has left.
    Truncated { needed: u64, remaining: usize },
    /// The bytes are there but do not form an allowed value.
    Invalid(String),
}

/// Reads fields from one frame's payload. Never reads past its end.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(payload: Bytes) -> Self {
        Self { buf: payload }
    }

    /// Bytes not yet consumed.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn ensure(&self, needed: u64) -> Result<usize, FieldError> {
        match usize::try_from(needed) {
            Ok(n) if n <= self.buf.len() => Ok(n),
            _ => Err(FieldError::Truncated {
                needed,
                remaining: self.buf.len(),
            }),
        }
    }

    /// Takes exactly `N` bytes into an array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FieldError> {
        self.ensure(N as u64)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    /// Takes a `u32`-length-prefixed byte string, sharing the frame's memory.
    pub(crate) fn prefixed(&mut self) -> Result<Bytes, FieldError> {
        let len = u32::get(self)?;
        let n = self.ensure(u64::from(len))?;
        Ok(self.buf.split_to(n))
    }
}

/// A type that can be a field of a message.
pub(crate) trait Wire: Sized + fmt::Debug {
    /// Appends the encoding of `self`.
    fn put(&self, out: &mut BytesMut);

    /// Reads one value, consuming exactly the bytes [`Wire::put`] wrote.
    fn get(r: &mut Reader) -> Result<Self, FieldError>;

    /// How the field appears in `Debug` output of a message. Overridden for
    /// bulk data so that logging a 4 MiB write does not print 4 MiB.
    fn fmt_debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Adapts [`Wire::fmt_debug`] to `Debug`, for the generated `Debug` impls.
pub(crate) struct WireDebug<'a, T>(pub(crate) &'a T);

impl<T: Wire> fmt::Debug for WireDebug<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt_debug(f)
    }
}

macro_rules! wire_int {
    ($($t:ty),* $(,)?) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut BytesMut) {
                out.put_slice(&self.to_le_bytes());
            }

            fn get(r: &mut Reader) -> Result<Self, FieldError> {
                r.array::<{ std::mem::size_of::<$t>() }>().map(<$t>::from_le_bytes)
            }
        }
    )*};
}

wire_int!(u8, u16, u32, u64, i32);

/// Length prefix for a variable-sized field. Lengths beyond `u32::MAX` cannot
/// occur in a frame the encoder accepts (it rejects payloads over
/// `MAX_PAYLOAD`), so saturating here only affects frames that are discarded.
fn put_prefixed(bytes: &[u8], out: &mut BytesMut) {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX).put(out);
    out.put_slice(bytes);
}

impl Wire for bool {
    fn put(&self, out: &mut BytesMut) {
        u8::from(*self).put(out);
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        match u8::get(r)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(FieldError::Invalid(format!(
                "boolean must be 0 or 1, got {other}"
            ))),
        }
    }
}

impl<const N: usize> Wire for [u8; N] {
    fn put(&self, out: &mut BytesMut) {
        out.put_slice(self);
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        r.array()
    }

    fn fmt_debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A key sent inside a sealed record ([`crate::Message::SharedKey`]): on
/// the wire like any 32 bytes, but never shown by `Debug`, so that logging a
/// message cannot leak it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<key>")
    }
}

impl Wire for SecretKey {
    fn put(&self, out: &mut BytesMut) {
        self.0.put(out);
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        r.array().map(Self)
    }
}

impl Wire for Bytes {
    fn put(&self, out: &mut BytesMut) {
        put_prefixed(self, out);
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        r.prefixed()
    }

    fn fmt_debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        write!(f, "<{} bytes", self.len())?;
        if !self.is_empty() {
            f.write_str(": ")?;
            self.iter()
                .take(SHOWN)
                .try_for_each(|b| write!(f, "{b:02x}"))?;
            if self.len() > SHOWN {
                f.write_str("..")?;
            }
        }
        f.write_str(">")
    }
}

impl Wire for String {
    fn put(&self, out: &mut BytesMut) {
        put_prefixed(self.as_bytes(), out);
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        let raw = r.prefixed()?;
        std::str::from_utf8(&raw)
            .map(str::to_owned)
            .map_err(|e| FieldError::Invalid(format!("not valid UTF-8: {e}")))
    }
}

/// One tag byte (0 = absent, 1 = present) followed by the value if present.
impl<T: Wire> Wire for Option<T> {
    fn put(&self, out: &mut BytesMut) {
        self.is_some().put(out);
        if let Some(v) = self {
            v.put(out);
        }
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        match u8::get(r)? {
            0 => Ok(None),
            1 => T::get(r).map(Some),
            other => Err(FieldError::Invalid(format!(
                "option tag must be 0 or 1, got {other}"
            ))),
        }
    }

    fn fmt_debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            None => f.write_str("None"),
            Some(v) => {
                f.write_str("Some(")?;
                v.fmt_debug(f)?;
                f.write_str(")")
            }
        }
    }
}

/// Defines a fieldless enum that travels as one tag byte, with `Display`
/// (its name) and a decoder that rejects unknown tags.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $tag:literal ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $tag ),*
        }

        impl $name {
            /// Every value, in tag order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The value with wire tag `tag`, if any.
            pub fn from_tag(tag: u8) -> Option<Self> {
                match tag {
                    $( $tag => Some(Self::$variant), )*
                    _ => None,
                }
            }

            /// The wire tag.
            pub fn tag(self) -> u8 {
                self as u8
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }

        impl $crate::codec::Wire for $name {
            fn put(&self, out: &mut bytes::BytesMut) {
                $crate::codec::Wire::put(&self.tag(), out);
            }

            fn get(r: &mut $crate::codec::Reader) -> Result<Self, $crate::codec::FieldError> {
                let tag = <u8 as $crate::codec::Wire>::get(r)?;
                Self::from_tag(tag).ok_or_else(|| {
                    $crate::codec::FieldError::Invalid(format!(
                        concat!("unknown ", stringify!($name), " tag {}"),
                        tag
                    ))
                })
            }
        }
    };
}

pub(crate) use wire_enum;

#[cfg(test)]
mod tests {
    use super::*;

    fn encode<T: Wire>(v: &T) -> Bytes {
        let mut out = BytesMut::new();
        v.put(&mut out);
        out.freeze()
    }

    fn decode<T: Wire>(bytes: &[u8]) -> Result<T, FieldError> {
        T::get(&mut Reader::new(Bytes::copy_from_slice(bytes)))
    }

    #[test]
    fn integers_are_little_endian() {
        assert_eq!(&encode(&0x0102_0304u32)[..], &[4, 3, 2, 1]);
        assert_eq!(&encode(&-2i32)[..], &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(
            decode::<u64>(&[1, 0, 0, 0, 0, 0, 0, 0x80]),
            Ok(0x8000_0000_0000_0001)
        );
        assert_eq!(decode::<u16>(&[0x34, 0x12]), Ok(0x1234));
    }

    #[test]
    fn short_integer_is_truncated() {
        assert_eq!(
            decode::<u32>(&[1, 2, 3]),
            Err(FieldError::Truncated {
                needed: 4,
                remaining: 3
            })
        );
    }

    #[test]
    fn bool_and_option_tags_are_strict() {
        assert_eq!(decode::<bool>(&[1]), Ok(true));
        assert!(matches!(decode::<bool>(&[2]), Err(FieldError::Invalid(_))));
        assert_eq!(decode::<Option<u8>>(&[0]), Ok(None));
        assert_eq!(decode::<Option<u8>>(&[1, 7]), Ok(Some(7)));
        assert!(matches!(
            decode::<Option<u8>>(&[9, 7]),
            Err(FieldError::Invalid(_))
        ));
    }

    #[test]
    fn huge_length_prefix_is_rejected_without_allocating() {
        // Declares 4 GiB - 1 bytes but carries 2.
        let err = decode::<Bytes>(&[0xff, 0xff, 0xff, 0xff, 1, 2]).unwrap_err();
        assert_eq!(
            err,
            FieldError::Truncated {
                needed: u64::from(u32::MAX),
                remaining: 2
            }
        );
    }

    #[test]
    fn bytes_and_strings_round_trip() {
        let data = Bytes::from_static(b"hello");
        assert_eq!(&encode(&data)[..], b"\x05\0\0\0hello");
        assert_eq!(decode::<Bytes>(&encode(&data)), Ok(data));
        let s = "grüße".to_string();
        assert_eq!(decode::<String>(&encode(&s)), Ok(s));
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert!(matches!(
            decode::<String>(b"\x02\0\0\0\xff\xfe"),
            Err(FieldError::Invalid(reason)) if reason.contains("UTF-8")
        ));
    }

    #[test]
    fn debug_of_bulk_data_is_short() {
        let data = Bytes::from(vec![0xab; 1 << 20]);
        let shown = format!("{:?}", WireDebug(&data));
        assert_eq!(shown, "<1048576 bytes: abababababababab..>");
        assert_eq!(format!("{:?}", WireDebug(&[1u8, 0xff])), "01ff");
    }
}
