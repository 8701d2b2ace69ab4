//! Framed, authenticated TCP connections between nodes (and between a node
//! and the directory server). Only with the `net` feature (tokio).
//!
//! A peer link is two connections: *data* (replicated writes, resync data,
//! barriers) and *meta* (acks, state, keepalive), so acks never queue behind
//! bulk data. Each connection starts with the protocol's challenge-response
//! handshake; anything malformed or unauthenticated closes that connection
//! and nothing else. Once both sides have verified the peer's `AuthOk`, the
//! reader and writer switch to sealed records under the handshake's session
//! keys ([`crate::secure`]) and never go back: from then on a plaintext
//! frame, or a record that fails authentication, closes the connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::zerocopy::{
    zero_copy_send, Flight, Socket, ZeroCopySend, ZeroCopySender, ZeroCopyStats, ZERO_COPY_MIN,
};
use crate::{
    Channel, Handshake, HandshakeError, HandshakeParams, HandshakeStep, Message, Opener,
    ProtocolError, RecordBuf, Sealer, SharedRecord, HEADER_LEN,
};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How long a connection may take to authenticate.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection failed or was closed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("peer closed the connection")]
    Closed,
    #[error("unknown node {0} tried to connect")]
    UnknownPeer(u32),
    #[error("{0}")]
    Violation(String),
}

/// Receiving half of a connection.
pub struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    /// Set once the handshake is done; from then on only sealed records
    /// are accepted.
    opener: Option<Opener>,
    /// Until the peer is authenticated, the largest frame payload accepted
    /// (the handshake's messages are small): an unauthenticated client
    /// cannot make us buffer a data-sized frame. `None` once authenticated.
    pre_auth_limit: Option<usize>,
}

/// Largest payload of a frame before the handshake is done: a Hello with
/// a resource name of a few hundred bytes, with room to spare.
pub const PRE_AUTH_MAX_PAYLOAD: usize = 1024;

impl FrameReader {
    /// The next message; an error means the connection is unusable.
    pub async fn next(&mut self) -> Result<Message, LinkError> {
        loop {
            if let (Some(limit), Some(header)) = (
                self.pre_auth_limit,
                self.buf.first_chunk::<{ HEADER_LEN }>(),
            ) {
                let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
                // (Not vmsync at all is reported as such by `decode`.)
                if header[..4] == crate::MAGIC.to_le_bytes() && len as usize > limit {
                    return Err(LinkError::Violation(format!(
                        "a {len}-byte frame before authentication (at most {limit})"
                    )));
                }
            }
            let next = match &mut self.opener {
                Some(opener) => opener.open(&mut self.buf)?,
                None => crate::decode(&mut self.buf)?,
            };
            if let Some(msg) = next {
                return Ok(msg);
            }
            self.buf.reserve(64 * 1024);
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Err(LinkError::Closed);
            }
        }
    }
}

/// The most a pump batches into one flush. Without a bound a producer
/// that refills the channel as fast as the pump seals (a holder reading
/// 1 MiB replies from the page cache for a requester that reads none)
/// kept the batch growing and the socket never got its write: every
/// requested reply ended up in memory at once (hundreds of MiB).
pub const MAX_BATCH: usize = 1 << 20;

/// A duplicate of a connection's socket descriptor that only asks the
/// kernel about the connection (it keeps the socket open while it lives,
/// but never reads or writes).
pub struct SocketProbe(std::os::fd::OwnedFd);

impl SocketProbe {
    /// Bytes the kernel holds for the connection: not yet sent, or sent and
    /// not yet acknowledged by the peer (`SIOCOUTQ`). `None` if it cannot
    /// tell.
    pub fn held_bytes(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let mut held: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int through
        // the pointer, which points at `held`; the descriptor is ours.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCOUTQ, &mut held) };
        (rc == 0).then(|| held.max(0) as u64)
    }
}

/// Sending half of a connection.
///
/// Before the handshake is done (and on unprotected test links), messages
/// are encoded into `buf`, large payloads are queued as they are (shared,
/// not copied) behind the encoded bytes before them, and
/// [`FrameWriter::flush`] hands everything to the socket in vectored writes.
/// On a protected connection every frame is sealed into `records` instead:
/// the ciphertext needs memory of its own anyway, and encrypting a payload
/// from the message into it is the one pass over the data; `records` keeps
/// its memory from flush to flush.
pub struct FrameWriter {
    write: OwnedWriteHalf,
    buf: BytesMut,
    /// Set once the handshake is done.
    sealer: Option<Sealer>,
    /// Sealed records not yet written.
    records: RecordBuf,
    /// The id of the shared key this connection announced last.
    announced: Option<u64>,
    /// Shared records queued, each with the length of `records` it follows.
    shared_queue: Vec<(usize, Bytes)>,
    /// Bytes in `shared_queue`.
    shared_bytes: usize,
    /// Encoded frames and payloads queued before `buf`, in order.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    chunked: usize,
    /// Whether sealed flushes of [`ZERO_COPY_MIN`] bytes or more go out
    /// zero-copy ([`crate::zerocopy`]); `Off` once found unsupported.
    zero_copy_mode: ZeroCopySend,
    /// Made at the first such flush (a connection of small messages never
    /// has one).
    zero_copy: Option<ZeroCopySender>,
}

impl FrameWriter {
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Encodes into the write buffer without sending yet (batching).
    pub fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        if let Some(sealer) = &mut self.sealer {
            sealer.seal(msg, &mut self.records)?;
            return Ok(());
        }
        if let Some(data) = crate::encode_split(msg, &mut self.buf)? {
            let head = self.buf.split().freeze();
            self.chunked += head.len() + data.len();
            self.chunks.push_back(head);
            self.chunks.push_back(data);
        }
        Ok(())
    }

    /// Queues `msg`. If `shared` holds it (sealed once for every peer, see
    /// [`crate::SharedSealer`]), that record goes out, announced by a
    /// [`Message::SharedNext`] of our own (and, the first time a key is
    /// used here, its [`Message::SharedKey`]), instead of one sealed here.
    /// On an unprotected connection, which seals nothing, `msg` goes out
    /// plain. Returns whether the shared record went out.
    pub fn queue_shared(
        &mut self,
        msg: &Message,
        shared: Option<&SharedRecord>,
    ) -> Result<bool, LinkError> {
        let (Some(record), Some(sealer)) = (shared, &mut self.sealer) else {
            return self.queue(msg).map(|()| false);
        };
        if self.announced != Some(record.key_id()) {
            sealer.seal(&record.announcement(), &mut self.records)?;
            self.announced = Some(record.key_id());
        }
        let next = Message::SharedNext {
            counter: record.counter(),
        };
        sealer.seal(&next, &mut self.records)?;
        self.shared_queue
            .push((self.records.len(), record.bytes().clone()));
        self.shared_bytes += record.bytes().len();
        Ok(true)
    }

    pub fn buffered(&self) -> usize {
        self.chunked + self.buf.len() + self.records.len() + self.shared_bytes
    }

    /// Sends every message from `rx` until the channel closes (the meta
    /// connection's writer task). Whatever is queued when the socket is free
    /// goes out in one write, up to [`MAX_BATCH`] bytes: under load, dozens
    /// of acks share a syscall.
    pub async fn pump(
        mut self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Message>,
    ) -> Result<(), LinkError> {
        while let Some(msg) = rx.recv().await {
            self.queue(&msg)?;
            while self.buffered() < MAX_BATCH {
                let Ok(more) = rx.try_recv() else { break };
                self.queue(&more)?;
            }
            self.flush().await?;
        }
        Ok(())
    }

    /// [`FrameWriter::pump`] for a bounded channel: senders wait while the
    /// peer does not read, instead of queueing without limit.
    pub async fn pump_bounded(
        mut self,
        mut rx: tokio::sync::mpsc::Receiver<Message>,
    ) -> Result<(), LinkError> {
        while let Some(msg) = rx.recv().await {
            self.queue(&msg)?;
            while self.buffered() < MAX_BATCH {
                let Ok(more) = rx.try_recv() else { break };
                self.queue(&more)?;
            }
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), LinkError> {
        // Plain frames queued before the connection was protected go first.
        self.flush_plain().await?;
        if let Some(sender) = &mut self.zero_copy {
            sender.reap();
        }
        if self.records.len() + self.shared_bytes >= ZERO_COPY_MIN && self.zero_copy_ready() {
            return self.flush_zero_copy().await;
        }
        self.flush_records().await
    }

    /// Sends the sealed records, copied into the socket.
    async fn flush_records(&mut self) -> Result<(), LinkError> {
        if self.shared_queue.is_empty() {
            if !self.records.is_empty() {
                self.write.write_all(self.records.as_slice()).await?;
            }
        } else {
            // Our records and the shared ones between them, in order, in
            // vectored writes.
            let records = self.records.as_slice();
            let mut queue = SliceQueue::default();
            let mut at = 0;
            for (end, shared) in &self.shared_queue {
                queue.push(&records[at..*end]);
                queue.push(shared);
                at = *end;
            }
            queue.push(&records[at..]);
            self.write.write_all_buf(&mut queue).await?;
            self.shared_queue.clear();
            self.shared_bytes = 0;
        }
        self.records.clear();
        Ok(())
    }

    /// Whether this flush can go zero-copy (making the sender the first
    /// time).
    fn zero_copy_ready(&mut self) -> bool {
        if self.zero_copy_mode == ZeroCopySend::Off {
            return false;
        }
        if self.zero_copy.is_none() {
            match ZeroCopySender::new(self.zero_copy_mode) {
                Ok(sender) => self.zero_copy = Some(sender),
                Err(e) => {
                    tracing::debug!(error = %e, "zero-copy sends unavailable: copying");
                    self.zero_copy_mode = ZeroCopySend::Off;
                    return false;
                }
            }
        }
        self.zero_copy.as_ref().is_some_and(ZeroCopySender::enabled)
    }

    /// Sends the sealed records zero-copy: the kernel reads them from our
    /// memory, which the sender holds until it is done; the next flush is
    /// sealed into another buffer.
    async fn flush_zero_copy(&mut self) -> Result<(), LinkError> {
        let sender = self.zero_copy.as_mut().expect("made by zero_copy_ready");
        let flight = Flight {
            records: std::mem::replace(&mut self.records, sender.spare_records()),
            shared: std::mem::take(&mut self.shared_queue),
        };
        self.shared_bytes = 0;
        sender
            .send(Socket::Tcp(self.write.as_ref()), flight)
            .await?;
        Ok(())
    }

    /// A second handle on this connection's socket, to ask how much the
    /// kernel still holds for it ([`SocketProbe`]); `None` if the handle
    /// cannot be made (out of file descriptors).
    pub fn probe(&self) -> Option<SocketProbe> {
        use std::os::fd::AsFd;
        self.write
            .as_ref()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(SocketProbe)
    }

    /// Caps the bytes the kernel holds unsent for this connection
    /// (`TCP_NOTSENT_LOWAT`: a write waits until fewer are), so that what
    /// is queued next does not wait behind a full socket buffer; `None`
    /// restores the system's default (no cap). Best effort.
    pub fn limit_unsent(&self, limit: Option<u32>) {
        let socket = socket2::SockRef::from(self.write.as_ref());
        // 0: the `net.ipv4.tcp_notsent_lowat` sysctl (unlimited by default).
        let _ = socket.set_tcp_notsent_lowat(limit.unwrap_or(0));
    }

    /// What zero-copy sending did on this connection so far.
    pub fn zero_copy_stats(&self) -> ZeroCopyStats {
        self.zero_copy
            .as_ref()
            .map(ZeroCopySender::stats)
            .unwrap_or_default()
    }

    /// Overrides the process-wide zero-copy mode for this connection
    /// (tests).
    pub fn set_zero_copy(&mut self, mode: ZeroCopySend) {
        self.zero_copy_mode = mode;
    }

    async fn flush_plain(&mut self) -> Result<(), LinkError> {
        if self.chunks.is_empty() {
            if !self.buf.is_empty() {
                self.write.write_all(&self.buf).await?;
                self.buf.clear();
            }
            return Ok(());
        }
        if !self.buf.is_empty() {
            let tail = self.buf.split().freeze();
            self.chunks.push_back(tail);
        }
        let mut queue = SliceQueue::default();
        for chunk in &self.chunks {
            queue.push(chunk);
        }
        // Vectored when the socket supports it (TCP does).
        self.write.write_all_buf(&mut queue).await?;
        self.chunks.clear();
        self.chunked = 0;
        Ok(())
    }
}

/// Byte slices read front to back, for vectored socket writes.
#[derive(Default)]
struct SliceQueue<'a> {
    slices: VecDeque<&'a [u8]>,
    remaining: usize,
}

impl<'a> SliceQueue<'a> {
    /// Appends `slice` (an empty one is left out, so that every vectored
    /// write makes progress).
    fn push(&mut self, slice: &'a [u8]) {
        if !slice.is_empty() {
            self.remaining += slice.len();
            self.slices.push_back(slice);
        }
    }
}

impl Buf for SliceQueue<'_> {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.slices.front().copied().unwrap_or(&[])
    }

    fn advance(&mut self, cnt: usize) {
        let mut left = cnt.min(self.remaining);
        self.remaining -= left;
        while left > 0 {
            let Some(front) = self.slices.front_mut() else {
                return;
            };
            if left < front.len() {
                *front = &front[left..];
                return;
            }
            left -= front.len();
            self.slices.pop_front();
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [std::io::IoSlice<'b>]) -> usize {
        let mut n = 0;
        for (slot, slice) in dst.iter_mut().zip(self.slices.iter()) {
            *slot = std::io::IoSlice::new(slice);
            n += 1;
        }
        n
    }
}

/// Dead-peer timeout of every connection made from now on, in ms (see
/// [`set_dead_peer_timeout`]). Process-wide: one daemon per process.
static DEAD_PEER_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5000);

/// Sets the dead-peer timeout applied to connections made after this call
/// (the node's `ping_timeout_ms`).
pub fn set_dead_peer_timeout(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    DEAD_PEER_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Lets the kernel notice a dead peer too: `TCP_USER_TIMEOUT` drops the
/// connection when sent data stays unacknowledged for the dead-peer timeout
/// (a crashed host, a cut cable: otherwise TCP retransmits for ~15
/// minutes), and keepalive probes find a dead idle one within about twice
/// the timeout. The first probe waits for a whole timeout of silence: a
/// link's meta connection carries pings and never needs one, and the idle
/// ones (a link's data connection between two secondaries, a fetch
/// connection) cost two packets per timeout instead of four per second —
/// on a WAN, a probe every second on each idle connection was most of the
/// traffic of an idle cluster. The application's pings still catch a peer
/// whose kernel answers but whose process does not (SIGSTOP). Best effort:
/// failures are ignored.
pub fn configure_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let timeout =
        Duration::from_millis(DEAD_PEER_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed));
    let idle = timeout.max(Duration::from_secs(1));
    let probe = (timeout / 4).max(Duration::from_secs(1));
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(probe)
        .with_retries(4);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(timeout));
}

fn split(stream: TcpStream) -> (FrameReader, FrameWriter) {
    configure_socket(&stream);
    let (read, write) = stream.into_split();
    (
        FrameReader {
            read,
            buf: BytesMut::with_capacity(128 * 1024),
            opener: None,
            pre_auth_limit: Some(PRE_AUTH_MAX_PAYLOAD),
        },
        FrameWriter {
            write,
            buf: BytesMut::with_capacity(128 * 1024),
            sealer: None,
            records: RecordBuf::new(),
            announced: None,
            shared_queue: Vec::new(),
            shared_bytes: 0,
            chunks: VecDeque::new(),
            chunked: 0,
            zero_copy_mode: zero_copy_send(),
            zero_copy: None,
        },
    )
}

/// An authenticated connection.
pub struct Connection {
    pub peer_id: u32,
    pub channel: Channel,
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

/// Who we are, for handshakes.
#[derive(Clone)]
pub struct LocalIdentity {
    pub resource: String,
    pub node_id: u32,
    pub secret: std::sync::Arc<Vec<u8>>,
}

/// Dials `addr` and authenticates as `channel` towards node `peer_id`.
pub async fn connect(
    identity: &LocalIdentity,
    addr: SocketAddr,
    peer_id: u32,
    channel: Channel,
) -> Result<Connection, LinkError> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::HandshakeTimeout)??;
    let (mut reader, mut writer) = split(stream);
    let params = HandshakeParams {
        resource: identity.resource.clone(),
        node_id: identity.node_id,
        peer_node_id: peer_id,
        channel,
    };
    let (mut machine, hello) = Handshake::new(params, &identity.secret)?;
    writer.send(&hello).await?;
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        drive(&mut machine, &mut reader, &mut writer),
    )
    .await
    .map_err(|_| LinkError::HandshakeTimeout)??;
    protect(&machine, &mut reader, &mut writer)?;
    Ok(Connection {
        peer_id,
        channel,
        reader,
        writer,
    })
}

/// Authenticates an accepted connection. The peer says who it claims to be
/// in its Hello; `is_known_peer` decides, once it has proven it knows the
/// secret, whether we talk to it at all.
///
/// Before the client is authenticated it learns nothing about this node:
/// our Hello is anonymous (see [`Handshake::new_acceptor`]), every refusal
/// but a protocol-version mismatch says only [`GENERIC_REFUSAL`] (the
/// details go to our log through the returned error), and a wrong
/// resource, node id or secret all fail the same way, at the MAC, so
/// nothing can be probed by trying names or ids.
pub async fn accept(
    identity: &LocalIdentity,
    stream: TcpStream,
    is_known_peer: impl Fn(u32) -> bool,
) -> Result<Connection, LinkError> {
    let (mut reader, mut writer) = split(stream);
    let work = async {
        let first = reader.next().await?;
        let hello = ClaimedHello::of(&first)?;
        let claimed = hello.node_id;
        accept_handshake(
            &mut reader,
            &mut writer,
            &identity.secret,
            (identity.node_id, &identity.resource),
            &hello,
            || {
                is_known_peer(claimed)
                    .then_some(())
                    .ok_or_else(|| format!("node {claimed} is not a configured peer"))
            },
        )
        .await?;
        Ok::<_, LinkError>((claimed, hello.channel))
    };
    let (peer_id, channel) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::HandshakeTimeout)??;
    Ok(Connection {
        peer_id,
        channel,
        reader,
        writer,
    })
}

/// Authenticates an accepted connection whose resource is not known in
/// advance (the directory server, which serves many resources under one
/// secret): the resource is the one the peer names in its Hello, and
/// `is_known(resource, node)` decides, once the peer is authenticated,
/// whether we talk to it at all. We are node `node_id` (the directory:
/// [`crate::DIRECTORY_NODE_ID`]). Returns the resource name and the
/// connection. Reveals nothing before authentication, as [`accept`].
pub async fn accept_any_resource(
    node_id: u32,
    secret: &[u8],
    stream: TcpStream,
    is_known: impl Fn(&str, u32) -> bool,
) -> Result<(String, Connection), LinkError> {
    let (mut reader, mut writer) = split(stream);
    let work = async {
        let first = reader.next().await?;
        let hello = ClaimedHello::of(&first)?;
        let (claimed, resource) = (hello.node_id, hello.resource.clone());
        accept_handshake(
            &mut reader,
            &mut writer,
            secret,
            (node_id, &resource),
            &hello,
            || {
                is_known(&resource, claimed).then_some(()).ok_or_else(|| {
                    format!("node {claimed} of resource '{resource}' is not accepted")
                })
            },
        )
        .await?;
        Ok::<_, LinkError>((claimed, hello.channel, resource))
    };
    let (peer_id, channel, resource) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::HandshakeTimeout)??;
    Ok((
        resource,
        Connection {
            peer_id,
            channel,
            reader,
            writer,
        },
    ))
}

/// What an unauthenticated client is told when its handshake fails for any
/// reason but the protocol version: nothing that depends on our
/// configuration.
pub const GENERIC_REFUSAL: &str = "handshake refused: authentication failed";

/// Longest piece of a peer-supplied string (a claimed resource name) that
/// goes into our log.
const MAX_LOGGED_CLAIM: usize = 64;

/// The client's first message, which must be a Hello: who it claims to be.
struct ClaimedHello {
    version: u32,
    resource: String,
    node_id: u32,
    channel: Channel,
    nonce: crate::Nonce,
}

impl ClaimedHello {
    fn of(first: &Message) -> Result<Self, LinkError> {
        let Message::Hello {
            version,
            resource,
            node_id,
            channel,
            nonce,
            ..
        } = first
        else {
            // Not a handshake at all: closed without an answer.
            return Err(LinkError::Violation(format!(
                "expected Hello, got {}",
                first.message_type()
            )));
        };
        Ok(ClaimedHello {
            version: *version,
            resource: resource.clone(),
            node_id: *node_id,
            channel: *channel,
            nonce: *nonce,
        })
    }

    /// The claim for our log: a peer-supplied name is cut short and escaped.
    fn describe(&self) -> String {
        let mut name: String = self.resource.chars().take(MAX_LOGGED_CLAIM).collect();
        if name.len() < self.resource.len() {
            name.push('…');
        }
        format!("node {} of resource {:?}", self.node_id, name)
    }
}

/// The acceptor's side of the handshake after the client's Hello: we are
/// `(our_id, resource)`. The client's claims are not checked one by one
/// (that would tell a prober which one is wrong); the machine is set up
/// for exactly the peer the client claims to be, so its MAC verifies only
/// if the claims are right *and* it knows the secret. `authorize` runs once
/// the client's MAC verified, before our `AuthOk`: its refusal reaches an
/// authenticated client in the clear.
async fn accept_handshake(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    secret: &[u8],
    (our_id, resource): (u32, &str),
    hello: &ClaimedHello,
    authorize: impl Fn() -> Result<(), String>,
) -> Result<(), LinkError> {
    // A client claiming our own id can never be a peer; the MACs then name
    // an id no secret holder has a MAC for, so it fails like any other.
    let peer_id = if hello.node_id == our_id {
        our_id.wrapping_add(1)
    } else {
        hello.node_id
    };
    let params = HandshakeParams {
        resource: resource.to_string(),
        node_id: our_id,
        peer_node_id: peer_id,
        channel: hello.channel,
    };
    let (mut machine, our_hello) = Handshake::new_acceptor(params, secret)?;
    writer.send(&our_hello).await?;
    let as_expected = Message::Hello {
        version: hello.version,
        resource: resource.to_string(),
        node_id: peer_id,
        peer_node_id: our_id,
        channel: hello.channel,
        nonce: hello.nonce,
    };
    let claim = hello.describe();
    let mut step = machine.on_message(as_expected);
    loop {
        match step {
            Ok(HandshakeStep::Send(Message::AuthOk)) => {
                // The client proved it knows the secret.
                if let Err(reason) = authorize() {
                    let _ = writer
                        .send(&Message::Refused {
                            reason: reason.clone(),
                        })
                        .await;
                    return Err(LinkError::Violation(reason));
                }
                writer.send(&Message::AuthOk).await?;
            }
            Ok(HandshakeStep::Send(msg)) => writer.send(&msg).await?,
            Ok(HandshakeStep::Done(_)) => break,
            Err(e) => {
                let refusal = match &e {
                    HandshakeError::VersionMismatch { .. } => e.refusal(),
                    HandshakeError::Refused(_) => None,
                    _ => Some(Message::Refused {
                        reason: GENERIC_REFUSAL.into(),
                    }),
                };
                if let Some(refusal) = refusal {
                    let _ = writer.send(&refusal).await;
                }
                return Err(LinkError::Violation(match e {
                    HandshakeError::AuthFailed => format!(
                        "authentication failed for the client claiming to be {claim}: wrong secret, resource or node id"
                    ),
                    other => format!("{other} (client claims to be {claim})"),
                }));
            }
        }
        let msg = reader.next().await?;
        step = machine.on_message(msg);
    }
    protect(&machine, reader, writer)
}

async fn respond(
    step: Result<HandshakeStep, HandshakeError>,
    writer: &mut FrameWriter,
) -> Result<bool, LinkError> {
    match step {
        Ok(HandshakeStep::Send(msg)) => {
            writer.send(&msg).await?;
            Ok(false)
        }
        Ok(HandshakeStep::Done(_)) => Ok(true),
        Err(e) => {
            if let Some(refusal) = e.refusal() {
                let _ = writer.send(&refusal).await;
            }
            Err(e.into())
        }
    }
}

/// Whether connections switch to sealed records after the handshake; see
/// [`disable_link_protection_for_benchmarks`]. Process-wide.
static PROTECT_LINKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Leaves every connection made from now on unprotected after the
/// handshake: authenticated once, then plain frames that anyone on the
/// wire can read or change. Only for measuring what protection costs
/// (`benches/replication.rs`, through `VMSYNC_BENCH_UNPROTECTED_LINKS` in
/// `vmsyncd`). Both ends must agree: a protected end refuses the plain
/// frames of an unprotected one (and the other way round), so a mismatch
/// fails closed.
pub fn disable_link_protection_for_benchmarks() {
    PROTECT_LINKS.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Switches both halves to sealed records under the session keys of the
/// finished handshake `machine`. Runs right after our `AuthOk` went out and
/// the peer's came in: the peer seals only after it has seen ours, so
/// anything already buffered behind its `AuthOk` is sealed too.
fn protect(
    machine: &Handshake,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
) -> Result<(), LinkError> {
    let keys = machine
        .session_keys()
        .ok_or_else(|| LinkError::Violation("handshake finished without session keys".into()))?;
    // Authenticated: frames of any permitted size from now on.
    reader.pre_auth_limit = None;
    if !PROTECT_LINKS.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let (sealer, opener) = keys.split();
    reader.opener = Some(opener);
    writer.sealer = Some(sealer);
    Ok(())
}

async fn drive(
    machine: &mut Handshake,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
) -> Result<(), LinkError> {
    loop {
        let msg = reader.next().await?;
        if respond(machine.on_message(msg), writer).await? {
            return Ok(());
        }
    }
}

/// Both ends of an unauthenticated loopback connection, for unit tests of
/// what runs over a link (not for production use).
#[doc(hidden)]
pub async fn loopback_pair() -> ((FrameReader, FrameWriter), (FrameReader, FrameWriter)) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut client, mut server) = (split(client.unwrap()), split(server.unwrap().0));
    client.0.pre_auth_limit = None;
    server.0.pre_auth_limit = None;
    (client, server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedSealer;
    use std::sync::{Arc, Mutex};

    /// A client and a server connection, authenticated over loopback
    /// through a relay that records what the client puts on the wire.
    async fn recorded_pair() -> (Connection, Connection, Arc<Mutex<Vec<u8>>>) {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        tokio::spawn(async move {
            let (client, _) = relay.accept().await.unwrap();
            let server = TcpStream::connect(server_addr).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = cr.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let down = tokio::io::copy(&mut sr, &mut cw);
            let _ = tokio::join!(up, down);
        });
        let secret = std::sync::Arc::new(b"net test secret: 0123456789".to_vec());
        let identity = |node_id| LocalIdentity {
            resource: "r0".into(),
            node_id,
            secret: Arc::clone(&secret),
        };
        let server_identity = identity(2);
        let accepting = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(&server_identity, stream, |id| id == 1).await
        });
        let client = connect(&identity(1), relay_addr, 2, Channel::Data)
            .await
            .unwrap();
        let server = accepting.await.unwrap().unwrap();
        (client, server, seen)
    }

    fn write_of(byte: u8, len: usize) -> Message {
        Message::Write {
            term: 1,
            epoch: 1,
            seq: 1,
            offset: 0,
            fua: false,
            data: Bytes::from(vec![byte; len]),
        }
    }

    /// Frames after the handshake arrive intact both ways, and neither
    /// their payload nor a frame header shows on the wire (only the three
    /// plain handshake frames do).
    #[tokio::test]
    async fn frames_after_the_handshake_are_sealed_on_the_wire() {
        let (mut client, mut server, seen) = recorded_pair().await;
        let write = write_of(0xa5, 64 * 1024);
        client.writer.queue(&write).unwrap();
        client.writer.queue(&Message::Ping).unwrap();
        client.writer.flush().await.unwrap();
        assert_eq!(server.reader.next().await.unwrap(), write);
        assert_eq!(server.reader.next().await.unwrap(), Message::Ping);
        server.writer.send(&Message::PingAck).await.unwrap();
        assert_eq!(client.reader.next().await.unwrap(), Message::PingAck);

        let wire = seen.lock().unwrap().clone();
        assert_eq!(wire.windows(4).filter(|w| w == b"VMSY").count(), 3);
        assert!(!wire.windows(64).any(|w| w.iter().all(|&b| b == 0xa5)));
    }

    /// With the kernel's unsent bytes capped, a flush far larger than the
    /// cap still arrives whole (the writer waits for the socket, as for a
    /// full buffer, zero-copy or not), and lifting the cap restores the
    /// system's default.
    #[tokio::test]
    async fn a_flush_larger_than_the_unsent_cap_arrives_whole() {
        for zero_copy in [ZeroCopySend::Off, ZeroCopySend::On] {
            let (mut client, mut server, _) = recorded_pair().await;
            client.writer.set_zero_copy(zero_copy);
            let lowat = |w: &FrameWriter| {
                socket2::SockRef::from(w.write.as_ref())
                    .tcp_notsent_lowat()
                    .unwrap()
            };
            client.writer.limit_unsent(Some(64 * 1024));
            assert_eq!(lowat(&client.writer), 64 * 1024);
            let writes: Vec<Message> = (0..8u8).map(|i| write_of(i, 1 << 20)).collect();
            let receiving = tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..8 {
                    got.push(server.reader.next().await.unwrap());
                }
                got
            });
            for w in &writes {
                client.writer.queue(w).unwrap();
            }
            client.writer.flush().await.unwrap();
            assert_eq!(receiving.await.unwrap(), writes);
            client.writer.limit_unsent(None);
            assert_eq!(lowat(&client.writer), 0, "the sysctl's value applies");
        }
    }

    /// The probe tells what the kernel holds for a connection: data the
    /// peer has not read (so not all acknowledged) is counted, and nothing
    /// once the peer read it all.
    #[tokio::test]
    async fn the_socket_probe_counts_what_the_peer_has_not_acknowledged() {
        let (mut client, mut server, _) = recorded_pair().await;
        let probe = client.writer.probe().expect("a probe");
        assert_eq!(probe.held_bytes(), Some(0));
        // More than the kernel's buffers on both sides take together.
        let writes: Vec<Message> = (0..24u8).map(|i| write_of(i, 1 << 20)).collect();
        let sending = {
            let writes = writes.clone();
            tokio::spawn(async move {
                for w in &writes {
                    client.writer.queue(w).unwrap();
                }
                client.writer.flush().await.unwrap();
                client
            })
        };
        let mut held = 0;
        for _ in 0..200 {
            held = probe.held_bytes().unwrap();
            if held > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(held > 0, "nothing held while the peer does not read");
        for w in &writes {
            assert_eq!(&server.reader.next().await.unwrap(), w);
        }
        let _client = sending.await.unwrap();
        let mut held = u64::MAX;
        for _ in 0..200 {
            held = probe.held_bytes().unwrap();
            if held == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(held, 0, "still held after the peer read everything");
    }

    /// A write sealed once goes out byte for byte the same on every
    /// connection, and each receiver opens it (and the connection's own
    /// records around it), also after the sender replaced its sealer.
    #[tokio::test]
    async fn a_shared_record_goes_out_unchanged_on_every_connection() {
        let (old, new) = (SharedSealer::new(), SharedSealer::new());
        let write = write_of(0x5a, 64 * 1024);
        let records = [old.seal(&write).unwrap(), new.seal(&write).unwrap()];
        let contains = |wire: &[u8], part: &[u8]| wire.windows(part.len()).any(|w| w == part);
        for _ in 0..2 {
            let (mut client, mut server, seen) = recorded_pair().await;
            client.writer.queue(&Message::Ping).unwrap();
            client
                .writer
                .queue_shared(&write, Some(&records[0]))
                .unwrap();
            client.writer.queue(&Message::PingAck).unwrap();
            client
                .writer
                .queue_shared(&write, Some(&records[1]))
                .unwrap();
            client
                .writer
                .queue_shared(&write, Some(&records[1]))
                .unwrap();
            client.writer.flush().await.unwrap();
            for expected in [&Message::Ping, &write, &Message::PingAck, &write] {
                assert_eq!(&server.reader.next().await.unwrap(), expected);
            }
            let wire = seen.lock().unwrap().clone();
            for record in &records {
                assert!(
                    contains(&wire, record.bytes()),
                    "the shared record, unchanged"
                );
            }
            assert!(!wire.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)));
        }
    }

    /// Writes of `len` bytes or more, each filled with its index, one in
    /// three sealed once as a shared record, with a `Ping` after each.
    fn zero_copy_traffic(n: usize, len: usize) -> Vec<(Message, Option<crate::SharedRecord>)> {
        let shared = SharedSealer::new();
        (0..n)
            .flat_map(|i| {
                let write = write_of(i as u8, len + i);
                let record = (i % 3 == 0).then(|| shared.seal(&write).unwrap());
                [(write, record), (Message::Ping, None)]
            })
            .collect()
    }

    /// Reads `expected.len()` messages and compares them, in order.
    fn expect_all(
        mut reader: FrameReader,
        expected: Vec<Message>,
    ) -> tokio::task::JoinHandle<FrameReader> {
        tokio::spawn(async move {
            for (i, want) in expected.iter().enumerate() {
                let got = reader.next().await.unwrap();
                assert!(&got == want, "message {i} differs");
            }
            reader
        })
    }

    /// Queues `traffic`, flushing after each `Ping` (and then waiting
    /// `pause`); returns the bytes flushed.
    async fn send_traffic(
        writer: &mut FrameWriter,
        traffic: &[(Message, Option<crate::SharedRecord>)],
        pause: Duration,
    ) -> u64 {
        let mut payload = 0;
        for (msg, shared) in traffic {
            writer.queue_shared(msg, shared.as_ref()).unwrap();
            if matches!(msg, Message::Ping) {
                payload += writer.buffered() as u64;
                writer.flush().await.unwrap();
                tokio::time::sleep(pause).await;
            }
        }
        payload
    }

    /// Flushes sent zero-copy (each write its own flush of 256 KiB or
    /// more, shared records among them) arrive whole and in order, the
    /// sender hands every byte to the kernel zero-copy, and the kernel's
    /// notifications come in (on loopback they say it copied).
    #[tokio::test]
    async fn zero_copy_flushes_arrive_whole_and_in_order() {
        let (mut client, server, _) = recorded_pair().await;
        client.writer.set_zero_copy(ZeroCopySend::On);
        let traffic = zero_copy_traffic(40, 256 * 1024);
        let reading = expect_all(
            server.reader,
            traffic.iter().map(|(m, _)| m.clone()).collect(),
        );
        let payload = send_traffic(&mut client.writer, &traffic, Duration::ZERO).await;
        reading.await.unwrap();
        let stats = client.writer.zero_copy_stats();
        assert_eq!(stats.sent_bytes, payload, "every flush zero-copy");
        // The notifications of the last sends come once they are delivered.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.writer.zero_copy_stats().copied + client.writer.zero_copy_stats().zero_copied
            < 40
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "notifications: {:?}",
                client.writer.zero_copy_stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            client.writer.flush().await.unwrap();
        }
    }

    /// In `Auto`, a connection on which the kernel copies anyway (loopback)
    /// stops sending zero-copy, and what it sends by copy still arrives.
    #[tokio::test]
    async fn auto_zero_copy_stops_where_the_kernel_copies() {
        let (mut client, server, _) = recorded_pair().await;
        client.writer.set_zero_copy(ZeroCopySend::Auto);
        let traffic = zero_copy_traffic(200, 128 * 1024);
        let reading = expect_all(
            server.reader,
            traffic.iter().map(|(m, _)| m.clone()).collect(),
        );
        // Paced, so that notifications come in between flushes.
        let payload = send_traffic(&mut client.writer, &traffic, Duration::from_millis(2)).await;
        reading.await.unwrap();
        let stats = client.writer.zero_copy_stats();
        assert!(stats.copied >= 16, "{stats:?}");
        assert_eq!(stats.zero_copied, 0, "loopback copies: {stats:?}");
        assert!(
            stats.sent_bytes > 0 && stats.sent_bytes < payload / 2,
            "zero-copy first, then by copy: {stats:?} of {payload}"
        );
    }

    /// A writer dropped while the kernel still holds its zero-copy sends
    /// (the reader has not read them yet) keeps their memory until the
    /// kernel is done: everything arrives intact, also when the process
    /// reuses freed memory meanwhile.
    #[tokio::test]
    async fn memory_of_zero_copy_sends_outlives_the_writer() {
        let (mut client, server, _) = recorded_pair().await;
        client.writer.set_zero_copy(ZeroCopySend::On);
        let traffic = zero_copy_traffic(12, 512 * 1024);
        for (msg, shared) in &traffic {
            client.writer.queue_shared(msg, shared.as_ref()).unwrap();
            if matches!(msg, Message::Ping) {
                // Nobody reads yet: the socket fills, the relay's too.
                if tokio::time::timeout(Duration::from_millis(500), client.writer.flush())
                    .await
                    .is_err()
                {
                    panic!("loopback buffers should hold 6 MiB");
                }
            }
        }
        drop(client);
        drop(traffic);
        // Freed memory would be reused by these and sent as it is now.
        let scribble: Vec<Vec<u8>> = (0..64).map(|i| vec![0xee ^ i as u8; 512 * 1024]).collect();
        let expected: Vec<Message> = zero_copy_traffic(12, 512 * 1024)
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        expect_all(server.reader, expected).await.unwrap();
        drop(scribble);
    }

    #[test]
    fn a_slice_queue_reads_its_slices_in_order_across_partial_advances() {
        let mut queue = SliceQueue::default();
        for part in [&b"head"[..], b"", b"payload-bytes", b"tail"] {
            queue.push(part);
        }
        assert_eq!(queue.slices.len(), 3, "the empty slice is left out");
        let mut seen = Vec::new();
        // Odd step sizes cut slices in the middle, as short writes do.
        for step in [3, 5, 1, 7, 100] {
            let take = step.min(queue.remaining());
            let mut slices = [std::io::IoSlice::new(&[]); 4];
            let n = queue.chunks_vectored(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(flat.len(), queue.remaining());
            seen.extend_from_slice(&flat[..take]);
            queue.advance(take);
        }
        assert_eq!(seen, b"headpayload-bytestail");
        assert_eq!(queue.remaining(), 0);
        assert!(queue.chunk().is_empty());
    }
}
