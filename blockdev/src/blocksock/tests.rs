use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Barrier};
use tokio::task::JoinHandle;

use super::*;
use crate::device::BlockDevice;
use crate::{BackingOptions, BackingStore};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(10);

/// A server on a temporary socket; dropping `stop` (or sending) shuts it down.
struct Server {
    _dir: TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    fn start<D: BlockDevice>(device: Arc<D>) -> Server {
        Server::start_in(TempDir::new().unwrap(), device)
    }

    /// Serves `device` from a socket in `dir`, which lives as long as the server.
    fn start_in<D: BlockDevice>(dir: TempDir, device: Arc<D>) -> Server {
        let socket = dir.path().join("blk.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, device, stopped));
        Server {
            _dir: dir,
            socket,
            stop: Some(stop),
            task,
        }
    }

    /// Serves a file-backed [`BackingStore`] of `size` bytes.
    fn with_backing(size: u64) -> Server {
        let dir = TempDir::new().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let store = BackingStore::open(&image, size, BackingOptions::default()).unwrap();
        Server::start_in(dir, Arc::new(store))
    }

    async fn client(&self) -> BlockClient {
        BlockClient::connect(&self.socket).await.unwrap()
    }

    async fn shutdown(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn every_op_round_trips() {
    let server = Server::with_backing(4 * MIB);
    let client = server.client().await;

    client.write(0, pattern(1, 64 * 1024), false).await.unwrap();
    client
        .write(MIB, Bytes::copy_from_slice(&pattern(2, 4096)), true)
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        client.read(0, 64 * 1024).await.unwrap(),
        pattern(1, 64 * 1024)
    );
    assert_eq!(client.read(MIB, 4096).await.unwrap(), pattern(2, 4096));
    assert_eq!(client.read(0, 0).await.unwrap(), Vec::<u8>::new());

    client.discard(4096, 8192).await.unwrap();
    let after = client.read(0, 16384).await.unwrap();
    assert_eq!(&after[..4096], &pattern(1, 4096)[..]);
    assert!(after[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&after[12288..], &pattern(1, 16384)[12288..]);

    client.write_zeroes(MIB, 4096).await.unwrap();
    assert_eq!(client.read(MIB, 4096).await.unwrap(), vec![0u8; 4096]);

    // Device errors come back as the device's errno, and cost nothing else.
    let beyond = client.read(4 * MIB, 4096).await.unwrap_err();
    assert_eq!(beyond.raw_os_error(), Some(libc::EINVAL));
    let unaligned = client.write(1, vec![0u8; 512], false).await.unwrap_err();
    assert_eq!(unaligned.raw_os_error(), Some(libc::EINVAL));
    // Too large for the wire: refused before anything is sent.
    let huge = client.read(0, MAX_IO_BYTES as usize + 1).await.unwrap_err();
    assert_eq!(huge.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(client.read(0, 4096).await.unwrap(), pattern(1, 4096));

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_then_reads_on_one_connection() {
    const N: u64 = 64;
    const LEN: usize = 32 * 1024;
    let server = Server::with_backing(4 * MIB);
    let client = server.client().await;

    let writes: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .write(i * LEN as u64, pattern(i as u8, LEN), i.is_multiple_of(7))
                    .await
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap().unwrap();
    }
    let reads: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, client.read(i * LEN as u64, LEN).await) })
        })
        .collect();
    for r in reads {
        let (i, data) = r.await.unwrap();
        assert_eq!(data.unwrap(), pattern(i as u8, LEN), "block {i}");
    }
    server.shutdown().await;
}

/// A device whose flushes complete only once `parties` of them are running
/// at the same time: it deadlocks unless the server runs requests on one
/// connection concurrently.
struct Rendezvous {
    barrier: Barrier,
    /// Flushes that reached the device.
    arrived: AtomicUsize,
}

impl Rendezvous {
    fn new(parties: usize) -> Self {
        Rendezvous {
            barrier: Barrier::new(parties),
            arrived: AtomicUsize::new(0),
        }
    }
}

impl BlockDevice for Rendezvous {
    fn size(&self) -> u64 {
        MIB
    }
    async fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Ok(())
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> io::Result<()> {
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.barrier.wait().await;
        Ok(())
    }
    async fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn requests_on_one_connection_run_concurrently() {
    const PARTIES: usize = 32;
    let server = Server::start(Arc::new(Rendezvous::new(PARTIES)));
    let client = server.client().await;
    let flushes: Vec<_> = (0..PARTIES)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.flush().await })
        })
        .collect();
    for f in flushes {
        tokio::time::timeout(DEADLINE, f)
            .await
            .expect("requests were serialised")
            .unwrap()
            .unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let server = Server::with_backing(MIB);
    let good = server.client().await;
    good.write(0, pattern(5, 4096), false).await.unwrap();

    let mut raw = UnixStream::connect(&server.socket).await.unwrap();
    raw.write_all(b"this is not a block socket request at all")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the server answered garbage instead of closing");

    // A header that claims an absurd payload is refused before any allocation.
    let mut raw = UnixStream::connect(&server.socket).await.unwrap();
    let mut header = wire::RequestHeader {
        op: wire::Op::Write,
        tag: 1,
        offset: 0,
        len: 0,
    }
    .encode();
    header[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.write_all(&header).await.unwrap();
    let n = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);

    // The existing connection and new ones are unaffected.
    assert_eq!(good.read(0, 4096).await.unwrap(), pattern(5, 4096));
    let fresh = server.client().await;
    assert_eq!(fresh.read(0, 4096).await.unwrap(), pattern(5, 4096));
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_answers_started_requests_and_fails_later_ones() {
    let device = Arc::new(Rendezvous::new(2));
    let server = Server::start(Arc::clone(&device));
    let client = server.client().await;
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.flush().await }
    });
    // Let the first flush reach the device, where it waits for a partner.
    while device.arrived.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Server { stop, mut task, .. } = server;
    drop(stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !task.is_finished(),
        "serve returned while a request was still running"
    );
    // Release the started flush from outside the socket.
    tokio::time::timeout(DEADLINE, device.flush())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(DEADLINE, &mut task)
        .await
        .unwrap()
        .unwrap();
    first.await.unwrap().unwrap();
    let late = client.flush().await.unwrap_err();
    assert_eq!(late.kind(), io::ErrorKind::ConnectionAborted);
}
