//! Talking to the directory server.
//!
//! Every call opens one authenticated connection (channel
//! [`Channel::Directory`], towards node [`DIRECTORY_NODE_ID`]), joins (the
//! directory records this node's name, listen address, LAN group and size,
//! and answers the term and primary), sends its request and waits for the
//! answer. Every network step has a timeout, so a dead directory never
//! hangs the caller.
//!
//! The directory also dials a primary (at its listen address) to ask it to
//! demote: the node's acceptor hands such a connection (channel
//! `Directory`, from node [`DIRECTORY_NODE_ID`]) to [`answer_demote`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use blockdev::meta::Bitmap;
use bytes::{BufMut, Bytes, BytesMut};
use protocol::{Channel, GenerationIds, Message, DIRECTORY_NODE_ID, MAX_DATA_LEN, NO_NODE};

use crate::replication::transport::{self, Connection, FrameReader, FrameWriter, LocalIdentity};

/// The one encoding of [`Message::DirBitmap`] data: [`Bitmap::encode`]'s.
pub const ENCODING_VMSYNC_RLE: u8 = 0;

/// Connecting to the directory and authenticating.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer to a join or a report (the directory commits it first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// An answer to a promotion: the directory may first wait for the current
/// primary to demote (which waits for its peers).
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(90);
/// Sending a request (the directory reads it at once).
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// The directory's DirDemote after it connected to us.
const DEMOTE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// This node, as the directory records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where peers and the directory reach this node.
    pub address: SocketAddr,
    pub lan_group: String,
    /// Size of this node's copy, in bytes.
    pub size: u64,
}

/// The resource's term and primary, as the directory knows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirInfo {
    /// The newest term handed out (0: no promotion ever).
    pub term: u64,
    pub primary: Option<u32>,
}

/// What a primary tells the directory: which blocks every node lacks.
#[derive(Debug, Clone)]
pub struct Report {
    /// The term this node is primary of.
    pub term: u64,
    pub generation: GenerationIds,
    /// The final report of a demotion: the directory records "no primary".
    pub last: bool,
    /// Hot extents (the activity log), pulled first by the next primary.
    pub hot_extents: Vec<u64>,
    /// (node id, the blocks that node lacks).
    pub bitmaps: Vec<(u32, Arc<Bitmap>)>,
}

/// The directory made this node primary.
#[derive(Debug)]
pub struct Grant {
    /// The new term.
    pub term: u64,
    /// The previous primary could not hand over and was overridden
    /// (`promote --force`): writes after its last report may be missing.
    pub overridden: bool,
    /// The last report the directory holds; `None` if it never got one.
    pub prev: Option<PrevReport>,
}

impl Grant {
    /// The previous primary, another node than `me`, demoted cleanly after
    /// its last report and was not overridden: the bitmaps are exact (no
    /// write is missing from them).
    pub fn is_clean_handover_to(&self, me: u32) -> bool {
        self.prev
            .as_ref()
            .is_some_and(|p| p.primary != me && p.last && !self.overridden)
    }
}

/// The last report of the resource, handed to a new primary.
#[derive(Debug)]
pub struct PrevReport {
    /// The node that made it (primary of `term`).
    pub primary: u32,
    pub term: u64,
    pub generation: GenerationIds,
    /// It was a final report (clean demotion, nothing written since).
    pub last: bool,
    /// How old the report is.
    pub age: Duration,
    pub hot_extents: Vec<u64>,
    /// Per node id, the blocks that node lacks.
    pub bitmaps: BTreeMap<u32, Bitmap>,
    /// Blocks the report described: fewer than this node has when the
    /// device grew since (`vmsyncctl resize`); the bitmaps mark the blocks
    /// past them as lacking, which the new primary corrects for itself
    /// (it holds its own version of the new area).
    pub covered_blocks: u64,
}

/// Why a directory request failed. Each variant holds a whole sentence
/// that names the directory's address.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory (or, through it, another node) said no: the reason.
    #[error("{0}")]
    Refused(String),
    /// No connection, no authentication, or no answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// The other side broke the protocol.
    #[error("{0}")]
    Protocol(String),
}

/// A client of the directory for one resource and node.
#[derive(Clone)]
pub struct DirectoryClient {
    directory: SocketAddr,
    identity: LocalIdentity,
    me: Member,
}

/// An open session: joined.
struct Session {
    reader: FrameReader,
    writer: FrameWriter,
    info: DirInfo,
}

impl DirectoryClient {
    pub fn new(directory: SocketAddr, identity: LocalIdentity, me: Member) -> Self {
        DirectoryClient {
            directory,
            identity,
            me,
        }
    }

    /// The directory's address.
    pub fn address(&self) -> SocketAddr {
        self.directory
    }

    fn unreachable(&self, what: impl std::fmt::Display) -> DirError {
        DirError::Unreachable(format!(
            "cannot reach the directory at {}: {what}",
            self.directory
        ))
    }

    fn refused(&self, reason: impl std::fmt::Display) -> DirError {
        DirError::Refused(format!(
            "the directory at {} refused: {reason}",
            self.directory
        ))
    }

    fn protocol(&self, what: impl std::fmt::Display) -> DirError {
        DirError::Protocol(format!(
            "the directory at {} broke the protocol: {what}",
            self.directory
        ))
    }

    async fn next(&self, reader: &mut FrameReader, timeout: Duration) -> Result<Message, DirError> {
        tokio::time::timeout(timeout, reader.next())
            .await
            .map_err(|_| self.unreachable(format!("no answer within {} s", timeout.as_secs())))?
            .map_err(|e| self.unreachable(e))
    }

    async fn send(&self, writer: &mut FrameWriter) -> Result<(), DirError> {
        tokio::time::timeout(SEND_TIMEOUT, writer.flush())
            .await
            .map_err(|_| self.unreachable("sending timed out"))?
            .map_err(|e| self.unreachable(e))
    }

    /// Connects, authenticates and joins.
    async fn join(&self) -> Result<Session, DirError> {
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::connect(
                &self.identity,
                self.directory,
                DIRECTORY_NODE_ID,
                Channel::Directory,
            ),
        )
        .await
        .map_err(|_| {
            self.unreachable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| self.unreachable(e))?;
        let Connection {
            mut reader,
            mut writer,
            ..
        } = conn;
        writer
            .queue(&Message::DirJoin {
                name: self.me.name.clone(),
                address: self.me.address.to_string(),
                lan_group: self.me.lan_group.clone(),
                size: self.me.size,
            })
            .map_err(|e| self.protocol(e))?;
        self.send(&mut writer).await?;
        let info = match self.next(&mut reader, ANSWER_TIMEOUT).await? {
            Message::DirInfo { term, primary } => info(term, primary),
            Message::DirRefused { reason } => return Err(self.refused(reason)),
            other => {
                return Err(self.protocol(format!("expected DirInfo, got {}", other.message_type())))
            }
        };
        Ok(Session {
            reader,
            writer,
            info,
        })
    }

    /// Joins; the resource's term and primary.
    pub async fn info(&self) -> Result<DirInfo, DirError> {
        Ok(self.join().await?.info)
    }

    /// Asks to become primary (`force`: even if the current primary cannot
    /// hand over). The previous report's bitmaps must match this node's
    /// geometry (`nbits` blocks of `block_size` bytes).
    pub async fn promote(
        &self,
        force: bool,
        nbits: u64,
        block_size: u32,
    ) -> Result<Grant, DirError> {
        let mut s = self.join().await?;
        s.writer
            .queue(&Message::DirPromote { force })
            .map_err(|e| self.protocol(e))?;
        self.send(&mut s.writer).await?;
        let granted = self.next(&mut s.reader, PROMOTE_TIMEOUT).await?;
        let Message::DirGranted {
            term,
            prev_primary,
            prev_term,
            prev_generation,
            prev_final,
            report_age_ms,
            overridden,
            hot_extents,
            bitmaps: count,
        } = granted
        else {
            return match granted {
                Message::DirRefused { reason } => Err(self.refused(reason)),
                other => {
                    Err(self.protocol(format!("expected DirGranted, got {}", other.message_type())))
                }
            };
        };
        let mut bitmaps = BTreeMap::new();
        let mut covered_blocks = nbits;
        for _ in 0..count {
            let msg = self.next(&mut s.reader, ANSWER_TIMEOUT).await?;
            let (node_id, bitmap, covered) =
                decode_bitmap(msg, nbits, block_size).map_err(|e| self.protocol(e))?;
            covered_blocks = covered_blocks.min(covered);
            if bitmaps.insert(node_id, bitmap).is_some() {
                return Err(self.protocol(format!("two bitmaps for node {node_id}")));
            }
        }
        let prev = (prev_primary != NO_NODE).then(|| PrevReport {
            primary: prev_primary,
            term: prev_term,
            generation: prev_generation,
            last: prev_final,
            age: Duration::from_millis(report_age_ms),
            hot_extents: decode_extents(&hot_extents),
            bitmaps,
            covered_blocks,
        });
        Ok(Grant {
            term,
            overridden,
            prev,
        })
    }

    /// Sends a report. A refusal (`DirError::Refused`, "fenced: ...") means
    /// this node is no longer primary of `report.term`: stop serving writes.
    pub async fn report(&self, report: &Report) -> Result<DirInfo, DirError> {
        let mut s = self.join().await?;
        queue_report(&mut s.writer, report).map_err(|e| self.protocol(e))?;
        self.send(&mut s.writer).await?;
        match self.next(&mut s.reader, ANSWER_TIMEOUT).await? {
            Message::DirInfo { term, primary } => Ok(info(term, primary)),
            Message::DirRefused { reason } => Err(self.refused(reason)),
            other => Err(self.protocol(format!("expected DirInfo, got {}", other.message_type()))),
        }
    }
}

fn info(term: u64, primary: u32) -> DirInfo {
    DirInfo {
        term,
        primary: (primary != NO_NODE).then_some(primary),
    }
}

fn decode_extents(bytes: &[u8]) -> Vec<u64> {
    // The codec checked that the length is a multiple of 8.
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// One node's bitmap of a report, sized for this node's `nbits` blocks,
/// and how many blocks the report covered. A report from before the device
/// grew covers fewer: the blocks past them are marked lacking (every other
/// copy lacks the new primary's version of the new area).
fn decode_bitmap(msg: Message, nbits: u64, block_size: u32) -> Result<(u32, Bitmap, u64), String> {
    let Message::DirBitmap {
        node_id,
        block_size: their_block_size,
        nbits: their_nbits,
        encoding,
        data,
    } = msg
    else {
        return Err(format!("expected DirBitmap, got {}", msg.message_type()));
    };
    if node_id >= crate::config::MAX_NODES {
        return Err(format!(
            "a bitmap for node {node_id}, outside the node slots (0 to {})",
            crate::config::MAX_NODES - 1
        ));
    }
    if their_block_size != block_size || their_nbits > nbits {
        return Err(format!(
            "the bitmap of node {node_id} covers {their_nbits} blocks of {their_block_size} bytes; \
             this node has {nbits} blocks of {block_size} bytes"
        ));
    }
    if encoding != ENCODING_VMSYNC_RLE {
        return Err(format!(
            "the bitmap of node {node_id} has unknown encoding {encoding}"
        ));
    }
    let reported = Bitmap::decode(their_nbits, block_size, &data)
        .map_err(|e| format!("the bitmap of node {node_id} does not decode: {e}"))?;
    if their_nbits == nbits {
        return Ok((node_id, reported, nbits));
    }
    let bitmap = Bitmap::new(nbits, block_size);
    bitmap
        .merge_prefix_from(&reported)
        .map_err(|e| format!("the bitmap of node {node_id}: {e}"))?;
    bitmap.set_range(their_nbits, nbits - their_nbits);
    Ok((node_id, bitmap, their_nbits))
}

/// Queues a DirReport and its DirBitmaps.
fn queue_report(writer: &mut FrameWriter, report: &Report) -> Result<(), String> {
    let mut extents = BytesMut::with_capacity(report.hot_extents.len() * 8);
    report
        .hot_extents
        .iter()
        .for_each(|&e| extents.put_u64_le(e));
    let mut encoded = Vec::with_capacity(report.bitmaps.len());
    for (node_id, bitmap) in &report.bitmaps {
        let data = bitmap.encode();
        if data.len() > MAX_DATA_LEN {
            return Err(format!(
                "the bitmap of node {node_id} encodes to {} bytes, more than {MAX_DATA_LEN}",
                data.len()
            ));
        }
        encoded.push(Message::DirBitmap {
            node_id: *node_id,
            block_size: bitmap.block_size(),
            nbits: bitmap.nbits(),
            encoding: ENCODING_VMSYNC_RLE,
            data: Bytes::from(data),
        });
    }
    writer
        .queue(&Message::DirReport {
            term: report.term,
            generation: report.generation,
            last: report.last,
            hot_extents: extents.freeze(),
            bitmaps: encoded.len() as u32,
        })
        .map_err(|e| e.to_string())?;
    for msg in &encoded {
        writer.queue(msg).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Node side of the directory's DirDemote: serves one request on an
/// accepted `Channel::Directory` connection. `demote(force, term)` runs the
/// node's demotion and returns its final report (`last` = true) or the
/// reason it refuses. Sends the DirReport and its bitmaps (or DirRefused)
/// and, after a report, waits for the directory's DirInfo acknowledging it.
pub async fn answer_demote<F, Fut>(mut conn: Connection, demote: F) -> Result<(), DirError>
where
    F: FnOnce(bool, u64) -> Fut,
    Fut: Future<Output = Result<Report, String>>,
{
    let lost =
        |what: String| DirError::Unreachable(format!("the directory's demote request: {what}"));
    let request = tokio::time::timeout(DEMOTE_REQUEST_TIMEOUT, conn.reader.next())
        .await
        .map_err(|_| lost("no request within 10 s".into()))?
        .map_err(|e| lost(e.to_string()))?;
    let Message::DirDemote { force, term } = request else {
        return Err(DirError::Protocol(format!(
            "the directory sent {} instead of DirDemote",
            request.message_type()
        )));
    };
    let report = match demote(force, term).await {
        Ok(report) => report,
        Err(reason) => {
            let msg = Message::DirRefused { reason };
            return tokio::time::timeout(SEND_TIMEOUT, conn.writer.send(&msg))
                .await
                .map_err(|_| lost("sending the refusal timed out".into()))?
                .map_err(|e| lost(e.to_string()));
        }
    };
    queue_report(&mut conn.writer, &report).map_err(DirError::Protocol)?;
    tokio::time::timeout(SEND_TIMEOUT, conn.writer.flush())
        .await
        .map_err(|_| lost("sending the final report timed out".into()))?
        .map_err(|e| lost(e.to_string()))?;
    let ack = tokio::time::timeout(ANSWER_TIMEOUT, conn.reader.next())
        .await
        .map_err(|_| lost("no acknowledgement of the final report".into()))?
        .map_err(|e| lost(e.to_string()))?;
    match ack {
        Message::DirInfo { .. } => Ok(()),
        Message::DirRefused { reason } => Err(DirError::Refused(format!(
            "the directory refused the final report: {reason}"
        ))),
        other => Err(DirError::Protocol(format!(
            "the directory acknowledged the final report with {}",
            other.message_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grant's bitmap for a node id beyond the metadata's slots (a
    /// directory bug or a hostile directory) is refused, not indexed.
    #[test]
    fn a_bitmap_for_a_node_outside_the_slots_is_refused() {
        for node_id in [crate::config::MAX_NODES, u32::MAX] {
            let msg = Message::DirBitmap {
                node_id,
                block_size: 4096,
                nbits: 16,
                encoding: ENCODING_VMSYNC_RLE,
                data: Bytes::new(),
            };
            let err = decode_bitmap(msg, 16, 4096).unwrap_err();
            assert!(err.contains("outside the node slots"), "{err}");
        }
    }
}
