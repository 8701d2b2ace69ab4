//! Page-aligned I/O buffers.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size; 4 KiB
//! alignment satisfies every device. [`AlignedBuf`] can become a [`Bytes`]
//! without a copy, so a guest write is copied once out of the ublk buffer and
//! then shared by the local write and every peer it is mirrored to.

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`].
pub const IO_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`IO_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// An aligned copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN).expect("buffer size overflows a Layout")
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Freezes the buffer into [`Bytes`] that keep their alignment.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `zeroed` with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

/// True when `ptr` may be handed to an O_DIRECT transfer as is.
pub fn is_aligned(ptr: *const u8) -> bool {
    (ptr as usize).is_multiple_of(IO_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_stay_aligned_as_bytes() {
        let buf = AlignedBuf::copy_from(&[7u8; 8192]);
        assert!(is_aligned(buf.as_slice().as_ptr()));
        let bytes = buf.into_bytes();
        assert!(is_aligned(bytes.as_ptr()));
        assert_eq!(bytes.len(), 8192);
        assert!(bytes.iter().all(|&b| b == 7));
        assert_eq!(AlignedBuf::zeroed(0).as_slice().len(), 0);
    }
}
