//! The holder side of on-demand fetch and background sync: any node answers
//! block reads from a peer (the new primary after a machine switch) on a
//! connection of its own (`Channel::Fetch`), whatever the two nodes' roles.
//!
//! A request names a range and, optionally, the BLAKE3 hash of the
//! requester's own copy; when ours hashes the same the answer is
//! `ReadSame` and no data crosses the network.

use std::sync::Arc;

use blockdev::buffer::AlignedBuf;
use blockdev::device::check_range;
use blockdev::BlockDevice;
use protocol::Message;
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use super::transport::{Connection, LinkError};
use super::Replication;

/// Requests answered at once per connection; the rest wait in the socket.
/// A reply keeps its slot until it is in the (as small) reply queue, so a
/// requester that stops reading its replies holds at most twice this many
/// in memory here, then its requests wait in the socket too.
const MAX_IN_FLIGHT: usize = 8;

/// Answers read requests on `conn` until the requester hangs up. A bad
/// message closes this connection only.
pub async fn serve(repl: Arc<Replication>, conn: Connection) {
    let Connection {
        mut reader, writer, ..
    } = conn;
    let (replies, outgoing) = mpsc::channel(MAX_IN_FLIGHT);
    let pump = tokio::spawn(writer.pump_bounded(outgoing).in_current_span());
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let request = match reader.next().await {
            Ok(Message::ReadRequest {
                id,
                offset,
                len,
                hash,
            }) => Request::Read {
                id,
                offset,
                len: u64::from(len),
                hash,
            },
            Ok(Message::HashRequest {
                id,
                offset,
                len,
                granule,
            }) => Request::Hashes {
                id,
                offset,
                len: u64::from(len),
                granule: u64::from(granule),
            },
            Ok(other) => {
                tracing::warn!(message = %other.message_type(), "not a read or hash request; closing the fetch connection");
                break;
            }
            Err(LinkError::Closed) => break,
            Err(e) => {
                tracing::warn!(error = %e, "fetch connection failed");
                break;
            }
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let repl = Arc::clone(&repl);
        let replies = replies.clone();
        tokio::spawn(
            async move {
                let reply = match request {
                    Request::Read {
                        id,
                        offset,
                        len,
                        hash,
                    } => answer(&repl, id, offset, len, hash).await,
                    Request::Hashes {
                        id,
                        offset,
                        len,
                        granule,
                    } => answer_hashes(&repl, id, offset, len, granule).await,
                };
                let _ = replies.send(reply).await;
                drop(slot);
            }
            .in_current_span(),
        );
    }
    drop(replies);
    // Replies still being read go out before the connection closes, unless
    // the requester is gone (then the pump fails on its own).
    let _ = pump.await;
}

/// What a requester may ask on a fetch connection.
enum Request {
    /// Blocks (or "same" if they hash to `hash`).
    Read {
        id: u64,
        offset: u64,
        len: u64,
        hash: Option<[u8; 32]>,
    },
    /// The hash of each `granule` bytes of the range (the WAN push).
    Hashes {
        id: u64,
        offset: u64,
        len: u64,
        granule: u64,
    },
}

/// The answer to a hash request: our copy's hash per granule.
async fn answer_hashes(
    repl: &Replication,
    id: u64,
    offset: u64,
    len: u64,
    granule: u64,
) -> Message {
    let refuse = |errno: i32| Message::ReadError { id, errno };
    if check_range(repl.local_size(), offset, len).is_err() {
        return refuse(libc::EINVAL);
    }
    // Blocks we lack hash to nothing anyone may rely on.
    if repl.local.stale_bitmap().any_in_bytes(offset, len) {
        return refuse(libc::ESTALE);
    }
    let mut buf = AlignedBuf::with_len(len as usize); // the read fills it
    if let Err(e) = repl.local.read(offset, buf.as_mut_slice()).await {
        tracing::warn!(offset, len, error = %e, "cannot read blocks a peer asked hashes of");
        return refuse(blockdev::device::errno_of(&e));
    }
    let mut hashes = Vec::with_capacity(len.div_ceil(granule) as usize * 32);
    for piece in buf.as_slice().chunks(granule as usize) {
        hashes.extend_from_slice(blake3::hash(piece).as_bytes());
    }
    Message::HashReply {
        id,
        offset,
        hashes: hashes.into(),
    }
}

/// The answer to one read request.
async fn answer(
    repl: &Replication,
    id: u64,
    offset: u64,
    len: u64,
    hash: Option<[u8; 32]>,
) -> Message {
    let refuse = |errno: i32| Message::ReadError { id, errno };
    if check_range(repl.local_size(), offset, len).is_err() {
        return refuse(libc::EINVAL);
    }
    // Blocks we lack ourselves (we were switched away from before our own
    // background sync finished) are not ours to give.
    if repl.local.stale_bitmap().any_in_bytes(offset, len) {
        tracing::debug!(offset, len, "asked for blocks this node lacks");
        return refuse(libc::ESTALE);
    }
    let mut buf = AlignedBuf::with_len(len as usize); // the read fills it
    if let Err(e) = repl.local.read(offset, buf.as_mut_slice()).await {
        tracing::warn!(offset, len, error = %e, "cannot read blocks a peer asked for");
        return refuse(blockdev::device::errno_of(&e));
    }
    if hash.is_some_and(|theirs| *blake3::hash(buf.as_slice()).as_bytes() == theirs) {
        return Message::ReadSame {
            id,
            offset,
            len: len as u32,
        };
    }
    Message::ReadReply {
        id,
        offset,
        data: buf.into_bytes(),
    }
}
