//! ublk zero copy for the direct queue (Linux 6.16+, `UBLK_F_AUTO_BUF_REG`).
//!
//! Without it the ublk driver copies every request's data between the
//! request's pages and the queue's buffer for that tag: one `memcpy` of up
//! to 1 MiB per request, which is most of what a large request costs a
//! ublk server (and what the kernel's own loop driver never pays). With
//! automatic buffer registration the driver instead puts the request's
//! pages into the queue ring's buffer table, at the index the tag's fetch
//! named, before it hands the request over, and takes them out again when
//! the result is committed. The direct queue then reads or writes the
//! backing file straight from those pages (`READ_FIXED` / `WRITE_FIXED`
//! with the tag's index).
//!
//! The price: the server never sees the data. That suits only a device
//! that passes reads and writes to one file untouched (a standalone node's
//! disk); a replicating device must hash and send what is written, so it
//! keeps the copying queue. A device's data path is fixed when it is
//! created: one recovered after a restart keeps its own.

use std::os::fd::{OwnedFd, RawFd};

use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::sys;

/// The feature flag a device is created with to use zero copy.
pub(super) const CTRL_FLAGS: u64 = sys::UBLK_F_AUTO_BUF_REG as u64;

/// Whether the running kernel's ublk driver has automatic buffer
/// registration (it lists its features since Linux 6.5).
pub(super) fn supported() -> bool {
    UblkCtrl::get_features().is_some_and(|features| features & CTRL_FLAGS != 0)
}

/// Whether `dev` was created for zero copy.
pub(super) fn in_use(dev: &UblkDev) -> bool {
    dev.dev_info.flags & CTRL_FLAGS != 0
}

/// Whether the existing device `dev_id` was created for zero copy.
pub(super) fn device_uses_it(dev_id: u32) -> bool {
    UblkCtrl::new_simple(dev_id as i32).is_ok_and(|ctrl| ctrl.dev_info().flags & CTRL_FLAGS != 0)
}

/// The backing file once more, without `O_DIRECT`: for the requests whose
/// pages an `O_DIRECT` descriptor refuses (-EINVAL).
///
/// A ublk device only asks its users to align memory to 4 bytes (the
/// parameter that would raise that is not in libublk's bindings), while an
/// `O_DIRECT` file wants its disk's sector size. In copy mode the tag's
/// buffer is aligned whatever the user's is; in zero copy the user's pages
/// are the buffer. The page cache takes any alignment, and Linux keeps it
/// coherent with the direct descriptor's I/O (a direct read writes back
/// and a direct write drops the cached pages of its range first), and a
/// flush of either descriptor syncs the file.
pub(super) fn reopen_buffered(fd: RawFd) -> std::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{fd}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    Ok(file.into())
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
