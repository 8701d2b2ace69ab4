//! The primary's side of a link to a secondary: decide whether the peer's
//! data can be brought up to date from our bitmap, then mirror writes to it,
//! resend what it missed (resync), and collect its acks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::buffer::AlignedBuf;
use blockdev::BlockDevice;
use protocol::{DiskState, GenerationIds, Message, Role};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::bitmap_exchange;
use super::link::{our_state, Link, PeerState};
use super::liveness::{Due, Liveness};
use super::pacing::{RateBounds, ResyncPace, UNSENT_WHILE_RESYNCING};
use super::peer::{Outgoing, PeerMode, PeerReplica};
use super::split_brain::{self, Decision, Side};
use super::transport::{FrameWriter, LinkError, SocketProbe};
use super::{Replication, RoleState};

/// Resync chunks per epoch: bits clear when the epoch's barrier is acked.
const RESYNC_CHUNKS_PER_EPOCH: u32 = 16;
/// Bytes sent per socket write at most (batching small messages).
const SEND_BATCH: usize = 1 << 20;

/// How the peer's data relates to ours.
#[derive(Debug, PartialEq, Eq)]
pub enum Lineage {
    /// Same generation, or the one our bitmaps count from: the bitmap (and
    /// the peer's report) say what differs.
    FromBitmap,
    /// The peer never held data: everything must be sent.
    Empty,
    /// An older generation of our history: our bitmaps only count changes
    /// since the last one, and other primaries may have written in between,
    /// so everything must be sent.
    TooOld,
    /// The peer has data we do not: refuse rather than overwrite it.
    PeerAhead,
    /// Neither descends from the other: split brain.
    Diverged,
}

/// How a peer's data relates to ours, from both sides' generation ids and
/// `us`, the (term, node id) of our tenure as primary. Our bitmaps hold
/// every block a peer missed since it last held one of our generations: one
/// started by us in this tenure (ids carry their origin, see
/// `GenerationIds::new_id`), or the one we held when promoted
/// (`ours.bitmap`). An older one is too old to diff.
pub fn lineage(ours: GenerationIds, theirs: GenerationIds, us: (u64, u32)) -> Lineage {
    use blockdev::meta::GenerationIds as Ids;
    let ours_to_diff = theirs.current == ours.current
        || theirs.current == ours.bitmap
        || (us.0 != 0 && Ids::origin_of(theirs.current) == us)
        || only_ours_since(ours, theirs.current, us.1);
    if theirs.current == 0 {
        Lineage::Empty
    } else if ours_to_diff {
        Lineage::FromBitmap
    } else if ours.history.contains(&theirs.current) {
        Lineage::TooOld
    } else if ours.current == theirs.bitmap || theirs.history.contains(&ours.current) {
        Lineage::PeerAhead
    } else {
        Lineage::Diverged
    }
}

/// Whether `theirs` is one of our last generations and it and every one
/// since were started by `node` (us) as primary, in whatever tenure: a
/// daemon that restarted (crashed, or grew online) resumes in a tenure of
/// its own. Our data then changed only by our own writes since `theirs`,
/// and our bitmaps hold every one of them a peer missed: no other primary
/// wrote in between (we would hold its generation, having synced from it).
fn only_ours_since(ours: GenerationIds, theirs: u64, node: u32) -> bool {
    use blockdev::meta::GenerationIds as Ids;
    let newest_first = [ours.current, ours.history[0], ours.history[1]];
    newest_first
        .iter()
        .position(|&g| g == theirs)
        .is_some_and(|k| {
            newest_first[..=k]
                .iter()
                .all(|&g| g != 0 && Ids::origin_of(g).1 == node)
        })
}

/// A diverged secondary: `[replication] after_split_brain` decides (see
/// `split_brain`). Refused, or the peer's bits are set for what it must be
/// sent: only what it lacks when it wrote nothing since the split and our
/// bitmaps count from the generation it then holds, everything otherwise.
fn resolve_split_brain(
    repl: &Replication,
    peer: &PeerReplica,
    theirs: &PeerState,
    us: (u64, u32),
) -> Result<(), LinkError> {
    let policy = repl.tunables().after_split_brain;
    let ours = Side::ours(repl);
    let their_side = Side::theirs(theirs);
    match split_brain::decide(policy, &ours, &their_side) {
        Decision::Refuse(why) => Err(LinkError::Violation(why)),
        Decision::DiscardPeer { made_no_changes } => {
            // Its own stale blocks would not be in our bitmap: only a peer
            // whose copy is whole may be diffed.
            let diffable = made_no_changes
                && theirs.disk_state == DiskState::UpToDate
                && lineage(ours.generation, their_side.as_parent(), us) == Lineage::FromBitmap;
            if diffable {
                tracing::warn!(
                    policy = policy.name(),
                    peer_generation = format!("{:016x}", theirs.generation.current),
                    "split brain resolved: the secondary wrote nothing since the split; resyncing what it lacks"
                );
            } else {
                let blocks = peer.bitmap.set_all();
                tracing::warn!(
                    blocks,
                    policy = policy.name(),
                    peer_generation = format!("{:016x}", theirs.generation.current),
                    "split brain resolved: the secondary's changes are discarded: full sync"
                );
            }
            Ok(())
        }
    }
}

pub async fn run(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    link: Link,
    theirs: PeerState,
    role_changes: &mut watch::Receiver<RoleState>,
) -> Result<(), LinkError> {
    let us = (repl.role().term, repl.config.node.id);
    let inherited = repl.inherited();
    let taken_over = inherited.is_some_and(|i| i.covers(theirs.generation.current));
    let mut relation = lineage(repl.generation(), theirs.generation, us);
    if taken_over && relation != Lineage::Empty {
        // A generation of the primary we took over from: the bitmap the
        // directory gave us for this peer covers what it lacks.
        relation = Lineage::FromBitmap;
    }
    match relation {
        Lineage::FromBitmap => {}
        Lineage::Empty => {
            let blocks = peer.bitmap.set_all();
            tracing::info!(blocks, "peer holds no data yet: full sync");
        }
        Lineage::TooOld => {
            let blocks = peer.bitmap.set_all();
            tracing::info!(
                blocks,
                generation = format!("{:016x}", theirs.generation.current),
                "peer holds an older generation than our bitmaps count from: full sync"
            );
        }
        Lineage::PeerAhead => {
            return Err(LinkError::Violation(format!(
                "peer holds newer data (generation {:016x}) than this primary; refusing to overwrite it — demote here and promote the peer",
                theirs.generation.current
            )))
        }
        Lineage::Diverged => resolve_split_brain(repl, peer, &theirs, us)?,
    }
    let Link {
        data_reader: _data_reader,
        data_writer,
        mut meta_reader,
        meta_writer,
    } = link;
    // What the peer holds that we may not: resynced like what it lacks.
    let reported = bitmap_exchange::receive(
        &mut meta_reader,
        repl.config.node.id,
        &peer.bitmap,
        super::liveness::ping_timeout(&repl.tunables()),
    )
    .await?;
    if taken_over && inherited.is_some_and(|i| i.exact) {
        // A clean handover: the directory's bitmap for this peer is exact,
        // and whatever it reports (its activity log, the blocks it knew we
        // lacked) holds the previous primary's data, which is what we
        // fetch: resending it would only double the traffic.
        tracing::debug!(
            reported = reported.count_ones(),
            "peer of the tenure we took over: its report adds nothing"
        );
        reported.clear_all();
    }
    let added = peer
        .bitmap
        .merge_from(&reported)
        .map_err(|e| LinkError::Violation(e.to_string()))?;
    if added > 0 {
        tracing::info!(
            blocks = added,
            "peer reported blocks that may differ from ours; they will be resynced"
        );
    }
    let congestion = repl.tunables().congestion_bytes;
    let (data_tx, data_rx) = mpsc::unbounded_channel();
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    // In the link's span: what the writers log names node and peer.
    // The LAN resync paces itself by what the kernel holds (see `pacing`).
    let data_socket = if peer.is_lan {
        data_writer.probe()
    } else {
        None
    };
    let mut sender = tokio::spawn(
        send_data(Arc::clone(peer), data_writer, data_rx, congestion).in_current_span(),
    );
    let meta_sender = tokio::spawn(meta_writer.pump(meta_rx).in_current_span());
    peer.start_mirroring(data_tx);
    let resync = if peer.is_lan {
        tokio::spawn(
            resync_loop(
                Arc::clone(repl),
                Arc::clone(peer),
                meta_tx.clone(),
                data_socket,
            )
            .in_current_span(),
        )
    } else {
        // WAN peers: the lazy, budgeted push (see `wan`).
        let push = super::wan::push_loop(Arc::clone(repl), Arc::clone(peer), meta_tx.clone());
        tokio::spawn(push.in_current_span())
    };
    tracing::info!(
        mode = peer.mode().name(),
        stale_bytes = peer.bitmap.count_ones() * peer.bitmap.block_size() as u64,
        "mirroring to peer"
    );

    let mut live = Liveness::new(&repl.tunables(), peer);
    let operator_disconnect = peer.admin.down();
    tokio::pin!(operator_disconnect);
    let result = loop {
        tokio::select! {
            // Frames first: one that is waiting proves the peer alive even
            // if the deadline passed while we were not polled.
            biased;
            msg = meta_reader.next() => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => break Err(e),
                };
                live.heard();
                match msg {
                    Message::BarrierAck { epoch } => {
                        if let Err(e) = peer.barrier_acked(epoch, congestion) {
                            break Err(LinkError::Violation(e));
                        }
                    }
                    Message::WriteAck { seq } => peer.write_acked(seq),
                    Message::WriteNack { seq, errno } => {
                        break Err(LinkError::Violation(format!("peer's disk failed write {seq} (errno {errno}); it is marked stale")));
                    }
                    // Liveness only: see `liveness` for why no answer.
                    Message::Ping | Message::PingAck => {}
                    Message::State { term, .. } => {
                        if let Err(e) = repl.check_peer_term(term, &peer.config.name) {
                            break Err(e);
                        }
                        break Ok(());
                    }
                    other => break Err(LinkError::Violation(format!("unexpected {} from a secondary", other.message_type()))),
                }
            }
            _ = role_changes.changed() => break Ok(()),
            _ = &mut operator_disconnect => break Ok(()),
            () = peer.expel.notified() => {
                if let Some(why) = peer.expel_reason() {
                    break Err(LinkError::Violation(why));
                }
            }
            sent = &mut sender => break match sent {
                Ok(Err(e)) => Err(e),
                _ => Err(LinkError::Closed),
            },
            due = live.due() => match due {
                Due::Ping => {
                    let _ = meta_tx.send(Message::Ping);
                    if peer.mode() == PeerMode::Behind {
                        repl.nudge_behind_peer(peer);
                    }
                }
                Due::Dead(e) => break Err(e),
            },
        }
    };
    resync.abort();
    sender.abort();
    meta_sender.abort();
    result
}

/// Writes queued messages to the data connection, batching small ones.
async fn send_data(
    peer: Arc<PeerReplica>,
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    congestion: u64,
) -> Result<(), LinkError> {
    // What this connection sent zero-copy, counted so far.
    let mut zero_copy_bytes = 0;
    // Whether the kernel's unsent bytes are capped (see `pacing`).
    let mut unsent_limited = false;
    while let Some(first) = rx.recv().await {
        let mut bytes = first.bytes;
        queue_one(&peer, &mut writer, &first)?;
        bytes += queue_ready(&peer, &mut rx, &mut writer)?;
        // Each socket write costs a system call and, on the receiving side,
        // a wake-up: let the writes submitted concurrently with this one
        // join it (one pass of the scheduler) before sending.
        if writer.buffered() < SEND_BATCH {
            tokio::task::yield_now().await;
            bytes += queue_ready(&peer, &mut rx, &mut writer)?;
        }
        let resyncing = peer.mode() == PeerMode::Resyncing;
        if resyncing != unsent_limited {
            writer.limit_unsent(resyncing.then_some(UNSENT_WHILE_RESYNCING));
            unsent_limited = resyncing;
        }
        writer.flush().await?;
        let sent = writer.zero_copy_stats().sent_bytes;
        peer.stats
            .zero_copy_bytes
            .fetch_add(sent - zero_copy_bytes, Ordering::Relaxed);
        zero_copy_bytes = sent;
        peer.queued.fetch_sub(
            bytes.min(peer.queued.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        peer.backlog_drained(congestion);
    }
    Ok(())
}

/// Queues what is already waiting in `rx`, up to [`SEND_BATCH`] bytes in
/// the writer; returns the payload bytes queued.
fn queue_ready(
    peer: &PeerReplica,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    writer: &mut FrameWriter,
) -> Result<u64, LinkError> {
    let mut bytes = 0;
    while writer.buffered() < SEND_BATCH {
        let Ok(next) = rx.try_recv() else { break };
        bytes += next.bytes;
        queue_one(peer, writer, &next)?;
    }
    Ok(bytes)
}

/// Queues one message: the record sealed once for every peer if it has
/// one, else sealed by this link.
fn queue_one(
    peer: &PeerReplica,
    writer: &mut FrameWriter,
    out: &Outgoing,
) -> Result<(), LinkError> {
    if writer.queue_shared(&out.message, out.shared.as_ref())? {
        peer.stats
            .shared_record_bytes
            .fetch_add(out.bytes, Ordering::Relaxed);
    }
    Ok(())
}

/// Resends stale blocks whenever the peer is in `Resyncing` mode.
async fn resync_loop(
    repl: Arc<Replication>,
    peer: Arc<PeerReplica>,
    meta_tx: mpsc::UnboundedSender<Message>,
    data_socket: Option<SocketProbe>,
) {
    loop {
        peer.resync_wanted.notified().await;
        match peer.mode() {
            PeerMode::Resyncing => {
                if let Err(e) = resync_pass(&repl, &peer, data_socket.as_ref()).await {
                    tracing::error!(error = %e, "resync stopped");
                    return;
                }
                if peer.mark_up_to_date() {
                    tracing::info!("peer is up to date");
                    let _ = meta_tx.send(in_sync_state(&repl));
                } else if peer.mode() == PeerMode::Resyncing {
                    // Bits were set while we worked: go again.
                    peer.resync_wanted.notify_one();
                }
            }
            PeerMode::UpToDate => {
                let _ = meta_tx.send(in_sync_state(&repl));
            }
            _ => {}
        }
    }
}

/// Tells the secondary that it now holds our generation's data.
pub(super) fn in_sync_state(repl: &Replication) -> Message {
    match our_state(repl) {
        Message::State {
            term,
            generation,
            size,
            unwritten,
            ..
        } => Message::State {
            role: Role::Primary,
            term,
            generation,
            disk_state: DiskState::UpToDate,
            size,
            unwritten,
        },
        other => other,
    }
}

/// One pass over the bitmap; returns once every chunk it sent is acked.
async fn resync_pass(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    data_socket: Option<&SocketProbe>,
) -> std::io::Result<()> {
    let bitmap = &peer.bitmap;
    let block = bitmap.block_size() as u64;
    let total = bitmap.count_ones() * block;
    let started = Instant::now();
    *peer
        .stats
        .run_started
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(started);
    peer.stats.run_bytes.store(0, Ordering::Release);
    tracing::info!(stale_bytes = total, "resync starting");
    let mut pace = ResyncPace::new(resync_fill_cap(&repl.tunables()), data_socket);
    let mut cursor = 0;
    let mut chunks = 0;
    let mut last_report = Instant::now();
    let mut sent = 0u64;
    while let Some(first) = bitmap.find_next_set(cursor) {
        if peer.mode() != PeerMode::Resyncing {
            return Ok(());
        }
        let blocks_per_chunk = (pace.chunk(&repl.guest_io) / block).max(1);
        let end = bitmap
            .find_next_clear(first)
            .unwrap_or(bitmap.nbits())
            .min(first + blocks_per_chunk);
        let offset = first * block;
        let len = ((end - first) * block).min(repl.local_size() - offset);
        let range = repl.ranges.acquire(offset, len, || {}).await;
        let mut buf = AlignedBuf::with_len(len as usize); // the read fills it
        repl.local.read(offset, buf.as_mut_slice()).await?;
        let queued = {
            let epochs = repl.epochs.lock().unwrap_or_else(|e| e.into_inner());
            let message = Message::ResyncData {
                term: repl.role().term,
                offset,
                data: buf.into_bytes(),
            };
            peer.send_resync(epochs.current, message, first, end - first, offset, len)
        };
        drop(range);
        if !queued {
            return Ok(());
        }
        sent += len;
        peer.stats.resync_bytes.fetch_add(len, Ordering::AcqRel);
        peer.stats.run_bytes.fetch_add(len, Ordering::AcqRel);
        cursor = end;
        chunks += 1;
        if chunks % RESYNC_CHUNKS_PER_EPOCH == 0 {
            drop(repl.close_epoch_including(peer, false));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            report_progress(sent, total, started);
        }
        // Leave the link to guest writes as far as they need it, within
        // the operator's bounds (read each time: `adjust` applies at once).
        let tunables = repl.tunables();
        let bounds = RateBounds {
            max: tunables.resync_rate,
            min: tunables.resync_min_rate,
        };
        pace.set_max_fill(resync_fill_cap(&tunables));
        pace.after_chunk(len, peer, &repl.guest_io, bounds).await;
    }
    // Close the last epoch and wait until the peer made it durable; the
    // bits of everything sent clear with that ack.
    let acks = repl.close_epoch_including(peer, true);
    if let Some((_, ack)) = acks.into_iter().find(|(p, _)| p.id() == peer.id()) {
        let _ = ack.await;
    }
    report_progress(sent, total, started);
    Ok(())
}

/// The most a resync keeps queued to a peer: a quarter of the congestion
/// limit, so guest writes always find room.
fn resync_fill_cap(tunables: &crate::config::Replication) -> u64 {
    tunables.congestion_bytes / 4
}

fn report_progress(done: u64, total: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let left = total.saturating_sub(done);
    let eta = if rate > 0.0 {
        left as f64 / rate
    } else {
        f64::INFINITY
    };
    tracing::info!(
        bytes_done = done,
        bytes_total = total,
        rate_mib_s = format!("{:.1}", rate / (1 << 20) as f64),
        eta_s = format!("{eta:.1}"),
        "resync progress"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(current: u64, bitmap: u64, history: [u64; 2]) -> GenerationIds {
        GenerationIds {
            current,
            bitmap,
            history,
        }
    }

    /// A generation id started by node 1 as primary of `term`.
    fn id(term: u64, n: u64) -> u64 {
        (term << 32) | (1 << 24) | n
    }

    #[test]
    fn lineage_decides_the_direction() {
        // We are primary of term 3; our generation forked once in term 3
        // from the one we were promoted with (term 2's).
        let term = (3, 1);
        let ours = gen(id(3, 2), id(3, 1), [id(3, 1), id(2, 1)]);
        let at = |current: u64| gen(current, 0, [0, 0]);
        assert_eq!(lineage(ours, ours, term), Lineage::FromBitmap);
        // Any generation of our own term, however many forks ago.
        assert_eq!(lineage(ours, at(id(3, 1)), term), Lineage::FromBitmap);
        assert_eq!(lineage(ours, at(id(3, 77)), term), Lineage::FromBitmap);
        // The one we held when promoted (node 9's, which we followed).
        let of_9 = |term: u64| (term << 32) | (9 << 24) | 1;
        let promoted = gen(id(3, 1), of_9(2), [of_9(2), id(1, 1)]);
        assert_eq!(lineage(promoted, at(of_9(2)), term), Lineage::FromBitmap);
        // Further back: node 9 wrote since.
        assert_eq!(lineage(promoted, at(id(1, 1)), term), Lineage::TooOld);
        // Only our own generations since (we restarted, resuming in terms
        // of our own): every change since is in our bitmaps.
        let resumed = gen(id(3, 1), id(2, 4), [id(2, 4), id(1, 1)]);
        assert_eq!(lineage(resumed, at(id(1, 1)), term), Lineage::FromBitmap);
        assert_eq!(lineage(resumed, at(id(2, 4)), term), Lineage::FromBitmap);
        assert_eq!(lineage(ours, at(0), term), Lineage::Empty);
        // A later primary that started from one of our generations.
        let newer = gen(id(4, 1), id(3, 2), [id(3, 2), id(3, 1)]);
        assert_eq!(lineage(ours, newer, term), Lineage::PeerAhead);
        // A primary of another branch (e.g. promoted while cut off from us).
        let other = gen(id(4, 9), id(2, 1), [id(2, 1), id(1, 1)]);
        assert_eq!(lineage(ours, other, term), Lineage::Diverged);
        // Node 2, promoted to our very term while cut off from us.
        let twin = gen((3 << 32) | (2 << 24) | 5, id(2, 1), [id(2, 1), 0]);
        assert_eq!(lineage(ours, twin, term), Lineage::Diverged);
    }
}
