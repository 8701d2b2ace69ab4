//! Waking a ublk queue thread from other threads.
//!
//! A libublk queue thread sleeps in `io_uring_enter` on its own ring. When a
//! request's future is completed by another thread (the backing store's
//! reaper, a network task), waking the future's task is not enough: the queue
//! thread only looks at its executor after a completion arrives on its ring.
//! So every queue keeps a read of an eventfd pending on its ring, and every
//! wake-up also writes that eventfd: the read completes, the thread wakes,
//! and the executor runs the woken tasks.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use nix::sys::eventfd::{EfdFlags, EventFd};

/// One queue thread's eventfd.
pub struct Doorbell {
    fd: EventFd,
    closing: AtomicBool,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Arc<Self>> {
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?;
        Ok(Arc::new(Doorbell {
            fd,
            closing: AtomicBool::new(false),
        }))
    }

    /// Wakes the queue thread (cheap; many rings coalesce into one read).
    pub fn ring(&self) {
        let _ = self.fd.write(1);
    }

    /// Makes [`Doorbell::listen`] return after its next wake-up.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.ring();
    }

    /// Runs on the queue thread: keeps an eventfd read pending on the queue's
    /// ring until [`Doorbell::close`].
    pub async fn listen(&self) {
        let mut counter = [0u8; 8];
        let raw = self.fd.as_fd().as_raw_fd();
        while !self.closing.load(Ordering::Acquire) {
            let entry = opcode::Read::new(types::Fd(raw), counter.as_mut_ptr(), 8).build();
            if ublk_submit_sqe_async(entry, UblkUringData::Target as u64)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Wraps `future` so that whoever wakes it also rings this doorbell.
    pub fn wrap<F: Future>(self: &Arc<Self>, future: F) -> Rung<F> {
        Rung {
            future,
            doorbell: Arc::clone(self),
            waker: None,
        }
    }
}

/// A future whose wake-ups also ring a [`Doorbell`].
pub struct Rung<F> {
    future: F,
    doorbell: Arc<Doorbell>,
    /// The ringing waker of the last poll and the task waker it wraps:
    /// reused while the task's waker stays the same (one allocation per
    /// request instead of one per poll).
    waker: Option<(Waker, Waker)>,
}

struct RingingWaker {
    inner: Waker,
    doorbell: Arc<Doorbell>,
}

impl Wake for RingingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Schedule the task first, then wake the thread that will run it,
        // unless that is this thread (a completion reaped from the queue's
        // own ring): it runs its executor next anyway.
        self.inner.wake_by_ref();
        if !super::ring::is_queue_thread_of(&self.doorbell) {
            self.doorbell.ring();
        }
    }
}

impl<F: Future> Future for Rung<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `future` is structurally pinned; we never move it.
        let this = unsafe { self.get_unchecked_mut() };
        let reusable = matches!(&this.waker, Some((inner, _)) if inner.will_wake(cx.waker()));
        if !reusable {
            let ringing = Waker::from(Arc::new(RingingWaker {
                inner: cx.waker().clone(),
                doorbell: Arc::clone(&this.doorbell),
            }));
            this.waker = Some((cx.waker().clone(), ringing));
        }
        let waker = &this.waker.as_ref().expect("set above").1;
        let future = unsafe { Pin::new_unchecked(&mut this.future) };
        future.poll(&mut Context::from_waker(waker))
    }
}
