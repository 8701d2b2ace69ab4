//! A TCP proxy on loopback that a test can cut and heal, to break a link
//! between two real daemons without touching either process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub listen: SocketAddr,
    open: Arc<AtomicBool>,
    paused: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
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
        let (accept_open, accept_gen, accept_paused) =
            (Arc::clone(&open), generation.clone(), paused.clone());
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
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = forward(cr, sw, up) => {}
                        _ = forward(sr, cw, down) => {}
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
            task,
        }
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
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
