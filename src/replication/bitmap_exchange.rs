//! Bitmap exchange when a secondary joins a primary.
//!
//! The primary's bitmap for a peer says which blocks the *peer* lacks. It
//! cannot know which blocks the peer holds that the primary does not: a
//! crashed primary's last writes that never left it (protocol A), or a
//! secondary's writes that the other secondaries missed when their primary
//! died. The secondary knows: its own bitmap for the primary's node (bits it
//! set as primary, activity-log extents marked after a crash or a change of
//! primary). So the secondary sends that bitmap first thing, the primary ORs
//! it into its bitmap for the peer, and the resync overwrites every block
//! that may differ in either direction — as DRBD does with its bitmap
//! exchange. The secondary clears those bits once the primary reports it up
//! to date.

use blockdev::meta::Bitmap;
use protocol::{Message, MAX_DATA_LEN};
use tokio::sync::mpsc;

use super::link::LINK_TIMEOUT;
use super::transport::{FrameReader, LinkError};

/// The one encoding of [`Message::Bitmap`] data: `Bitmap::encode`'s.
const ENCODING_VMSYNC_RLE: u8 = 0;

/// Queues `bitmap` (ours for node `node_id`) as Bitmap chunks on `meta`.
pub fn send(meta: &mpsc::UnboundedSender<Message>, node_id: u32, bitmap: &Bitmap) {
    let encoded = bytes::Bytes::from(bitmap.encode());
    let chunks = encoded.len().div_ceil(MAX_DATA_LEN).max(1);
    for index in 0..chunks {
        let start = index * MAX_DATA_LEN;
        let end = encoded.len().min(start + MAX_DATA_LEN);
        let _ = meta.send(Message::Bitmap {
            node_id,
            block_size: bitmap.block_size(),
            nbits: bitmap.nbits(),
            encoding: ENCODING_VMSYNC_RLE,
            chunk_index: index as u32,
            last: index + 1 == chunks,
            data: encoded.slice(start..end),
        });
    }
}

/// Reads the peer's Bitmap chunks from `meta` and checks them against our
/// node id and geometry (`like` is a bitmap of ours for the peer). Pings
/// on the way are skipped.
pub async fn receive(
    meta: &mut FrameReader,
    our_id: u32,
    like: &Bitmap,
) -> Result<Bitmap, LinkError> {
    let mut encoded = Vec::new();
    let mut expected_index = 0u32;
    loop {
        let msg = tokio::time::timeout(LINK_TIMEOUT, meta.next())
            .await
            .map_err(|_| LinkError::Violation("no bitmap from the peer".into()))??;
        let (node_id, block_size, nbits, encoding, chunk_index, last, data) = match msg {
            Message::Bitmap {
                node_id,
                block_size,
                nbits,
                encoding,
                chunk_index,
                last,
                data,
            } => (
                node_id,
                block_size,
                nbits,
                encoding,
                chunk_index,
                last,
                data,
            ),
            Message::Ping | Message::PingAck => continue,
            other => {
                return Err(LinkError::Violation(format!(
                    "expected the peer's bitmap, got {}",
                    other.message_type()
                )))
            }
        };
        if node_id != our_id
            || block_size != like.block_size()
            || nbits != like.nbits()
            || encoding != ENCODING_VMSYNC_RLE
            || chunk_index != expected_index
        {
            return Err(LinkError::Violation(format!(
                "bitmap chunk {chunk_index} (node {node_id}, {nbits} bits of {block_size} bytes, encoding {encoding}) does not match ours (node {our_id}, chunk {expected_index}, {} bits of {} bytes)",
                like.nbits(),
                like.block_size()
            )));
        }
        // The encoding never exceeds the raw size plus its tag byte.
        if (encoded.len() + data.len()) as u64 > nbits.div_ceil(8) + 1 {
            return Err(LinkError::Violation(
                "bitmap longer than its geometry allows".into(),
            ));
        }
        encoded.extend_from_slice(&data);
        expected_index += 1;
        if last {
            return Bitmap::decode(nbits, block_size, &encoded)
                .map_err(|e| LinkError::Violation(format!("bad bitmap from the peer: {e}")));
        }
    }
}
