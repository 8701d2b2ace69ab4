//! The server: answers block socket requests from a [`BlockDevice`].
//!
//! Per connection, one reader loop decodes requests and spawns a task for
//! each, so up to [`MAX_IN_FLIGHT`] requests run against the device at once
//! (like a ublk queue of that depth), and one writer task sends the answers in
//! completion order. A malformed request ends its own connection only.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::wire::{Op, RequestHeader, ResponseHeader, REQUEST_HEADER_LEN};
use crate::buffer::AlignedBuf;
use crate::device::{errno_of, BlockDevice};

/// Requests one connection may have started but not yet answered. Each holds
/// a slot in the response channel from before it is read until its answer is
/// queued, so this also bounds the memory one client can pin (at most this
/// many payloads of `MAX_IO_BYTES`).
pub const MAX_IN_FLIGHT: usize = 128;

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a shutting-down connection keeps trying to deliver answers to a
/// client that does not read them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Socket buffer sizes: large enough to batch many small frames per syscall.
const STREAM_BUFFER: usize = 256 * 1024;

/// Serves `device` to every client of `listener` until `shutdown` completes.
///
/// On shutdown it stops accepting and stops reading requests, lets every
/// request already started finish and tries to answer it, then returns. So
/// once this returns, no request from the socket is still running against
/// `device`, and the layer below can be torn down safely. The socket file is
/// left in place; removing it is the caller's business.
pub async fn serve<D: BlockDevice>(listener: UnixListener, device: Arc<D>, shutdown: impl Future) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&device), stop_rx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "block socket: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => log_join(done),
        }
    }
    drop(listener);
    // Receivers outlive this send (they are in `connections`), so it cannot fail.
    let _ = stop_tx.send(true);
    while let Some(done) = connections.join_next().await {
        log_join(done);
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "block socket: connection task failed");
    }
}

/// A decoded request with its payload.
struct Request {
    header: RequestHeader,
    payload: Bytes,
}

/// An answer ready for the writer.
struct Response {
    header: ResponseHeader,
    data: Option<Bytes>,
}

async fn serve_connection<D: BlockDevice>(
    stream: UnixStream,
    device: Arc<D>,
    mut stop: watch::Receiver<bool>,
) {
    let (read_half, write_half) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Response>(MAX_IN_FLIGHT);
    let mut writer = tokio::spawn(write_responses(write_half, rx));
    let mut reader = BufReader::with_capacity(STREAM_BUFFER, read_half);
    let mut requests = JoinSet::new();
    loop {
        while let Some(done) = requests.try_join_next() {
            log_join(done);
        }
        // Reserve the answer's slot first: this is the queue-depth limit, and
        // it fails once the writer has given up on the client.
        let slot = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            slot = tx.clone().reserve_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let request = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            request = read_request(&mut reader) => request,
        };
        let request = match request {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "block socket: closing connection after a bad request");
                break;
            }
        };
        let device = Arc::clone(&device);
        requests.spawn(async move {
            slot.send(execute(&*device, request).await);
        });
    }
    drop(reader);
    drop(tx);
    // Every started request runs to completion: device futures must not be
    // abandoned, and callers rely on none running after `serve` returns.
    while let Some(done) = requests.join_next().await {
        log_join(done);
    }
    tokio::select! {
        _ = &mut writer => {}
        _ = async {
            let _ = stop.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("block socket: client is not reading its answers; dropping them");
            writer.abort();
        }
    }
}

/// Reads one request; `None` at a clean end of stream between requests.
async fn read_request(reader: &mut BufReader<OwnedReadHalf>) -> io::Result<Option<Request>> {
    if reader.fill_buf().await?.is_empty() {
        return Ok(None);
    }
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    reader.read_exact(&mut raw).await?;
    let header =
        RequestHeader::decode(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let payload = if header.op.has_payload() {
        // Aligned, so an O_DIRECT backing store can use it without a copy;
        // not zeroed first, since the read overwrites every byte (and
        // `with_len` never exposes uninitialised memory).
        let mut buf = AlignedBuf::with_len(header.len as usize);
        reader.read_exact(buf.as_mut_slice()).await?;
        buf.into_bytes()
    } else {
        Bytes::new()
    };
    Ok(Some(Request { header, payload }))
}

async fn execute<D: BlockDevice>(device: &D, request: Request) -> Response {
    let RequestHeader {
        op,
        tag,
        offset,
        len,
    } = request.header;
    let len64 = u64::from(len);
    let (result, data) = match op {
        Op::Read => {
            // Filled whole by a successful read, dropped unsent otherwise.
            let mut buf = AlignedBuf::with_len(len as usize);
            match device.read(offset, buf.as_mut_slice()).await {
                Ok(()) => (Ok(()), Some(buf.into_bytes())),
                Err(e) => (Err(e), None),
            }
        }
        Op::Write => (device.write(offset, request.payload, false).await, None),
        Op::WriteFua => (device.write(offset, request.payload, true).await, None),
        Op::Flush => (device.flush().await, None),
        Op::Discard => (device.discard(offset, len64).await, None),
        Op::WriteZeroes => (device.write_zeroes(offset, len64).await, None),
    };
    let result = match result {
        Ok(()) => 0,
        Err(e) => -errno_for(&e),
    };
    Response {
        header: ResponseHeader { tag, result },
        data,
    }
}

/// The errno to answer with. Errors built without an errno (such as
/// `check_range`'s `InvalidInput`) keep their meaning instead of all
/// becoming `EIO`, so clients can tell a bad request from a failed disk.
fn errno_for(err: &io::Error) -> i32 {
    match (err.raw_os_error(), err.kind()) {
        (Some(errno), _) if errno > 0 => errno,
        (_, io::ErrorKind::InvalidInput) => libc::EINVAL,
        _ => errno_of(err),
    }
}

/// Sends answers as they come; batches whatever is already queued into one
/// flush so small requests at high queue depth do not cost a syscall each.
async fn write_responses(half: OwnedWriteHalf, mut rx: mpsc::Receiver<Response>) {
    let mut out = BufWriter::with_capacity(STREAM_BUFFER, half);
    let result: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            write_response(&mut out, first).await?;
            while let Ok(next) = rx.try_recv() {
                write_response(&mut out, next).await?;
            }
            out.flush().await?;
        }
        out.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "block socket: client went away");
    }
}

async fn write_response(out: &mut BufWriter<OwnedWriteHalf>, response: Response) -> io::Result<()> {
    out.write_all(&response.header.encode()).await?;
    if let Some(data) = response.data {
        out.write_all(&data).await?;
    }
    Ok(())
}
