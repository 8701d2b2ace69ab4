//! The workload generator, its model and the block socket, checked against
//! a plain backing store in-process (no daemon): if this fails, multi-node
//! tests built on the same pieces cannot be trusted.

mod support;

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blockdev::blocksock::{serve, BlockClient};
use blockdev::{BackingOptions, BackingStore, BlockDevice};
use bytes::Bytes;
use support::workload::{self, Model, Op, Workload};
use support::{blake3_of_device_via_client, blake3_of_file};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

const SIZE: u64 = 64 << 20;
const SEED: u64 = 0x5eed_0001;
const OPS: usize = 3000;
const QD: usize = 16;

/// Wraps a device and records what the workload's correctness rests on:
/// that no two overlapping ops were ever in flight together, and that ops
/// did run concurrently (the queue depth was real).
struct OverlapCheck<D> {
    inner: D,
    state: Mutex<CheckState>,
}

#[derive(Default)]
struct CheckState {
    in_flight: Vec<Range<u64>>,
    max_in_flight: usize,
    overlaps: usize,
}

impl<D: BlockDevice> OverlapCheck<D> {
    async fn tracked<T>(&self, range: Range<u64>, io: impl std::future::Future<Output = T>) -> T {
        {
            let mut state = self.state.lock().unwrap();
            if state
                .in_flight
                .iter()
                .any(|r| r.start < range.end && range.start < r.end)
            {
                state.overlaps += 1;
            }
            state.in_flight.push(range.clone());
            state.max_in_flight = state.max_in_flight.max(state.in_flight.len());
        }
        let result = io.await;
        let mut state = self.state.lock().unwrap();
        let at = state.in_flight.iter().position(|r| *r == range).unwrap();
        state.in_flight.swap_remove(at);
        result
    }
}

impl<D: BlockDevice> BlockDevice for OverlapCheck<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let range = offset..offset + data.len() as u64;
        self.tracked(range, self.inner.write(offset, data, fua))
            .await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.tracked(offset..offset + len, self.inner.discard(offset, len))
            .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.tracked(offset..offset + len, self.inner.write_zeroes(offset, len))
            .await
    }
}

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("image");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_over_block_socket_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let store = BackingStore::open(&image, SIZE, BackingOptions::default()).unwrap();
    let device = Arc::new(OverlapCheck {
        inner: store,
        state: Mutex::default(),
    });
    let socket = dir.path().join("blk.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        UnixListener::bind(&socket).unwrap(),
        Arc::clone(&device),
        stopped,
    ));

    let client = BlockClient::connect(&socket).await.unwrap();
    let ops = Workload::new(SEED, SIZE).ops(OPS);
    let model = workload::run(&client, &ops, QD, Model::zeroed(SIZE))
        .await
        .unwrap();

    let expected = model.blake3();
    assert_eq!(
        blake3_of_device_via_client(&client, SIZE).await.unwrap(),
        expected
    );
    drop(client);
    drop(stop);
    server.await.unwrap();
    assert_eq!(blake3_of_file(&image, SIZE), expected);

    let state = device.state.lock().unwrap();
    assert_eq!(state.overlaps, 0, "overlapping ops were in flight together");
    assert!(
        state.max_in_flight > 1,
        "the workload never ran ops concurrently"
    );
    assert_ne!(expected, Model::zeroed(SIZE).blake3());
}

#[test]
fn workload_is_deterministic_and_mixed() {
    let ops = Workload::new(SEED, SIZE).ops(OPS);
    assert_eq!(
        ops,
        Workload::new(SEED, SIZE).ops(OPS),
        "same seed, different ops"
    );
    assert_ne!(ops, Workload::new(SEED + 1, SIZE).ops(OPS));

    let count = |pred: fn(&Op) -> bool| ops.iter().filter(|op| pred(op)).count();
    assert!(count(|op| matches!(op, Op::Flush)) >= OPS / 64);
    assert!(count(|op| matches!(op, Op::Write { fua: true, .. })) > 0);
    assert!(count(|op| matches!(op, Op::Write { fua: false, .. })) > OPS / 2);
    assert!(count(|op| matches!(op, Op::Discard { .. })) > 0);
    assert!(count(|op| matches!(op, Op::WriteZeroes { .. })) > 0);
    let write_lens: Vec<u64> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Write { len, .. } => Some(*len),
            _ => None,
        })
        .collect();
    assert!(write_lens
        .iter()
        .all(|&l| l.is_multiple_of(4096) && (4096..=256 * 1024).contains(&l)));
    assert!(write_lens.contains(&4096) && write_lens.contains(&(256 * 1024)));
    for op in &ops {
        if let Some(r) = op.range() {
            assert!(r.start.is_multiple_of(4096) && r.end <= SIZE, "{op:?}");
        }
    }
    // Neighbouring ops overlap often enough to exercise the serialisation.
    let overlapping = ops
        .windows(2 * QD)
        .filter(|w| {
            let first = w[0].range();
            w[1..].iter().any(|op| match (&first, op.range()) {
                (Some(a), Some(b)) => a.start < b.end && b.start < a.end,
                _ => false,
            })
        })
        .count();
    assert!(
        overlapping > OPS / 20,
        "only {overlapping} windows with overlapping ops"
    );
}
