//! The direct queue: a ublk queue for a device that is one file (see
//! [`BlockDevice::direct_file`]: a standalone node's backing store).
//!
//! The async queue (`queue`) runs a future per tag through an executor;
//! that costs a task wake and a walk down the nested futures of the stack
//! on every request. For a device that adds nothing to a read, write or
//! flush, this queue does what the reference ublk loop target does in its
//! default mode: the handler of the request's CQE turns it into one
//! io_uring operation on the backing file (by its registered slot) on the
//! queue's own ring, and the handler of that operation's CQE commits the
//! result. No future, no executor, no allocation per request.
//!
//! Everything else goes to the *slow lane*, a thread per queue that runs
//! the request through the device's own async methods: the other
//! operations (discard, write-zeroes), requests beyond the device, and any
//! direct operation that did not transfer exactly what was asked (an
//! error, a short transfer, -EAGAIN). Re-running a read, write or flush
//! whole is harmless, and the device's methods then retry, bounce, fill
//! holes and report failures exactly as they do on every other path. The
//! slow lane posts its result into the queue's ring as a CQE of its own
//! (`IORING_OP_MSG_RING`), so the queue thread needs no second thing to
//! wait on.
//!
//! The async queue borrows one piece of this: for a device that lets some
//! reads through to a file ([`BlockDevice::read_file`], e.g. a replicated
//! primary's reads of blocks it holds), [`DirectTarget::read`] reads the
//! file by its slot on the queue ring instead of calling the device.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, BufDescList, UblkIORes};

use super::queue::{execute, RequestBuffer};
use crate::device::{BlockDevice, DirectFile, DirectOp, SECTOR_SIZE};

/// Marks a CQE that the slow lane posted (carrying a request's result);
/// libublk leaves this bit of a target operation's user data to us.
const SLOW_LANE_DONE: u64 = libublk::UblkUringData::NonAsync as u64;

/// The backing file as the queue's ring knows it.
#[derive(Clone, Copy)]
pub(super) struct DirectTarget {
    /// Its slot among the files registered with every queue ring.
    slot: u32,
    size: u64,
    /// Tell the device of each request served (`served_directly`).
    report: bool,
}

impl DirectTarget {
    /// The target for `file`, if `dev` registers it with its queue rings
    /// (it does when the device listed it in `io_files`).
    pub(super) fn registered(dev: &UblkDev, file: DirectFile) -> Option<Self> {
        let fds = &dev.tgt.fds[..dev.tgt.nr_fds as usize];
        let slot = fds.iter().position(|&fd| fd == file.fd)?;
        Some(DirectTarget {
            slot: slot as u32,
            size: file.size,
            report: file.report,
        })
    }

    /// The byte range (offset, length) of `iod`, if it lies within the
    /// file and fits a buffer of `buf_len` bytes.
    fn range_within(&self, iod: &sys::ublksrv_io_desc, buf_len: usize) -> Option<(u64, u64)> {
        let offset = iod.start_sector * SECTOR_SIZE;
        let len = iod.nr_sectors as u64 * SECTOR_SIZE;
        let fits = len <= buf_len as u64 && offset.checked_add(len)? <= self.size;
        fits.then_some((offset, len))
    }

    /// The one operation that serves `iod` straight from the file, or None
    /// when the request is not one this queue serves directly.
    fn operation(&self, iod: &sys::ublksrv_io_desc, buf: &IoBuf<u8>) -> Option<squeue::Entry> {
        let file = types::Fixed(self.slot);
        let op = iod.op_flags & 0xff;
        let range = self.range_within(iod, buf.len());
        let (offset, len) = range.unwrap_or_default();
        let in_range = range.is_some();
        // The kernel copies data in and out of the tag's buffer; the
        // operation reaches it by address while the tag is ours.
        let addr = buf.as_ptr() as *mut u8;
        match op {
            sys::UBLK_IO_OP_READ if in_range => Some(
                opcode::Read::new(file, addr, len as u32)
                    .offset(offset)
                    .build(),
            ),
            sys::UBLK_IO_OP_WRITE if in_range => {
                let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
                Some(
                    opcode::Write::new(file, addr, len as u32)
                        .offset(offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                )
            }
            sys::UBLK_IO_OP_FLUSH => Some(
                opcode::Fsync::new(file)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            ),
            _ => None,
        }
    }
}

impl DirectTarget {
    /// For the async queue (`queue`), on its thread: serves a read straight
    /// from the file when `device` says it may ([`BlockDevice::read_file`],
    /// [`BlockDevice::read_directly`]). Some(result) when the whole read
    /// was done; None to run the request through the device (not a read,
    /// not now, or the file gave less than asked).
    pub(super) async fn read<D: BlockDevice>(
        &self,
        iod: &sys::ublksrv_io_desc,
        buf: &mut [u8],
        device: &D,
    ) -> Option<i32> {
        if iod.op_flags & 0xff != sys::UBLK_IO_OP_READ {
            return None;
        }
        let (offset, len) = self.range_within(iod, buf.len())?;
        if !device.read_directly(offset, len) {
            return None;
        }
        let started = self.report.then(Instant::now);
        let read = opcode::Read::new(types::Fixed(self.slot), buf.as_mut_ptr(), len as u32)
            .offset(offset)
            .build();
        // SAFETY: `buf` stays borrowed until the read completes: it is
        // awaited here, on this queue thread.
        let result = unsafe { super::ring::submit_on_queue_ring(read) }.await?;
        if result != len as i32 {
            return None;
        }
        if let Some(started) = started {
            device.served_directly(DirectOp::Read, len, started);
        }
        Some(result)
    }
}

/// The CQE result of a direct operation that served `iod` completely.
fn complete_result(iod: &sys::ublksrv_io_desc) -> i32 {
    match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => {
            (iod.nr_sectors as u64 * SECTOR_SIZE) as i32
        }
        _ => 0,
    }
}

/// What `iod` was, as [`BlockDevice::served_directly`] names it.
fn direct_op(iod: &sys::ublksrv_io_desc) -> DirectOp {
    match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => DirectOp::Read,
        sys::UBLK_IO_OP_WRITE => DirectOp::Write,
        _ => DirectOp::Flush,
    }
}

/// What a queue thread runs until the device stops.
pub(super) fn run_direct_queue<D: BlockDevice>(
    qid: u16,
    dev: &UblkDev,
    device: Arc<D>,
    target: DirectTarget,
) {
    let dev_id = dev.dev_info.dev_id;
    let span = tracing::info_span!("ublk_queue", dev_id, qid, direct = true);
    let _entered = span.enter();
    // Declared before the lane: the lane is joined (no request still uses
    // a buffer) before the buffers are freed.
    let bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up ublk queue");
            return;
        }
    };
    let ring_fd = libublk::with_task_io_ring(|ring| ring.as_raw_fd());
    let lane = match SlowLane::start(Arc::clone(&device), ring_fd, dev_id, qid) {
        Ok(lane) => lane,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the queue's slow lane");
            return;
        }
    };
    let queue = match queue.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "cannot fetch ublk requests");
            lane.finish();
            return;
        }
    };
    tracing::info!("serving reads, writes and flushes straight from the backing file");
    let handler = Handler {
        device: &*device,
        target,
        bufs: &bufs,
        lane: &lane,
        started: (0..bufs.len()).map(|_| Cell::new(None)).collect(),
    };
    queue.wait_and_handle_io(|q, tag, cqe| handler.on_cqe(q, tag, cqe));
    lane.finish();
    tracing::debug!("ublk queue stopped");
}

/// The queue thread's state between CQEs.
struct Handler<'a, D> {
    device: &'a D,
    target: DirectTarget,
    /// Each tag's buffer.
    bufs: &'a [IoBuf<u8>],
    lane: &'a SlowLane,
    /// When each tag's request arrived (only with `target.report`).
    started: Vec<Cell<Option<Instant>>>,
}

impl<D: BlockDevice> Handler<'_, D> {
    /// One CQE for `tag`: a new request, a direct operation's result, or
    /// the slow lane's result.
    fn on_cqe(&self, q: &UblkQueue<'_>, tag: u16, cqe: &UblkIOCtx) {
        let iod = *q.get_iod(tag);
        let buf = &self.bufs[tag as usize];
        if !cqe.is_tgt_io() {
            // A new request. (libublk hands us only fetches that succeeded.)
            let submitted = self.target.operation(&iod, buf).is_some_and(|op| {
                let op = op.user_data(UblkIOCtx::build_user_data(tag, 0, 0, true));
                q.ublk_submit_sqe_sync(op).is_ok()
            });
            if !submitted {
                self.lane.run(tag, iod, buf);
            } else if self.target.report {
                self.started[tag as usize].set(Some(Instant::now()));
            }
            return;
        }
        let result = cqe.result();
        if cqe.user_data() & SLOW_LANE_DONE != 0 {
            // The device's methods ran it (and counted it, if they count).
            commit(q, tag, buf, result);
        } else if result == complete_result(&iod) {
            if let Some(started) = self.started[tag as usize].take() {
                let bytes = result as u64;
                self.device.served_directly(direct_op(&iod), bytes, started);
            }
            commit(q, tag, buf, result);
        } else {
            // Short, failed, or worth another try: the device's methods decide.
            self.started[tag as usize].set(None);
            self.lane.run(tag, iod, buf);
        }
    }
}

/// Hands `result` to the kernel and fetches the tag's next request.
fn commit(q: &UblkQueue<'_>, tag: u16, buf: &IoBuf<u8>, result: i32) {
    let done = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(result)));
    if let Err(e) = done {
        tracing::error!(tag, error = %e, "cannot commit a ublk request");
    }
}

/// A tag's buffer as the slow lane uses it while it runs that tag's
/// request (the queue thread does not touch it meanwhile).
struct TagMemory {
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the buffer outlives the lane (joined before the buffers are
// freed), and while a request is in the lane nothing else uses it.
unsafe impl Send for TagMemory {}

impl RequestBuffer for TagMemory {
    fn size(&self) -> usize {
        self.size
    }

    fn for_read(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: see `TagMemory`; `execute` asks for at most `size` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.size)) }
    }

    fn write_data(&mut self, len: usize) -> Bytes {
        // SAFETY: as `for_read`; and the device keeps no write data past
        // the write (`direct_file` devices say so in `keeps_write_data`,
        // checked before this queue is chosen), which completes before the
        // request is committed and the buffer refilled.
        let data: &'static [u8] =
            unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.size)) };
        Bytes::from_static(data)
    }
}

/// A request on its way through the slow lane.
struct Job {
    tag: u16,
    iod: sys::ublksrv_io_desc,
    memory: TagMemory,
}

/// The queue's thread for requests it does not serve directly.
struct SlowLane {
    jobs: smol::channel::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl SlowLane {
    fn start<D: BlockDevice>(
        device: Arc<D>,
        ring_fd: RawFd,
        dev_id: u32,
        qid: u16,
    ) -> std::io::Result<Self> {
        // Its own small ring, only to post results into the queue's ring.
        let poster = IoUring::new(8)?;
        let (jobs, queued) = smol::channel::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-slow-{qid}"))
            .spawn(move || {
                let span = tracing::info_span!("ublk_slow_lane", dev_id, qid);
                let _entered = span.enter();
                run_lane(&*device, queued, poster, ring_fd);
            })?;
        Ok(SlowLane { jobs, thread })
    }

    /// Runs `tag`'s request `iod` through the device; its result comes back
    /// as a CQE on the queue's ring.
    fn run(&self, tag: u16, iod: sys::ublksrv_io_desc, buf: &IoBuf<u8>) {
        let memory = TagMemory {
            ptr: buf.as_ptr() as *mut u8,
            size: buf.len(),
        };
        if self.jobs.try_send(Job { tag, iod, memory }).is_err() {
            // Only after `finish`, which runs once the queue is down.
            tracing::error!(tag, "slow lane gone; request left unanswered");
        }
    }

    /// Waits for every request in the lane to finish, then stops it.
    fn finish(self) {
        self.jobs.close();
        if self.thread.join().is_err() {
            tracing::error!("the slow lane panicked");
        }
    }
}

/// The slow lane's thread: every request runs as its own task; the lane
/// ends when the queue closes the channel and the last task is done.
fn run_lane<D: BlockDevice>(
    device: &D,
    queued: smol::channel::Receiver<Job>,
    poster: IoUring,
    ring_fd: RawFd,
) {
    let poster = RefCell::new(poster);
    let executor = smol::LocalExecutor::new();
    smol::block_on(executor.run(async {
        let mut running = Vec::new();
        while let Ok(mut job) = queued.recv().await {
            running.retain(|task: &smol::Task<()>| !task.is_finished());
            let poster = &poster;
            running.push(executor.spawn(async move {
                let result = execute(&job.iod, &mut job.memory, device).await;
                post_result(&mut poster.borrow_mut(), ring_fd, job.tag, result);
            }));
        }
        for task in running {
            task.await;
        }
    }));
}

/// Posts `result` for `tag` as a CQE on the queue's ring (`ring_fd`).
/// Exactly one such CQE may arrive per request (a second would commit the
/// tag's next request), so a post is repeated only after the kernel has
/// answered that it failed.
fn post_result(poster: &mut IoUring, ring_fd: RawFd, tag: u16, result: i32) {
    let user_data = UblkIOCtx::build_user_data(tag, 0, 0, true) | SLOW_LANE_DONE;
    let post = opcode::MsgRingData::new(types::Fd(ring_fd), result, user_data, None).build();
    let mut failures = 0;
    // SAFETY (both pushes): MSG_RING references no memory of ours. The
    // ring holds at most this one entry, so a push cannot fail.
    let _ = unsafe { poster.submission().push(&post) };
    loop {
        let answer = poster.completion().next().map(|cqe| cqe.result());
        if let Some(answer) = answer {
            if answer >= 0 {
                return;
            }
            // The queue's ring had no room (or worse): wait and post again.
            failures += 1;
            let error = std::io::Error::from_raw_os_error(-answer);
            if failures == 100 {
                tracing::error!(tag, result, %error, "cannot post a request's result to the queue: the request hangs");
                return;
            }
            tracing::warn!(tag, %error, "cannot post a request's result to the queue; retrying");
            std::thread::sleep(std::time::Duration::from_millis(10));
            let _ = unsafe { poster.submission().push(&post) };
        }
        match poster.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(tag, result, error = %e, "cannot post a request's result to the queue: the request hangs");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// A 1 MiB device whose file sits in slot 1.
    const TARGET: DirectTarget = DirectTarget {
        slot: 1,
        size: MIB,
        report: false,
    };

    fn request(op: u32, offset: u64, len: u64) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op,
            nr_sectors: (len / SECTOR_SIZE) as u32,
            start_sector: offset / SECTOR_SIZE,
            addr: 0,
        }
    }

    fn opcode_of(op: Option<squeue::Entry>) -> Option<u8> {
        op.map(|entry| entry.get_opcode() as u8)
    }

    #[test]
    fn reads_writes_and_flushes_within_the_device_go_to_the_file() {
        let buf = IoBuf::<u8>::new(256 << 10);
        let read = request(sys::UBLK_IO_OP_READ, 0, 4096);
        let last_write = request(
            sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            MIB - (256 << 10),
            256 << 10,
        );
        let flush = request(sys::UBLK_IO_OP_FLUSH, 0, 0);
        assert_eq!(
            opcode_of(TARGET.operation(&read, &buf)),
            Some(opcode::Read::CODE)
        );
        assert_eq!(
            opcode_of(TARGET.operation(&last_write, &buf)),
            Some(opcode::Write::CODE)
        );
        assert_eq!(
            opcode_of(TARGET.operation(&flush, &buf)),
            Some(opcode::Fsync::CODE)
        );
    }

    #[test]
    fn everything_else_goes_through_the_device() {
        let buf = IoBuf::<u8>::new(64 << 10);
        let others = [
            // Past the end, across the end, larger than the tag's buffer.
            request(sys::UBLK_IO_OP_READ, MIB, 4096),
            request(sys::UBLK_IO_OP_WRITE, MIB - 4096, 8192),
            request(sys::UBLK_IO_OP_READ, 0, 128 << 10),
            // An offset whose end does not fit in 64 bits.
            sys::ublksrv_io_desc {
                op_flags: sys::UBLK_IO_OP_READ,
                nr_sectors: 8,
                start_sector: u64::MAX / SECTOR_SIZE,
                addr: 0,
            },
            // Operations the device carries out itself.
            request(sys::UBLK_IO_OP_DISCARD, 0, 4096),
            request(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 4096),
            request(0xfe, 0, 4096),
        ];
        for iod in others {
            assert!(
                TARGET.operation(&iod, &buf).is_none(),
                "{iod:?} would go to the file directly"
            );
        }
    }

    #[test]
    fn only_the_whole_transfer_completes_a_request_directly() {
        assert_eq!(
            complete_result(&request(sys::UBLK_IO_OP_READ, 0, 8192)),
            8192
        );
        assert_eq!(
            complete_result(&request(sys::UBLK_IO_OP_WRITE, 4096, 4096)),
            4096
        );
        assert_eq!(complete_result(&request(sys::UBLK_IO_OP_FLUSH, 0, 0)), 0);
    }
}
