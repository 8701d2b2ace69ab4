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
    timeout: std::time::Duration,
) -> Result<Bitmap, LinkError> {
    let mut encoded = Vec::new();
    let mut expected_index = 0u32;
    loop {
        let msg = tokio::time::timeout(timeout, meta.next())
            .await
            .map_err(|_| LinkError::Violation("no bitmap from the peer".into()))??;
        if matches!(msg, Message::Ping | Message::PingAck) {
            continue;
        }
        let kind = msg.message_type();
        let Message::Bitmap {
            node_id,
            block_size,
            nbits,
            encoding,
            chunk_index,
            last,
            data,
        } = msg
        else {
            return Err(LinkError::Violation(format!(
                "expected the peer's bitmap, got {kind}"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::transport::loopback_pair;

    const NBITS: u64 = 100_000;
    const BLOCK: u32 = 4096;

    /// Sends `messages` from one end of a loopback connection and runs
    /// `receive` (as node 1, for a bitmap like `like`) on the other.
    async fn exchange_like(like: &Bitmap, messages: Vec<Message>) -> Result<Bitmap, LinkError> {
        let ((_, mut writer), (mut reader, _)) = loopback_pair().await;
        let sending = tokio::spawn(async move {
            for msg in &messages {
                writer.queue(msg).unwrap();
            }
            writer.flush().await.unwrap();
            writer
        });
        let received = receive(&mut reader, 1, like, std::time::Duration::from_secs(5)).await;
        drop(sending.await.unwrap());
        received
    }

    async fn exchange(messages: Vec<Message>) -> Result<Bitmap, LinkError> {
        exchange_like(&Bitmap::new(NBITS, BLOCK), messages).await
    }

    #[tokio::test]
    async fn a_bitmap_larger_than_one_message_travels_in_chunks() {
        // Alternating bits: the raw form, one byte more than MAX_DATA_LEN.
        let nbits = 8 * MAX_DATA_LEN as u64;
        let mut raw = vec![1u8];
        raw.resize(1 + MAX_DATA_LEN, 0x55);
        let bitmap = Bitmap::decode(nbits, BLOCK, &raw).unwrap();
        let messages = sent(&bitmap, 1);
        assert_eq!(messages.len(), 2);
        let got = exchange_like(&Bitmap::new(nbits, BLOCK), messages)
            .await
            .unwrap();
        assert_eq!(got.count_ones(), nbits / 2);
        assert_eq!(got.encode(), bitmap.encode());
    }

    fn sent(bitmap: &Bitmap, node_id: u32) -> Vec<Message> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        send(&tx, node_id, bitmap);
        drop(tx);
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn a_bitmap_arrives_bit_for_bit() {
        let bitmap = Bitmap::new(NBITS, BLOCK);
        bitmap.set_range(10, 5);
        bitmap.set_range(70_000, 1234);
        bitmap.set_range(NBITS - 1, 1);
        let mut messages = vec![Message::Ping];
        messages.extend(sent(&bitmap, 1));
        let got = exchange(messages).await.unwrap();
        assert_eq!(got.count_ones(), 5 + 1234 + 1);
        for bit in [10, 14, 70_000, 71_233, NBITS - 1] {
            assert!(got.test(bit), "bit {bit}");
        }
        assert!(!got.test(15) && !got.test(71_234));
    }

    #[tokio::test]
    async fn a_bitmap_that_does_not_fit_our_geometry_is_refused() {
        let other_size = Bitmap::new(NBITS + 1, BLOCK);
        let err = exchange(sent(&other_size, 1)).await.unwrap_err();
        assert!(err.to_string().contains("does not match ours"), "{err}");

        let other_node = Bitmap::new(NBITS, BLOCK);
        let err = exchange(sent(&other_node, 3)).await.unwrap_err();
        assert!(err.to_string().contains("node 3"), "{err}");
    }

    #[tokio::test]
    async fn out_of_order_oversized_or_undecodable_chunks_are_refused() {
        let chunk = |index: u32, last: bool, data: &'static [u8]| Message::Bitmap {
            node_id: 1,
            block_size: BLOCK,
            nbits: NBITS,
            encoding: ENCODING_VMSYNC_RLE,
            chunk_index: index,
            last,
            data: bytes::Bytes::from_static(data),
        };
        let err = exchange(vec![chunk(1, true, &[0])]).await.unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");

        static HUGE: [u8; 20_000] = [1; 20_000]; // raw form is 12_501 bytes
        let err = exchange(vec![chunk(0, true, &HUGE)]).await.unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");

        // Runs that add up to less than the bitmap.
        let err = exchange(vec![chunk(0, true, &[0, 5])]).await.unwrap_err();
        assert!(err.to_string().contains("bad bitmap"), "{err}");

        let err = exchange(vec![Message::BarrierAck { epoch: 1 }])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("expected the peer's bitmap"),
            "{err}"
        );
    }
}
