//! Page-aligned I/O buffers.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size; 4 KiB
//! alignment satisfies every device. [`AlignedBuf`] can become a [`Bytes`]
//! without a copy, so a guest write is copied at most once out of the ublk
//! buffer (a large one takes the buffer over) and then shared by the local
//! write and every peer it is mirrored to.

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every [`AlignedBuf`].
pub const IO_ALIGN: usize = 4096;

/// Buffers are recycled per power-of-two size class up to this size, so the
/// write path does not pay an allocation (and page faults) per request.
const MAX_POOLED: usize = 8 << 20;
/// Bytes kept idle per size class at most.
const POOL_BYTES_PER_CLASS: usize = 16 << 20;
const POOL_CLASSES: usize = (MAX_POOLED / IO_ALIGN).trailing_zeros() as usize + 1;

/// Idle allocations by size class (addresses, so the pool is `Send`).
static POOL: Mutex<[Vec<usize>; POOL_CLASSES]> = Mutex::new([const { Vec::new() }; POOL_CLASSES]);

fn class_of(capacity: usize) -> usize {
    (capacity / IO_ALIGN).trailing_zeros() as usize
}

/// A heap buffer aligned to [`IO_ALIGN`], recycled through a small pool.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation: a power of two, at least [`IO_ALIGN`].
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes whose contents are unspecified but
    /// initialised: zeroes, or what a previous user of the pooled allocation
    /// left. For the kernel or a read to fill.
    pub fn with_len(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                capacity: 0,
            };
        }
        let capacity = len.next_power_of_two().max(IO_ALIGN);
        if capacity <= MAX_POOLED {
            let reused = POOL.lock().unwrap_or_else(|e| e.into_inner())[class_of(capacity)].pop();
            if let Some(addr) = reused {
                let ptr = NonNull::new(addr as *mut u8).expect("pooled addresses are non-null");
                return AlignedBuf { ptr, len, capacity };
            }
        }
        let layout = Self::layout(capacity);
        // Zeroed, so every byte of every buffer (pooled ones included) is
        // initialised and `with_len` may expose old contents safely. Large
        // zeroed allocations are fresh mappings: no memset is paid.
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, capacity }
    }

    /// Shortens the buffer to `len` bytes (no-op if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::with_len(len);
        // SAFETY: ptr is valid for len bytes; writing initialises them.
        unsafe { std::ptr::write_bytes(buf.ptr.as_ptr(), 0, len) };
        buf.len = len;
        buf
    }

    /// An aligned copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let buf = Self::with_len(data.len());
        // SAFETY: both ranges are valid for data.len() bytes and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr.as_ptr(), data.len()) };
        buf
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, IO_ALIGN).expect("buffer size overflows a Layout")
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
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
        if self.capacity == 0 {
            return;
        }
        if self.capacity <= MAX_POOLED {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let idle = &mut pool[class_of(self.capacity)];
            if (idle.len() + 1) * self.capacity <= POOL_BYTES_PER_CLASS.max(2 * self.capacity) {
                idle.push(self.ptr.as_ptr() as usize);
                return;
            }
        }
        // SAFETY: allocated in `with_len` with this same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
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

    #[test]
    fn a_taken_over_buffer_keeps_its_bytes_and_only_the_written_length() {
        let mut buf = AlignedBuf::with_len(1 << 20);
        assert_eq!(buf.as_slice().len(), 1 << 20);
        buf.as_mut_slice()[..3].copy_from_slice(b"abc");
        let ptr = buf.as_ptr();
        buf.truncate(512 * 1024);
        buf.truncate(usize::MAX); // never grows back
        let bytes = buf.into_bytes();
        assert_eq!(bytes.len(), 512 * 1024);
        assert_eq!(bytes.as_ptr(), ptr, "taken over, not copied");
        assert_eq!(&bytes[..3], b"abc");
    }

    #[test]
    fn recycled_buffers_come_back_zeroed_or_copied_never_stale() {
        for _ in 0..4 {
            drop(AlignedBuf::copy_from(&[0xAB; 12288]));
            let z = AlignedBuf::zeroed(12288);
            assert!(z.as_slice().iter().all(|&b| b == 0));
            assert!(is_aligned(z.as_slice().as_ptr()));
            let c = AlignedBuf::copy_from(&[5u8; 5000]);
            assert_eq!(c.as_slice(), &[5u8; 5000][..]);
        }
    }
}
