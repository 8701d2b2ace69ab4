//! Backing I/O on the ublk queue's own io_uring.
//!
//! A request served by a queue thread that reaches the backing store would
//! otherwise take three hops: the backing store's shared ring, its reaper
//! thread, and an eventfd write to wake the queue thread again (see
//! `doorbell`). On the queue thread itself the backing store submits to the
//! queue's ring instead (libublk's `ublk_submit_sqe_async`): the completion
//! arrives on the ring the thread already waits on, and the request is
//! committed on the same wake-up. Everywhere else (tokio tasks, replication)
//! the shared ring is used as before.
//!
//! The queue's ring and the futures on it are per thread: a submission made
//! here is awaited here. That holds because a future first polled on a
//! queue thread stays on its local executor (it is never handed to tokio
//! mid-flight), and a future spawned elsewhere sees no queue ring.
//!
//! The queue's ring also has the backing files registered (libublk
//! registers the target's files with every queue ring; the device names
//! them through [`crate::BlockDevice::io_files`]), and an operation on the
//! queue ring names its file by slot: the kernel then skips looking up and
//! reference-counting the descriptor on every request, as rublk's loop
//! target does.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::squeue;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;

use super::doorbell::Doorbell;

std::thread_local! {
    /// The doorbell of the queue this thread serves, if it serves one.
    static QUEUE_DOORBELL: Cell<*const Doorbell> = const { Cell::new(std::ptr::null()) };
    /// The files registered with this thread's queue ring, by slot.
    static QUEUE_FILES: RefCell<Vec<RawFd>> = const { RefCell::new(Vec::new()) };
}

/// Marks this thread as serving the queue of `doorbell`, whose ring has
/// `files` registered (slot = index), until the guard is dropped.
pub(super) fn enter_queue_thread(doorbell: &Arc<Doorbell>, files: &[RawFd]) -> QueueThread {
    QUEUE_DOORBELL.with(|d| d.set(Arc::as_ptr(doorbell)));
    QUEUE_FILES.with(|f| *f.borrow_mut() = files.to_vec());
    QueueThread(())
}

pub(super) struct QueueThread(());

impl Drop for QueueThread {
    fn drop(&mut self) {
        QUEUE_DOORBELL.with(|d| d.set(std::ptr::null()));
        QUEUE_FILES.with(|f| f.borrow_mut().clear());
    }
}

/// The slot of `fd` among the files registered with this thread's queue
/// ring, if this is a queue thread and `fd` is one of them.
pub(crate) fn queue_file_slot(fd: RawFd) -> Option<u32> {
    QUEUE_FILES.with(|f| f.borrow().iter().position(|&r| r == fd).map(|i| i as u32))
}

/// Whether this thread serves the queue `doorbell` belongs to.
pub(super) fn is_queue_thread_of(doorbell: &Doorbell) -> bool {
    QUEUE_DOORBELL.with(|d| std::ptr::eq(d.get(), doorbell))
}

/// Whether this thread is a ublk queue thread (its ring takes backing I/O).
pub(crate) fn on_queue_thread() -> bool {
    QUEUE_DOORBELL.with(|d| !d.get().is_null())
}

/// Submits `entry` on this queue thread's ring and waits for its result
/// (a CQE result: bytes or a negative errno). None when the ring refused
/// it: nothing was submitted, the caller uses another ring.
///
/// # Safety
/// As for any io_uring submission: every buffer `entry` names must stay
/// valid and unaliased until the returned future completes, and the future
/// must be polled to completion on this thread.
pub(crate) async unsafe fn submit_on_queue_ring(entry: squeue::Entry) -> Option<i32> {
    ublk_submit_sqe_async(entry, UblkUringData::Target as u64)
        .await
        .ok()
}
