//! A small io_uring engine shared by many threads.
//!
//! One ring per backing store. Any thread submits under a short lock on the
//! submission queue; one reaper thread waits for completions and wakes the
//! future that owns each one. This keeps the kernel doing the I/O
//! asynchronously while callers are plain `async fn`s on any executor
//! (tokio in the daemon and tests, smol on the ublk queue threads).

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, IoUring};

/// `user_data` of the no-op that tells the reaper thread to exit.
const SHUTDOWN: u64 = 0;

/// Where one operation's result lands. Shared by the submitting future and
/// the reaper thread; its address is the operation's `user_data`.
struct Completion {
    state: Mutex<CompletionState>,
    finished: Condvar,
}

enum CompletionState {
    Pending(Option<Waker>),
    Done(i32),
}

impl Completion {
    fn complete(&self, result: i32) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut *state, CompletionState::Done(result));
        drop(state);
        self.finished.notify_all();
        if let CompletionState::Pending(Some(waker)) = previous {
            waker.wake();
        }
    }
}

/// The ring and its reaper thread.
pub struct Uring {
    ring: Arc<IoUring>,
    /// Serialises writers of the submission queue; the kernel side needs no
    /// lock.
    submit_lock: Mutex<()>,
    reaper: Option<JoinHandle<()>>,
}

impl Uring {
    /// Creates a ring with room for `entries` queued submissions.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = Arc::new(
            IoUring::builder()
                .setup_cqsize(entries * 4)
                .build(entries)?,
        );
        let reaper_ring = Arc::clone(&ring);
        let reaper = std::thread::Builder::new()
            .name("uring-reaper".into())
            .spawn(move || reap(&reaper_ring))?;
        Ok(Uring {
            ring,
            submit_lock: Mutex::new(()),
            reaper: Some(reaper),
        })
    }

    /// Queues `entry` and returns a future for its result (the CQE's `res`:
    /// a byte count, or a negative errno).
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid and unaliased for `'a`.
    /// The returned future waits for the kernel on drop, so tying `'a` to the
    /// buffer's borrow is enough — as long as the future is not leaked.
    pub unsafe fn submit<'a>(&self, entry: squeue::Entry) -> UringOp<'a> {
        let completion = Arc::new(Completion {
            state: Mutex::new(CompletionState::Pending(None)),
            finished: Condvar::new(),
        });
        let user_data = Arc::into_raw(Arc::clone(&completion)) as u64;
        let entry = entry.user_data(user_data);
        if let Err(err) = self.push(&entry) {
            // The kernel never saw it: reclaim the reference we handed out.
            drop(Arc::from_raw(user_data as *const Completion));
            completion.complete(-err.raw_os_error().unwrap_or(libc::EIO));
        }
        UringOp {
            completion,
            _buffer: PhantomData,
        }
    }

    fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let _guard = self.submit_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // SAFETY: `submit_lock` makes this the only submission queue view.
            let pushed = unsafe { self.ring.submission_shared().push(entry).is_ok() };
            if pushed {
                break;
            }
            // Queue full: hand what is queued to the kernel and retry.
            submit_retrying(&self.ring)?;
        }
        submit_retrying(&self.ring)?;
        Ok(())
    }
}

fn submit_retrying(ring: &IoUring) -> io::Result<()> {
    loop {
        match ring.submit() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // Completion queue momentarily full: the reaper drains it.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        let stop = opcode::Nop::new().build().user_data(SHUTDOWN);
        if self.push(&stop).is_ok() {
            if let Some(reaper) = self.reaper.take() {
                let _ = reaper.join();
            }
        }
    }
}

/// The reaper: the only reader of the completion queue.
fn reap(ring: &IoUring) {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring wait failed; reaper stops");
                return;
            }
        }
        // SAFETY: this thread is the only one that touches the completion queue.
        let completions = unsafe { ring.completion_shared() };
        let mut stop = false;
        for cqe in completions {
            if cqe.user_data() == SHUTDOWN {
                stop = true;
                continue;
            }
            // SAFETY: every other user_data is an `Arc<Completion>` leaked by `submit`.
            let completion = unsafe { Arc::from_raw(cqe.user_data() as *const Completion) };
            completion.complete(cqe.result());
        }
        if stop {
            return;
        }
    }
}

/// One in-flight operation. Resolves to the CQE result.
pub struct UringOp<'a> {
    completion: Arc<Completion>,
    _buffer: PhantomData<&'a mut [u8]>,
}

impl Future for UringOp<'_> {
    type Output = i32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut state = self
            .completion
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            CompletionState::Done(result) => Poll::Ready(*result),
            CompletionState::Pending(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for UringOp<'_> {
    /// The kernel may still be using the buffer: wait for it before the
    /// borrow ends.
    fn drop(&mut self) {
        let mut state = self
            .completion
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while matches!(*state, CompletionState::Pending(_)) {
            state = self
                .completion
                .finished
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Turns a CQE result into a byte count or an error.
pub fn cqe_to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}
