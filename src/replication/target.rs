//! The secondary's side of a link to its primary: apply what arrives on the
//! data connection, in epochs.
//!
//! Writes of one epoch run concurrently (overlapping ones in arrival order);
//! at a barrier every write of the epoch completes, the disk is flushed, and
//! only then is the barrier acked and the next epoch started. So the disk
//! only ever holds a prefix of the primary's epochs plus part of one.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use blockdev::device::check_range;
use blockdev::meta::ActivityLog;
use blockdev::BlockDevice;
use bytes::Bytes;
use protocol::{DiskState, Message};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::bitmap_exchange;
use super::fetcher::Fetcher;
use super::link::{Link, PeerState};
use super::liveness::{Due, Liveness};
use super::peer::PeerReplica;
use super::transport::{self, LinkError};
use super::{enter_activity_log, LocalDisk, Replication, RoleState};
use crate::config::Protocol;

/// One write to apply.
enum Op {
    Write {
        data: Bytes,
        fua: bool,
    },
    Discard,
    WriteZeroes,
    /// Resync by reference (`ResyncFrom`): read the range from a member of
    /// our LAN group, check it hashes to `hash`, write it.
    Relay {
        from: Arc<Relay>,
        hash: [u8; 32],
    },
}

/// Where `ResyncFrom` ranges are read: one member of our LAN group (the
/// WAN postmaster), over its fetch connection.
pub(super) struct Relay {
    holder: Arc<PeerReplica>,
    fetcher: Fetcher,
}

impl Relay {
    /// The range's contents, as `holder` has them, if they hash to `hash`.
    async fn read(&self, offset: u64, len: u64, hash: [u8; 32]) -> io::Result<Bytes> {
        let data = self
            .fetcher
            .read_from(&self.holder, offset, len)
            .await
            .map_err(|e| {
                io::Error::other(format!(
                    "relay from {} failed at {offset}+{len}: {e}",
                    self.holder.config.name
                ))
            })?;
        if *blake3::hash(&data).as_bytes() != hash {
            return Err(io::Error::other(format!(
                "relay from {}: its copy of {offset}+{len} is not the primary's",
                self.holder.config.name
            )));
        }
        Ok(data)
    }
}

/// Writes a secondary keeps in flight at most. More gains nothing (the
/// backing store is busy) and the overlap check looks at each of them; when
/// full, the reader waits, and TCP pushes back on the primary.
const MAX_IN_FLIGHT: usize = 256;

/// How long a relay holder may take to answer before the link is dropped
/// (and the primary resends).
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// One write being applied: its byte range and the task doing it.
struct InFlight {
    start: u64,
    end: u64,
    task: JoinHandle<io::Result<()>>,
}

/// Applies the writes of the current epoch.
struct Applier {
    local: Arc<LocalDisk>,
    /// Our activity log: a secondary records where it writes too, so that
    /// after a change of primary the blocks where it may be ahead of (or
    /// behind) the new primary are known (see `bitmap_exchange`).
    al: Arc<ActivityLog>,
    acks: mpsc::UnboundedSender<Message>,
    ack_writes: bool,
    /// In submission order.
    in_flight: VecDeque<InFlight>,
    /// Relay sources by holder id, opened on first `ResyncFrom`.
    relays: std::collections::HashMap<u32, Arc<Relay>>,
}

impl Applier {
    async fn submit(
        &mut self,
        offset: u64,
        len: u64,
        seq: Option<u64>,
        op: Op,
    ) -> Result<(), LinkError> {
        check_range(self.local.size(), offset, len)
            .map_err(|e| LinkError::Violation(e.to_string()))?;
        // Reap what is done (oldest first), and make room if full.
        while self.in_flight.front().is_some_and(|oldest| {
            oldest.task.is_finished() || self.in_flight.len() >= MAX_IN_FLIGHT
        }) {
            if let Some(oldest) = self.in_flight.pop_front() {
                finish(oldest.task).await?;
            }
        }
        // Earlier writes to the same bytes must land first.
        let end = offset + len;
        let mut i = 0;
        while i < self.in_flight.len() {
            let w = &self.in_flight[i];
            if w.start < end && offset < w.end {
                let w = self.in_flight.remove(i).expect("index in range");
                finish(w.task).await?;
            } else {
                i += 1;
            }
        }
        let al_guard = enter_activity_log(&self.al, offset, len).await?;
        let local = Arc::clone(&self.local);
        let acks = self.acks.clone();
        let ack = self.ack_writes;
        self.in_flight.push_back(InFlight {
            start: offset,
            end,
            task: tokio::spawn(async move {
                let _al_guard = al_guard;
                let result = match op {
                    Op::Write { data, fua } => local.write(offset, data, fua).await,
                    Op::Discard => local.discard(offset, len).await,
                    Op::WriteZeroes => local.write_zeroes(offset, len).await,
                    Op::Relay { from, hash } => {
                        if holds_already(&local, offset, len, &hash).await {
                            Ok(())
                        } else {
                            match from.read(offset, len, hash).await {
                                Ok(data) => local.write(offset, data, false).await,
                                Err(e) => Err(e),
                            }
                        }
                    }
                };
                if let (Some(seq), true) = (seq, ack) {
                    let reply = match &result {
                        Ok(()) => Message::WriteAck { seq },
                        Err(e) => Message::WriteNack {
                            seq,
                            errno: blockdev::device::errno_of(e),
                        },
                    };
                    let _ = acks.send(reply);
                }
                result
            }),
        });
        Ok(())
    }

    /// Completes the epoch: every write done, then the disk flushed.
    async fn barrier(&mut self) -> Result<(), LinkError> {
        for w in self.in_flight.drain(..) {
            finish(w.task).await?;
        }
        self.local.flush().await?;
        Ok(())
    }
}

/// Whether our copy of the range already hashes to `hash` (then a relay
/// has nothing to read: e.g. the initial sync of identical replicas).
async fn holds_already(local: &LocalDisk, offset: u64, len: u64, hash: &[u8; 32]) -> bool {
    let mut ours = blockdev::buffer::AlignedBuf::with_len(len as usize); // the read fills it
    local.read(offset, ours.as_mut_slice()).await.is_ok()
        && blake3::hash(ours.as_slice()).as_bytes() == hash
}

async fn finish(task: JoinHandle<io::Result<()>>) -> Result<(), LinkError> {
    match task.await {
        Ok(result) => Ok(result?),
        Err(e) => Err(LinkError::Violation(format!("apply task failed: {e}"))),
    }
}

pub async fn run(
    repl: &Arc<Replication>,
    peer: &Arc<PeerReplica>,
    link: Link,
    theirs: PeerState,
    role_changes: &mut watch::Receiver<RoleState>,
) -> Result<(), LinkError> {
    let Link {
        mut data_reader,
        data_writer: _data_writer,
        mut meta_reader,
        meta_writer,
    } = link;
    let (meta_tx, meta_rx) = mpsc::unbounded_channel();
    let meta_sender = tokio::spawn(meta_writer.pump(meta_rx).in_current_span());
    // Our blocks the primary has (all of them unless we grew first).
    let primary_blocks = theirs.size.div_ceil(u64::from(peer.bitmap.block_size()));
    if let Err(e) = report_what_may_differ(repl, peer, &theirs, primary_blocks, &meta_tx) {
        meta_sender.abort();
        return Err(e);
    }
    let mut applier = Applier {
        local: Arc::clone(&repl.local),
        al: Arc::clone(repl.metadata.activity_log()),
        acks: meta_tx.clone(),
        ack_writes: repl.config.resource.protocol == Protocol::C,
        in_flight: VecDeque::new(),
        relays: std::collections::HashMap::new(),
    };
    let mut live = Liveness::new(&repl.tunables(), peer);
    let operator_disconnect = peer.admin.down();
    tokio::pin!(operator_disconnect);
    let result = loop {
        tokio::select! {
            // Frames first: one that is waiting proves the primary alive
            // even if the deadline passed while we were applying a write.
            biased;
            msg = data_reader.next() => {
                let step = match msg {
                    Ok(msg) => {
                        live.heard();
                        apply(repl, &mut applier, &meta_tx, msg).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = step {
                    break Err(e);
                }
            }
            msg = meta_reader.next() => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => break Err(e),
                };
                live.heard();
                match msg {
                    // Liveness only: see `liveness` for why no answer.
                    Message::Ping | Message::PingAck => {}
                    Message::State { disk_state: DiskState::UpToDate, generation, term, .. } => {
                        // A fenced primary must not rewrite our generation either.
                        if let Err(e) = check_term(repl, term) {
                            break Err(e);
                        }
                        if let Err(e) = repl.adopt_generation(generation) {
                            break Err(LinkError::Io(e));
                        }
                        // Whatever we reported differing has been overwritten
                        // (only the primary's blocks: a tail past its size,
                        // ours after a resize, it does not hold).
                        peer.bitmap.clear_range(0, primary_blocks.min(peer.bitmap.nbits()));
                        tracing::info!(generation = format!("{:016x}", generation.current), "in sync with the primary");
                    }
                    Message::State { term, .. } => {
                        if let Err(e) = repl.check_peer_term(term, &peer.config.name) {
                            break Err(e);
                        }
                        break Ok(());
                    }
                    other => break Err(LinkError::Violation(format!("unexpected {} on meta from the primary", other.message_type()))),
                }
            }
            _ = role_changes.changed() => break Ok(()),
            _ = &mut operator_disconnect => break Ok(()),
            due = live.due() => match due {
                Due::Ping => { let _ = meta_tx.send(Message::Ping); }
                Due::Dead(e) => break Err(e),
            },
        }
    };
    // Let writes already started finish before the link is reported down.
    let _ = applier.barrier().await;
    meta_sender.abort();
    result
}

/// Starts the session with the bitmap exchange: sends the primary the
/// blocks in which we may differ from it (see `bitmap_exchange`).
fn report_what_may_differ(
    repl: &Replication,
    peer: &PeerReplica,
    theirs: &PeerState,
    primary_blocks: u64,
    meta_tx: &mpsc::UnboundedSender<Message>,
) -> Result<(), LinkError> {
    // A primary other than the one we followed (another promotion) may lack
    // our last writes, or have writes we missed, anywhere we wrote lately.
    // The one we followed knows what we miss: it kept our unacked epochs.
    let followed = repl.metadata.superblock().data_term;
    if theirs.term != followed || followed == 0 {
        if repl.disk_state() == DiskState::Inconsistent {
            // A resync from the primary we followed was cut short: only it
            // knew which blocks we still lack.
            peer.bitmap.set_all();
            tracing::info!("new primary while our resync was unfinished: full resync");
        } else {
            let blocks = repl.metadata.mark_active_extents(&peer.bitmap);
            if blocks > 0 {
                tracing::info!(
                    blocks,
                    "new primary: our activity-log extents will be resynced"
                );
            }
        }
    }
    // The marks must be durable before the term that makes them needless.
    repl.metadata
        .flush_bitmaps()
        .and_then(|()| repl.metadata.set_data_term(theirs.term))
        .map_err(|e| LinkError::Io(io::Error::other(e)))?;
    // A primary smaller than us (a resize round, see `link::check_sizes`)
    // gets the bits of its own blocks only.
    if primary_blocks < peer.bitmap.nbits() {
        bitmap_exchange::send(meta_tx, peer.id(), &peer.bitmap.prefix(primary_blocks));
    } else {
        bitmap_exchange::send(meta_tx, peer.id(), &peer.bitmap);
    }
    Ok(())
}

/// The relay source for `holder`: a configured peer in our own LAN group
/// (reading from anywhere else would cross the WAN again).
fn relay(repl: &Replication, applier: &mut Applier, holder: u32) -> Result<Arc<Relay>, LinkError> {
    if let Some(relay) = applier.relays.get(&holder) {
        return Ok(Arc::clone(relay));
    }
    let peer = repl.peers.get(holder).filter(|p| p.is_lan).ok_or_else(|| {
        LinkError::Violation(format!(
            "resync by reference from node {holder}, which is not a peer in our LAN group"
        ))
    })?;
    let identity = transport::LocalIdentity {
        resource: repl.config.resource.name.clone(),
        node_id: repl.config.node.id,
        secret: Arc::new(
            repl.config
                .read_secret()
                .map_err(|e| LinkError::Io(io::Error::other(e)))?,
        ),
    };
    let fetcher = Fetcher::new(
        identity,
        repl.config.node.lan_group.clone(),
        vec![(Arc::clone(&peer), Arc::new(peer.bitmap.new_like()))],
        RELAY_TIMEOUT,
    );
    let relay = Arc::new(Relay {
        holder: peer,
        fetcher,
    });
    applier.relays.insert(holder, Arc::clone(&relay));
    Ok(relay)
}

/// Rejects messages from a primary whose term is older than one we have
/// seen: it was fenced by a newer promotion.
fn check_term(repl: &Replication, term: u64) -> Result<(), LinkError> {
    super::valid_term(term)?;
    let known = repl.known_term();
    if term < known {
        return Err(LinkError::Violation(format!(
            "stale primary: message of term {term}, but term {known} has been seen"
        )));
    }
    repl.observe_term(term);
    Ok(())
}

async fn apply(
    repl: &Replication,
    applier: &mut Applier,
    meta_tx: &mpsc::UnboundedSender<Message>,
    msg: Message,
) -> Result<(), LinkError> {
    match msg {
        Message::Write {
            term,
            seq,
            offset,
            fua,
            data,
            ..
        } => {
            check_term(repl, term)?;
            let len = data.len() as u64;
            applier
                .submit(offset, len, Some(seq), Op::Write { data, fua })
                .await
        }
        Message::Discard {
            term,
            seq,
            offset,
            len,
            ..
        } => {
            check_term(repl, term)?;
            applier.submit(offset, len, Some(seq), Op::Discard).await
        }
        Message::WriteZeroes {
            term,
            seq,
            offset,
            len,
            ..
        } => {
            check_term(repl, term)?;
            applier
                .submit(offset, len, Some(seq), Op::WriteZeroes)
                .await
        }
        Message::ResyncData { term, offset, data } => {
            check_term(repl, term)?;
            // Until the resync finishes this replica is not a usable copy.
            repl.set_disk_state(DiskState::Inconsistent)?;
            let len = data.len() as u64;
            applier
                .submit(offset, len, None, Op::Write { data, fua: false })
                .await
        }
        Message::ResyncPacked {
            term,
            offset,
            len,
            codec,
            data,
        } => {
            check_term(repl, term)?;
            // A frame that does not decompress to its announced length is
            // a broken or hostile peer: drop the link (bounded, no panic).
            let data = protocol::compress::decompress(codec, &data, len).map_err(|e| {
                LinkError::Violation(format!("compressed resync data at {offset}: {e}"))
            })?;
            repl.set_disk_state(DiskState::Inconsistent)?;
            applier
                .submit(
                    offset,
                    u64::from(len),
                    None,
                    Op::Write {
                        data: Bytes::from(data),
                        fua: false,
                    },
                )
                .await
        }
        Message::ResyncFrom {
            term,
            offset,
            len,
            holder,
            hash,
        } => {
            check_term(repl, term)?;
            let from = relay(repl, applier, holder)?;
            repl.set_disk_state(DiskState::Inconsistent)?;
            applier
                .submit(offset, u64::from(len), None, Op::Relay { from, hash })
                .await
        }
        Message::Barrier { term, epoch } => {
            check_term(repl, term)?;
            applier.barrier().await?;
            let _ = meta_tx.send(Message::BarrierAck { epoch });
            Ok(())
        }
        other => Err(LinkError::Violation(format!(
            "unexpected {} on the data connection",
            other.message_type()
        ))),
    }
}
