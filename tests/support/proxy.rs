//! A TCP proxy on loopback that a test can cut and heal, to break a link
//! between two real daemons without touching either process — or arm to
//! tamper with one protected record of an established link (an attacker on
//! the wire: [`Tamper`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub listen: SocketAddr,
    open: Arc<AtomicBool>,
    paused: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    tamper: Arc<Armed>,
    /// Bytes forwarded, both directions together.
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// What the proxy does to one protected record of an established link, in
/// the dialer-to-acceptor direction (the primary's writes), once armed with
/// [`Proxy::tamper`]. The proxy knows the framing: the dialer's three plain
/// handshake frames, then length-prefixed records; it does not know the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Flip one byte in the middle of the record.
    Flip,
    /// Insert a made-up record of plausible length before it.
    InjectRecord,
    /// Insert a plaintext frame (a Ping) before it.
    InjectPlain,
    /// Forward it, then forward it again.
    Replay,
    /// Hold it back and forward the next record first.
    Reorder,
}

/// The armed tamper, taken by the first record that qualifies, and how
/// many tampers were carried out.
#[derive(Default)]
struct Armed {
    next: Mutex<Option<(Tamper, usize)>>,
    done: AtomicU64,
}

impl Proxy {
    /// Forwards connections to `target` from a loopback port of its own,
    /// `listen` (call inside a runtime). The kernel picks the port while the
    /// proxy binds it, so no other test can take it in between.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let listen = listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (paused, _) = watch::channel(false);
        let tamper = Arc::new(Armed::default());
        let bytes = Arc::new(AtomicU64::new(0));
        let (accept_open, accept_gen, accept_paused, accept_tamper, accept_bytes) = (
            Arc::clone(&open),
            generation.clone(),
            paused.clone(),
            Arc::clone(&tamper),
            Arc::clone(&bytes),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !accept_open.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let mut cut = accept_gen.subscribe();
                let (up, down) = (accept_paused.subscribe(), accept_paused.subscribe());
                let tamper = Arc::clone(&accept_tamper);
                let (up_bytes, down_bytes) = (Arc::clone(&accept_bytes), Arc::clone(&accept_bytes));
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = forward_records(cr, sw, up, tamper, up_bytes) => {}
                        _ = forward(sr, cw, down, down_bytes) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            listen,
            open,
            paused,
            generation,
            tamper,
            bytes,
            task,
        }
    }

    /// Bytes forwarded so far, both directions together (what crossed
    /// the link this proxy stands for).
    pub fn forwarded(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Arms `what` for the next record of at least `min_len` bytes that a
    /// dialer sends after its handshake (`min_len` picks the data
    /// connection's writes over the meta connection's small messages).
    pub fn tamper(&self, what: Tamper, min_len: usize) {
        *self.tamper.next.lock().unwrap() = Some((what, min_len));
    }

    /// How many armed tampers have been carried out.
    pub fn tampered(&self) -> u64 {
        self.tamper.done.load(Ordering::Acquire)
    }

    /// Stops forwarding bytes (connections stay open): a peer that is alive
    /// but does not keep up.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.open.store(true, Ordering::Release);
    }
}

/// Copies one direction, holding data back while paused.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    counted: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counted.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// Frames a dialer sends in the clear: Hello, AuthResponse, AuthOk.
const PLAIN_HANDSHAKE_FRAMES: usize = 3;

/// Like [`forward`], but unit by unit (plain handshake frames, then
/// records), so that an armed [`Tamper`] can act on a whole record.
async fn forward_records(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    armed: Arc<Armed>,
    counted: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending: Vec<u8> = Vec::new();
    let mut plain_left = PLAIN_HANDSHAKE_FRAMES;
    // A record held back by `Tamper::Reorder`.
    let mut held: Option<Vec<u8>> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let mut out = Vec::new();
        loop {
            // A plain frame's length sits at offset 8 of its 12-byte header;
            // a record's is its first 4 bytes.
            let (len_at, head) = if plain_left > 0 { (8, 12) } else { (0, 4) };
            let Some(raw) = pending.get(len_at..len_at + 4) else {
                break;
            };
            let unit = head + u32::from_le_bytes(raw.try_into().unwrap()) as usize;
            if pending.len() < unit {
                break;
            }
            let mut record: Vec<u8> = pending.drain(..unit).collect();
            if plain_left > 0 {
                plain_left -= 1;
                out.extend_from_slice(&record);
                continue;
            }
            if let Some(first) = held.take() {
                out.extend_from_slice(&record);
                out.extend_from_slice(&first);
                armed.done.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            let what = {
                let mut next = armed.next.lock().unwrap();
                match *next {
                    Some((what, min_len)) if record.len() >= min_len => {
                        *next = None;
                        Some(what)
                    }
                    _ => None,
                }
            };
            match what {
                None => out.extend_from_slice(&record),
                Some(Tamper::Reorder) => held = Some(record),
                Some(what) => {
                    match what {
                        Tamper::Flip => {
                            let mid = record.len() / 2;
                            record[mid] ^= 0x40;
                            out.extend_from_slice(&record);
                        }
                        Tamper::InjectRecord => {
                            let fake = 4096u32;
                            out.extend_from_slice(&fake.to_le_bytes());
                            out.extend((0..fake).map(|i| (i * 7 + 3) as u8));
                            out.extend_from_slice(&record);
                        }
                        Tamper::InjectPlain => {
                            let ping = protocol::encode_to_bytes(&protocol::Message::Ping)
                                .expect("encode a ping");
                            out.extend_from_slice(&ping);
                            out.extend_from_slice(&record);
                        }
                        Tamper::Replay => {
                            out.extend_from_slice(&record);
                            out.extend_from_slice(&record);
                        }
                        Tamper::Reorder => unreachable!("handled above"),
                    }
                    armed.done.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            return;
        }
        counted.fetch_add(out.len() as u64, Ordering::AcqRel);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
