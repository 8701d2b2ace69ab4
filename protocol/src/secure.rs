//! Protected framing: what a connection carries once the handshake is done.
//!
//! The handshake proves that both ends know the shared secret, but on its
//! own it protects nothing that follows it. After both sides have verified
//! the peer's `AuthOk`, every frame travels as one AEAD *record*:
//!
//! ```text
//! offset  size  field
//!      0     4  length   bytes that follow (ciphertext + tag), little-endian
//!      4     …  ciphertext of one whole frame (header and payload, frame.rs)
//!    end-16 16  tag      AEGIS-256X4 tag over the ciphertext, with the
//!                        4 length bytes as associated data
//! ```
//!
//! Why the *whole* frame is encrypted (rather than the payload with the frame
//! header as associated data): the header would show every message's type
//! on the wire (acks, barriers, pings: a map of the guest's I/O pattern), and
//! a separate plaintext header would be a second thing to authenticate. The
//! only plaintext is the record length, which a reader needs to find the end
//! of the record; it is associated data, so changing it fails the tag.
//!
//! Keys and nonces:
//!
//! * One key per direction, derived by [`crate::Handshake::session_keys`] with
//!   BLAKE3 in key-derivation mode from the shared secret and the handshake
//!   transcript (protocol version, channel, resource, both node ids, both
//!   fresh nonces), sender first. Every connection therefore has keys of its
//!   own, and the two directions of one connection never share a key: a
//!   record reflected back to its sender fails authentication.
//! * The 256-bit nonce is 24 zero bytes followed by a per-direction 64-bit
//!   record counter (big-endian) that both sides keep in step, starting at 0.
//!   It is never sent: a record that is replayed, dropped, reordered or
//!   injected is opened under the wrong counter and fails authentication,
//!   and so does every record after it. A key never sees a nonce twice; a
//!   direction that would run out of counter values (2^64 records) refuses
//!   to seal or open more and the connection is closed.
//!
//! Shared records: a write that goes to several peers is sealed once, under
//! a key of the sender's own, and the same record goes out on each
//! connection right after one of the connection's own records that names
//! its counter ([`SharedSealer`] says why that is as safe). On the wire a
//! shared record looks like any other.
//!
//! Any failure is final: the caller closes the connection (the link layer
//! reconnects and resyncs from its bitmaps).

use std::fmt;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use aegis::aegis256x4::Aegis256X4;
use bytes::{Bytes, BytesMut};
use rand::rngs::OsRng;
use rand::RngCore;

use crate::codec::SecretKey;
use crate::error::ProtocolError;
use crate::frame::{self, HEADER_LEN, MAX_PAYLOAD};
use crate::message::Message;

/// Bytes of the plaintext record length in front of every record.
pub const RECORD_LEN_BYTES: usize = 4;

/// Bytes of the authentication tag at the end of every record.
pub const TAG_LEN: usize = 16;

/// Largest record length (the field's value): one maximum-sized frame plus
/// its tag. Checked before any memory is reserved for a record.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + MAX_PAYLOAD + TAG_LEN;

/// Smallest record length: an empty-payload frame plus its tag.
const MIN_RECORD_LEN: usize = HEADER_LEN + TAG_LEN;

/// The two keys of one connection, as seen from one end.
#[derive(Clone)]
pub struct SessionKeys {
    /// Seals what we send.
    pub send: [u8; 32],
    /// Opens what the peer sends.
    pub recv: [u8; 32],
}

impl fmt::Debug for SessionKeys {
    /// Leaves the keys out, so that logging cannot leak them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys").finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// The sealing and opening halves.
    pub fn split(&self) -> (Sealer, Opener) {
        (
            Sealer {
                state: Direction::new(&self.send),
            },
            Opener {
                state: Direction::new(&self.recv),
                shared_key: None,
                shared_next: None,
            },
        )
    }
}

/// The AEAD of every record.
///
/// AEGIS-256X4 (the CFRG's AEGIS family: a 256-bit key, a 256-bit nonce, a
/// 128-bit tag; four AEGIS-256 lanes, built on the AES round function), from
/// the `aegis` crate (libaegis, which picks AVX-512/VAES, AVX2 or AES-NI at
/// run time). It replaced ring's AES-256-GCM (protocol version 6) because
/// link protection must cost little next to a 1 MiB replicated write: on the
/// reference machine (Xeon with VAES) sealing 1 MiB in place takes about
/// 26 µs against AES-256-GCM's 113 µs, and the whole record, copy included,
/// about 60 µs against 147 µs (`cargo test --release -p protocol --
/// --ignored --nocapture seal_speed`).
type Cipher = Aegis256X4<TAG_LEN>;

/// One direction's key and record counter.
struct Direction {
    key: [u8; 32],
    /// The counter of the next record; `u64::MAX` is never used, so reaching
    /// it means the direction is exhausted.
    next: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        Self { key: *key, next: 0 }
    }

    /// The cipher for the next record, without consuming its nonce.
    fn cipher(&self) -> Result<Cipher, ProtocolError> {
        cipher(&self.key, self.next)
    }
}

/// The cipher of record number `counter` under `key`: the nonce is 24 zero
/// bytes and the counter, big-endian. `u64::MAX` is never used.
fn cipher(key: &[u8; 32], counter: u64) -> Result<Cipher, ProtocolError> {
    if counter == u64::MAX {
        return Err(ProtocolError::CounterExhausted);
    }
    let mut nonce = [0u8; 32];
    nonce[24..].copy_from_slice(&counter.to_be_bytes());
    Ok(Cipher::new(key, &nonce))
}

/// Seals frames for one direction of a connection.
pub struct Sealer {
    state: Direction,
}

impl Sealer {
    /// Appends `msg` as one sealed record to `out`.
    ///
    /// The frame's header (and a small payload) is encoded into scratch
    /// space; a bulk payload (a replicated write's data) is encrypted
    /// straight from the message into `out`, out of place: one pass over
    /// the data, where a copy into the record followed by encryption in
    /// place was two (the copy was most of what a record cost the sender).
    /// The ciphertext is the same either way. On error `out` is unchanged
    /// and no counter value is used up.
    pub fn seal(&mut self, msg: &Message, out: &mut RecordBuf) -> Result<(), ProtocolError> {
        seal_record(self.state.cipher()?, msg, out)?;
        self.state.next += 1;
        Ok(())
    }
}

/// Appends `msg` to `out` as one record sealed with `cipher` (see
/// [`Sealer::seal`]); on error `out` is unchanged.
fn seal_record(cipher: Cipher, msg: &Message, out: &mut RecordBuf) -> Result<(), ProtocolError> {
    let RecordBuf { mem, len, head } = out;
    head.clear();
    let bulk = frame::encode_split(msg, head)?;
    let data = bulk.as_deref().unwrap_or(&[]);
    // `encode_split` caps a frame at HEADER_LEN + MAX_PAYLOAD, so this fits.
    let record_len = head.len() + data.len() + TAG_LEN;
    let record = RecordBuf::claim(mem, len, RECORD_LEN_BYTES + record_len);
    let (aad, body) = record.split_at_mut(RECORD_LEN_BYTES);
    aad.copy_from_slice(&(record_len as u32).to_le_bytes());
    let (head_out, rest) = body.split_at_mut(head.len());
    let (data_out, tag_out) = rest.split_at_mut(data.len());
    let mut encryptor = cipher.encryptor(aad);
    encryptor.update(head, head_out);
    encryptor.update(data, data_out);
    tag_out.copy_from_slice(&encryptor.finalize());
    Ok(())
}

/// Seals records once for every connection they go out on.
///
/// A replicated write goes to each LAN peer. Sealed per connection, it cost
/// the sender one pass over the data per peer; sealed here, it costs one
/// pass in all, and every connection sends the same bytes. How it stays as
/// safe as a connection's own records:
///
/// * the key is drawn at random when the sealer is made and travels to a
///   peer inside that connection's own sealed records
///   ([`Message::SharedKey`]), just before the first record under it that
///   goes there, so only peers that were sent its records hold it. The
///   user replaces the sealer (a new key) whenever the set of peers may
///   have changed (vmsync: whenever a link comes up or goes down), so a
///   peer that left, or a connection keyed from a secret since replaced,
///   cannot read what follows;
/// * record counters come from one atomic counter, so a nonce is never used
///   twice under the key, whichever connections a record goes out on;
/// * a connection sends a shared record only right after one of its own
///   records that names its counter ([`Message::SharedNext`]): the peer
///   opens it under exactly that counter, so a shared record cannot be
///   replayed, dropped, reordered or moved to another connection without
///   failing authentication (the connection's own record is bound to the
///   connection and its place in it).
pub struct SharedSealer {
    key: Arc<SharedKey>,
    /// The counter of the next shared record.
    next: AtomicU64,
    /// Memory of records every connection has sent, for the next ones: a
    /// fresh buffer would have to be zero-filled before sealing into it (a
    /// pass over the data, as costly as the sealing).
    pool: Arc<RecordPool>,
}

/// A shared sealer's key, and an id that tells its records from another
/// sealer's without exposing it.
struct SharedKey {
    key: [u8; 32],
    id: u64,
}

/// Record memory for reuse: `Vec`s whose length is the memory they have
/// initialised, at most [`RecordPool::MAX_BYTES`] in all.
#[derive(Default)]
struct RecordPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl RecordPool {
    /// Memory kept for reuse, at most (a few 1 MiB writes in flight).
    const MAX_BYTES: usize = 8 << 20;

    fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    fn put(&self, mem: Vec<u8>) {
        let mut free = self.lock();
        let kept: usize = free.iter().map(Vec::len).sum();
        if kept + mem.len() <= Self::MAX_BYTES {
            free.push(mem);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The memory behind a [`SharedRecord`]'s bytes: back to the pool when the
/// last connection has sent them.
struct PooledRecord {
    mem: Vec<u8>,
    /// Bytes of the record (the rest of `mem` is initialised, unused).
    len: usize,
    pool: Weak<RecordPool>,
}

impl AsRef<[u8]> for PooledRecord {
    fn as_ref(&self) -> &[u8] {
        &self.mem[..self.len]
    }
}

impl Drop for PooledRecord {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(std::mem::take(&mut self.mem));
        }
    }
}

impl Default for SharedSealer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SharedSealer {
    /// Leaves the key out, so that logging cannot leak it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSealer").finish_non_exhaustive()
    }
}

impl SharedSealer {
    /// A sealer with a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let hash = blake3::keyed_hash(&key, b"vmsync shared record key id");
        let id = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        Self {
            key: Arc::new(SharedKey { key, id }),
            next: AtomicU64::new(0),
            pool: Arc::default(),
        }
    }

    /// Seals `msg` into a record of its own, for any number of connections.
    pub fn seal(&self, msg: &Message) -> Result<SharedRecord, ProtocolError> {
        // Counters run up and never wrap (that would reuse a nonce); one
        // that fails to seal is simply never sent.
        let counter = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| ProtocolError::CounterExhausted)?;
        let mut out = RecordBuf {
            mem: self.pool.take(),
            ..RecordBuf::default()
        };
        let sealed = seal_record(cipher(&self.key.key, counter)?, msg, &mut out);
        let record = PooledRecord {
            mem: out.mem,
            len: out.len,
            pool: Arc::downgrade(&self.pool),
        };
        sealed?;
        Ok(SharedRecord {
            key: Arc::clone(&self.key),
            counter,
            record: Bytes::from_owner(record),
        })
    }
}

/// One record sealed by a [`SharedSealer`]; cheap to clone (the bytes are
/// shared).
#[derive(Clone)]
pub struct SharedRecord {
    key: Arc<SharedKey>,
    counter: u64,
    record: Bytes,
}

impl fmt::Debug for SharedRecord {
    /// Leaves the key out, so that logging cannot leak it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRecord")
            .field("counter", &self.counter)
            .field("len", &self.record.len())
            .finish_non_exhaustive()
    }
}

impl SharedRecord {
    /// Tells the key this record was sealed under from other keys.
    pub fn key_id(&self) -> u64 {
        self.key.id
    }

    /// What a connection sends (sealed) before the first record under this
    /// record's key.
    pub fn announcement(&self) -> Message {
        Message::SharedKey {
            key: SecretKey(self.key.key),
        }
    }

    /// The record's counter, for the connection's [`Message::SharedNext`].
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The record as it goes on the wire.
    pub fn bytes(&self) -> &Bytes {
        &self.record
    }
}

/// A send buffer of sealed records.
///
/// Its memory stays initialised from flush to flush (a `Vec` that never
/// shrinks, with a length of its own), so [`Sealer::seal`] can encrypt a
/// payload straight into it without first zero-filling the space: only
/// memory the buffer has never used before is zeroed, once.
#[derive(Default)]
pub struct RecordBuf {
    /// Initialised memory; `mem.len()` is the most ever used.
    mem: Vec<u8>,
    /// Bytes of records in `mem`.
    len: usize,
    /// Scratch space for encoding a frame's header.
    head: BytesMut,
}

impl RecordBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// The records queued, in order.
    pub fn as_slice(&self) -> &[u8] {
        &self.mem[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the records (they were sent); keeps the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `n` bytes for the caller to overwrite and returns them.
    fn claim<'a>(mem: &'a mut Vec<u8>, len: &mut usize, n: usize) -> &'a mut [u8] {
        let start = *len;
        if mem.len() < start + n {
            mem.resize(start + n, 0);
        }
        *len = start + n;
        &mut mem[start..start + n]
    }
}

/// Opens the records of one direction of a connection.
pub struct Opener {
    state: Direction,
    /// The peer's key for shared records, once announced (the newest).
    shared_key: Option<[u8; 32]>,
    /// The counter of the next record, if the peer announced it as shared.
    shared_next: Option<u64>,
}

impl Opener {
    /// Opens one record from the front of a receive buffer, like
    /// [`crate::decode`] does for plain frames:
    ///
    /// * `Ok(Some(msg))`: one record was consumed, authenticated, and held
    ///   exactly one valid frame;
    /// * `Ok(None)`: only part of a record is buffered; nothing consumed
    ///   (capacity for the whole record is reserved once its length is in);
    /// * `Err(_)`: a bad length, a record that fails authentication
    ///   (tampered, injected, replayed, reordered, a plaintext frame, the
    ///   wrong key) or a malformed frame inside: close the connection.
    ///
    /// The records of shared sealing ([`Message::SharedKey`],
    /// [`Message::SharedNext`]) are consumed here, never returned: the
    /// message a shared record holds is returned like any other.
    ///
    /// Decryption happens in place in `buf`; decoded `Bytes` fields share
    /// its memory. Never panics and never reserves more than one record of
    /// [`RECORD_LEN_BYTES`]` + `[`MAX_RECORD_LEN`] bytes.
    pub fn open(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let msg = match self.shared_next {
                Some(counter) => {
                    let key = self.shared_key.as_ref().expect("checked at SharedNext");
                    let opened = open_record(|| cipher(key, counter), buf).map_err(|e| match e {
                        ProtocolError::Unauthenticated => ProtocolError::SharedUnauthenticated,
                        e => e,
                    });
                    let Some(msg) = opened? else {
                        return Ok(None);
                    };
                    self.shared_next = None;
                    if matches!(msg, Message::SharedKey { .. } | Message::SharedNext { .. }) {
                        return Err(ProtocolError::SharedRecordMisuse(
                            "a shared record holds a link message",
                        ));
                    }
                    return Ok(Some(msg));
                }
                None => {
                    let Some(msg) = open_record(|| self.state.cipher(), buf)? else {
                        return Ok(None);
                    };
                    self.state.next += 1;
                    msg
                }
            };
            match msg {
                // The first key, or a new one (the sender replaced its
                // sealer): records announced from now on are under it.
                Message::SharedKey { key } => self.shared_key = Some(key.0),
                Message::SharedNext { counter } => {
                    if self.shared_key.is_none() {
                        return Err(ProtocolError::SharedRecordMisuse(
                            "SharedNext before SharedKey",
                        ));
                    }
                    self.shared_next = Some(counter);
                }
                msg => return Ok(Some(msg)),
            }
        }
    }
}

/// Opens one record from the front of `buf` with the cipher `cipher` makes
/// once the whole record is buffered (see [`Opener::open`]).
fn open_record(
    cipher: impl FnOnce() -> Result<Cipher, ProtocolError>,
    buf: &mut BytesMut,
) -> Result<Option<Message>, ProtocolError> {
    let Some(raw_len) = buf.first_chunk::<RECORD_LEN_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*raw_len) as usize;
    if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(ProtocolError::BadRecordLength { len: len as u64 });
    }
    let total = RECORD_LEN_BYTES + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let cipher = cipher()?;
    let mut body = buf.split_to(total);
    let aad = body.split_to(RECORD_LEN_BYTES);
    // Ciphertext and tag; the ciphertext is opened in place.
    let tag: [u8; TAG_LEN] = body[len - TAG_LEN..]
        .try_into()
        .expect("the record length was checked to hold a tag");
    body.truncate(len - TAG_LEN);
    cipher
        .decrypt_in_place(&mut body, &tag, &aad)
        .map_err(|_| ProtocolError::Unauthenticated)?;
    // Authentic, so written by the peer's encoder; still checked as
    // strictly as any frame (one whole frame, nothing after it).
    match frame::decode(&mut body)? {
        Some(msg) if body.is_empty() => Ok(Some(msg)),
        _ => Err(ProtocolError::RecordNotOneFrame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};

    /// Sealing for tests that look at records as the receiver's buffer.
    trait SealBytes {
        fn seal_bytes(&mut self, msg: &Message, out: &mut BytesMut) -> Result<(), ProtocolError>;
    }

    impl SealBytes for Sealer {
        fn seal_bytes(&mut self, msg: &Message, out: &mut BytesMut) -> Result<(), ProtocolError> {
            let mut records = RecordBuf::new();
            self.seal(msg, &mut records)?;
            out.extend_from_slice(records.as_slice());
            Ok(())
        }
    }

    fn pair() -> (SessionKeys, SessionKeys) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (
            SessionKeys { send: a, recv: b },
            SessionKeys { send: b, recv: a },
        )
    }

    fn write(seq: u64, len: usize) -> Message {
        Message::Write {
            term: 1,
            epoch: 1,
            seq,
            offset: 4096 * seq,
            fua: false,
            data: Bytes::from(vec![seq as u8; len]),
        }
    }

    fn write_of(data: Bytes) -> Message {
        Message::Write {
            term: 1,
            epoch: 1,
            seq: 0,
            offset: 0,
            fua: false,
            data,
        }
    }

    /// Seals each message into a record of its own.
    fn seal_all(sealer: &mut Sealer, msgs: &[Message]) -> Vec<BytesMut> {
        msgs.iter()
            .map(|m| {
                let mut out = BytesMut::new();
                sealer.seal_bytes(m, &mut out).unwrap();
                out
            })
            .collect()
    }

    fn open_one(opener: &mut Opener, bytes: &[u8]) -> Result<Option<Message>, ProtocolError> {
        opener.open(&mut BytesMut::from(bytes))
    }

    #[test]
    fn records_round_trip_in_order_and_hide_the_frame() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let msgs = [
            Message::Ping,
            write(1, 4096),
            write(2, 1 << 20),
            Message::PingAck,
        ];
        let mut stream = BytesMut::new();
        for m in &msgs {
            seal.seal_bytes(m, &mut stream).unwrap();
        }
        // No frame magic and no payload byte pattern shows on the wire.
        assert!(!stream.windows(4).any(|w| w == b"VMSY"));
        assert!(!stream.windows(64).any(|w| w.iter().all(|&x| x == 2)));
        for m in &msgs {
            assert_eq!(open.open(&mut stream).unwrap().as_ref(), Some(m));
        }
        assert!(stream.is_empty());
        assert_eq!(open.open(&mut stream), Ok(None));
    }

    #[test]
    fn partial_records_consume_nothing() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let mut out = BytesMut::new();
        seal.seal_bytes(&Message::WriteAck { seq: 9 }, &mut out)
            .unwrap();
        for cut in 0..out.len() {
            let mut part = BytesMut::from(&out[..cut]);
            assert_eq!(open.open(&mut part), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
        assert_eq!(
            open_one(&mut open, &out),
            Ok(Some(Message::WriteAck { seq: 9 }))
        );
    }

    #[test]
    fn any_flipped_bit_fails_authentication() {
        let (a, _) = pair();
        let (mut seal, _) = a.split();
        let mut out = BytesMut::new();
        seal.seal_bytes(&write(3, 100), &mut out).unwrap();
        for i in 0..out.len() {
            let (_, b) = pair();
            let (_, mut open) = b.split();
            let mut bad = out.clone();
            bad[i] ^= 0x01;
            assert!(
                !matches!(open.open(&mut bad), Ok(Some(_))),
                "flip at byte {i} accepted"
            );
        }
    }

    #[test]
    fn replayed_records_fail() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let recs = seal_all(&mut seal, &[write(1, 10), write(2, 10)]);
        assert!(open_one(&mut open, &recs[0]).unwrap().is_some());
        assert_eq!(
            open_one(&mut open, &recs[0]),
            Err(ProtocolError::Unauthenticated)
        );
    }

    #[test]
    fn reordered_records_fail() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let recs = seal_all(&mut seal, &[write(1, 10), write(2, 10)]);
        assert_eq!(
            open_one(&mut open, &recs[1]),
            Err(ProtocolError::Unauthenticated)
        );
    }

    #[test]
    fn dropped_records_fail_the_next_one() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let recs = seal_all(&mut seal, &[Message::Ping, Message::Ping]);
        assert_eq!(
            open_one(&mut open, &recs[1]),
            Err(ProtocolError::Unauthenticated)
        );
    }

    #[test]
    fn the_wrong_direction_key_fails() {
        let (a, _) = pair();
        let (mut seal, mut own_open) = a.split();
        let mut out = BytesMut::new();
        seal.seal_bytes(&Message::Ping, &mut out).unwrap();
        // Our own record reflected back to us.
        assert_eq!(
            open_one(&mut own_open, &out),
            Err(ProtocolError::Unauthenticated)
        );
        // Another connection's keys.
        let other = SessionKeys {
            send: [3; 32],
            recv: [7; 32],
        };
        let (_, mut open) = other.split();
        assert_eq!(
            open_one(&mut open, &out),
            Err(ProtocolError::Unauthenticated)
        );
    }

    #[test]
    fn plaintext_and_injected_records_are_refused() {
        let (_, b) = pair();
        let (_, mut open) = b.split();
        // A plain frame: its magic read as a length is far too large.
        let plain = crate::encode_to_bytes(&Message::Ping).unwrap();
        assert!(matches!(
            open_one(&mut open, &plain),
            Err(ProtocolError::BadRecordLength { .. })
        ));
        // A record of plausible length but made up.
        let mut fake = BytesMut::new();
        fake.put_u32_le(40);
        fake.put_slice(&[0x55; 40]);
        assert_eq!(
            open_one(&mut open, &fake),
            Err(ProtocolError::Unauthenticated)
        );
        // Too short to hold a tag, and oversized: refused from the length.
        for len in [0u32, 27, MAX_RECORD_LEN as u32 + 1, u32::MAX] {
            let mut bad = BytesMut::new();
            bad.put_u32_le(len);
            let cap = bad.capacity();
            assert!(matches!(
                open.open(&mut bad),
                Err(ProtocolError::BadRecordLength { .. })
            ));
            assert_eq!(bad.capacity(), cap, "reserved for a rejected record");
        }
    }

    #[test]
    fn an_exhausted_counter_refuses_to_seal_or_open() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        seal.state.next = u64::MAX - 1;
        open.state.next = u64::MAX - 1;
        let mut out = BytesMut::new();
        seal.seal_bytes(&Message::Ping, &mut out).unwrap();
        assert_eq!(open.open(&mut out.clone()), Ok(Some(Message::Ping)));
        let before = out.len();
        assert_eq!(
            seal.seal_bytes(&Message::Ping, &mut out),
            Err(ProtocolError::CounterExhausted)
        );
        assert_eq!(out.len(), before);
        assert_eq!(
            open_one(&mut open, &out),
            Err(ProtocolError::CounterExhausted)
        );
    }

    #[test]
    fn an_invalid_message_leaves_the_buffer_and_counter_alone() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let mut out = BytesMut::from(&b"kept"[..]);
        let bad = Message::ReadReply {
            id: 1,
            offset: 0,
            data: Bytes::from(vec![0; crate::MAX_DATA_LEN + 1]),
        };
        assert!(seal.seal_bytes(&bad, &mut out).is_err());
        assert_eq!(&out[..], b"kept");
        let mut out = BytesMut::new();
        seal.seal_bytes(&Message::Ping, &mut out).unwrap();
        assert_eq!(open.open(&mut out), Ok(Some(Message::Ping)));
    }

    #[test]
    fn the_largest_frame_fits_in_a_record() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let msg = write(7, crate::MAX_DATA_LEN);
        let mut out = BytesMut::new();
        seal.seal_bytes(&msg, &mut out).unwrap();
        assert!(out.len() - RECORD_LEN_BYTES <= MAX_RECORD_LEN);
        assert_eq!(open.open(&mut out), Ok(Some(msg)));
    }

    /// One direction of a connection, for shared records.
    struct Conn {
        seal: Sealer,
        open: Opener,
        wire: BytesMut,
        /// The id of the shared key last announced on it.
        announced: Option<u64>,
    }

    impl Conn {
        /// A connection with keys of its own (`k` tells them apart).
        fn new(k: u8) -> Self {
            let keys = SessionKeys {
                send: [10 + k; 32],
                recv: [20 + k; 32],
            };
            let (seal, _) = keys.split();
            let (_, open) = SessionKeys {
                send: keys.recv,
                recv: keys.send,
            }
            .split();
            Conn {
                seal,
                open,
                wire: BytesMut::new(),
                announced: None,
            }
        }

        /// What `FrameWriter::queue_shared` sends for `record`: the key
        /// when it is new here, its own `SharedNext`, the shared bytes.
        fn send_shared(&mut self, record: &SharedRecord) {
            if self.announced != Some(record.key_id()) {
                self.send(&record.announcement());
                self.announced = Some(record.key_id());
            }
            self.send(&Message::SharedNext {
                counter: record.counter(),
            });
            self.wire.extend_from_slice(record.bytes());
        }

        fn send(&mut self, msg: &Message) {
            self.seal.seal_bytes(msg, &mut self.wire).unwrap();
        }

        fn open_all(&mut self) -> Result<Vec<Message>, ProtocolError> {
            let mut got = Vec::new();
            while let Some(m) = self.open.open(&mut self.wire)? {
                got.push(m);
            }
            assert!(self.wire.is_empty());
            Ok(got)
        }
    }

    #[test]
    fn a_shared_record_opens_on_every_connection() {
        let shared = SharedSealer::new();
        let msgs = [write(1, 64 * 1024), write(2, 1 << 20)];
        let records: Vec<SharedRecord> = msgs.iter().map(|m| shared.seal(m).unwrap()).collect();
        for k in 0..2 {
            let mut conn = Conn::new(k);
            // Shared records between the connection's own.
            conn.send(&Message::Ping);
            conn.send_shared(&records[0]);
            conn.send_shared(&records[1]);
            conn.send(&Message::PingAck);
            // Byte by byte: nothing opens early, and the link messages
            // never come out.
            let wire = std::mem::take(&mut conn.wire);
            let mut got = Vec::new();
            for &b in wire.iter() {
                conn.wire.put_u8(b);
                while let Some(m) = conn.open.open(&mut conn.wire).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(
                got,
                [
                    Message::Ping,
                    msgs[0].clone(),
                    msgs[1].clone(),
                    Message::PingAck
                ]
            );
        }
    }

    /// The sender replaces its sealer (a new key); the connection announces
    /// the new key before the first record under it.
    #[test]
    fn a_new_shared_key_replaces_the_old_one() {
        let (old, new) = (SharedSealer::new(), SharedSealer::new());
        let msgs = [write(1, 100), write(2, 200), write(3, 300)];
        let mut conn = Conn::new(0);
        conn.send_shared(&old.seal(&msgs[0]).unwrap());
        conn.send_shared(&new.seal(&msgs[1]).unwrap());
        conn.send_shared(&new.seal(&msgs[2]).unwrap());
        assert_eq!(conn.open_all().unwrap(), msgs);
    }

    /// A record's memory goes back to the sealer once sent, still holding
    /// the old ciphertext: the next record sealed into it is whole.
    #[test]
    fn a_shared_record_sealed_into_reused_memory_opens() {
        let shared = SharedSealer::new();
        drop(shared.seal(&write(1, 1 << 20)).unwrap());
        let msg = write(2, 20 * 1024);
        let record = shared.seal(&msg).unwrap();
        assert_eq!(shared.pool.lock().len(), 0, "the memory was reused");
        assert_eq!(
            record.bytes().len(),
            RECORD_LEN_BYTES + HEADER_LEN + 37 + 20 * 1024 + TAG_LEN
        );
        let mut conn = Conn::new(0);
        conn.send_shared(&record);
        assert_eq!(conn.open_all().unwrap(), [msg]);
        drop(record);
        assert_eq!(shared.pool.lock().len(), 1, "back in the pool");
    }

    #[test]
    fn shared_records_cannot_be_swapped_replayed_or_moved() {
        let shared = SharedSealer::new();
        let a = shared.seal(&write(1, 100)).unwrap();
        let b = shared.seal(&write(2, 100)).unwrap();
        // Announced as `a`, but `b` follows.
        let mut conn = Conn::new(0);
        conn.send(&a.announcement());
        conn.send(&Message::SharedNext {
            counter: a.counter(),
        });
        conn.wire.extend_from_slice(b.bytes());
        assert_eq!(conn.open_all(), Err(ProtocolError::SharedUnauthenticated));
        // `a` again where the sender announced the next one (a replay).
        let mut conn = Conn::new(1);
        conn.send_shared(&a);
        conn.send(&Message::SharedNext {
            counter: b.counter(),
        });
        conn.wire.extend_from_slice(a.bytes());
        assert_eq!(conn.open_all(), Err(ProtocolError::SharedUnauthenticated));
        // A shared record without its announcement is read as one of the
        // connection's own, and fails.
        let mut conn = Conn::new(0);
        conn.wire.extend_from_slice(a.bytes());
        assert_eq!(conn.open_all(), Err(ProtocolError::Unauthenticated));
        // A record of a key the connection never announced.
        let stranger = SharedSealer::new().seal(&write(3, 100)).unwrap();
        let mut conn = Conn::new(0);
        conn.send(&a.announcement());
        conn.send(&Message::SharedNext {
            counter: stranger.counter(),
        });
        conn.wire.extend_from_slice(stranger.bytes());
        assert_eq!(conn.open_all(), Err(ProtocolError::SharedUnauthenticated));
    }

    #[test]
    fn shared_records_out_of_order_are_refused() {
        let shared = SharedSealer::new();
        // SharedNext before any SharedKey.
        let mut conn = Conn::new(0);
        conn.send(&Message::SharedNext { counter: 0 });
        assert!(matches!(
            conn.open_all(),
            Err(ProtocolError::SharedRecordMisuse(_))
        ));
        // A shared record that holds a link message.
        let mut conn = Conn::new(0);
        conn.send_shared(&shared.seal(&Message::SharedNext { counter: 7 }).unwrap());
        assert!(matches!(
            conn.open_all(),
            Err(ProtocolError::SharedRecordMisuse(_))
        ));
    }

    /// Counters (nonces under the one key) are never reused, not even
    /// past the last one.
    #[test]
    fn every_shared_record_has_a_counter_of_its_own() {
        let shared = SharedSealer::new();
        let counters: Vec<u64> = (0..5)
            .map(|i| shared.seal(&write(i, 10)).unwrap().counter())
            .collect();
        assert_eq!(counters, [0, 1, 2, 3, 4]);
        shared.next.store(u64::MAX - 1, Ordering::Relaxed);
        assert_eq!(shared.seal(&Message::Ping).unwrap().counter(), u64::MAX - 1);
        for _ in 0..2 {
            assert_eq!(
                shared.seal(&Message::Ping).unwrap_err(),
                ProtocolError::CounterExhausted
            );
        }
    }

    /// A record is the whole encoded frame encrypted in one piece, however
    /// the sealer gets there (the payload encrypted out of place into a
    /// reused buffer whose old bytes are still there): the receiver, and
    /// older senders, see the same bytes.
    #[test]
    fn records_are_the_encrypted_frame_in_a_reused_buffer() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        let mut records = RecordBuf::new();
        // Fill the buffer with a large record, then reuse its memory.
        seal.seal(&write(1, 1 << 20), &mut records).unwrap();
        records.clear();
        let msgs = [write(2, 100), write(3, 64 * 1024), Message::Ping];
        for m in &msgs {
            seal.seal(m, &mut records).unwrap();
        }
        let mut expected = BytesMut::new();
        for (counter, m) in (1u64..).zip(&msgs) {
            let mut frame = BytesMut::new();
            frame::encode(m, &mut frame).unwrap();
            let len = (frame.len() + TAG_LEN) as u32;
            let mut nonce = [0u8; 32];
            nonce[24..].copy_from_slice(&counter.to_be_bytes());
            let tag =
                Cipher::new(&[1u8; 32], &nonce).encrypt_in_place(&mut frame, &len.to_le_bytes());
            expected.put_u32_le(len);
            expected.extend_from_slice(&frame);
            expected.extend_from_slice(&tag);
        }
        assert_eq!(records.as_slice(), &expected[..]);
        // The cleared 1 MiB record (counter 0) was never sent.
        open.state.next = 1;
        let mut wire = BytesMut::from(records.as_slice());
        for m in &msgs {
            assert_eq!(open.open(&mut wire).unwrap().as_ref(), Some(m));
        }
    }

    #[test]
    fn a_failed_seal_leaves_the_record_buffer_alone() {
        let (a, _) = pair();
        let (mut seal, _) = a.split();
        let mut records = RecordBuf::new();
        seal.seal(&Message::Ping, &mut records).unwrap();
        let before = records.as_slice().to_vec();
        let bad = Message::ReadReply {
            id: 1,
            offset: 0,
            data: Bytes::from(vec![0; crate::MAX_DATA_LEN + 1]),
        };
        assert!(seal.seal(&bad, &mut records).is_err());
        assert_eq!(records.as_slice(), &before[..]);
    }

    /// Throughput of sealing and opening 1 MiB writes (run with
    /// `cargo test --release -p protocol -- --ignored --nocapture seal_speed`),
    /// with the way records were sealed before as the baseline in the same
    /// run: the frame encoded into the buffer (a copy of the payload), then
    /// encrypted there in place. The payloads rotate through 64 MiB, more
    /// than the caches hold, as a guest's writes do.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn seal_speed() {
        let (a, b) = pair();
        let (mut seal, _) = a.split();
        let (_, mut open) = b.split();
        // Seals the extra measurement, so `seal`'s records stay in step
        // with `open`.
        let (mut other_seal, _) = pair().0.split();
        let mut other_records = RecordBuf::new();
        let msgs: Vec<Message> = (0..64).map(|i| write(i, 1 << 20)).collect();
        let rounds = 1024;
        let mut records = RecordBuf::new();
        let mut copied = BytesMut::new();
        // copy + in place, out of place, open, out of place of a payload just copied
        let mut time = [std::time::Duration::ZERO; 4];
        // Each way goes first in every other round: the second finds the
        // payload in the cache.
        for round in 0..rounds {
            let msg = &msgs[round % msgs.len()];
            for way in [round % 2, 1 - round % 2] {
                let t = std::time::Instant::now();
                if way == 0 {
                    copied.clear();
                    frame::encode(msg, &mut copied).unwrap();
                    let key = [9; 32];
                    std::hint::black_box(
                        Cipher::new(&key, &[0; 32]).encrypt_in_place(&mut copied, &[0; 4]),
                    );
                } else {
                    records.clear();
                    seal.seal(msg, &mut records).unwrap();
                }
                time[way] += t.elapsed();
            }
            // The state a received write is in when sealed at once: just
            // copied (as a socket read or the ublk driver copies) from
            // memory that is cold.
            let cold = &msgs[(round + msgs.len() / 2) % msgs.len()];
            let just_copied = match cold {
                Message::Write { data, .. } => write_of(Bytes::from(data.to_vec())),
                _ => unreachable!(),
            };
            let t = std::time::Instant::now();
            other_seal.seal(&just_copied, &mut other_records).unwrap();
            time[3] += t.elapsed();
            other_records.clear();
            let mut wire = BytesMut::from(records.as_slice());
            let t = std::time::Instant::now();
            assert!(open.open(&mut wire).unwrap().is_some());
            time[2] += t.elapsed();
        }
        let per_mib = |d: std::time::Duration| d.as_secs_f64() * 1e6 / rounds as f64;
        eprintln!(
            "seal: copy + in place {:.0} µs per MiB (baseline), out of place {:.0} µs per MiB (ratio {:.2}); open {:.0} µs per MiB; out of place, the payload just copied from cold memory (hot) {:.0} µs per MiB",
            per_mib(time[0]),
            per_mib(time[1]),
            per_mib(time[1]) / per_mib(time[0]),
            per_mib(time[2]),
            per_mib(time[3]),
        );
    }
}
