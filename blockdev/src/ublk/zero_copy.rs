//! ublk zero copy (Linux 6.16+, `UBLK_F_AUTO_BUF_REG` with `UBLK_F_USER_COPY`).
//!
//! Without it the ublk driver copies every request's data between the
//! request's pages and the queue's buffer for that tag: one `memcpy` of up
//! to 1 MiB per request, which is most of what a large request costs a
//! ublk server (and what the kernel's own loop driver never pays). With
//! automatic buffer registration the driver instead puts the request's
//! pages into the queue ring's buffer table, at the index the tag's fetch
//! named, before it hands the request over, and takes them out again when
//! the result is committed. A read or write of the backing file can then
//! use those pages directly (`READ_FIXED` / `WRITE_FIXED` with the tag's
//! index): the direct queue does so for every request it serves, the
//! async queue for the reads it sends straight to the file.
//!
//! Everything else needs the data in this process: a replicating layer
//! hashes and sends what is written, a read of a block this node lacks is
//! fetched from a peer, and the slow lane runs a request through the
//! device's own methods. For those the device is also created with user
//! copy: [`UserCopy`] copies a write's data out of the request, or a
//! read's data into it, through the ublk char device (`pread` / `pwrite`),
//! one copy, as the driver would have made. A device's data path is fixed
//! when it is created; one recovered after a restart keeps its own, and
//! both queues serve either kind.

use std::io;
use std::os::fd::RawFd;

use libublk::ctrl::UblkCtrl;
use libublk::io::{UblkDev, UblkIOCtx};
use libublk::sys;

use crate::device::SECTOR_SIZE;

/// The feature flags a device is created with to use zero copy.
pub(super) const CTRL_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

/// Whether the running kernel's ublk driver has automatic buffer
/// registration and user copy (it lists its features since Linux 6.5).
pub(super) fn supported() -> bool {
    UblkCtrl::get_features().is_some_and(|features| features & CTRL_FLAGS == CTRL_FLAGS)
}

/// Whether `dev` was created for zero copy.
pub(super) fn in_use(dev: &UblkDev) -> bool {
    dev.dev_info.flags & CTRL_FLAGS == CTRL_FLAGS
}

/// What each fetch and commit of `tag` names: put the tag's next request's
/// pages at index `tag` of the queue ring's buffer table (libublk gives
/// the table one entry per tag). No fallback: if the kernel cannot
/// register them (out of memory), it fails that request itself.
pub(super) fn registration(tag: u16) -> sys::ublk_auto_buf_reg {
    sys::ublk_auto_buf_reg {
        index: tag,
        flags: 0,
        reserved0: 0,
        reserved1: 0,
    }
}

/// Copies data between this process and a request's pages through the
/// ublk char device (`UBLK_F_USER_COPY`), for the requests of one queue.
/// Any thread may copy, between the request's arrival and its commit.
#[derive(Clone, Copy, Debug)]
pub(super) struct UserCopy {
    /// `/dev/ublkcN`, which libublk keeps open (and in slot 0 of the
    /// files it registers) as long as the device is served.
    cdev: RawFd,
    qid: u16,
}

impl UserCopy {
    pub(super) fn new(dev: &UblkDev, qid: u16) -> Self {
        UserCopy {
            cdev: dev.tgt.fds[0],
            qid,
        }
    }

    /// The data of `tag`'s write request, into all of `buf`.
    fn read_request(&self, tag: u16, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let pos = self.position(tag, done)?;
            // SAFETY: `rest` is valid for writes of its length.
            let n = unsafe { libc::pread(self.cdev, rest.as_mut_ptr().cast(), rest.len(), pos) };
            done += transferred(n)?;
        }
        Ok(())
    }

    /// All of `data` into `tag`'s read request.
    fn fill_request(&self, tag: u16, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let pos = self.position(tag, done)?;
            // SAFETY: `rest` is valid for reads of its length.
            let n = unsafe { libc::pwrite(self.cdev, rest.as_ptr().cast(), rest.len(), pos) };
            done += transferred(n)?;
        }
        Ok(())
    }

    /// Before `iod` runs on `buf` (memory of ours, at least the request's
    /// length): a write's data comes over from the request.
    pub(super) fn before(
        &self,
        tag: u16,
        iod: &sys::ublksrv_io_desc,
        buf: &mut [u8],
    ) -> io::Result<()> {
        if iod.op_flags & 0xff != sys::UBLK_IO_OP_WRITE {
            return Ok(());
        }
        let len = iod.nr_sectors as usize * SECTOR_SIZE as usize;
        self.read_request(tag, &mut buf[..len])
    }

    /// After `iod` ran on `buf` with `result`: a read's data goes over to
    /// the request.
    pub(super) fn after(
        &self,
        tag: u16,
        iod: &sys::ublksrv_io_desc,
        buf: &[u8],
        result: i32,
    ) -> io::Result<()> {
        if iod.op_flags & 0xff != sys::UBLK_IO_OP_READ || result <= 0 {
            return Ok(());
        }
        self.fill_request(tag, &buf[..result as usize])
    }

    /// Where `offset` of `tag`'s request is in the char device.
    fn position(&self, tag: u16, offset: usize) -> io::Result<libc::off_t> {
        if offset as u64 > sys::UBLK_IO_BUF_BITS_MASK as u64 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(UblkIOCtx::ublk_user_copy_pos(self.qid, tag, offset as u32) as libc::off_t)
    }
}

/// The byte count of a `pread`/`pwrite` that returned `n`.
fn transferred(n: isize) -> io::Result<usize> {
    match n {
        n if n > 0 => Ok(n as usize),
        // The request is shorter than the caller thought.
        0 => Err(io::Error::from_raw_os_error(libc::EIO)),
        _ => {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(error)
            }
        }
    }
}

/// The result of a request whose data could not be copied to or from its
/// pages (the kernel refused: the request is gone, or the device is).
pub(super) fn user_copy_failed(iod: &sys::ublksrv_io_desc, error: &io::Error) -> i32 {
    let op = iod.op_flags & 0xff;
    tracing::warn!(op, %error, "request failed: cannot copy its data");
    -error.raw_os_error().unwrap_or(libc::EIO)
}
