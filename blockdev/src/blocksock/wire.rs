//! The block socket's frame headers and their little-endian encoding.
//!
//! Kept free of I/O so the encoding can be tested (and fuzzed) alone; the
//! server and the client only move the bytes.

use std::fmt;

/// First four bytes of every request ("VMBQ" read as little-endian).
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"VMBQ");

/// First four bytes of every response ("VMBR"). A different value from
/// [`REQUEST_MAGIC`] makes a client connected to a client, or a stream read
/// from the wrong position, fail at once instead of misparsing.
pub const RESPONSE_MAGIC: u32 = u32::from_le_bytes(*b"VMBR");

/// Largest read or write payload in one request. It bounds what one request
/// makes either side allocate, so a corrupt length cannot exhaust memory.
pub const MAX_IO_BYTES: u32 = 8 << 20;

/// Encoded size of a [`RequestHeader`].
pub const REQUEST_HEADER_LEN: usize = 4 + 1 + 8 + 8 + 4;

/// Encoded size of a [`ResponseHeader`].
pub const RESPONSE_HEADER_LEN: usize = 4 + 8 + 4;

/// What a request asks of the device; one per [`BlockDevice`] method.
///
/// [`BlockDevice`]: crate::device::BlockDevice
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    /// A write that is durable when answered.
    WriteFua = 3,
    Flush = 4,
    Discard = 5,
    WriteZeroes = 6,
}

impl Op {
    fn from_u8(value: u8) -> Option<Op> {
        Some(match value {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::WriteFua,
            4 => Op::Flush,
            5 => Op::Discard,
            6 => Op::WriteZeroes,
            _ => return None,
        })
    }

    /// Whether `len` payload bytes follow the request header.
    pub fn has_payload(self) -> bool {
        matches!(self, Op::Write | Op::WriteFua)
    }
}

/// Why a frame was rejected. Any of these means the peer is not speaking this
/// protocol (or is out of step), so the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    BadMagic(u32),
    UnknownOp(u8),
    TooLong {
        op: Op,
        len: u32,
    },
    /// A flush carries no range.
    FlushWithRange {
        offset: u64,
        len: u32,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            WireError::UnknownOp(op) => write!(f, "unknown op {op}"),
            WireError::TooLong { op, len } => {
                write!(
                    f,
                    "{op:?} of {len} bytes exceeds the limit of {MAX_IO_BYTES}"
                )
            }
            WireError::FlushWithRange { offset, len } => {
                write!(f, "flush with a range ({offset}+{len})")
            }
        }
    }
}

impl std::error::Error for WireError {}

/// One request: `magic u32, op u8, tag u64, offset u64, len u32`, then `len`
/// payload bytes for writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    /// Chosen by the client and echoed in the response; responses come back
    /// in completion order, not request order.
    pub tag: u64,
    pub offset: u64,
    /// Bytes to read or write, or the length of a discard / write-zeroes range.
    pub len: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        out[4] = self.op as u8;
        out[5..13].copy_from_slice(&self.tag.to_le_bytes());
        out[13..21].copy_from_slice(&self.offset.to_le_bytes());
        out[21..25].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes and validates a header; only a header that passes may be acted on.
    pub fn decode(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = le_u32(&bytes[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let op = Op::from_u8(bytes[4]).ok_or(WireError::UnknownOp(bytes[4]))?;
        let header = RequestHeader {
            op,
            tag: le_u64(&bytes[5..13]),
            offset: le_u64(&bytes[13..21]),
            len: le_u32(&bytes[21..25]),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks what the wire format itself constrains. Whether the range fits
    /// the device is the device's business (it answers `EINVAL`), so a client
    /// bug there costs one request, not the connection.
    pub fn validate(&self) -> Result<(), WireError> {
        match self.op {
            Op::Read | Op::Write | Op::WriteFua if self.len > MAX_IO_BYTES => {
                Err(WireError::TooLong {
                    op: self.op,
                    len: self.len,
                })
            }
            Op::Flush if self.offset != 0 || self.len != 0 => Err(WireError::FlushWithRange {
                offset: self.offset,
                len: self.len,
            }),
            _ => Ok(()),
        }
    }
}

/// One response: `magic u32, tag u64, result i32` (0 or a negative errno),
/// then, for a successful read, the `len` bytes the request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    pub tag: u64,
    pub result: i32,
}

impl ResponseHeader {
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut out = [0u8; RESPONSE_HEADER_LEN];
        out[0..4].copy_from_slice(&RESPONSE_MAGIC.to_le_bytes());
        out[4..12].copy_from_slice(&self.tag.to_le_bytes());
        out[12..16].copy_from_slice(&self.result.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; RESPONSE_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = le_u32(&bytes[0..4]);
        if magic != RESPONSE_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        Ok(ResponseHeader {
            tag: le_u64(&bytes[4..12]),
            result: i32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_is_little_endian() {
        let header = RequestHeader {
            op: Op::WriteFua,
            tag: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[0..4], b"VMBQ");
        assert_eq!(bytes[4], 3);
        assert_eq!(bytes[5], 0x08);
        assert_eq!(RequestHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn response_round_trips() {
        let header = ResponseHeader {
            tag: 7,
            result: -libc::EIO,
        };
        assert_eq!(ResponseHeader::decode(&header.encode()), Ok(header));
    }

    #[test]
    fn garbage_is_rejected() {
        let good = RequestHeader {
            op: Op::Read,
            tag: 1,
            offset: 0,
            len: 4096,
        }
        .encode();
        let mut bad = good;
        bad[0] ^= 1;
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(WireError::BadMagic(_))
        ));
        let mut bad = good;
        bad[4] = 0;
        assert_eq!(RequestHeader::decode(&bad), Err(WireError::UnknownOp(0)));
        let mut bad = good;
        bad[21..25].copy_from_slice(&(MAX_IO_BYTES + 1).to_le_bytes());
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(WireError::TooLong { .. })
        ));
        let flush = RequestHeader {
            op: Op::Flush,
            tag: 1,
            offset: 0,
            len: 512,
        };
        assert!(RequestHeader::decode(&flush.encode()).is_err());
        // Long discards are fine: they carry no payload.
        let discard = RequestHeader {
            op: Op::Discard,
            tag: 1,
            offset: 0,
            len: u32::MAX,
        };
        assert_eq!(RequestHeader::decode(&discard.encode()), Ok(discard));
    }
}
