//! The local backing store: a regular file or a block device, driven through
//! io_uring.
//!
//! This is the bottom of the block stack. It knows nothing of replication; it
//! turns [`BlockDevice`] calls into io_uring operations on one file
//! descriptor, with O_DIRECT when the configuration asks for it.

mod file_times;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use io_uring::{opcode, squeue, types};

use crate::buffer::{is_aligned, AlignedBuf};
use crate::device::{check_range, BlockDevice};
pub use file_times::FileTimes;
use uring::{cqe_to_result, Uring};

/// Queue depth of the ring; more in-flight requests simply wait in `push`.
const RING_ENTRIES: u32 = 256;

/// Largest single zero-fill write when a backing cannot zero a range itself.
const ZERO_FILL_CHUNK: u64 = 1 << 20;

/// How an io_uring operation names the backing file: by descriptor, or by
/// its slot among the files registered with the ring it goes to (a ublk
/// queue ring; see `ublk::ring`).
#[derive(Clone, Copy)]
enum FileRef {
    Fd(types::Fd),
    Slot(types::Fixed),
}

/// Builds an operation on a [`FileRef`]: `op!(file, |f| opcode::X::new(f, ..).build())`
/// (one expression, type-checked for a descriptor and for a slot).
macro_rules! op {
    ($file:expr, |$f:ident| $build:expr) => {
        match $file {
            FileRef::Fd($f) => $build,
            FileRef::Slot($f) => $build,
        }
    };
}

/// How the backing store is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackingOptions {
    /// Bypass the page cache (O_DIRECT). Buffers that are not 4 KiB-aligned
    /// are bounced through an aligned copy.
    pub direct_io: bool,
}

/// Why a backing store could not be opened. Every case names the path.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("backing store {path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("backing store {path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: PathBuf },
    #[error("backing store {path} holds {actual} bytes, smaller than the configured size of {wanted} bytes")]
    TooSmall {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("backing store {path}: cannot set up io_uring: {source}")]
    Uring { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackingKind {
    File,
    BlockDevice,
}

/// An operation the backing device failed (the kernel returned an error
/// for it): what the layer above needs to stop using the device and to say
/// so clearly.
#[derive(Debug)]
pub struct BackingFailure<'a> {
    pub path: &'a Path,
    /// "read", "write", "flush", "discard" or "write-zeroes".
    pub op: &'static str,
    pub offset: u64,
    pub len: u64,
    pub error: &'a io::Error,
}

/// Called for every failed operation (see [`BackingStore::on_failure`]).
pub type FailureHook = Box<dyn Fn(&BackingFailure<'_>) + Send + Sync>;

/// A file or block device serving the first `size` bytes as a [`BlockDevice`].
pub struct BackingStore {
    file: File,
    path: PathBuf,
    kind: BackingKind,
    size: u64,
    direct_io: bool,
    uring: Uring,
    on_failure: std::sync::OnceLock<FailureHook>,
    /// A file's times, kept current so writes start without blocking.
    times: Option<FileTimes>,
}

impl BackingStore {
    /// Opens `path` to serve `size` bytes. Refuses, without writing anything,
    /// a path that is missing, of the wrong type, or smaller than `size`.
    pub fn open(path: &Path, size: u64, options: BackingOptions) -> Result<Self, BackingError> {
        let open_err = |source| BackingError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut open = OpenOptions::new();
        open.read(true).write(true);
        if options.direct_io {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(open_err)?;
        let kind = measure(&file, path, size)?;
        let uring = Uring::new(RING_ENTRIES).map_err(|source| BackingError::Uring {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(BackingStore {
            times: FileTimes::for_file(&file),
            file,
            path: path.to_path_buf(),
            kind,
            size,
            direct_io: options.direct_io,
            uring,
            on_failure: std::sync::OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Installs the hook told about every operation the device fails (an
    /// I/O error, a write the file refuses...), after the error is final:
    /// transient -EINTR/-EAGAIN are retried first, and requests refused
    /// before reaching the device (out of range) are not reported. The
    /// replication layer uses it to detach a failing disk. Only the first
    /// call installs a hook.
    pub fn on_failure(&self, hook: FailureHook) {
        let _ = self.on_failure.set(hook);
    }

    /// Passes `result` through, telling the hook if it is a device error.
    fn observe<T>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        result: io::Result<T>,
    ) -> io::Result<T> {
        if let (Err(error), Some(hook)) = (&result, self.on_failure.get()) {
            hook(&BackingFailure {
                path: &self.path,
                op,
                offset,
                len,
                error,
            });
        }
        result
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Runs one operation, built by `build` for the file reference of the
    /// ring it goes to. A result of -EINTR or -EAGAIN means the kernel
    /// did not perform it (no byte transferred), so it is submitted again,
    /// a few times, rather than failing a guest request on a transient
    /// condition; any other result, or a transient one that persists, is
    /// returned.
    ///
    /// # Safety
    /// As [`Uring::submit`]: every buffer the entries point to must stay
    /// valid and unaliased until the returned future completes (it is
    /// awaited here, so until this future completes or is dropped).
    async unsafe fn run(&self, build: impl Fn(FileRef) -> squeue::Entry) -> io::Result<usize> {
        let mut attempt = 0;
        loop {
            // SAFETY: the caller's contract; each submission is awaited
            // (and so finished) before the next one reuses the buffers.
            let result = unsafe { self.submit(&build) }.await;
            if retry_transient(result, attempt) {
                attempt += 1;
                continue;
            }
            return cqe_to_result(result);
        }
    }

    /// Submits `entry` and waits for its CQE result: on the ublk queue's own
    /// ring when called from a queue thread (no thread hops, see
    /// `ublk::ring`), on the backing store's shared ring otherwise.
    ///
    /// # Safety
    /// As [`BackingStore::run`].
    async unsafe fn submit(&self, build: impl Fn(FileRef) -> squeue::Entry) -> i32 {
        if crate::ublk::ring::on_queue_thread() {
            let file = match crate::ublk::ring::queue_file_slot(self.file.as_raw_fd()) {
                Some(slot) => FileRef::Slot(types::Fixed(slot)),
                None => FileRef::Fd(self.fd()),
            };
            // SAFETY: the caller's contract; awaited here, on this thread.
            if let Some(result) =
                unsafe { crate::ublk::ring::submit_on_queue_ring(build(file)) }.await
            {
                return result;
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.uring.submit(build(FileRef::Fd(self.fd()))) }.await
    }

    /// Reads exactly `buf.len()` bytes, retrying short reads.
    async fn read_exact_at(&self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let len = chunk_len(buf.len());
            // The address as an integer: a raw pointer would keep the
            // future from being `Send`.
            let addr = buf.as_mut_ptr() as usize;
            let read = |file| {
                op!(file, |f| opcode::Read::new(f, addr as *mut u8, len)
                    .offset(offset)
                    .build())
            };
            // SAFETY: `buf` is borrowed until the op completes (UringOp waits on drop).
            let done = unsafe { self.run(read) }.await?.min(buf.len());
            if done == 0 {
                // Past the end of a file: the rest reads as zeroes, like a hole.
                buf.fill(0);
                return Ok(());
            }
            offset += done as u64;
            buf = &mut buf[done..];
        }
        Ok(())
    }

    /// Writes all of `data`, retrying short writes.
    async fn write_all_at(&self, mut offset: u64, mut data: &[u8], fua: bool) -> io::Result<()> {
        let rw_flags = if fua { libc::RWF_DSYNC } else { 0 };
        while !data.is_empty() {
            let len = chunk_len(data.len());
            let addr = data.as_ptr() as usize; // as in `read_exact_at`
            let write = |file| {
                op!(file, |f| opcode::Write::new(f, addr as *const u8, len)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build())
            };
            if let Some(times) = &self.times {
                times.before_write();
            }
            // SAFETY: `data` is borrowed until the op completes.
            let done = unsafe { self.run(write) }.await?.min(data.len());
            if done == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "backing write made no progress",
                ));
            }
            offset += done as u64;
            data = &data[done..];
        }
        Ok(())
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let fallocate = |file| {
            op!(file, |f| opcode::Fallocate::new(f, len)
                .offset(offset)
                .mode(mode)
                .build())
        };
        // SAFETY: fallocate references no memory.
        unsafe { self.run(fallocate) }.await.map(|_| ())
    }

    /// Punches a hole, or writes zeroes where holes are not supported.
    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(offset, len, punch).await {
            Err(e) if is_unsupported(&e) => self.zero_fill(offset, len).await,
            other => other,
        }
    }

    /// Writes zero buffers: the fallback for backings that cannot zero a range.
    async fn zero_fill(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeroes = AlignedBuf::zeroed(ZERO_FILL_CHUNK.min(len) as usize);
        while offset < end {
            let n = (end - offset).min(ZERO_FILL_CHUNK) as usize;
            self.write_all_at(offset, &zeroes.as_slice()[..n], false)
                .await?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Times an operation that the kernel did not perform (-EINTR, -EAGAIN) is
/// submitted again before its error is returned.
const TRANSIENT_RETRIES: u32 = 3;

/// Whether CQE result `result` of attempt `attempt` (0-based) is worth
/// another submission.
fn retry_transient(result: i32, attempt: u32) -> bool {
    (result == -libc::EINTR || result == -libc::EAGAIN) && attempt < TRANSIENT_RETRIES
}

/// io_uring lengths are u32; large requests go in pieces.
fn chunk_len(len: usize) -> u32 {
    len.min(1 << 30) as u32
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

impl BlockDevice for BackingStore {
    fn size(&self) -> u64 {
        self.size
    }

    /// The data is only read by the kernel while the write runs.
    fn keeps_write_data(&self) -> bool {
        false
    }

    fn io_files(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.file.as_raw_fd()]
    }

    /// The store adds nothing to a read, write or flush that goes well:
    /// those may go to the file directly. (Errors, retries, bounce buffers
    /// and the failure hook stay in the methods below, which a frontend
    /// calls for any request that does not go well.)
    fn direct_file(&self) -> Option<crate::device::DirectFile> {
        Some(crate::device::DirectFile {
            fd: self.file.as_raw_fd(),
            size: self.size,
            report: false,
        })
    }

    fn read_file(&self) -> Option<crate::device::DirectFile> {
        self.direct_file()
    }

    fn read_directly(&self, offset: u64, len: u64) -> bool {
        check_range(self.size, offset, len).is_ok()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        check_range(self.size, offset, len)?;
        let result = if self.direct_io && !is_aligned(buf.as_ptr()) {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            let read = self.read_exact_at(offset, bounce.as_mut_slice()).await;
            if read.is_ok() {
                buf.copy_from_slice(bounce.as_slice());
            }
            read
        } else {
            self.read_exact_at(offset, buf).await
        };
        self.observe("read", offset, len, result)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        check_range(self.size, offset, len)?;
        let result = if self.direct_io && !is_aligned(data.as_ptr()) {
            let bounce = AlignedBuf::copy_from(&data);
            self.write_all_at(offset, bounce.as_slice(), fua).await
        } else {
            self.write_all_at(offset, &data, fua).await
        };
        self.observe("write", offset, len, result)
    }

    async fn flush(&self) -> io::Result<()> {
        let fsync = |file| {
            op!(file, |f| opcode::Fsync::new(f)
                .flags(types::FsyncFlags::DATASYNC)
                .build())
        };
        // SAFETY: fsync references no memory.
        let result = cqe_to_result(unsafe { self.submit(fsync) }.await).map(|_| ());
        self.observe("flush", 0, 0, result)
    }

    /// Punches a hole (files) or zeroes-with-unmap (block devices). Both
    /// release the space *and* make the range read back as zeroes; a plain
    /// BLKDISCARD would leave the contents undefined and replicas could
    /// differ afterwards.
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let result = self.punch_hole(offset, len).await;
        self.observe("discard", offset, len, result)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let result = match self.fallocate(offset, len, zero_range).await {
            Err(e) if is_unsupported(&e) => match self.kind {
                // tmpfs and some file systems lack ZERO_RANGE; a hole reads as zeroes too.
                BackingKind::File => self.punch_hole(offset, len).await,
                BackingKind::BlockDevice => self.zero_fill(offset, len).await,
            },
            other => other,
        };
        self.observe("write-zeroes", offset, len, result)
    }
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Checks, without writing, that `path` could serve `size` bytes (a file
/// or block device at least that large), as [`BackingStore::open`] would.
pub fn check_capacity(path: &Path, size: u64) -> Result<(), BackingError> {
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|source| BackingError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    measure(&file, path, size).map(|_| ())
}

/// What `file` (opened from `path`) is; refuses anything but a file or a
/// block device of at least `size` bytes.
fn measure(file: &File, path: &Path, size: u64) -> Result<BackingKind, BackingError> {
    let open_err = |source| BackingError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file_type = file.metadata().map_err(open_err)?.file_type();
    let (kind, actual) = if file_type.is_file() {
        (BackingKind::File, file.metadata().map_err(open_err)?.len())
    } else if file_type.is_block_device() {
        (
            BackingKind::BlockDevice,
            block_device_size(file).map_err(open_err)?,
        )
    } else {
        return Err(BackingError::NotFileOrDevice {
            path: path.to_path_buf(),
        });
    };
    if actual < size {
        return Err(BackingError::TooSmall {
            path: path.to_path_buf(),
            actual,
            wanted: size,
        });
    }
    Ok(kind)
}

/// Capacity of a block device in bytes (BLKGETSIZE64).
fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

#[cfg(test)]
mod tests;
