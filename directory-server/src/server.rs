//! Serving nodes: joins, promotions (asking the current primary to demote)
//! and reports. See `protocol::message` for the `Dir*` messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use protocol::gate::{HandshakeGate, LogRefusal, DEFAULT_MAX_PENDING_HANDSHAKES};
use protocol::net::{self, Connection, FrameReader, LinkError, LocalIdentity};
use protocol::{Channel, GenerationIds, Message, DIRECTORY_NODE_ID, NO_NODE};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use crate::store::{Member, ReportMeta, ResourceState, Store, StoredBitmap};

/// Node ids a resource may have (the nodes' metadata has this many slots).
pub const MAX_NODES: u32 = 32;
/// Highest term the directory grants: the nodes' limit (32 bits of term in
/// a generation id).
pub const MAX_TERM: u64 = u32::MAX as u64;
/// At most this many bitmaps in one report (one per node).
pub const MAX_BITMAPS: u32 = MAX_NODES;
/// A connection must send DirJoin this soon after the handshake.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection between requests is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bitmaps following a report must arrive this soon.
const BITMAP_TIMEOUT: Duration = Duration::from_secs(60);
/// Dialling a primary to demote it (connect and handshake).
const DEMOTE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A primary asked to demote must answer within this (it waits up to 30 s
/// for its peers to take every write).
const DEMOTE_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One resource: its state, and the lock that serializes promotions.
struct Resource {
    name: String,
    /// Held for a whole promotion (including asking the primary to demote),
    /// so promotions of one resource happen one at a time.
    promote: tokio::sync::Mutex<()>,
    /// Held briefly, across a commit: the in-memory copy changes only after
    /// the store committed it.
    state: tokio::sync::Mutex<ResourceState>,
}

/// The directory: every resource, and the store.
pub struct Directory {
    store: Store,
    secret: Arc<Vec<u8>>,
    resources: std::sync::Mutex<HashMap<String, Arc<Resource>>>,
}

/// A report as received: its metadata and its bitmaps.
struct Received {
    meta: ReportMeta,
    bitmaps: Vec<StoredBitmap>,
}

enum DemoteOutcome {
    /// The primary demoted and sent its final report; ack it on `conn`.
    Demoted(Box<(Received, Connection)>),
    Refused(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn violation(msg: String) -> LinkError {
    LinkError::Violation(msg)
}

fn node_name(state: &ResourceState, id: u32) -> String {
    state
        .members
        .get(&id)
        .map_or_else(|| "?".to_string(), |m| m.name.clone())
}

impl Directory {
    /// Loads every resource from `store`.
    pub fn new(store: Store, secret: Vec<u8>) -> anyhow::Result<Arc<Directory>> {
        let resources = store
            .load_all()?
            .into_iter()
            .map(|(name, state)| {
                let resource = Arc::new(Resource {
                    name: name.clone(),
                    promote: tokio::sync::Mutex::new(()),
                    state: tokio::sync::Mutex::new(state),
                });
                (name, resource)
            })
            .collect();
        Ok(Arc::new(Directory {
            store,
            secret: Arc::new(secret),
            resources: std::sync::Mutex::new(resources),
        }))
    }

    /// Accepts connections forever.
    /// Accepts connections forever. Unauthenticated clients are bounded
    /// as on the nodes (see `protocol::gate`): a fixed number of handshakes
    /// at once, refusals logged within a rate limit.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let gate = Arc::new(HandshakeGate::new(DEFAULT_MAX_PENDING_HANDSHAKES));
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let LogRefusal::Yes { suppressed } = gate.refusal() {
                        warn!(suppressed_since_last_window = suppressed, "accept: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = gate.try_enter(from.ip()) else {
                if let LogRefusal::Yes { suppressed } = gate.refusal() {
                    warn!(%from, suppressed_since_last_window = suppressed,
                        "too many handshakes in progress; connection closed at once");
                }
                continue;
            };
            let directory = self.clone();
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                if let Err(e) = directory.connection(stream, from, slot).await {
                    if let LogRefusal::Yes { suppressed } = gate.refusal() {
                        warn!(%from, suppressed_since_last_window = suppressed, "connection closed: {e}");
                    }
                }
            });
        }
    }

    fn resource(&self, name: &str) -> Arc<Resource> {
        let mut all = self.resources.lock().unwrap();
        all.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Resource {
                    name: name.to_string(),
                    promote: tokio::sync::Mutex::new(()),
                    state: tokio::sync::Mutex::new(ResourceState::default()),
                })
            })
            .clone()
    }

    /// Commits `state` (and replaces the bitmaps, if given) durably.
    async fn commit(
        &self,
        resource: &str,
        state: &ResourceState,
        bitmaps: Option<Vec<StoredBitmap>>,
    ) -> Result<(), LinkError> {
        let store = self.store.clone();
        let resource = resource.to_string();
        let state = state.clone();
        tokio::task::spawn_blocking(move || store.save(&resource, &state, bitmaps.as_deref()))
            .await
            .map_err(|e| violation(format!("store task failed: {e}")))?
            .map_err(|e| {
                warn!("cannot commit: {e}");
                violation(format!("cannot commit the state: {e}"))
            })
    }

    async fn stored_bitmaps(&self, resource: &str) -> Result<Vec<StoredBitmap>, LinkError> {
        let store = self.store.clone();
        let resource = resource.to_string();
        tokio::task::spawn_blocking(move || store.bitmaps(&resource))
            .await
            .map_err(|e| violation(format!("store task failed: {e}")))?
            .map_err(|e| violation(format!("cannot read the bitmaps: {e}")))
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        from: SocketAddr,
        handshake_slot: protocol::gate::HandshakeSlot,
    ) -> Result<(), LinkError> {
        let (resource, conn) =
            net::accept_any_resource(DIRECTORY_NODE_ID, &self.secret, stream, |resource, node| {
                node < MAX_NODES && !resource.is_empty()
            })
            .await?;
        drop(handshake_slot);
        let span = tracing::info_span!("conn", resource = %resource, node = conn.peer_id);
        let res = self.resource(&resource);
        self.session(res, conn, from).instrument(span).await
    }

    async fn session(
        &self,
        res: Arc<Resource>,
        mut conn: Connection,
        from: SocketAddr,
    ) -> Result<(), LinkError> {
        let node = conn.peer_id;
        let first = tokio::time::timeout(JOIN_TIMEOUT, conn.reader.next())
            .await
            .map_err(|_| violation("no DirJoin".into()))??;
        let Message::DirJoin {
            name,
            address,
            lan_group,
            size,
        } = first
        else {
            return Err(violation(format!(
                "expected DirJoin, got {}",
                first.message_type()
            )));
        };
        let member = Member {
            name,
            address,
            lan_group,
            size,
        };
        match self.join(&res, node, member, from).await? {
            Ok(info) => conn.writer.send(&info).await?,
            Err(reason) => {
                warn!("join refused: {reason}");
                conn.writer.send(&Message::DirRefused { reason }).await?;
                return Ok(());
            }
        }
        loop {
            let msg = match tokio::time::timeout(IDLE_TIMEOUT, conn.reader.next()).await {
                Err(_) => return Ok(()),
                Ok(Err(LinkError::Closed)) => return Ok(()),
                Ok(msg) => msg?,
            };
            match msg {
                Message::DirPromote { force } => self.promote(&res, node, force, &mut conn).await?,
                report @ Message::DirReport { .. } => {
                    let received = read_report(node, report, &mut conn.reader).await?;
                    let answer = self.report(&res, node, received).await?;
                    conn.writer.send(&answer).await?;
                }
                other => {
                    return Err(violation(format!(
                        "expected DirPromote or DirReport, got {}",
                        other.message_type()
                    )))
                }
            }
        }
    }

    /// Records the member: the DirInfo to answer, or the reason it is
    /// refused.
    async fn join(
        &self,
        res: &Resource,
        node: u32,
        member: Member,
        from: SocketAddr,
    ) -> Result<Result<Message, String>, LinkError> {
        if let Err(e) = member.address.parse::<SocketAddr>() {
            return Ok(Err(format!(
                "node {} (id {node}) gave the listen address '{}', which is not IP:PORT: {e}",
                member.name, member.address
            )));
        }
        let mut state = res.state.lock().await;
        // Every copy must hold the resource's data: a member may not be
        // smaller than the copy that data lives on (see `size_reference`);
        // members first heard of now included (a secondary talks to the
        // directory only when it is promoted). While a resize goes round
        // (`vmsyncctl resize`, node by node, online or not) a member may be
        // larger: a grown secondary while the primary still serves the old
        // size, or the primary once it grew before the others.
        if let Some((id, reference)) = size_reference(&state, node) {
            if member.size < reference.size {
                return Ok(Err(format!(
                    "node {} (id {node}) has a {}-byte copy of resource '{}', but node {} (id {id}) \
                     has {} bytes: every member's copy must have the same size (grow the smaller \
                     ones with `vmsyncctl resize`)",
                    member.name, member.size, res.name, reference.name, reference.size
                )));
            }
        }
        if state.members.get(&node) != Some(&member) {
            let mut new = state.clone();
            info!(
                %from,
                name = %member.name,
                address = %member.address,
                lan_group = %member.lan_group,
                size = member.size,
                "member joined"
            );
            new.members.insert(node, member);
            self.commit(&res.name, &new, None).await?;
            *state = new;
        }
        Ok(Ok(info_of(&state)))
    }

    /// DirPromote from `node`: answers on `conn` (DirGranted and the
    /// bitmaps, or DirRefused). An error closes the connection.
    async fn promote(
        &self,
        res: &Resource,
        node: u32,
        force: bool,
        conn: &mut Connection,
    ) -> Result<(), LinkError> {
        let _serial = res.promote.lock().await;
        let (primary, term, snapshot) = {
            let state = res.state.lock().await;
            (state.primary, state.term, state.clone())
        };
        info!(force, term, primary = ?primary, "promote requested");
        // Nodes take terms up to 2^32-1 (generation ids carry 32 bits of
        // term): never grant one beyond, nor wrap.
        if term >= MAX_TERM {
            let reason = format!("term {MAX_TERM} reached: no further promotion possible");
            warn!("promote refused: {reason}");
            return conn.writer.send(&Message::DirRefused { reason }).await;
        }
        let mut overridden = false;
        let mut demoted = None;
        if let Some(p) = primary.filter(|&p| p != node) {
            let name = node_name(&snapshot, p);
            let address = snapshot.members.get(&p).map(|m| m.address.clone());
            let outcome = match &address {
                Some(address) => self.ask_demote(&res.name, p, address, force, term).await,
                None => Err(format!("node {p} never joined")),
            };
            let address = address.unwrap_or_else(|| "an unknown address".into());
            match outcome {
                Ok(DemoteOutcome::Demoted(demotion)) => demoted = Some(*demotion),
                Ok(DemoteOutcome::Refused(reason)) => {
                    let reason = format!("node {name} (id {p}) refuses to demote: {reason}");
                    warn!("promote refused: {reason}");
                    return conn.writer.send(&Message::DirRefused { reason }).await;
                }
                Err(error) if !force => {
                    let from_report = match &snapshot.report {
                        Some(report) => format!(
                            "proceeds from its last report ({} s old)",
                            now_ms().saturating_sub(report.time_ms) / 1000
                        ),
                        None => "proceeds without any report (the directory never received one)"
                            .to_string(),
                    };
                    let reason = format!(
                        "primary {name} (id {p}) at {address} is unreachable: {error}; \
                         `promote --force` {from_report}"
                    );
                    warn!("promote refused: {reason}");
                    return conn.writer.send(&Message::DirRefused { reason }).await;
                }
                Err(error) => {
                    warn!("overriding primary {name} (id {p}) at {address}: {error}");
                    overridden = true;
                }
            }
        }

        let mut state = res.state.lock().await;
        let mut new = state.clone();
        let mut bitmaps = None;
        let mut ack = None;
        if let Some((received, conn)) = demoted {
            new.report = Some(received.meta);
            bitmaps = Some(received.bitmaps);
            ack = Some(conn);
        }
        // Nodes take terms up to 2^32-1 (generation ids carry 32 bits of
        // term): never grant one beyond, nor wrap.
        // (Checked before anything was asked of the old primary.)
        new.term = new.term.min(MAX_TERM - 1) + 1;
        new.primary = Some(node);
        self.commit(&res.name, &new, bitmaps.clone()).await?;
        *state = new;
        let info = info_of(&state);
        let report = state.report.clone();
        let term = state.term;
        drop(state);
        info!(term, overridden, "promoted");
        if let Some(mut ack) = ack {
            // The old primary's final report is committed.
            if let Err(e) = ack.writer.send(&info).await {
                warn!("cannot acknowledge the old primary's final report: {e}");
            }
        }
        let bitmaps = match bitmaps {
            Some(bitmaps) => bitmaps,
            None if report.is_some() => self.stored_bitmaps(&res.name).await?,
            None => Vec::new(),
        };
        let granted = match &report {
            Some(r) => Message::DirGranted {
                term,
                prev_primary: r.from,
                prev_term: r.term,
                prev_generation: GenerationIds {
                    current: r.generation[0],
                    bitmap: r.generation[1],
                    history: [r.generation[2], r.generation[3]],
                },
                prev_final: r.last,
                report_age_ms: now_ms().saturating_sub(r.time_ms),
                overridden,
                hot_extents: encode_extents(&r.hot_extents),
                bitmaps: bitmaps.len() as u32,
            },
            None => Message::DirGranted {
                term,
                prev_primary: NO_NODE,
                prev_term: 0,
                prev_generation: GenerationIds::default(),
                prev_final: false,
                report_age_ms: 0,
                overridden,
                hot_extents: Bytes::new(),
                bitmaps: 0,
            },
        };
        conn.writer.queue(&granted)?;
        for b in bitmaps {
            conn.writer.queue(&Message::DirBitmap {
                node_id: b.node_id,
                block_size: b.block_size,
                nbits: b.nbits,
                encoding: b.encoding,
                data: b.data,
            })?;
        }
        conn.writer.flush().await
    }

    /// Dials primary `p` and asks it to demote. `Err` means it could not be
    /// reached or did not answer properly.
    async fn ask_demote(
        &self,
        resource: &str,
        p: u32,
        address: &str,
        force: bool,
        term: u64,
    ) -> Result<DemoteOutcome, String> {
        let addr: SocketAddr = address.parse().map_err(|e| format!("bad address: {e}"))?;
        let identity = LocalIdentity {
            resource: resource.to_string(),
            node_id: DIRECTORY_NODE_ID,
            secret: self.secret.clone(),
        };
        let mut conn = tokio::time::timeout(
            DEMOTE_CONNECT_TIMEOUT,
            net::connect(&identity, addr, p, Channel::Directory),
        )
        .await
        .map_err(|_| {
            format!(
                "no connection within {} s",
                DEMOTE_CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| e.to_string())?;
        info!(node = p, %addr, force, "asking the primary to demote");
        conn.writer
            .send(&Message::DirDemote { force, term })
            .await
            .map_err(|e| e.to_string())?;
        let answer = async {
            match conn.reader.next().await? {
                Message::DirRefused { reason } => Ok(DemoteOutcome::Refused(reason)),
                report @ Message::DirReport { .. } => {
                    let received = read_report(p, report, &mut conn.reader).await?;
                    if received.meta.term != term || !received.meta.last {
                        let reason = format!(
                            "its answer is not a final report of term {term} (term {}, last {})",
                            received.meta.term, received.meta.last
                        );
                        let _ = conn
                            .writer
                            .send(&Message::DirRefused {
                                reason: reason.clone(),
                            })
                            .await;
                        return Err(violation(reason));
                    }
                    Ok(DemoteOutcome::Demoted(Box::new((received, conn))))
                }
                other => Err(violation(format!(
                    "expected DirReport or DirRefused, got {}",
                    other.message_type()
                ))),
            }
        };
        tokio::time::timeout(DEMOTE_ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| format!("no answer within {} s", DEMOTE_ANSWER_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())
    }

    /// A report from `node`: stored if it is the primary of the report's
    /// term; the answer to send.
    async fn report(
        &self,
        res: &Resource,
        node: u32,
        received: Received,
    ) -> Result<Message, LinkError> {
        let mut state = res.state.lock().await;
        if state.primary != Some(node) || received.meta.term != state.term {
            let who = match state.primary {
                Some(p) => format!("node {} (id {p}) is primary", node_name(&state, p)),
                None => "no node is primary".to_string(),
            };
            let reason = format!("fenced: term {} is current and {who}", state.term);
            warn!(report_term = received.meta.term, "report refused: {reason}");
            return Ok(Message::DirRefused { reason });
        }
        let mut new = state.clone();
        let last = received.meta.last;
        new.report = Some(received.meta);
        if last {
            new.primary = None;
        }
        self.commit(&res.name, &new, Some(received.bitmaps)).await?;
        *state = new;
        // Periodic reports arrive every few seconds: only the final one is news.
        if last {
            info!(term = state.term, "final report stored");
        } else {
            debug!(term = state.term, "report stored");
        }
        Ok(info_of(&state))
    }
}

fn info_of(state: &ResourceState) -> Message {
    Message::DirInfo {
        term: state.term,
        primary: state.primary.unwrap_or(NO_NODE),
    }
}

fn encode_extents(extents: &[u64]) -> Bytes {
    let mut out = BytesMut::with_capacity(extents.len() * 8);
    extents.iter().for_each(|&e| out.put_u64_le(e));
    out.freeze()
}

fn decode_extents(bytes: &[u8]) -> Vec<u64> {
    // The codec checked that the length is a multiple of 8.
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Reads the bitmaps that follow `report` (a DirReport from `node`).
async fn read_report(
    node: u32,
    report: Message,
    reader: &mut FrameReader,
) -> Result<Received, LinkError> {
    let Message::DirReport {
        term,
        generation,
        last,
        hot_extents,
        bitmaps: count,
    } = report
    else {
        return Err(violation("not a report".into()));
    };
    if count > MAX_BITMAPS {
        return Err(violation(format!(
            "a report with {count} bitmaps (at most {MAX_BITMAPS})"
        )));
    }
    let mut bitmaps: Vec<StoredBitmap> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let msg = tokio::time::timeout(BITMAP_TIMEOUT, reader.next())
            .await
            .map_err(|_| violation("the report's bitmaps did not arrive".into()))??;
        let Message::DirBitmap {
            node_id,
            block_size,
            nbits,
            encoding,
            data,
        } = msg
        else {
            return Err(violation(format!(
                "expected DirBitmap, got {}",
                msg.message_type()
            )));
        };
        if node_id >= MAX_NODES || bitmaps.iter().any(|b| b.node_id == node_id) {
            return Err(violation(format!(
                "a report with a bitmap for node {node_id} (out of range or twice)"
            )));
        }
        bitmaps.push(StoredBitmap {
            node_id,
            block_size,
            nbits,
            encoding,
            data,
        });
    }
    Ok(Received {
        meta: ReportMeta {
            from: node,
            term,
            generation: [
                generation.current,
                generation.bitmap,
                generation.history[0],
                generation.history[1],
            ],
            last,
            time_ms: now_ms(),
            hot_extents: decode_extents(&hot_extents),
        },
        bitmaps,
    })
}

/// The member whose copy a joining `node`'s size is checked against: the
/// node itself when it is the primary (it may grow, never shrink); else
/// the primary, or when none is (it demoted) the last one that reported:
/// the copy the resource's data is on; with neither, the largest other
/// member. None for the first member of a resource.
fn size_reference(state: &ResourceState, node: u32) -> Option<(u32, &Member)> {
    let serving = state.primary.or(state.report.as_ref().map(|r| r.from));
    if let Some(m) = serving.and_then(|id| state.members.get(&id).map(|m| (id, m))) {
        return Some(m);
    }
    state
        .members
        .iter()
        .filter(|(id, _)| **id != node)
        .max_by_key(|(_, m)| m.size)
        .map(|(id, m)| (*id, m))
}
