//! A small io_uring engine shared by many threads.
//!
//! One ring per backing store. Any thread submits under a short lock on the
//! submission queue; one reaper thread waits for completions and wakes the
//! future that owns each one. This keeps the kernel doing the I/O
//! asynchronously while callers are plain `async fn`s on any executor
//! (tokio in the daemon and tests, smol on the ublk queue threads).
//!
//! # Error paths
//!
//! Once an entry is in the submission queue it belongs to the kernel: a
//! later `io_uring_enter` (ours, another submitter's, or the reaper's wait,
//! which also submits what is queued) hands it over, and the kernel then
//! writes into its buffer and posts a completion carrying a pointer to its
//! [`Completion`]. So an `io_uring_enter` that fails AFTER the entry was
//! queued must not complete the operation: that would let the caller free
//! the buffer and the completion while the kernel will still use them
//! (use-after-free, or data read into memory that is reused). Such an
//! operation stays pending and submission is retried, with a short backoff,
//! until the kernel has consumed the queue. Only an operation whose entry
//! was never queued (the queue was full and could not be drained) is failed
//! with the error. The errors `io_uring_enter` returns on a healthy ring are
//! transient (EINTR, EAGAIN, ENOMEM, EBUSY); a ring that fails for good
//! leaves those operations waiting, loudly logged, which is the only safe
//! outcome.
//!
//! The reaper never exits on an error either: every backing I/O depends on
//! it, so it logs, backs off briefly and waits again (draining whatever
//! completions are there each time).

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, IoUring};

/// `user_data` of the no-op that tells the reaper thread to exit.
const SHUTDOWN: u64 = 0;

/// First backoff after a failed `io_uring_enter`; doubles up to
/// [`MAX_BACKOFF`]. Short, because the usual causes (memory pressure, a
/// full completion queue the reaper is draining) clear in microseconds to
/// milliseconds, and a guest I/O waits meanwhile.
const FIRST_BACKOFF: Duration = Duration::from_micros(50);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How often a persisting failure is logged again.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Attempts to make room in a full submission queue before an entry that
/// was never queued is failed (about two seconds with the backoff above).
const UNQUEUED_ATTEMPTS: u32 = 30;
/// Attempts to hand the shutdown no-op to the kernel: it owns no buffer, so
/// giving up on it is safe (the reaper is then left running, not joined).
const SHUTDOWN_ATTEMPTS: u32 = 30;

/// Backoff before retry `attempt` (0-based).
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.min(16))
        .min(MAX_BACKOFF)
}

/// What to do after `io_uring_enter` failed with `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnEnterError {
    /// Retry after this pause (zero: at once).
    Retry(Duration),
    /// Fail the operation with the error. Only allowed for an entry that
    /// was never queued.
    Fail,
}

/// The decision for a submitter whose `attempt`-th (0-based) call failed.
/// `queued`: its entry is already in the submission queue, so the kernel
/// will run it whatever we do and it must never be failed here.
fn on_submit_error(queued: bool, errno: i32, attempt: u32) -> OnEnterError {
    if errno == libc::EINTR {
        return OnEnterError::Retry(Duration::ZERO);
    }
    if queued {
        return OnEnterError::Retry(backoff(attempt));
    }
    let transient = matches!(errno, libc::EAGAIN | libc::EBUSY | libc::ENOMEM);
    if transient && attempt + 1 < UNQUEUED_ATTEMPTS {
        OnEnterError::Retry(backoff(attempt))
    } else {
        OnEnterError::Fail
    }
}

/// The reaper's pause after its `attempt`-th consecutive failed wait: never
/// give up. EINTR and EBUSY (completion queue full: draining it, which the
/// reaper does next, is the cure) retry at once.
fn on_wait_error(errno: i32, attempt: u32) -> Duration {
    match errno {
        libc::EINTR | libc::EBUSY => Duration::ZERO,
        _ => backoff(attempt),
    }
}

/// Rate-limits the log lines of a failure that persists.
struct LogLimit {
    last: Option<Instant>,
}

impl LogLimit {
    fn new() -> Self {
        LogLimit { last: None }
    }

    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < LOG_EVERY)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Test seam: errno values returned in place of the next `io_uring_enter`
/// calls, to exercise the error paths against a real ring. Empty (and
/// compiled out) outside tests.
#[derive(Default)]
pub(crate) struct Faults {
    #[cfg(test)]
    submit: Mutex<std::collections::VecDeque<i32>>,
    #[cfg(test)]
    wait: Mutex<std::collections::VecDeque<i32>>,
}

impl Faults {
    #[cfg(test)]
    pub(crate) fn new(submit: &[i32], wait: &[i32]) -> Self {
        Faults {
            submit: Mutex::new(submit.iter().copied().collect()),
            wait: Mutex::new(wait.iter().copied().collect()),
        }
    }

    #[cfg(test)]
    pub(crate) fn inject_submit(&self, errnos: &[i32]) {
        self.submit.lock().unwrap().extend(errnos);
    }

    #[cfg(test)]
    fn pending(&self) -> (usize, usize) {
        (
            self.submit.lock().unwrap().len(),
            self.wait.lock().unwrap().len(),
        )
    }

    fn next_submit(&self) -> Option<io::Error> {
        #[cfg(test)]
        if let Some(errno) = self.submit.lock().unwrap().pop_front() {
            return Some(io::Error::from_raw_os_error(errno));
        }
        None
    }

    fn next_wait(&self) -> Option<io::Error> {
        #[cfg(test)]
        if let Some(errno) = self.wait.lock().unwrap().pop_front() {
            return Some(io::Error::from_raw_os_error(errno));
        }
        None
    }
}

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

/// Whether an entry that could not be handed to the kernel may be given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persist {
    /// It refers to a buffer and a `Completion`: retry until the kernel has
    /// it (see the module docs).
    UntilSubmitted,
    /// It owns nothing (the shutdown no-op): give up after a few attempts.
    Bounded(u32),
}

/// The ring and its reaper thread.
pub struct Uring {
    ring: Arc<IoUring>,
    /// Serialises writers of the submission queue; the kernel side needs no
    /// lock.
    submit_lock: Mutex<()>,
    reaper: Option<JoinHandle<()>>,
    faults: Arc<Faults>,
}

impl Uring {
    /// Creates a ring with room for `entries` queued submissions.
    pub fn new(entries: u32) -> io::Result<Self> {
        Self::with_faults(entries, Faults::default())
    }

    pub(crate) fn with_faults(entries: u32, faults: Faults) -> io::Result<Self> {
        let ring = Arc::new(
            IoUring::builder()
                .setup_cqsize(entries * 4)
                .build(entries)?,
        );
        let faults = Arc::new(faults);
        let reaper_ring = Arc::clone(&ring);
        let reaper_faults = Arc::clone(&faults);
        let reaper = std::thread::Builder::new()
            .name("uring-reaper".into())
            .spawn(move || reap(&reaper_ring, &reaper_faults))?;
        Ok(Uring {
            ring,
            submit_lock: Mutex::new(()),
            reaper: Some(reaper),
            faults,
        })
    }

    #[cfg(test)]
    pub(crate) fn faults(&self) -> &Faults {
        &self.faults
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
        if let Err(err) = self.push(&entry, Persist::UntilSubmitted) {
            // `push` fails only for an entry it never queued: the kernel
            // cannot see it, so reclaim the reference we handed out.
            drop(Arc::from_raw(user_data as *const Completion));
            completion.complete(-err.raw_os_error().unwrap_or(libc::EIO));
        }
        UringOp {
            completion,
            _buffer: PhantomData,
        }
    }

    /// Queues `entry` and hands the queue to the kernel. An error means the
    /// entry was NOT queued; once queued it is only given up with
    /// `Persist::Bounded` (an entry that owns nothing).
    fn push(&self, entry: &squeue::Entry, persist: Persist) -> io::Result<()> {
        let _guard = self.submit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut attempt = 0;
        loop {
            // SAFETY: `submit_lock` makes this the only submission queue view.
            let pushed = unsafe { self.ring.submission_shared().push(entry).is_ok() };
            if pushed {
                break;
            }
            // Queue full: hand what is queued to the kernel and retry.
            if let Err(e) = self.enter_submit() {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                match on_submit_error(false, errno, attempt) {
                    OnEnterError::Retry(pause) => std::thread::sleep(pause),
                    OnEnterError::Fail => {
                        tracing::error!(error = %e, "io_uring submission queue full and cannot be submitted; failing the request");
                        return Err(e);
                    }
                }
                attempt += 1;
            }
        }
        self.submit_queued(persist);
        Ok(())
    }

    /// Hands every queued entry to the kernel, retrying on errors (the
    /// caller's entry is queued: see the module docs). Also loops when the
    /// kernel took only part of the queue, since nothing else may submit the
    /// rest soon (the reaper may be asleep in a wait that submits nothing).
    /// Runs under `submit_lock`: other submitters would fail the same way.
    fn submit_queued(&self, persist: Persist) {
        let mut attempt = 0u32;
        let mut log = LogLimit::new();
        loop {
            let pause = match self.enter_submit() {
                // SAFETY: under `submit_lock`, the only submission queue view.
                Ok(_) if unsafe { self.ring.submission_shared().is_empty() } => return,
                Ok(_) => backoff(attempt),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    let pause = match on_submit_error(true, errno, attempt) {
                        OnEnterError::Retry(pause) => pause,
                        // Never returned for a queued entry; retrying is
                        // the only safe reading anyway.
                        OnEnterError::Fail => backoff(attempt),
                    };
                    if errno != libc::EINTR && log.due() {
                        tracing::warn!(error = %e, attempt, "io_uring submit failed after queueing; the queued requests stay pending and submission is retried");
                    }
                    pause
                }
            };
            if let Persist::Bounded(max) = persist {
                if attempt.saturating_add(1) >= max {
                    tracing::error!("io_uring: giving up handing a no-op to the kernel");
                    return;
                }
            }
            std::thread::sleep(pause);
            attempt = attempt.saturating_add(1);
        }
    }

    fn enter_submit(&self) -> io::Result<usize> {
        match self.faults.next_submit() {
            Some(e) => Err(e),
            None => self.ring.submit(),
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        let stop = opcode::Nop::new().build().user_data(SHUTDOWN);
        if self
            .push(&stop, Persist::Bounded(SHUTDOWN_ATTEMPTS))
            .is_err()
        {
            // Not queued: the reaper would never see it. Leave it running
            // (it holds its own reference to the ring) rather than hang.
            return;
        }
        // SAFETY: `&mut self`: no submitter is left.
        if !unsafe { self.ring.submission_shared().is_empty() } {
            // Queued but not handed over: the reaper's next wait might, but
            // joining could hang on a broken ring.
            return;
        }
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.join();
        }
    }
}

/// The reaper: the only reader of the completion queue. It never exits
/// except on the shutdown no-op: every operation's completion depends on it.
fn reap(ring: &IoUring, faults: &Faults) {
    let mut failures = 0u32;
    let mut log = LogLimit::new();
    loop {
        let waited = match faults.next_wait() {
            Some(e) => Err(e),
            None => ring.submit_and_wait(1),
        };
        let pause = match waited {
            Ok(_) => {
                failures = 0;
                Duration::ZERO
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let pause = on_wait_error(errno, failures);
                if !pause.is_zero() && log.due() {
                    tracing::error!(error = %e, failures, "io_uring wait failed; the reaper retries");
                }
                failures = failures.saturating_add(1);
                pause
            }
        };
        // Drain first, then pause: completions already there are delivered
        // without delay.
        if drain(ring) {
            return;
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// Completes every operation in the completion queue; returns whether the
/// shutdown no-op was among them.
fn drain(ring: &IoUring) -> bool {
    // SAFETY: the reaper thread is the only one that touches the
    // completion queue.
    let completions = unsafe { ring.completion_shared() };
    let mut stop = false;
    for cqe in completions {
        if cqe.user_data() == SHUTDOWN {
            stop = true;
            continue;
        }
        // SAFETY: every other user_data is an `Arc<Completion>` leaked by
        // `submit` for an entry that was queued (entries that were not
        // queued got their reference back there, and a queued one is
        // never completed before its CQE).
        let completion = unsafe { Arc::from_raw(cqe.user_data() as *const Completion) };
        completion.complete(cqe.result());
    }
    stop
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

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::types;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;

    const LEN: usize = 8192;

    fn pattern() -> Vec<u8> {
        (0..LEN)
            .map(|i| (i as u8).wrapping_mul(13) ^ 0x21)
            .collect()
    }

    fn data_file() -> Arc<tempfile::NamedTempFile> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&pattern()).unwrap();
        file.flush().unwrap();
        Arc::new(file)
    }

    /// Runs `f` on its own thread and fails the test if it does not finish:
    /// a regression here is a hang, which must fail rather than stall.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("io_uring operation hangs")
    }

    /// Reads the file through `uring`; returns the CQE result and the bytes.
    fn read(uring: &Uring, file: &tempfile::NamedTempFile) -> (i32, Vec<u8>) {
        let mut buf = vec![0u8; LEN];
        let entry = opcode::Read::new(
            types::Fd(file.as_file().as_raw_fd()),
            buf.as_mut_ptr(),
            LEN as u32,
        )
        .offset(0)
        .build();
        // SAFETY: `buf` outlives the operation, which is awaited here.
        let result = smol::block_on(unsafe { uring.submit(entry) });
        (result, buf)
    }

    #[test]
    fn a_queued_entry_is_never_failed_and_an_unqueued_one_is_only_after_retries() {
        for errno in [
            libc::EAGAIN,
            libc::ENOMEM,
            libc::EBUSY,
            libc::EINVAL,
            libc::EBADF,
        ] {
            for attempt in [0, 1, 1000, u32::MAX] {
                assert!(matches!(
                    on_submit_error(true, errno, attempt),
                    OnEnterError::Retry(_)
                ));
            }
        }
        assert_eq!(
            on_submit_error(false, libc::EINTR, 1000),
            OnEnterError::Retry(Duration::ZERO)
        );
        assert!(matches!(
            on_submit_error(false, libc::EAGAIN, 0),
            OnEnterError::Retry(_)
        ));
        assert_eq!(
            on_submit_error(false, libc::EAGAIN, UNQUEUED_ATTEMPTS),
            OnEnterError::Fail
        );
        assert_eq!(on_submit_error(false, libc::EINVAL, 0), OnEnterError::Fail);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), FIRST_BACKOFF);
        assert_eq!(backoff(1), FIRST_BACKOFF * 2);
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
        assert_eq!(on_wait_error(libc::EINTR, 5), Duration::ZERO);
        assert_eq!(on_wait_error(libc::EBUSY, 5), Duration::ZERO);
        assert_eq!(on_wait_error(libc::EINVAL, 0), FIRST_BACKOFF);
        assert_eq!(on_wait_error(libc::ENOMEM, 100), MAX_BACKOFF);
    }

    /// Before the fix, a submit error after the entry was queued completed
    /// the read with that error: the caller freed the buffer while the
    /// kernel would still read into it. Now the read waits for the kernel.
    #[test]
    fn a_submit_error_after_queueing_leaves_the_operation_to_the_kernel() {
        let file = data_file();
        let errors = [
            libc::EAGAIN,
            libc::ENOMEM,
            libc::EINVAL,
            libc::EINTR,
            libc::EBUSY,
        ];
        let uring = Arc::new(Uring::with_faults(8, Faults::new(&errors, &[])).unwrap());
        let (result, buf) = within_10s({
            let (uring, file) = (Arc::clone(&uring), Arc::clone(&file));
            move || read(&uring, &file)
        });
        assert_eq!(result, LEN as i32, "completed by the kernel, not the error");
        assert_eq!(buf, pattern());
        assert_eq!(uring.faults().pending(), (0, 0), "every error was seen");
        within_10s(move || drop(uring));
    }

    /// Before the fix, the reaper exited on the first unexpected error and
    /// every later operation hung.
    #[test]
    fn the_reaper_survives_unexpected_errors() {
        let file = data_file();
        let errors = [
            libc::EINVAL,
            libc::EINTR,
            libc::EBUSY,
            libc::EAGAIN,
            libc::EBADF,
            libc::ENOMEM,
            libc::EFAULT,
        ];
        let uring = Arc::new(Uring::with_faults(8, Faults::new(&[], &errors)).unwrap());
        // The reaper drains completions even between failed waits, so
        // reads may complete while it still meets errors: wait until it
        // has seen them all, then check that it still works.
        let deadline = Instant::now() + Duration::from_secs(10);
        while uring.faults().pending() != (0, 0) {
            assert!(Instant::now() < deadline, "the reaper stopped waiting");
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..3 {
            let (result, buf) = within_10s({
                let (uring, file) = (Arc::clone(&uring), Arc::clone(&file));
                move || read(&uring, &file)
            });
            assert_eq!(result, LEN as i32);
            assert_eq!(buf, pattern());
        }
        within_10s(move || drop(uring));
    }

    /// Many threads, with submit errors injected while they run: every
    /// read completes with the file's bytes and shutdown still joins.
    #[test]
    fn concurrent_operations_survive_intermittent_submit_errors() {
        let file = data_file();
        let uring = Arc::new(Uring::with_faults(4, Faults::default()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (uring, file) = (Arc::clone(&uring), Arc::clone(&file));
                std::thread::spawn(move || {
                    for i in 0..50 {
                        if i % 7 == 0 {
                            uring.faults().inject_submit(&[libc::EAGAIN, libc::EINTR]);
                        }
                        let (result, buf) = read(&uring, &file);
                        assert_eq!(result, LEN as i32);
                        assert_eq!(buf, pattern());
                    }
                })
            })
            .collect();
        within_10s(move || {
            for thread in threads {
                thread.join().unwrap();
            }
        });
        within_10s(move || drop(uring));
    }

    /// The shutdown no-op owns nothing: if it cannot be submitted, drop
    /// gives up instead of hanging.
    #[test]
    fn drop_does_not_hang_on_a_ring_that_cannot_submit() {
        let uring = Uring::with_faults(8, Faults::default()).unwrap();
        uring
            .faults()
            .inject_submit(&[libc::EINVAL; SHUTDOWN_ATTEMPTS as usize + 5]);
        within_10s(move || drop(uring));
    }
}
