//! Keeps a backing file's modification time at the kernel's current clock
//! tick while it is written, so that the writes themselves find nothing to
//! update and io_uring can start them at once.
//!
//! Why: io_uring first tries each write without blocking (`IOCB_NOWAIT`).
//! A write to a regular file must first set the file's mtime and ctime to
//! the current tick of the kernel's coarse clock when they are older
//! (`file_modified`), and that update may block (ext4 starts a journal
//! transaction), so without blocking it fails with `EAGAIN` and io_uring
//! hands the write to one of its worker threads (io-wq): a wake-up and a
//! thread hop more, and the worker competes with the queue threads for the
//! CPUs. Every write that starts after a tick, until one of them has made
//! the update, fails that way; with two ublk queues writing one file (a
//! guest with two vCPUs) most of them did. The loop driver never tries
//! without blocking, so it never pays this.
//!
//! So before a write, [`FileTimes::before_write`] looks at the coarse clock
//! (`CLOCK_REALTIME_COARSE`, the clock the kernel stamps files with; a
//! vDSO read) and, once per tick, sets the file's mtime (and with it its
//! ctime) to now itself (`futimens`, the access time left alone): one
//! blocking update per tick on the submitting thread, and the writes of the
//! tick go straight to the file. Measured in the test VM (`benches/README.md`,
//! "Keeping the file's times current"): two queues, 4 KiB random writes,
//! the server's CPU per write 90–96 µs without, 53–60 µs with.
//!
//! Times are set only to "now", as a write would set them, so nothing a
//! user sees changes. Only on local file systems (ext4, XFS, btrfs, f2fs,
//! tmpfs): elsewhere writes do not start without blocking anyway, and a
//! network file system would pay a round trip per tick. A file whose
//! times cannot be set (not the owner and no write permission, which
//! cannot happen to a file opened for writing by its owner or root) is
//! left alone from the first failure on.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One backing file's times keeper; share it between the threads that
/// write the file, or give each its own (at most one update per tick
/// each).
#[derive(Debug)]
pub struct FileTimes {
    fd: RawFd,
    /// The tick (coarse clock, nanoseconds) the times were last set in.
    set_in_tick: AtomicU64,
    failed: AtomicBool,
}

impl FileTimes {
    /// A keeper for `file` if it is a regular file (a block device's
    /// writes do not stamp it); the file must outlive the keeper.
    pub fn for_file(file: &impl AsRawFd) -> Option<FileTimes> {
        Self::for_fd(file.as_raw_fd())
    }

    /// [`FileTimes::for_file`] for a descriptor that stays open as long as
    /// the keeper.
    pub fn for_fd(fd: RawFd) -> Option<FileTimes> {
        let stat = nix::sys::stat::fstat(fd).ok()?;
        let regular = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
        (regular && on_local_file_system(fd)).then(|| Self::keeping(fd))
    }

    fn keeping(fd: RawFd) -> FileTimes {
        FileTimes {
            fd,
            set_in_tick: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// Call before submitting a write: sets the file's mtime to now if it
    /// has not been set in the current tick (by this keeper).
    pub fn before_write(&self) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let tick = coarse_now_ns();
        if self.set_in_tick.swap(tick, Ordering::Relaxed) == tick {
            return;
        }
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
        ];
        // SAFETY: `times` is two valid timespecs for the call; `fd` is open
        // (the keeper's owner keeps the file).
        if unsafe { libc::futimens(self.fd, times.as_ptr()) } != 0 {
            let error = std::io::Error::last_os_error();
            self.failed.store(true, Ordering::Relaxed);
            tracing::debug!(%error, "cannot keep the backing file's times current; writes update them themselves");
        }
    }
}

/// Whether `fd` is on a local file system that starts writes without
/// blocking (and so fails them on a stale timestamp). On a network file
/// system (NFS, SMB, FUSE...) setting the times would be a round trip to
/// the server every tick, for writes that go to io_uring's workers anyway.
fn on_local_file_system(fd: RawFd) -> bool {
    const EXT2_3_4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const F2FS: i64 = 0xF2F5_2010;
    const TMPFS: i64 = 0x0102_1994;
    // SAFETY: an all-zero statfs is valid, and `buf` outlives the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `buf` is valid for writes for the call.
    if unsafe { libc::fstatfs(fd, &mut buf) } != 0 {
        return false;
    }
    [EXT2_3_4, XFS, BTRFS, F2FS, TMPFS].contains(&(buf.f_type as i64))
}

/// The kernel's coarse clock (what it stamps files with), in nanoseconds.
fn coarse_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is valid for writes for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_mtime_is_set_to_the_current_tick_and_the_atime_left_alone() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let old = libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        };
        // SAFETY: two valid timespecs.
        assert_eq!(
            unsafe { libc::futimens(file.as_file().as_raw_fd(), [old, old].as_ptr()) },
            0
        );
        // Whatever file system the test's temporary directory is on.
        let times = FileTimes::keeping(file.as_file().as_raw_fd());
        let before = coarse_now_ns();
        times.before_write();
        let meta = file.as_file().metadata().unwrap();
        let mtime = meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64;
        assert!(mtime >= before, "mtime {mtime} before the tick {before}");
        assert_eq!(meta.atime(), 1_000_000, "the access time was changed");
        // Once per tick: set it back, and a second call in the same tick
        // (almost always; a tick is 1-10 ms) leaves it.
        let tick = times.set_in_tick.load(Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { libc::futimens(file.as_file().as_raw_fd(), [old, old].as_ptr()) };
        times.before_write();
        if coarse_now_ns() == tick {
            assert_eq!(file.as_file().metadata().unwrap().mtime(), 1_000_000);
        }
    }

    #[test]
    fn only_regular_files_on_local_file_systems_get_a_keeper() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(FileTimes::for_file(&null).is_none());
        // procfs: a regular file, but not a local file system of data.
        let stat = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(FileTimes::for_file(&stat).is_none());
        // /dev/shm is tmpfs wherever it exists.
        if let Ok(shm) = tempfile::NamedTempFile::new_in("/dev/shm") {
            assert!(FileTimes::for_file(shm.as_file()).is_some());
        }
    }
}
