//! The client: many concurrent requests over one block socket connection.
//!
//! Callers on any number of tasks share one connection. Each request gets a
//! fresh tag and a oneshot in the pending map; a writer task sends the frames
//! (so a caller that gives up mid-request can never leave half a frame on the
//! stream) and a reader task hands each answer to the tag's waiter.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::wire::{Op, RequestHeader, ResponseHeader, MAX_IO_BYTES, RESPONSE_HEADER_LEN};

/// Longest discard or write-zeroes range sent as one request (the wire length
/// is a u32); longer ranges go as several.
const MAX_RANGE_BYTES: u64 = 1 << 30;

/// Frames queued for the writer task; callers wait here when it is full.
const SEND_QUEUE: usize = 256;

const STREAM_BUFFER: usize = 256 * 1024;

/// A connection to a block socket server. Cloning is cheap and shares the
/// connection; all methods take `&self` and may run concurrently.
///
/// Must be created inside a tokio runtime (it spawns its I/O tasks there).
/// The connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct BlockClient {
    inner: Arc<Inner>,
}

struct Inner {
    frames: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
    next_tag: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nobody is left to receive answers; the writer task ends by itself
        // once `frames` is dropped, after sending what was queued.
        self.reader.abort();
    }
}

/// A request on its way to the writer task.
struct Frame {
    header: RequestHeader,
    payload: Bytes,
}

/// One caller waiting for its answer.
struct Waiter {
    /// Bytes that follow a successful answer (the length of a read).
    payload_len: u32,
    reply: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// State shared by callers and the I/O tasks.
#[derive(Default)]
struct Shared {
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    pending: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails every waiting caller with `why`.
    fn fail_all(&self, why: &io::Error) {
        let waiters = {
            let mut state = self.lock();
            state.closed.get_or_insert_with(|| why.to_string());
            std::mem::take(&mut state.pending)
        };
        for waiter in waiters.into_values() {
            let _ = waiter.reply.send(Err(closed_error(&why.to_string())));
        }
    }
}

fn closed_error(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("block socket connection lost: {why}"),
    )
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Removes a registered waiter unless its frame reached the writer. Once the
/// frame is queued the entry must stay, even if the caller gives up: the
/// reader needs its payload length to skip the answer.
struct Registration<'a> {
    shared: &'a Shared,
    tag: u64,
    queued: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.queued {
            self.shared.lock().pending.remove(&self.tag);
        }
    }
}

impl BlockClient {
    /// Connects to the server listening at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let stream = UnixStream::connect(path.as_ref()).await?;
        let (read_half, write_half) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let (frames, frames_rx) = mpsc::channel(SEND_QUEUE);
        tokio::spawn(write_frames(write_half, frames_rx, Arc::clone(&shared)));
        let reader = tokio::spawn(read_answers(read_half, Arc::clone(&shared)));
        Ok(BlockClient {
            inner: Arc::new(Inner {
                frames,
                shared,
                next_tag: AtomicU64::new(1),
                reader,
            }),
        })
    }

    /// Reads `len` bytes at `offset` (at most 8 MiB per call).
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let len = io_len(len)?;
        self.call(Op::Read, offset, len, Bytes::new()).await
    }

    /// Writes `data` at `offset` (at most 8 MiB per call); with `fua` it is
    /// durable when this returns. Borrowed data can be passed as
    /// `Bytes::copy_from_slice(slice)`.
    pub async fn write(&self, offset: u64, data: impl Into<Bytes>, fua: bool) -> io::Result<()> {
        let data = data.into();
        let len = io_len(data.len())?;
        let op = if fua { Op::WriteFua } else { Op::Write };
        self.call(op, offset, len, data).await.map(drop)
    }

    /// Makes every write completed so far durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.call(Op::Flush, 0, 0, Bytes::new()).await.map(drop)
    }

    /// Discards the range; vmsync devices read it back as zeroes afterwards.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ranged(Op::Discard, offset, len).await
    }

    /// Zeroes the range without sending a buffer.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ranged(Op::WriteZeroes, offset, len).await
    }

    /// Sends a range operation in pieces that fit the wire's u32 length.
    async fn ranged(&self, op: Op, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows u64"))?;
        loop {
            let piece = (end - offset).min(MAX_RANGE_BYTES);
            // Fits: MAX_RANGE_BYTES < u32::MAX.
            self.call(op, offset, piece as u32, Bytes::new()).await?;
            offset += piece;
            if offset == end {
                return Ok(());
            }
        }
    }

    /// Sends one request and waits for its answer (the read data, or empty).
    async fn call(&self, op: Op, offset: u64, len: u32, payload: Bytes) -> io::Result<Vec<u8>> {
        let inner = &*self.inner;
        let tag = inner.next_tag.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut state = inner.shared.lock();
            if let Some(why) = &state.closed {
                return Err(closed_error(why));
            }
            let payload_len = if op == Op::Read { len } else { 0 };
            state.pending.insert(tag, Waiter { payload_len, reply });
        }
        let mut registration = Registration {
            shared: &inner.shared,
            tag,
            queued: false,
        };
        let header = RequestHeader {
            op,
            tag,
            offset,
            len,
        };
        if inner.frames.send(Frame { header, payload }).await.is_err() {
            return Err(closed_error("the writer task has stopped"));
        }
        registration.queued = true;
        match answer.await {
            Ok(result) => result,
            // The waiter was dropped without an answer: only when the I/O
            // tasks are gone, after `fail_all` raced with our insertion.
            Err(_) => Err(closed_error("no answer")),
        }
    }
}

fn io_len(len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_IO_BYTES)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes in one request exceeds the block socket limit of {MAX_IO_BYTES}"
                ),
            )
        })
}

/// Sends queued frames, batching whatever is ready into one flush.
async fn write_frames(
    half: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
) {
    let mut out = BufWriter::with_capacity(STREAM_BUFFER, half);
    let result: io::Result<()> = async {
        while let Some(first) = frames.recv().await {
            write_frame(&mut out, first).await?;
            while let Ok(next) = frames.try_recv() {
                write_frame(&mut out, next).await?;
            }
            out.flush().await?;
        }
        // Every client handle is gone: tell the server we are done.
        out.shutdown().await
    }
    .await;
    if let Err(e) = result {
        shared.fail_all(&e);
    }
}

async fn write_frame(out: &mut BufWriter<OwnedWriteHalf>, frame: Frame) -> io::Result<()> {
    out.write_all(&frame.header.encode()).await?;
    out.write_all(&frame.payload).await
}

/// Hands each answer to its waiter until the stream ends or breaks the
/// protocol; then fails whoever is still waiting.
async fn read_answers(half: OwnedReadHalf, shared: Arc<Shared>) {
    let mut reader = BufReader::with_capacity(STREAM_BUFFER, half);
    let error = loop {
        if let Err(e) = read_answer(&mut reader, &shared).await {
            break e;
        }
    };
    let error = if error.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        )
    } else {
        error
    };
    shared.fail_all(&error);
}

async fn read_answer(reader: &mut BufReader<OwnedReadHalf>, shared: &Shared) -> io::Result<()> {
    let mut raw = [0u8; RESPONSE_HEADER_LEN];
    reader.read_exact(&mut raw).await?;
    let header =
        ResponseHeader::decode(&raw).map_err(|e| invalid_data(format!("bad answer: {e}")))?;
    let waiter = shared
        .lock()
        .pending
        .remove(&header.tag)
        .ok_or_else(|| invalid_data(format!("answer for unknown tag {}", header.tag)))?;
    let result = match header.result {
        0 => {
            let mut data = vec![0u8; waiter.payload_len as usize];
            reader.read_exact(&mut data).await?;
            Ok(data)
        }
        // i32::MIN has no positive counterpart; anything >= 0 besides 0 is not an errno.
        r => match r.checked_neg().filter(|errno| *errno > 0) {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => return Err(invalid_data(format!("answer with result {r}"))),
        },
    };
    // The caller may have given up; its answer is simply dropped.
    let _ = waiter.reply.send(result);
    Ok(())
}
