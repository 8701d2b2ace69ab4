//! The one trait every layer of the vmsync block stack implements.
//!
//! The stack is, bottom to top: the local backing store, the replication
//! layer, the on-demand fetch layer. The ublk frontend (and every test and
//! benchmark) talks only to the top layer through this trait, so each layer can
//! be exercised alone with a file backing and without a kernel device.

use bytes::Bytes;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

/// Size of the sector unit the kernel addresses ublk requests in.
pub const SECTOR_SIZE: u64 = 512;

/// A block device as seen by the layer above it.
///
/// All offsets and lengths are in bytes and must be multiples of
/// [`SECTOR_SIZE`]; a request that reaches past [`BlockDevice::size`] fails
/// with `EINVAL` and does nothing. Methods take `&self`: a device serves many
/// requests at once, from many threads.
///
/// Futures returned here must be driven to completion: a layer may have
/// handed the caller's buffer to the kernel, and dropping the future early
/// waits for the kernel to let go of it.
pub trait BlockDevice: Send + Sync + 'static {
    /// Capacity in bytes.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes `data` at `offset`. With `fua` the data is durable when the
    /// future completes (Force Unit Access); otherwise only after a later
    /// [`BlockDevice::flush`].
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Tells the device the range is unused. vmsync gives discard a defined
    /// result — the range reads back as zeroes — so that replicas that all
    /// apply the same discard stay byte-identical.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes zeroes over the range, without transferring a buffer.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// False when the device promises never to keep a write's `data` (or a
    /// clone of it) past the completion of that write. A frontend may then
    /// lend it the request's own buffer instead of a copy. The default,
    /// true, is always safe (a replicating device queues the data to its
    /// peers, so it must say true).
    fn keeps_write_data(&self) -> bool {
        true
    }

    /// The files this device's reads and writes reach in the end (the
    /// backing store's), for a frontend to register with the io_uring it
    /// serves requests on: an operation on a registered file skips the
    /// per-request lookup and reference count of its descriptor. Each must
    /// stay open as long as the device exists (the frontend matches them by
    /// number). A layer passes on the files of the layer under it; the
    /// default is none.
    fn io_files(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// The file this device *is*, when its reads, writes and flushes may
    /// go straight to that file with nothing of the device's own around
    /// them: device offset = file offset, no bookkeeping, no other copy.
    /// Only the bottom of a stack with nothing on it qualifies (a
    /// standalone node's backing store); every other layer keeps the
    /// default, none. A frontend may then serve those requests itself, one
    /// io_uring operation each, as the reference ublk loop target does; it
    /// still calls this device's methods for everything else (other
    /// operations, errors, short transfers). The file must stay open as
    /// long as the device exists.
    fn direct_file(&self) -> Option<DirectFile> {
        None
    }

    /// Told of each request a frontend served straight from
    /// [`BlockDevice::direct_file`] (and that succeeded), when that file
    /// asked for it (`report`): how a layer that counts requests (metrics)
    /// sees the ones that never reached its methods. `started` is when the
    /// request reached the frontend. Requests the frontend hands to the
    /// device's methods instead are not reported here.
    fn served_directly(&self, _op: DirectOp, _bytes: u64, _started: Instant) {}

    /// For a device that serves *some* reads straight from a file (a
    /// replicated primary's own disk, for the blocks it holds): that file.
    /// A frontend may then ask [`BlockDevice::read_directly`] before each
    /// read and, on yes, read the file itself. Every layer that can pass
    /// reads through unchanged passes its inner device's on; the default
    /// is none.
    fn read_file(&self) -> Option<DirectFile> {
        None
    }

    /// Whether the read of `len` bytes at `offset` may go straight to
    /// [`BlockDevice::read_file`] now (this device would do nothing but
    /// read the same bytes from it), having done the bookkeeping a read
    /// does. No sends the read through [`BlockDevice::read`]. Called on
    /// the frontend's thread: it must not block.
    fn read_directly(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// See [`BlockDevice::direct_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFile {
    pub fd: RawFd,
    /// The device's size: requests beyond it go through the device.
    pub size: u64,
    /// Whether to call [`BlockDevice::served_directly`] for each request
    /// served from the file (it costs a clock read per request).
    pub report: bool,
}

/// A request a frontend can serve from a [`DirectFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectOp {
    Read,
    Write,
    Flush,
}

/// Checks that a request lies inside a device of `size` bytes and is
/// sector-aligned; every layer uses this so out-of-range requests fail the
/// same way everywhere, before they touch anything.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    let aligned = offset.is_multiple_of(SECTOR_SIZE) && len.is_multiple_of(SECTOR_SIZE);
    let inside = offset.checked_add(len).is_some_and(|end| end <= size);
    if aligned && inside {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("request {offset}+{len} is unaligned or beyond the device size {size}"),
        ))
    }
}

/// The errno a failed request reports to the kernel (positive).
pub fn errno_of(err: &io::Error) -> i32 {
    match (err.raw_os_error(), err.kind()) {
        (Some(errno), _) => errno,
        (None, io::ErrorKind::InvalidInput) => libc::EINVAL,
        (None, io::ErrorKind::PermissionDenied) => libc::EROFS,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_accepts_inside_and_rejects_outside() {
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(4096, 512, 512).is_ok());
        assert!(check_range(4096, 4096, 0).is_ok());
        assert!(check_range(4096, 3584, 1024).is_err());
        assert!(check_range(4096, 1, 512).is_err());
        assert!(check_range(4096, u64::MAX - 511, 512).is_err());
    }
}
