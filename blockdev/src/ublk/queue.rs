//! One ublk queue: a thread with its own io_uring, one task per tag.
//!
//! Each task fetches a request from the kernel, turns it into one call on the
//! top [`BlockDevice`], and commits the result. The kernel guarantees a tag
//! carries one request at a time, so a task owns its buffer outright.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::sys;
use libublk::{BufDesc, UblkError};

use super::direct::DirectTarget;
use super::doorbell::Doorbell;
use super::zero_copy::{user_copy_failed, UserCopy};
use crate::buffer::AlignedBuf;
use crate::device::{errno_of, BlockDevice, SECTOR_SIZE};

/// What a queue thread runs until the device stops.
pub fn run_queue<D: BlockDevice>(qid: u16, dev: &UblkDev, device: Arc<D>) {
    let span = tracing::info_span!("ublk_queue", dev_id = dev.dev_info.dev_id, qid);
    let _entered = span.enter();
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up ublk queue");
            return;
        }
    };
    let doorbell = match Doorbell::new() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the queue's eventfd");
            return;
        }
    };
    // From here on this thread's backing I/O goes on the queue's own ring
    // (see `ring`), and wake-ups from this thread need no doorbell.
    let files = &dev.tgt.fds[..dev.tgt.nr_fds as usize];
    let _on_queue = super::ring::enter_queue_thread(&doorbell, files);
    let executor = Rc::new(smol::LocalExecutor::new());
    // Reads the device lets through go straight to its file (see
    // `direct::DirectTarget::read`).
    let read_target = device
        .read_file()
        .and_then(|file| super::direct::DirectTarget::registered(dev, file));
    // Zero copy: requests' pages are registered with the ring, and data
    // that must pass through this process is copied through the char
    // device (see `zero_copy`).
    let user_copy = super::zero_copy::in_use(dev).then(|| UserCopy::new(dev, qid));
    if user_copy.is_some() {
        tracing::info!("zero copy: reads the device lets through use the request's pages");
    }
    let tags: Vec<u16> = queue.tags().collect();
    let live_tags = Rc::new(std::cell::Cell::new(tags.len()));

    let mut tasks = Vec::with_capacity(tags.len() + 1);
    for tag in tags {
        let queue = Rc::clone(&queue);
        let device = Arc::clone(&device);
        let doorbell = Arc::clone(&doorbell);
        let live_tags = Rc::clone(&live_tags);
        tasks.push(executor.spawn(async move {
            match serve_tag(&queue, tag, &*device, &doorbell, read_target, user_copy).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(tag, error = %e, "ublk tag task failed"),
            }
            live_tags.set(live_tags.get() - 1);
            if live_tags.get() == 0 {
                // Last tag gone: let the doorbell listener finish too.
                doorbell.close();
            }
        }));
    }
    let listener = Arc::clone(&doorbell);
    tasks.push(executor.spawn(async move { listener.listen().await }));

    let exe = Rc::clone(&executor);
    smol::block_on(executor.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            tracing::error!(error = %e, "ublk queue event loop failed");
        }
    }));
    tracing::debug!("ublk queue stopped");
}

/// The buffer the kernel copies one tag's data through.
///
/// libublk must see an [`IoBuf`] registered for every tag before it starts
/// the device, so each tag begins with one. The buffer's address travels
/// with every fetch command, though, so a large write can keep the buffer
/// its data arrived in (no copy) while the tag moves on to a fresh one from
/// the pool; from then on the tag uses pooled buffers.
struct TagBuffer {
    registered: IoBuf<u8>,
    owned: Option<AlignedBuf>,
    size: usize,
}

impl TagBuffer {
    fn new(size: usize) -> Self {
        TagBuffer {
            registered: IoBuf::new(size),
            owned: None,
            size,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.owned {
            Some(buf) => buf.as_mut_slice(),
            None => self.registered.as_mut_slice(),
        }
    }

    /// What the next fetch command names.
    fn addr(&self) -> *const u8 {
        match &self.owned {
            Some(buf) => buf.as_ptr(),
            None => self.registered.as_ptr(),
        }
    }

    /// The first `len` bytes as `Bytes` for a write. A write of at least
    /// half the buffer takes it over; a smaller one is copied, so that a
    /// 4 KiB write queued to a peer does not pin a whole buffer. With
    /// `lend` (the device keeps no write data past the write, see
    /// [`BlockDevice::keeps_write_data`]) every write borrows the buffer.
    fn take_write_data(&mut self, len: usize, lend: bool) -> Bytes {
        if lend {
            let slice: &[u8] = &self.as_mut_slice()[..len];
            // SAFETY: the device drops every clone of these bytes before the
            // write completes (its `keeps_write_data` contract), and this
            // buffer is neither freed nor refilled until `serve_tag` has
            // awaited that write and committed the result.
            let lent = unsafe { std::mem::transmute::<&[u8], &'static [u8]>(slice) };
            return Bytes::from_static(lent);
        }
        if len < self.size / 2 {
            return AlignedBuf::copy_from(&self.as_mut_slice()[..len]).into_bytes();
        }
        let data = match self.owned.take() {
            Some(mut buf) => {
                buf.truncate(len);
                buf.into_bytes()
            }
            None => AlignedBuf::copy_from(&self.registered.as_slice()[..len]).into_bytes(),
        };
        self.owned = Some(AlignedBuf::with_len(self.size));
        data
    }
}

async fn serve_tag<D: BlockDevice>(
    queue: &UblkQueue<'_>,
    tag: u16,
    device: &D,
    doorbell: &Arc<Doorbell>,
    read_target: Option<DirectTarget>,
    user_copy: Option<UserCopy>,
) -> Result<(), UblkError> {
    let mut buf = TagBuffer::new(queue.dev.dev_info.max_io_buf_bytes as usize);
    let lend = !device.keeps_write_data();
    let registration = super::zero_copy::registration(tag);
    match user_copy {
        Some(_) => {
            let registered = BufDesc::AutoReg(registration);
            queue.submit_io_prep_cmd(tag, registered, 0, None).await?
        }
        None => {
            let registered = BufDesc::Slice(buf.registered.as_slice());
            queue
                .submit_io_prep_cmd(tag, registered, 0, Some(&buf.registered))
                .await?
        }
    };
    loop {
        let iod = *queue.get_iod(tag);
        let direct = match &read_target {
            Some(target) => {
                let zero_copy_index = user_copy.map(|_| tag);
                target
                    .read(&iod, buf.as_mut_slice(), zero_copy_index, device)
                    .await
            }
            None => None,
        };
        let result = match direct {
            Some(result) => result,
            None => {
                let request = handle_request(&iod, &mut buf, device, lend, user_copy, tag);
                doorbell.wrap(request).await
            }
        };
        let next = match user_copy {
            Some(_) => BufDesc::AutoReg(registration),
            // The kernel copies read data out of the buffer this names (and
            // the next write's data into it): the one `handle_request` left
            // current. It stays alive in `buf` until a later command names
            // another.
            None => BufDesc::RawAddress(buf.addr()),
        };
        queue.submit_io_commit_cmd(tag, next, result).await?;
    }
}

/// Where a request's data lives while [`execute`] runs it: the tag's buffer.
pub(super) trait RequestBuffer {
    /// Bytes the buffer holds (larger requests are refused).
    fn size(&self) -> usize;
    /// The first `len` bytes, for a read to fill.
    fn for_read(&mut self, len: usize) -> &mut [u8];
    /// The first `len` bytes as a write's data.
    fn write_data(&mut self, len: usize) -> Bytes;
}

/// A tag buffer of the async queue, with whether writes may borrow it.
struct Lending<'a> {
    buf: &'a mut TagBuffer,
    lend: bool,
}

impl RequestBuffer for Lending<'_> {
    fn size(&self) -> usize {
        self.buf.size
    }
    fn for_read(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[..len]
    }
    fn write_data(&mut self, len: usize) -> Bytes {
        self.buf.take_write_data(len, self.lend)
    }
}

/// Runs one request through `device`. With zero copy (`user_copy`) a
/// write's data is first copied out of the request into `buf`, and a
/// read's data copied from `buf` into the request after.
async fn handle_request<D: BlockDevice>(
    iod: &sys::ublksrv_io_desc,
    buf: &mut TagBuffer,
    device: &D,
    lend: bool,
    user_copy: Option<UserCopy>,
    tag: u16,
) -> i32 {
    let len = (iod.nr_sectors as u64 * SECTOR_SIZE) as usize;
    // (A request larger than the buffer fails in `execute`.)
    let copier = user_copy.filter(|_| len <= buf.size);
    if let Some(copier) = copier {
        if let Err(e) = copier.before(tag, iod, buf.as_mut_slice()) {
            return user_copy_failed(iod, &e);
        }
    }
    let result = execute(iod, &mut Lending { buf, lend }, device).await;
    if let Some(copier) = copier {
        if let Err(e) = copier.after(tag, iod, buf.as_mut_slice(), result) {
            return user_copy_failed(iod, &e);
        }
    }
    result
}

/// Executes one kernel request on `device`; returns what the kernel
/// expects: the byte count for reads and writes, 0 for the rest, or a
/// negative errno.
pub(super) async fn execute<D: BlockDevice>(
    iod: &sys::ublksrv_io_desc,
    buf: &mut impl RequestBuffer,
    device: &D,
) -> i32 {
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector * SECTOR_SIZE;
    let len = iod.nr_sectors as u64 * SECTOR_SIZE;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let outcome = match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len as usize > buf.size() => {
            return -libc::EINVAL;
        }
        sys::UBLK_IO_OP_READ => device.read(offset, buf.for_read(len as usize)).await,
        sys::UBLK_IO_OP_WRITE => {
            // The local write and every replica share these `Bytes`.
            let data = buf.write_data(len as usize);
            device.write(offset, data, fua).await
        }
        sys::UBLK_IO_OP_FLUSH => device.flush().await,
        sys::UBLK_IO_OP_DISCARD => device.discard(offset, len).await,
        sys::UBLK_IO_OP_WRITE_ZEROES => device.write_zeroes(offset, len).await,
        _ => return -libc::EOPNOTSUPP,
    };
    match outcome {
        Ok(()) if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) => len as i32,
        Ok(()) => 0,
        Err(e) => {
            tracing::warn!(op, offset, len, error = %e, "request failed");
            -errno_of(&e)
        }
    }
}
