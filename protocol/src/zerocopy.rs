//! Sending large records without the kernel's copy into the socket:
//! io_uring's `IORING_OP_SENDMSG_ZC`.
//!
//! A plain `send` copies every byte into socket buffers; at 1 MiB per
//! replicated write that copy is about a third of what each extra peer
//! costs the primary. A zero-copy send hands the kernel our pages instead,
//! and the kernel reads them until the data is acknowledged (or dropped):
//! the memory must stay unchanged until io_uring posts the send's
//! *notification*, which can come long after the send's result. So every
//! flush's memory (the connection's sealed records and the shared records
//! between them) is *held* here until its notifications arrive, and the
//! writer seals the next flush into a spare buffer.
//!
//! Why io_uring and not `MSG_ZEROCOPY` on the socket: its notifications
//! arrive on the socket's error queue, which makes epoll report `EPOLLERR`,
//! which mio reads as "write side closed", which tokio keeps for good: every
//! later wait for a full socket to drain would spin. io_uring notifies on
//! its own ring instead, which tokio watches like any other fd.
//!
//! When the kernel copies anyway (loopback, a veth into a local namespace,
//! a NIC without scatter-gather), pinning pages and notifications are pure
//! overhead; in [`ZeroCopySend::Auto`] a connection stops after a run of
//! notifications that all say "copied".

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{cqueue, opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use crate::RecordBuf;

/// Whether connections send large flushes zero-copy (the node's
/// `replication.zero_copy_send`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopySend {
    /// Zero-copy, until the kernel reports that it copies anyway on a
    /// connection (then that connection copies).
    Auto,
    /// Always zero-copy where the kernel supports it.
    On,
    /// Never: every send copies.
    Off,
}

impl ZeroCopySend {
    pub const NAMES: &'static str = "auto, on, off";

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(Self::Auto),
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// The mode of connections made from now on. Process-wide: one daemon per
/// process.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the zero-copy mode of every connection made after this call.
pub fn set_zero_copy_send(mode: ZeroCopySend) {
    let value = match mode {
        ZeroCopySend::Auto => 0,
        ZeroCopySend::On => 1,
        ZeroCopySend::Off => 2,
    };
    MODE.store(value, Ordering::Relaxed);
}

pub(crate) fn zero_copy_send() -> ZeroCopySend {
    match MODE.load(Ordering::Relaxed) {
        0 => ZeroCopySend::Auto,
        1 => ZeroCopySend::On,
        _ => ZeroCopySend::Off,
    }
}

/// Flushes smaller than this are copied: pinning the pages and a
/// notification per send cost more than copying a few pages.
pub const ZERO_COPY_MIN: usize = 64 * 1024;

/// Memory held for sends whose notifications are still to come, past
/// which a flush waits for some before it returns.
const MAX_HELD_BYTES: usize = 16 << 20;

/// In [`ZeroCopySend::Auto`], this many notifications in a row that say
/// the kernel copied turn zero-copy off on the connection.
const COPIED_BEFORE_OFF: u32 = 16;

/// How long a dropped sender waits for the notifications of its last
/// sends before it gives up (and leaks their memory rather than let the
/// kernel send reused memory).
const DRAIN_ON_DROP: Duration = Duration::from_secs(60);

/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the
/// kernel copied after all.
const REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's result.
const NOTIF_COPIED: i32 = i32::MIN;

/// One flush's memory: the connection's records, and shared records each
/// with the length of `records` it goes after.
pub(crate) struct Flight {
    pub records: RecordBuf,
    pub shared: Vec<(usize, Bytes)>,
}

impl Flight {
    /// The flush's bytes, in order on the wire.
    fn slices(&self) -> Vec<&[u8]> {
        let records = self.records.as_slice();
        let mut slices = Vec::with_capacity(2 * self.shared.len() + 1);
        let mut at = 0;
        for (end, shared) in &self.shared {
            slices.push(&records[at..*end]);
            slices.push(&shared[..]);
            at = *end;
        }
        slices.push(&records[at..]);
        slices.retain(|s| !s.is_empty());
        slices
    }
}

/// The bytes of `flight` from byte `from` on, as slices (computed from the
/// flight each time: a partial send may end inside any slice).
fn rest_of(flight: &Flight, from: usize) -> Vec<&[u8]> {
    let mut skip = from;
    let mut rest = Vec::new();
    for slice in flight.slices() {
        if skip >= slice.len() {
            skip -= slice.len();
        } else {
            rest.push(&slice[skip..]);
            skip = 0;
        }
    }
    rest
}

/// Sets `iov` to the bytes of `flight` from byte `from` on.
fn iovecs_from(flight: &Flight, from: usize, iov: &mut Vec<libc::iovec>) {
    iov.clear();
    iov.extend(rest_of(flight, from).into_iter().map(|rest| libc::iovec {
        iov_base: rest.as_ptr() as *mut libc::c_void,
        iov_len: rest.len(),
    }));
}

/// A flush whose memory the kernel may still read.
struct Held {
    id: u64,
    flight: Flight,
    bytes: usize,
    /// What is left to send, pointing into `flight` (set by `submit`); the
    /// kernel reads it until the send's result.
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    /// The send's result is still to come.
    sending: bool,
    /// Notifications announced (a result with `F_MORE`) and not yet in.
    notifications: u32,
}

// SAFETY: the raw pointers in `iov` and `msg` point into `flight` and
// `iov`, which this value owns and moves with it; nothing else uses them.
unsafe impl Send for Held {}

/// The socket a sender sends on: a TCP connection (and, in tests, a unix
/// socket, which cannot send zero-copy).
#[derive(Clone, Copy)]
pub(crate) enum Socket<'a> {
    Tcp(&'a TcpStream),
    #[cfg(test)]
    Unix(&'a tokio::net::UnixStream),
}

impl Socket<'_> {
    fn fd(self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            #[cfg(test)]
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    async fn writable(self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.writable().await,
            #[cfg(test)]
            Self::Unix(s) => s.writable().await,
        }
    }

    fn try_write_vectored(self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write_vectored(bufs),
            #[cfg(test)]
            Self::Unix(s) => s.try_write_vectored(bufs),
        }
    }
}

struct Ring(IoUring);

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What zero-copy sending did on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroCopyStats {
    /// Bytes handed to the kernel by zero-copy sends.
    pub sent_bytes: u64,
    /// Notifications saying the kernel sent our pages as they were.
    pub zero_copied: u64,
    /// Notifications saying the kernel copied after all.
    pub copied: u64,
}

/// The zero-copy sending side of one connection (see the module's doc).
pub(crate) struct ZeroCopySender {
    /// Taken only by `Drop`.
    ring: Option<AsyncFd<Ring>>,
    held: VecDeque<Held>,
    held_bytes: usize,
    next_id: u64,
    /// Record buffers whose flush is done, for the writer to reuse.
    spare: Vec<RecordBuf>,
    /// The result of the send in progress, once in: (id, result). Whether
    /// a notification follows is counted in its `Held` when it comes in.
    result: Option<(u64, i32)>,
    auto: bool,
    copied_in_a_row: u32,
    /// Set when this connection should copy from now on (see `auto`).
    kernel_copies: bool,
    stats: ZeroCopyStats,
}

impl ZeroCopySender {
    /// A sender of its own ring, if the kernel has zero-copy sendmsg
    /// (Linux 6.1) and io_uring is allowed here.
    pub fn new(mode: ZeroCopySend) -> io::Result<Self> {
        // Room for the notifications of many small flushes; more wait in
        // the kernel (see `drain_completions`).
        let ring = IoUring::builder().setup_cqsize(256).build(8)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::SendMsgZc::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring has no zero-copy sendmsg",
            ));
        }
        // SAFETY: `Ring` owns the io_uring fd and closes it only when
        // dropped, after the registration is gone.
        let ring =
            unsafe { AsyncFd::register_with_interest(Ring(ring), tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        Ok(Self {
            ring: Some(ring),
            held: VecDeque::new(),
            held_bytes: 0,
            next_id: 0,
            spare: Vec::new(),
            result: None,
            auto: mode == ZeroCopySend::Auto,
            copied_in_a_row: 0,
            kernel_copies: false,
            stats: ZeroCopyStats::default(),
        })
    }

    /// Whether flushes should still go zero-copy on this connection.
    pub fn enabled(&self) -> bool {
        !self.kernel_copies
    }

    pub fn stats(&self) -> ZeroCopyStats {
        self.stats
    }

    /// A record buffer to seal the next flush into (one whose flush is
    /// done, or a new one).
    pub fn spare_records(&mut self) -> RecordBuf {
        self.spare.pop().unwrap_or_default()
    }

    /// Sends `flight` on `socket`: returns once every byte is in the
    /// socket (so later writes follow it), while its memory stays held
    /// until the kernel is done with it. Where the kernel or socket cannot
    /// send zero-copy (or cannot pin more memory), the rest goes by copy,
    /// and so does every later flush on this connection.
    pub async fn send(&mut self, socket: Socket<'_>, flight: Flight) -> io::Result<()> {
        // Held from before the first submission: if this future is dropped
        // mid-send, the memory stays with the sender (see `Drop`).
        let (id, bytes) = self.hold(flight);
        let fd = socket.fd();
        let mut sent = 0usize;
        while sent < bytes {
            self.submit(id, fd, sent)?;
            let res = self.wait_result(id).await?;
            if res >= 0 {
                sent += res as usize;
                self.stats.sent_bytes += res as u64;
                continue;
            }
            match -res {
                libc::EINTR => {}
                libc::EAGAIN => socket.writable().await?,
                errno @ (libc::EOPNOTSUPP | libc::EINVAL | libc::ENOMEM | libc::ENOBUFS) => {
                    tracing::debug!(
                        error = %io::Error::from_raw_os_error(errno),
                        "zero-copy send refused: sending by copy on this connection"
                    );
                    self.kernel_copies = true;
                    self.send_by_copy(socket, id, sent).await?;
                    break;
                }
                errno => {
                    self.held_mut(id).sending = false;
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
        self.held_mut(id).sending = false;
        self.release_done();
        while self.held_bytes > MAX_HELD_BYTES {
            self.wait_notification().await?;
        }
        Ok(())
    }

    /// Writes flush `id` from byte `from` on with plain (copying) writes.
    async fn send_by_copy(&mut self, socket: Socket<'_>, id: u64, from: usize) -> io::Result<()> {
        // (The flight alone across awaits: `Held`, with raw pointers, is
        // not `Sync`.)
        let flight = &self.held.iter().find(|h| h.id == id).expect("held").flight;
        let mut sent = from;
        loop {
            let rest: Vec<io::IoSlice> = rest_of(flight, sent)
                .into_iter()
                .map(io::IoSlice::new)
                .collect();
            if rest.is_empty() {
                return Ok(());
            }
            socket.writable().await?;
            match socket.try_write_vectored(&rest) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `flight` (and the iovecs over it) as the send in progress;
    /// returns its id and length.
    fn hold(&mut self, flight: Flight) -> (u64, usize) {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = flight.slices().iter().map(|s| s.len()).sum();
        // SAFETY: all-zero is a valid msghdr (no name, no control data).
        let msg = Box::new(unsafe { std::mem::zeroed::<libc::msghdr>() });
        self.held.push_back(Held {
            id,
            flight,
            bytes,
            iov: Vec::new(),
            msg,
            sending: true,
            notifications: 0,
        });
        self.held_bytes += bytes;
        (id, bytes)
    }

    /// Takes in whatever the kernel posted and releases finished flushes,
    /// without waiting.
    pub fn reap(&mut self) {
        self.drain_completions();
        self.release_done();
    }

    fn ring_mut(&mut self) -> &mut IoUring {
        &mut self.ring.as_mut().expect("the ring until drop").get_mut().0
    }

    fn held_mut(&mut self, id: u64) -> &mut Held {
        self.held
            .iter_mut()
            .find(|h| h.id == id)
            .expect("a held flush for every send")
    }

    /// Submits the send of flush `id` from byte `from` on.
    fn submit(&mut self, id: u64, fd: RawFd, from: usize) -> io::Result<()> {
        let held = self.held_mut(id);
        iovecs_from(&held.flight, from, &mut held.iov);
        held.msg.msg_iov = held.iov.as_mut_ptr();
        held.msg.msg_iovlen = held.iov.len();
        let sqe = opcode::SendMsgZc::new(types::Fd(fd), &*held.msg)
            .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
            .ioprio(REPORT_USAGE)
            .build()
            .user_data(id);
        let ring = self.ring_mut();
        // SAFETY: the message, its iovecs and the memory they point at are
        // held (in `self.held`) until the result and every notification of
        // this send are in, also if the sender is dropped first.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("zero-copy ring full"))?;
        ring.submit()?;
        Ok(())
    }

    /// The result of send `id` (bytes sent, or a negated errno).
    async fn wait_result(&mut self, id: u64) -> io::Result<i32> {
        loop {
            self.drain_completions();
            if let Some((done, res)) = self.result {
                if done == id {
                    self.result = None;
                    return Ok(res);
                }
            }
            self.wait_ring().await?;
        }
    }

    async fn wait_notification(&mut self) -> io::Result<()> {
        let held = self.held.len();
        loop {
            self.reap();
            if self.held.len() < held {
                return Ok(());
            }
            self.wait_ring().await?;
        }
    }

    /// Waits until the ring has completions (or might).
    async fn wait_ring(&mut self) -> io::Result<()> {
        let ring = self.ring.as_mut().expect("the ring until drop");
        let mut ready = ring.readable_mut().await?;
        if ready.get_inner_mut().0.completion().is_empty() {
            ready.clear_ready();
        }
        Ok(())
    }

    fn drain_completions(&mut self) {
        let ring = self.ring_mut();
        let mut entries: Vec<cqueue::Entry> = ring.completion().collect();
        if ring.submission().cq_overflow() {
            // Completions that did not fit wait in the kernel until an
            // io_uring_enter moves them to the ring.
            let _ = ring.submit();
            entries.extend(ring.completion());
        }
        for cqe in entries {
            count_notifications(&mut self.held, &cqe);
            if cqueue::notif(cqe.flags()) {
                self.note_notification(cqe.result() & NOTIF_COPIED != 0);
            } else {
                self.result = Some((cqe.user_data(), cqe.result()));
            }
        }
    }

    fn note_notification(&mut self, copied: bool) {
        if copied {
            self.stats.copied += 1;
            self.copied_in_a_row += 1;
            if self.auto && self.copied_in_a_row >= COPIED_BEFORE_OFF && !self.kernel_copies {
                self.kernel_copies = true;
                tracing::debug!(
                    "the kernel copies zero-copy sends on this connection (loopback, a local veth or a NIC without scatter-gather): sending by copy from now on"
                );
            }
        } else {
            self.stats.zero_copied += 1;
            self.copied_in_a_row = 0;
        }
    }

    /// Releases every flush the kernel is done with; their record buffers
    /// become spares.
    fn release_done(&mut self) {
        let mut i = 0;
        while i < self.held.len() {
            let held = &self.held[i];
            if held.sending || held.notifications > 0 {
                i += 1;
                continue;
            }
            let held = self.held.remove(i).expect("index in range");
            self.held_bytes -= held.bytes;
            let mut records = held.flight.records;
            if self.spare.len() < 4 {
                records.clear();
                self.spare.push(records);
            }
        }
    }
}

impl Drop for ZeroCopySender {
    /// The kernel may still read held memory (a send cut short by a closed
    /// link, data not yet acknowledged): a thread keeps it until the last
    /// notification, then frees it.
    fn drop(&mut self) {
        self.reap();
        if self.held.is_empty() {
            return;
        }
        let Some(ring) = self.ring.take() else {
            return;
        };
        // A send still in progress (its future was dropped) is cancelled.
        for held in self.held.iter().filter(|h| h.sending) {
            let cancel = opcode::AsyncCancel::new(held.id)
                .build()
                .user_data(u64::MAX);
            // SAFETY: a cancel request refers to no memory of ours.
            let _ = unsafe { ring.get_ref().0.submission_shared().push(&cancel) };
        }
        let _ = ring.get_ref().0.submit();
        // Not freed if the thread cannot start: leaked, not reused.
        let held = std::mem::ManuallyDrop::new(std::mem::take(&mut self.held));
        // What the thread logs names the connection's node and peer.
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("zerocopy-drain".into())
            .spawn(move || {
                let _in = span.enter();
                drain(ring, std::mem::ManuallyDrop::into_inner(held));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot wait for the last zero-copy sends: keeping their memory");
        }
    }
}

/// Keeps the count of notifications still to come of the flush `cqe`
/// belongs to: a result with `F_MORE` announces one (counted as it comes
/// in, before a notification later in the same batch), a notification
/// ends one. Completions of no held flush (a cancel's) are ignored.
fn count_notifications(held: &mut VecDeque<Held>, cqe: &cqueue::Entry) {
    let Some(h) = held.iter_mut().find(|h| h.id == cqe.user_data()) else {
        return;
    };
    if cqueue::notif(cqe.flags()) {
        h.notifications = h.notifications.saturating_sub(1);
    } else if cqueue::more(cqe.flags()) {
        h.notifications += 1;
    }
}

/// Waits for every outstanding result and notification of `held` on
/// `ring`, then frees the memory; after [`DRAIN_ON_DROP`], leaks what is
/// left (the kernel might still send from it).
fn drain(ring: AsyncFd<Ring>, mut held: VecDeque<Held>) {
    let ring = &ring.get_ref().0;
    let deadline = Instant::now() + DRAIN_ON_DROP;
    let timeout = types::Timespec::new().nsec(100_000_000);
    loop {
        // SAFETY: only this thread uses the ring now.
        for cqe in unsafe { ring.completion_shared() } {
            count_notifications(&mut held, &cqe);
            if !cqueue::notif(cqe.flags()) {
                if let Some(h) = held.iter_mut().find(|h| h.id == cqe.user_data()) {
                    h.sending = false;
                }
            }
        }
        held.retain(|h| h.sending || h.notifications > 0);
        if held.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                flushes = held.len(),
                "zero-copy sends unfinished a minute after their connection closed: keeping their memory"
            );
            std::mem::forget(held);
            return;
        }
        let args = types::SubmitArgs::new().timespec(&timeout);
        let _ = ring.submitter().submit_with_args(1, &args);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The iovecs from any byte on hold exactly the rest of the flush, in
    /// order: records, the shared records between them, the last records.
    #[test]
    fn iovecs_from_any_byte_hold_the_rest_of_the_flush() {
        let mut records = RecordBuf::new();
        let sealer = crate::SharedSealer::new();
        let ping = crate::Message::Ping;
        let (mut keys, _) = crate::SessionKeys {
            send: [1; 32],
            recv: [2; 32],
        }
        .split();
        keys.seal(&ping, &mut records).unwrap();
        let first = records.len();
        keys.seal(&ping, &mut records).unwrap();
        let shared = sealer
            .seal(&crate::Message::Write {
                term: 1,
                epoch: 1,
                seq: 1,
                offset: 0,
                fua: false,
                data: Bytes::from(vec![7u8; 5000]),
            })
            .unwrap();
        let flight = Flight {
            records,
            shared: vec![(first, shared.bytes().clone())],
        };
        let whole: Vec<u8> = flight.slices().concat();
        assert_eq!(whole.len(), flight.records.len() + shared.bytes().len());
        let mut iov = Vec::new();
        for from in [
            0,
            1,
            first - 1,
            first,
            first + 1,
            first + 4999,
            whole.len() - 1,
        ] {
            iovecs_from(&flight, from, &mut iov);
            let got: Vec<u8> = iov
                .iter()
                // SAFETY: each iovec points into `flight`, alive here.
                .flat_map(|v| unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                })
                .copied()
                .collect();
            assert_eq!(got, whole[from..], "from byte {from}");
            assert!(iov.iter().all(|v| v.iov_len > 0));
        }
        iovecs_from(&flight, whole.len(), &mut iov);
        assert!(iov.is_empty());
    }

    /// Where the socket cannot send zero-copy (a unix socket here), the
    /// flush goes by copy, whole and in order, and so does every later one.
    #[tokio::test]
    async fn a_refused_zero_copy_send_goes_by_copy() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut sender = ZeroCopySender::new(ZeroCopySend::On).unwrap();
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut expected = Vec::new();
        for round in 0..2u8 {
            let mut records = sender.spare_records();
            let (mut sealer, _) = crate::SessionKeys {
                send: [round; 32],
                recv: [2; 32],
            }
            .split();
            let write = crate::Message::Write {
                term: 1,
                epoch: 1,
                seq: 1,
                offset: 0,
                fua: false,
                data: Bytes::from(vec![round; 300_000]),
            };
            sealer.seal(&write, &mut records).unwrap();
            expected.extend_from_slice(records.as_slice());
            let flight = Flight {
                records,
                shared: Vec::new(),
            };
            sender.send(Socket::Unix(&a), flight).await.unwrap();
            assert!(!sender.enabled(), "copying from the first refusal on");
        }
        drop(a);
        assert!(reading.await.unwrap() == expected, "the bytes, in order");
        assert_eq!(sender.stats().sent_bytes, 0);
    }
}
