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
//! With zero copy (see `zero_copy`) the operations use the request's own
//! pages, registered with the queue's ring, instead of the tag's buffer
//! (there are none), and the slow lane gets a request's data by user copy.
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
use super::zero_copy::{user_copy_failed, UserCopy};
use crate::backing::FileTimes;
use crate::buffer::AlignedBuf;
use crate::device::{BlockDevice, DirectFile, DirectOp, SECTOR_SIZE};

/// Marks a CQE that the slow lane posted (carrying a request's result);
/// libublk leaves this bit of a target operation's user data to us.
const SLOW_LANE_DONE: u64 = libublk::UblkUringData::NonAsync as u64;

/// The backing file as the queue's ring knows it.
#[derive(Clone, Copy)]
pub(super) struct DirectTarget {
    /// Its slot among the files registered with every queue ring.
    slot: u32,
    /// The file itself (it stays open while the device exists).
    fd: RawFd,
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
            fd: file.fd,
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
    fn operation(&self, iod: &sys::ublksrv_io_desc, memory: Memory<'_>) -> Option<squeue::Entry> {
        let file = types::Fixed(self.slot);
        let op = iod.op_flags & 0xff;
        let range = self.range_within(iod, memory.limit());
        let (offset, len) = range.unwrap_or_default();
        let len = len as u32;
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let rw_flags = if fua { libc::RWF_DSYNC } else { 0 };
        match (op, memory) {
            (sys::UBLK_IO_OP_FLUSH, _) => Some(
                opcode::Fsync::new(file)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            ),
            (sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE, _) if range.is_none() => None,
            // The kernel copies data in and out of the tag's buffer; the
            // operation reaches it by address while the tag is ours.
            (sys::UBLK_IO_OP_READ, Memory::Buffer(buf)) => Some(
                opcode::Read::new(file, buf.as_ptr() as *mut u8, len)
                    .offset(offset)
                    .build(),
            ),
            (sys::UBLK_IO_OP_WRITE, Memory::Buffer(buf)) => Some(
                opcode::Write::new(file, buf.as_ptr(), len)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build(),
            ),
            // Zero copy: the request's own pages, registered at `index`
            // (the address of a kernel-registered buffer is the offset
            // into it).
            (sys::UBLK_IO_OP_READ, Memory::Registered { index, .. }) => Some(
                opcode::ReadFixed::new(file, std::ptr::null_mut(), len, index)
                    .offset(offset)
                    .build(),
            ),
            (sys::UBLK_IO_OP_WRITE, Memory::Registered { index, .. }) => Some(
                opcode::WriteFixed::new(file, std::ptr::null(), len, index)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build(),
            ),
            _ => None,
        }
    }
}

/// Where a request's data is while the direct queue serves it.
#[derive(Clone, Copy)]
enum Memory<'a> {
    /// The tag's buffer, which the kernel copies the data through.
    Buffer(&'a IoBuf<u8>),
    /// Zero copy: the request's pages, in the queue ring's buffer table at
    /// `index`; requests are at most `limit` bytes.
    Registered { index: u16, limit: usize },
}

impl Memory<'_> {
    /// The largest request this memory holds.
    fn limit(&self) -> usize {
        match self {
            Memory::Buffer(buf) => buf.len(),
            Memory::Registered { limit, .. } => *limit,
        }
    }
}

impl DirectTarget {
    /// For the async queue (`queue`), on its thread: serves a read straight
    /// from the file when `device` says it may ([`BlockDevice::read_file`],
    /// [`BlockDevice::read_directly`]). Some(result) when the whole read
    /// was done; None to run the request through the device (not a read,
    /// not now, or the file gave less than asked). The data goes to `buf`,
    /// or with zero copy to the request's pages, registered at
    /// `zero_copy_index` (`buf` then only bounds the length).
    pub(super) async fn read<D: BlockDevice>(
        &self,
        iod: &sys::ublksrv_io_desc,
        buf: &mut [u8],
        zero_copy_index: Option<u16>,
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
        let file = types::Fixed(self.slot);
        let read = match zero_copy_index {
            Some(index) => opcode::ReadFixed::new(file, std::ptr::null_mut(), len as u32, index)
                .offset(offset)
                .build(),
            None => opcode::Read::new(file, buf.as_mut_ptr(), len as u32)
                .offset(offset)
                .build(),
        };
        // SAFETY: `buf` stays borrowed until the read completes: it is
        // awaited here, on this queue thread (and the request's pages stay
        // registered until the request is committed, after this).
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
    let zero_copy = super::zero_copy::in_use(dev);
    let span = tracing::info_span!("ublk_queue", dev_id, qid, direct = true, zero_copy);
    let _entered = span.enter();
    // Declared before the lane: the lane is joined (no request still uses
    // a buffer) before the buffers are freed. Zero copy needs none.
    let bufs = if zero_copy {
        Vec::new()
    } else {
        dev.alloc_queue_io_bufs()
    };
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
    let registrations: Vec<_> = if zero_copy {
        (0..dev.dev_info.queue_depth)
            .map(super::zero_copy::registration)
            .collect()
    } else {
        Vec::new()
    };
    let fetch = if zero_copy {
        BufDescList::AutoRegs(&registrations)
    } else {
        BufDescList::Slices(Some(&bufs))
    };
    let queue = match queue.submit_fetch_commands_unified(fetch) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "cannot fetch ublk requests");
            lane.finish();
            return;
        }
    };
    if zero_copy {
        tracing::info!(
            "serving reads, writes and flushes straight from the backing file, zero copy"
        );
    } else {
        tracing::info!("serving reads, writes and flushes straight from the backing file");
    }
    let handler = Handler {
        device: &*device,
        target,
        data: if zero_copy {
            TagData::Registered {
                copier: UserCopy::new(dev, qid),
                max_io_bytes: dev.dev_info.max_io_buf_bytes as usize,
            }
        } else {
            TagData::Buffers(&bufs)
        },
        lane: &lane,
        started: (0..dev.dev_info.queue_depth)
            .map(|_| Cell::new(None))
            .collect(),
        times: FileTimes::for_fd(target.fd),
    };
    queue.wait_and_handle_io(|q, tag, cqe| handler.on_cqe(q, tag, cqe));
    lane.finish();
    tracing::debug!("ublk queue stopped");
}

/// The queue thread's state between CQEs.
struct Handler<'a, D> {
    device: &'a D,
    target: DirectTarget,
    data: TagData<'a>,
    lane: &'a SlowLane,
    /// When each tag's request arrived (only with `target.report`).
    started: Vec<Cell<Option<Instant>>>,
    /// The backing file's times, kept current so that writes start
    /// without blocking (see `FileTimes`); None for a block device.
    times: Option<FileTimes>,
}

/// Where this queue's requests' data is.
enum TagData<'a> {
    /// Each tag's buffer, which the kernel copies the data through.
    Buffers(&'a [IoBuf<u8>]),
    /// Zero copy: the requests' own pages (at most `max_io_bytes`); the
    /// slow lane reaches them by user copy.
    Registered {
        copier: UserCopy,
        max_io_bytes: usize,
    },
}

impl<D: BlockDevice> Handler<'_, D> {
    /// Where `tag`'s request data is.
    fn memory(&self, tag: u16) -> Memory<'_> {
        match &self.data {
            TagData::Buffers(bufs) => Memory::Buffer(&bufs[tag as usize]),
            TagData::Registered { max_io_bytes, .. } => Memory::Registered {
                index: tag,
                limit: *max_io_bytes,
            },
        }
    }

    /// One CQE for `tag`: a new request, a direct operation's result, or
    /// the slow lane's result.
    fn on_cqe(&self, q: &UblkQueue<'_>, tag: u16, cqe: &UblkIOCtx) {
        let iod = *q.get_iod(tag);
        if !cqe.is_tgt_io() {
            // A new request. (libublk hands us only fetches that succeeded.)
            if iod.op_flags & 0xff == sys::UBLK_IO_OP_WRITE {
                if let Some(times) = &self.times {
                    times.before_write();
                }
            }
            let op = self.target.operation(&iod, self.memory(tag));
            let submitted = op.is_some_and(|op| {
                let op = op.user_data(UblkIOCtx::build_user_data(tag, 0, 0, true));
                q.ublk_submit_sqe_sync(op).is_ok()
            });
            if !submitted {
                self.to_slow_lane(tag, iod);
            } else if self.target.report {
                self.started[tag as usize].set(Some(Instant::now()));
            }
            return;
        }
        let result = cqe.result();
        if cqe.user_data() & SLOW_LANE_DONE != 0 {
            // The device's methods ran it (and counted it, if they count).
            self.commit(q, tag, result);
        } else if result == complete_result(&iod) {
            if let Some(started) = self.started[tag as usize].take() {
                let bytes = result as u64;
                self.device.served_directly(direct_op(&iod), bytes, started);
            }
            self.commit(q, tag, result);
        } else {
            // Short, failed, or worth another try: the device's methods decide.
            self.started[tag as usize].set(None);
            self.to_slow_lane(tag, iod);
        }
    }

    /// Runs `tag`'s request through the device's methods instead.
    fn to_slow_lane(&self, tag: u16, iod: sys::ublksrv_io_desc) {
        let memory = match &self.data {
            TagData::Buffers(bufs) => TagMemory::of(&bufs[tag as usize]),
            TagData::Registered { copier, .. } => TagMemory::copied(*copier, tag),
        };
        self.lane.run(tag, iod, memory);
    }

    /// Hands `result` to the kernel and fetches the tag's next request.
    fn commit(&self, q: &UblkQueue<'_>, tag: u16, result: i32) {
        let next = match self.memory(tag) {
            Memory::Buffer(buf) => BufDesc::Slice(buf),
            Memory::Registered { .. } => BufDesc::AutoReg(super::zero_copy::registration(tag)),
        };
        let done = q.complete_io_cmd_unified(tag, next, Ok(UblkIORes::Result(result)));
        if let Err(e) = done {
            tracing::error!(tag, error = %e, "cannot commit a ublk request");
        }
    }
}

/// Where the slow lane keeps a request's data while it runs it.
enum TagMemory {
    /// The tag's buffer (the queue thread does not touch it meanwhile).
    Buffer { ptr: *mut u8, size: usize },
    /// Zero copy: a buffer of the lane's own, filled from (writes) or
    /// copied into (reads) the request's pages by user copy.
    Copied {
        copier: UserCopy,
        tag: u16,
        buf: AlignedBuf,
    },
}

// SAFETY: a tag's buffer outlives the lane (joined before the buffers are
// freed), and while a request is in the lane nothing else uses it.
unsafe impl Send for TagMemory {}

impl TagMemory {
    fn of(buf: &IoBuf<u8>) -> Self {
        TagMemory::Buffer {
            ptr: buf.as_ptr() as *mut u8,
            size: buf.len(),
        }
    }

    fn copied(copier: UserCopy, tag: u16) -> Self {
        TagMemory::Copied {
            copier,
            tag,
            buf: AlignedBuf::with_len(0),
        }
    }

    /// Before the device runs `iod`: with zero copy, room for the
    /// request's data, and a write's data copied over from the request.
    fn before(&mut self, iod: &sys::ublksrv_io_desc) -> std::io::Result<()> {
        match self {
            TagMemory::Copied { copier, tag, buf } => {
                if matches!(
                    iod.op_flags & 0xff,
                    sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE
                ) {
                    *buf = AlignedBuf::with_len((iod.nr_sectors as u64 * SECTOR_SIZE) as usize);
                }
                copier.before(*tag, iod, buf.as_mut_slice())
            }
            TagMemory::Buffer { .. } => Ok(()),
        }
    }

    /// After the device ran `iod` with `result`: with zero copy, a read's
    /// data copied over to the request.
    fn after(&self, iod: &sys::ublksrv_io_desc, result: i32) -> std::io::Result<()> {
        match self {
            TagMemory::Copied { copier, tag, buf } => {
                copier.after(*tag, iod, buf.as_slice(), result)
            }
            TagMemory::Buffer { .. } => Ok(()),
        }
    }
}

impl RequestBuffer for TagMemory {
    fn size(&self) -> usize {
        match self {
            TagMemory::Buffer { size, .. } => *size,
            // `before` sized it for the request.
            TagMemory::Copied { buf, .. } => buf.as_slice().len(),
        }
    }

    fn for_read(&mut self, len: usize) -> &mut [u8] {
        match self {
            // SAFETY: see `TagMemory`; `execute` asks for at most `size`.
            TagMemory::Buffer { ptr, size } => unsafe {
                std::slice::from_raw_parts_mut(*ptr, len.min(*size))
            },
            TagMemory::Copied { buf, .. } => &mut buf.as_mut_slice()[..len],
        }
    }

    fn write_data(&mut self, len: usize) -> Bytes {
        match self {
            TagMemory::Buffer { ptr, size } => {
                // SAFETY: as `for_read`; and the device keeps no write data
                // past the write (`direct_file` devices say so in
                // `keeps_write_data`, checked before this queue is chosen),
                // which completes before the request is committed and the
                // buffer refilled.
                let data: &'static [u8] =
                    unsafe { std::slice::from_raw_parts(*ptr, len.min(*size)) };
                Bytes::from_static(data)
            }
            TagMemory::Copied { buf, .. } => {
                let mut data = std::mem::replace(buf, AlignedBuf::with_len(0));
                data.truncate(len);
                data.into_bytes()
            }
        }
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
    fn run(&self, tag: u16, iod: sys::ublksrv_io_desc, memory: TagMemory) {
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
                let result = match job.memory.before(&job.iod) {
                    Ok(()) => execute(&job.iod, &mut job.memory, device).await,
                    Err(e) => user_copy_failed(&job.iod, &e),
                };
                let result = match job.memory.after(&job.iod, result) {
                    Ok(()) => result,
                    Err(e) => user_copy_failed(&job.iod, &e),
                };
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
        fd: -1,
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
            opcode_of(TARGET.operation(&read, Memory::Buffer(&buf))),
            Some(opcode::Read::CODE)
        );
        assert_eq!(
            opcode_of(TARGET.operation(&last_write, Memory::Buffer(&buf))),
            Some(opcode::Write::CODE)
        );
        assert_eq!(
            opcode_of(TARGET.operation(&flush, Memory::Buffer(&buf))),
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
                TARGET.operation(&iod, Memory::Buffer(&buf)).is_none(),
                "{iod:?} would go to the file directly"
            );
            let registered = Memory::Registered {
                index: 3,
                limit: 64 << 10,
            };
            assert!(
                TARGET.operation(&iod, registered).is_none(),
                "{iod:?} would go to the file directly with zero copy"
            );
        }
    }

    /// The fields of a submission entry a test looks at.
    #[derive(Debug, PartialEq, Eq)]
    struct Sqe {
        opcode: u8,
        flags: u8,
        fd: i32,
        offset: u64,
        addr: u64,
        len: u32,
        rw_flags: u32,
        buf_index: u16,
    }

    fn fields(entry: squeue::Entry) -> Sqe {
        // SAFETY: an entry is the kernel's 64-byte `io_uring_sqe`
        // (`#[repr(C)]` around it); the offsets are the kernel ABI's.
        let raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
        let u32_at = |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_ne_bytes(raw[i..i + 8].try_into().unwrap());
        Sqe {
            opcode: raw[0],
            flags: raw[1],
            fd: u32_at(4) as i32,
            offset: u64_at(8),
            addr: u64_at(16),
            len: u32_at(24),
            rw_flags: u32_at(28),
            buf_index: u16::from_ne_bytes([raw[40], raw[41]]),
        }
    }

    #[test]
    fn zero_copy_reads_and_writes_use_the_requests_registered_pages() {
        let registered = Memory::Registered {
            index: 5,
            limit: 1 << 20,
        };
        let read = request(sys::UBLK_IO_OP_READ, 8192, 65536);
        let op = TARGET.operation(&read, registered).unwrap();
        let sqe = fields(op);
        assert_eq!(sqe.opcode, opcode::ReadFixed::CODE);
        assert_eq!(
            sqe.flags & squeue::Flags::FIXED_FILE.bits(),
            squeue::Flags::FIXED_FILE.bits()
        );
        assert_eq!((sqe.fd, sqe.offset, sqe.addr, sqe.len), (1, 8192, 0, 65536));
        assert_eq!(sqe.buf_index, 5);

        let fua_write = request(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 0, 4096);
        let sqe = fields(TARGET.operation(&fua_write, registered).unwrap());
        assert_eq!(sqe.opcode, opcode::WriteFixed::CODE);
        assert_eq!(sqe.rw_flags, libc::RWF_DSYNC as u32);
        assert_eq!(sqe.buf_index, 5);
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
