//! A hand-driven peer: raw TCP connections to a daemon's listen address that
//! speak as much (or as little) of the vmsync protocol as a test wants.
//!
//! The daemon's own client (`replication::transport`) is private to the
//! crate, so this re-implements the small part of it that tests need on top
//! of the `protocol` crate: framing, the challenge-response handshake, the
//! sealed records that follow it, and a full data + meta link. Everything is blocking with timeouts, so tests
//! can drive it between plain `vmsyncctl` calls.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use protocol::{Channel, Handshake, HandshakeError, HandshakeParams, HandshakeStep, Message};

/// Longest a single read may block before a test gives up on the daemon.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Why [`RawConn::recv`] returned no message.
#[derive(Debug)]
pub enum RecvError {
    /// The daemon closed the connection (EOF, or a reset because it closed
    /// with our bytes still unread).
    Closed,
    /// Nothing arrived within the read timeout.
    Timeout,
    /// The daemon sent bytes that are not a valid frame.
    Protocol(protocol::ProtocolError),
    Io(io::Error),
}

impl RecvError {
    pub fn is_closed(&self) -> bool {
        matches!(self, RecvError::Closed)
    }
}

/// One TCP connection to a daemon, with a frame decoder.
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Set once the handshake is done: what [`RawConn::send`] and
    /// [`RawConn::recv`] seal and open from then on, as the daemon does.
    sealer: Option<protocol::Sealer>,
    opener: Option<protocol::Opener>,
}

impl RawConn {
    /// Connects to `addr` (no handshake is sent).
    pub fn connect(addr: SocketAddr) -> io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        Ok(RawConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            sealer: None,
            opener: None,
        })
    }

    /// Our side's address: what the daemon logs as `from=`.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("connected socket")
    }

    /// Sends arbitrary bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Encodes and sends one message (sealed once the handshake is done).
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        let invalid = |e| io::Error::new(ErrorKind::InvalidInput, e);
        match &mut self.sealer {
            Some(sealer) => {
                let mut record = protocol::RecordBuf::new();
                sealer.seal(msg, &mut record).map_err(invalid)?;
                self.send_raw(record.as_slice())
            }
            None => {
                let mut frame = BytesMut::new();
                protocol::encode(msg, &mut frame).map_err(invalid)?;
                self.send_raw(&frame)
            }
        }
    }

    /// Switches to sealed records under the finished handshake's keys.
    fn protect(&mut self, machine: &Handshake) {
        let (sealer, opener) = machine
            .session_keys()
            .expect("a finished handshake has session keys")
            .split();
        self.sealer = Some(sealer);
        self.opener = Some(opener);
    }

    /// The next message from the daemon.
    pub fn recv(&mut self) -> Result<Message, RecvError> {
        loop {
            let next = match &mut self.opener {
                Some(opener) => opener.open(&mut self.buf),
                None => protocol::decode(&mut self.buf),
            };
            match next {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(RecvError::Protocol(e)),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(RecvError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(RecvError::Timeout)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(RecvError::Closed)
                }
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
    }

    /// Reads until the daemon closes the connection, returning every
    /// message it sent before closing; `Err` (with what was read so far) if
    /// it is still open after `timeout`, or sends something undecodable.
    pub fn drain_until_closed(&mut self, timeout: Duration) -> Result<Vec<Message>, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "connection still open after {timeout:?}; received {seen:?}"
                ));
            }
            self.stream
                .set_read_timeout(Some(left.min(READ_TIMEOUT)))
                .expect("set read timeout");
            match self.recv() {
                Ok(msg) => seen.push(msg),
                Err(RecvError::Closed) => return Ok(seen),
                Err(RecvError::Timeout) => {}
                Err(e) => return Err(format!("{e:?} after receiving {seen:?}")),
            }
        }
    }
}

/// A handshake that did not complete.
#[derive(Debug)]
pub struct HandshakeFailure {
    /// What our own state machine concluded (it checks the daemon too).
    pub local: Option<HandshakeError>,
    /// The reason in the daemon's `Refused`, if it sent one.
    pub refused: Option<String>,
    /// Whether the daemon closed the connection afterwards.
    pub closed: bool,
    /// Every message the daemon sent on this connection.
    pub received: Vec<Message>,
    /// Our side's address (the daemon logs it as `from=`).
    pub local_addr: SocketAddr,
}

/// Runs the handshake as node `params.node_id` on a fresh connection,
/// starting with `hello` (normally the one [`Handshake::new`] made; tests
/// pass a doctored one). On failure, keeps reading until the daemon closes
/// so that its `Refused` is collected.
pub fn handshake_with(
    addr: SocketAddr,
    mut machine: Handshake,
    hello: &Message,
) -> Result<RawConn, Box<HandshakeFailure>> {
    let mut conn = RawConn::connect(addr).expect("connect to the daemon");
    let local_addr = conn.local_addr();
    let mut received = Vec::new();
    let mut local = None;
    let sent = conn.send(hello);
    if sent.is_ok() {
        loop {
            let msg = match conn.recv() {
                Ok(msg) => msg,
                Err(e) => {
                    let closed = e.is_closed();
                    return Err(Box::new(HandshakeFailure {
                        local,
                        refused: refusal(&received),
                        closed,
                        received,
                        local_addr,
                    }));
                }
            };
            received.push(msg.clone());
            match machine.on_message(msg) {
                Ok(HandshakeStep::Send(reply)) => {
                    if conn.send(&reply).is_err() {
                        break;
                    }
                }
                Ok(HandshakeStep::Done(_)) => {
                    conn.protect(&machine);
                    return Ok(conn);
                }
                Err(e) => {
                    local = Some(e);
                    break;
                }
            }
        }
    }
    // Failed on our side (or the daemon stopped reading): collect whatever
    // the daemon still says, up to its closing the connection.
    let (more, closed) = match conn.drain_until_closed(Duration::from_secs(15)) {
        Ok(more) => (more, true),
        Err(_) => (Vec::new(), false),
    };
    received.extend(more);
    Err(Box::new(HandshakeFailure {
        local,
        refused: refusal(&received),
        closed,
        received,
        local_addr,
    }))
}

/// Runs the normal handshake (as [`Handshake::new`] makes it).
pub fn handshake(
    addr: SocketAddr,
    params: HandshakeParams,
    secret: &[u8],
) -> Result<RawConn, Box<HandshakeFailure>> {
    let (machine, hello) = Handshake::new(params, secret).expect("valid handshake parameters");
    handshake_with(addr, machine, &hello)
}

fn refusal(received: &[Message]) -> Option<String> {
    received.iter().find_map(|m| match m {
        Message::Refused { reason } => Some(reason.clone()),
        _ => None,
    })
}

/// The cluster's shared secret as the daemon uses it: the file's bytes with
/// surrounding whitespace trimmed.
pub fn read_secret(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read secret {}: {e}", path.display()));
    bytes.trim_ascii().to_vec()
}

/// Handshake parameters for node `me` talking to node `peer` of `resource`.
pub fn params(resource: &str, me: u32, peer: u32, channel: Channel) -> HandshakeParams {
    HandshakeParams {
        resource: resource.to_string(),
        node_id: me,
        peer_node_id: peer,
        channel,
    }
}

/// A fully authenticated link (both connections) posing as node `me`.
pub struct RawLink {
    pub data: RawConn,
    pub meta: RawConn,
}

impl RawLink {
    /// Dials `addr` twice, data then meta, like the daemon's own dialer.
    pub fn establish(
        addr: SocketAddr,
        resource: &str,
        me: u32,
        peer: u32,
        secret: &[u8],
    ) -> Result<RawLink, Box<HandshakeFailure>> {
        let data = handshake(addr, params(resource, me, peer, Channel::Data), secret)?;
        let meta = handshake(addr, params(resource, me, peer, Channel::Meta), secret)?;
        Ok(RawLink { data, meta })
    }
}

/// Lines of `log` that mention `needle`.
pub fn log_lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}
