//! Connection handshake and mutual authentication, as a pure state machine.
//!
//! Both sides run the same machine; nothing depends on who dialled:
//!
//! ```text
//!   A                                   B
//!   Hello{nonce_a} ───────────────────▶
//!                ◀─────────────────── Hello{nonce_b}
//!   (check B's Hello)                   (check A's Hello)
//!   AuthResponse{mac_a} ──────────────▶
//!                ◀──────────────────── AuthResponse{mac_b}
//!   (verify mac_b)                      (verify mac_a)
//!   AuthOk ───────────────────────────▶
//!                ◀──────────────────── AuthOk
//!   Done                                Done
//! ```
//!
//! `mac_x` is a keyed BLAKE3 hash, under a key derived from the shared secret,
//! of a transcript that names the protocol version, channel, resource, the
//! sender's and the receiver's node ids, and the sender's and the receiver's
//! nonces — always in *sender, receiver* order. Consequences:
//!
//! * The secret never crosses the wire; only MACs over fresh nonces do, so a
//!   recorded MAC is useless on any other connection (replay).
//! * A MAC computed by A is a MAC "from A", so it can never pass as B's, even
//!   when an attacker relays messages between two connections to A and
//!   chooses the nonces (reflection). For this node ids must differ, which
//!   [`Handshake::new`] enforces.
//! * Agreement on resource, channel and version is authenticated too: a
//!   man in the middle cannot splice a data connection of one resource into
//!   a meta connection of another.
//!
//! The handshake messages themselves are plain (the MACs protect what
//! matters in them). Once it is done, [`Handshake::session_keys`] derives
//! one key per direction from the secret and the whole transcript, and every
//! later frame travels sealed under them (see [`crate::secure`]).

use std::fmt;

use rand::rngs::OsRng;
use rand::RngCore;

use crate::message::{Message, MessageType, Nonce};
use crate::types::Channel;
use crate::PROTOCOL_VERSION;

/// BLAKE3 key-derivation context for the authentication key. Changing it
/// changes every key, so it is versioned with the transcript format.
const KEY_CONTEXT: &str = "vmsync 2024-11 node authentication key v1";

/// BLAKE3 key-derivation context for the per-direction record keys of a
/// connection (see [`Handshake::session_keys`]).
const LINK_KEY_CONTEXT: &str = "vmsync 2026-12 link record key v1";

/// What a node knows about a connection before it is established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeParams {
    /// Resource name; both sides must agree.
    pub resource: String,
    /// Our node id.
    pub node_id: u32,
    /// The node id we expect the peer to prove it is.
    pub peer_node_id: u32,
    /// Which connection of the pair this is; both sides must agree.
    pub channel: Channel,
}

/// The authenticated peer, once the handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id (equal to [`HandshakeParams::peer_node_id`]).
    pub node_id: u32,
    /// The channel agreed on.
    pub channel: Channel,
    /// The protocol version agreed on.
    pub version: u32,
}

/// What to do after feeding a message to [`Handshake::on_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send this message to the peer and keep feeding the machine.
    Send(Message),
    /// The peer is authenticated and has accepted us: regular traffic may
    /// flow.
    Done(PeerInfo),
}

/// Why a handshake failed. Each is final: close the connection (after
/// sending [`HandshakeError::refusal`], if any).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Our own configuration names one id for both ends.
    #[error("node id {0} is configured both for this node and for the peer")]
    SameNodeId(u32),
    /// The peer runs an incompatible protocol version.
    #[error("peer speaks protocol version {peer}, we speak {ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// The peer replicates a different resource.
    #[error("peer is resource '{peer}', we are '{ours}'")]
    ResourceMismatch {
        /// The peer's resource name.
        peer: String,
        /// Ours.
        ours: String,
    },
    /// The peer opened the other kind of connection.
    #[error("peer opened a {peer} channel, we expected {ours}")]
    ChannelMismatch {
        /// The peer's channel.
        peer: Channel,
        /// Ours.
        ours: Channel,
    },
    /// The peer is not the node we meant to talk to.
    #[error("peer claims to be node {claimed}, we expected node {expected}")]
    WrongPeer {
        /// The id the peer claims.
        claimed: u32,
        /// The id we expected.
        expected: u32,
    },
    /// The peer meant to talk to another node.
    #[error("peer expected to reach node {expected}, but we are node {ours}")]
    NotExpectedByPeer {
        /// The id the peer thinks we have.
        expected: u32,
        /// Our id.
        ours: u32,
    },
    /// The peer's Hello carries our own nonce: our message came back to us.
    #[error("peer sent our own nonce back: reflected or looped-back connection")]
    ReflectedNonce,
    /// The peer's MAC is wrong: it does not know the shared secret (or it
    /// replayed or reflected a MAC).
    #[error("authentication failed: wrong shared secret")]
    AuthFailed,
    /// The peer rejected the handshake and said why.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// A message arrived that does not belong at this point.
    #[error("unexpected {got} message during handshake (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: MessageType,
        /// What the machine was waiting for.
        expected: &'static str,
    },
    /// The machine is done or has failed and takes no more messages.
    #[error("handshake is already over")]
    Over,
}

impl HandshakeError {
    /// The [`Message::Refused`] to send the peer before closing, so its log
    /// says why; `None` when the peer already knows (it refused us) or when
    /// the error is not about the peer.
    pub fn refusal(&self) -> Option<Message> {
        match self {
            Self::Refused(_) | Self::Over | Self::SameNodeId(_) => None,
            other => Some(Message::Refused {
                reason: other.to_string(),
            }),
        }
    }
}

/// Where the machine is.
#[derive(Clone)]
enum State {
    /// Our Hello is out; waiting for the peer's.
    AwaitHello,
    /// Our MAC is out; waiting for the peer's.
    AwaitMac { peer_nonce: Nonce },
    /// The peer's MAC checked out and our AuthOk is out; waiting for the
    /// peer's AuthOk.
    AwaitAuthOk { peer_nonce: Nonce },
    /// Both sides accepted each other: the session keys may be derived.
    Established { peer_nonce: Nonce },
    /// Failed (or misused after being established).
    Over,
}

impl State {
    fn expected(&self) -> &'static str {
        match self {
            Self::AwaitHello => "Hello",
            Self::AwaitMac { .. } => "AuthResponse",
            Self::AwaitAuthOk { .. } => "AuthOk",
            Self::Established { .. } | Self::Over => "nothing",
        }
    }
}

/// One side of a handshake. Feed it every message received from the peer
/// until it returns [`HandshakeStep::Done`] or an error.
#[derive(Clone)]
pub struct Handshake {
    params: HandshakeParams,
    key: [u8; 32],
    nonce: Nonce,
    state: State,
}

impl fmt::Debug for Handshake {
    /// Leaves the key out, so that logging a handshake cannot leak it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("params", &self.params)
            .field("expecting", &self.state.expected())
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake with a fresh random nonce from the OS. Returns the
    /// machine and the [`Message::Hello`] to send first.
    ///
    /// `secret` is the cluster's shared secret, any length; only a key
    /// derived from it is kept.
    pub fn new(params: HandshakeParams, secret: &[u8]) -> Result<(Self, Message), HandshakeError> {
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        Self::with_nonce(params, secret, nonce)
    }

    /// Like [`Handshake::new`], for the side that accepted the connection:
    /// its Hello is *anonymous* (no resource, no node ids), so a client
    /// that has not proven it knows the secret learns neither the resource
    /// nor which node it reached. The dialer knows whom it dialed, and both
    /// MACs cover resource and ids, so nothing is lost: a wrong peer fails
    /// authentication.
    pub fn new_acceptor(
        params: HandshakeParams,
        secret: &[u8],
    ) -> Result<(Self, Message), HandshakeError> {
        let (machine, _) = Self::new(params, secret)?;
        let anonymous = Message::Hello {
            version: PROTOCOL_VERSION,
            resource: String::new(),
            node_id: 0,
            peer_node_id: 0,
            channel: machine.params.channel,
            nonce: machine.nonce,
        };
        Ok((machine, anonymous))
    }

    /// Like [`Handshake::new`] with a given nonce, for tests and fuzzing.
    /// Production code must use [`Handshake::new`]: a repeated nonce allows
    /// replaying a recorded handshake.
    pub fn with_nonce(
        params: HandshakeParams,
        secret: &[u8],
        nonce: Nonce,
    ) -> Result<(Self, Message), HandshakeError> {
        if params.node_id == params.peer_node_id {
            return Err(HandshakeError::SameNodeId(params.node_id));
        }
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            resource: params.resource.clone(),
            node_id: params.node_id,
            peer_node_id: params.peer_node_id,
            channel: params.channel,
            nonce,
        };
        let machine = Self {
            key: blake3::derive_key(KEY_CONTEXT, secret),
            params,
            nonce,
            state: State::AwaitHello,
        };
        Ok((machine, hello))
    }

    /// Advances the machine with one message from the peer.
    ///
    /// After an error or [`HandshakeStep::Done`] the machine is over and
    /// rejects further messages with [`HandshakeError::Over`].
    pub fn on_message(&mut self, msg: Message) -> Result<HandshakeStep, HandshakeError> {
        let state = std::mem::replace(&mut self.state, State::Over);
        let (next, step) = self.advance(state, msg)?;
        self.state = next;
        Ok(step)
    }

    /// The transition function; on error the state stays [`State::Over`].
    fn advance(
        &self,
        state: State,
        msg: Message,
    ) -> Result<(State, HandshakeStep), HandshakeError> {
        match (state, msg) {
            (State::Over | State::Established { .. }, _) => Err(HandshakeError::Over),
            (_, Message::Refused { reason }) => Err(HandshakeError::Refused(reason)),
            (
                State::AwaitHello,
                Message::Hello {
                    version,
                    resource,
                    node_id,
                    peer_node_id,
                    channel,
                    nonce,
                },
            ) => {
                self.check_hello(version, resource, node_id, peer_node_id, channel, &nonce)?;
                let mac = self.mac(Direction::Outgoing, &nonce);
                Ok((
                    State::AwaitMac { peer_nonce: nonce },
                    HandshakeStep::Send(Message::AuthResponse {
                        mac: *mac.as_bytes(),
                    }),
                ))
            }
            (State::AwaitMac { peer_nonce }, Message::AuthResponse { mac }) => {
                // `blake3::Hash` equality is constant-time.
                if blake3::Hash::from(mac) != self.mac(Direction::Incoming, &peer_nonce) {
                    return Err(HandshakeError::AuthFailed);
                }
                Ok((
                    State::AwaitAuthOk { peer_nonce },
                    HandshakeStep::Send(Message::AuthOk),
                ))
            }
            (State::AwaitAuthOk { peer_nonce }, Message::AuthOk) => Ok((
                State::Established { peer_nonce },
                HandshakeStep::Done(PeerInfo {
                    node_id: self.params.peer_node_id,
                    channel: self.params.channel,
                    version: PROTOCOL_VERSION,
                }),
            )),
            (state, msg) => Err(HandshakeError::Unexpected {
                got: msg.message_type(),
                expected: state.expected(),
            }),
        }
    }

    /// Checks the peer's Hello against our parameters, most fundamental
    /// mismatch first so the error names the real cause.
    fn check_hello(
        &self,
        version: u32,
        resource: String,
        node_id: u32,
        peer_node_id: u32,
        channel: Channel,
        nonce: &Nonce,
    ) -> Result<(), HandshakeError> {
        let ours = &self.params;
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::VersionMismatch {
                peer: version,
                ours: PROTOCOL_VERSION,
            });
        }
        if *nonce == self.nonce {
            return Err(HandshakeError::ReflectedNonce);
        }
        if channel != ours.channel {
            return Err(HandshakeError::ChannelMismatch {
                peer: channel,
                ours: ours.channel,
            });
        }
        if resource.is_empty() {
            // An acceptor's anonymous Hello (see `new_acceptor`): its
            // identity is checked by its MAC instead.
            return Ok(());
        }
        if resource != ours.resource {
            return Err(HandshakeError::ResourceMismatch {
                peer: resource,
                ours: ours.resource.clone(),
            });
        }
        if node_id != ours.peer_node_id {
            return Err(HandshakeError::WrongPeer {
                claimed: node_id,
                expected: ours.peer_node_id,
            });
        }
        if peer_node_id != ours.node_id {
            return Err(HandshakeError::NotExpectedByPeer {
                expected: peer_node_id,
                ours: ours.node_id,
            });
        }
        Ok(())
    }

    /// The keys that protect every frame after the handshake, once it has
    /// returned [`HandshakeStep::Done`]; `None` before (or after a failure).
    ///
    /// Each direction's key is BLAKE3 in key-derivation mode over the
    /// secret-derived key and the transcript (version, channel, resource,
    /// sender and receiver ids, sender and receiver nonces). Both ends derive
    /// the same two keys, swapped; fresh nonces make them unique to this
    /// connection, and the sender-first order makes the two directions'
    /// keys differ.
    pub fn session_keys(&self) -> Option<crate::SessionKeys> {
        let State::Established { peer_nonce } = &self.state else {
            return None;
        };
        let p = &self.params;
        let me = (p.node_id, &self.nonce);
        let peer = (p.peer_node_id, peer_nonce);
        Some(crate::SessionKeys {
            send: link_key(&self.key, p.channel, &p.resource, me, peer),
            recv: link_key(&self.key, p.channel, &p.resource, peer, me),
        })
    }

    /// The MAC we send (`Outgoing`, from us to the peer) or expect
    /// (`Incoming`, from the peer to us).
    fn mac(&self, direction: Direction, peer_nonce: &Nonce) -> blake3::Hash {
        let p = &self.params;
        let (me, peer) = ((p.node_id, &self.nonce), (p.peer_node_id, peer_nonce));
        let (sender, receiver) = match direction {
            Direction::Outgoing => (me, peer),
            Direction::Incoming => (peer, me),
        };
        transcript_mac(&self.key, p.channel, &p.resource, sender, receiver)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Outgoing,
    Incoming,
}

/// The record key for the direction `sender` → `receiver`. The same
/// length-prefixed transcript as [`transcript_mac`], under another
/// derivation context, so a MAC and a key are never the same value.
fn link_key(
    auth_key: &[u8; 32],
    channel: Channel,
    resource: &str,
    sender: (u32, &Nonce),
    receiver: (u32, &Nonce),
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(LINK_KEY_CONTEXT);
    h.update(auth_key);
    h.update(&PROTOCOL_VERSION.to_le_bytes());
    h.update(&[channel.tag()]);
    h.update(&(resource.len() as u64).to_le_bytes());
    h.update(resource.as_bytes());
    h.update(&sender.0.to_le_bytes());
    h.update(&receiver.0.to_le_bytes());
    h.update(sender.1);
    h.update(receiver.1);
    *h.finalize().as_bytes()
}

/// The MAC of the transcript as seen by `sender`, a (node id, nonce) pair.
/// Every variable-length item is length-prefixed, so distinct transcripts
/// never hash the same input.
fn transcript_mac(
    key: &[u8; 32],
    channel: Channel,
    resource: &str,
    sender: (u32, &Nonce),
    receiver: (u32, &Nonce),
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&PROTOCOL_VERSION.to_le_bytes());
    h.update(&[channel.tag()]);
    h.update(&(resource.len() as u64).to_le_bytes());
    h.update(resource.as_bytes());
    h.update(&sender.0.to_le_bytes());
    h.update(&receiver.0.to_le_bytes());
    h.update(sender.1);
    h.update(receiver.1);
    h.finalize()
}
