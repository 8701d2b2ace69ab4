//! Tests of the fetch layer over a real backing file, with a test source that
//! serves a "remote" image (the newest data) and counts what it is asked.

use super::*;
use crate::device::errno_of;
use crate::{BackingOptions, BackingStore};
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use tempfile::NamedTempFile;
use tokio::sync::Semaphore;

const BS: u64 = 4096;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i / 4096) as u8))
        .collect()
}

/// Stands in for the remote holders: serves `image`, counts requests.
struct Remote {
    image: Vec<u8>,
    /// Requests that covered each block.
    per_block: Vec<AtomicU32>,
    requests: Mutex<Vec<(u64, u64)>>,
    data_replies: AtomicU64,
    same_replies: AtomicU64,
    delay: Mutex<Option<(Duration, Duration)>>,
    fail: AtomicBool,
    /// When set, every fetch needs a permit first (holds fetches).
    gate: Option<Semaphore>,
}

impl Remote {
    fn new(image: Vec<u8>) -> Self {
        let blocks = image.len() as u64 / BS;
        Remote {
            image,
            per_block: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            requests: Mutex::new(Vec::new()),
            data_replies: AtomicU64::new(0),
            same_replies: AtomicU64::new(0),
            delay: Mutex::new(None),
            fail: AtomicBool::new(false),
            gate: None,
        }
    }

    fn count(&self, block: u64) -> u32 {
        self.per_block[block as usize].load(SeqCst)
    }

    fn requests(&self) -> Vec<(u64, u64)> {
        lock(&self.requests).clone()
    }

    fn max_per_block(&self) -> u32 {
        self.per_block.iter().map(|c| c.load(SeqCst)).max().unwrap()
    }
}

impl BlockSource for Remote {
    fn fetch(
        &self,
        offset: u64,
        len: u64,
        local_hash: Option<[u8; 32]>,
    ) -> BoxFuture<'_, io::Result<Fetched>> {
        Box::pin(async move {
            assert!(offset.is_multiple_of(BS) && len > 0 && len <= MAX_SOURCE_REQUEST);
            lock(&self.requests).push((offset, len));
            for b in offset / BS..(offset + len).div_ceil(BS) {
                self.per_block[b as usize].fetch_add(1, SeqCst);
            }
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let delay = *lock(&self.delay);
            if let Some((min, max)) = delay {
                let d = rand::thread_rng().gen_range(min..=max);
                tokio::time::sleep(d).await;
            }
            if self.fail.load(SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let data = &self.image[offset as usize..(offset + len) as usize];
            if local_hash == Some(*blake3::hash(data).as_bytes()) {
                self.same_replies.fetch_add(1, SeqCst);
                return Ok(Fetched::Same);
            }
            self.data_replies.fetch_add(1, SeqCst);
            Ok(Fetched::Data(Bytes::copy_from_slice(data)))
        })
    }
}

/// Records every write reaching the local store.
struct Counting {
    store: BackingStore,
    writes: Mutex<Vec<(u64, u64)>>,
    /// Random delay before each write reaches the store (widens races).
    write_delay: Mutex<Option<Duration>>,
}

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.store.size()
    }
    fn read_file(&self) -> Option<crate::device::DirectFile> {
        self.store.read_file()
    }
    fn read_directly(&self, offset: u64, len: u64) -> bool {
        self.store.read_directly(offset, len)
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.store.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        lock(&self.writes).push((offset, data.len() as u64));
        let delay = *lock(&self.write_delay);
        if let Some(max) = delay {
            let d = rand::thread_rng().gen_range(Duration::ZERO..=max);
            tokio::time::sleep(d).await;
        }
        self.store.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.store.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.write_zeroes(offset, len).await
    }
}

struct Fixture {
    dev: Arc<LazyDevice<Counting>>,
    remote: Arc<Remote>,
    stale: Arc<Bitmap>,
    persists: Arc<Mutex<Vec<Range<u64>>>>,
    local: Vec<u8>,
    _file: NamedTempFile,
}

/// A device of `blocks` blocks: local data `local_seed`, remote data
/// `remote_seed` on the stale blocks and the local data elsewhere.
fn fixture_with(
    blocks: u64,
    is_stale: impl Fn(u64) -> bool,
    remote: impl FnOnce(Vec<u8>) -> Remote,
) -> Fixture {
    let size = blocks * BS;
    let local = pattern(1, size as usize);
    let newest = pattern(2, size as usize);
    let stale = Arc::new(Bitmap::new(blocks, BS as u32));
    let mut image = local.clone();
    for b in (0..blocks).filter(|&b| is_stale(b)) {
        stale.set_range(b, 1);
        let r = (b * BS) as usize..((b + 1) * BS) as usize;
        image[r.clone()].copy_from_slice(&newest[r]);
    }
    let file = NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &local).unwrap();
    let store = BackingStore::open(file.path(), size, BackingOptions::default()).unwrap();
    let inner = Arc::new(Counting {
        store,
        writes: Mutex::new(Vec::new()),
        write_delay: Mutex::new(None),
    });
    let persists = Arc::new(Mutex::new(Vec::new()));
    let persist: PersistStale = {
        let persists = Arc::clone(&persists);
        let stale = Arc::clone(&stale);
        Arc::new(move |blocks: Range<u64>| {
            // Like NodeBitmaps::flush_blocks: takes the pages' dirty marks.
            for page in stale.pages_for_blocks(blocks.clone()) {
                stale.take_dirty(page);
            }
            lock(&persists).push(blocks);
            Ok(())
        })
    };
    let dev = Arc::new(LazyDevice::new(
        inner,
        Arc::clone(&stale),
        persist,
        Handle::current(),
    ));
    Fixture {
        dev,
        remote: Arc::new(remote(image)),
        stale,
        persists,
        local,
        _file: file,
    }
}

fn fixture(blocks: u64, is_stale: impl Fn(u64) -> bool) -> Fixture {
    fixture_with(blocks, is_stale, Remote::new)
}

impl Fixture {
    fn activate(&self) {
        self.dev
            .activate(Arc::clone(&self.remote) as Arc<dyn BlockSource>);
    }

    fn newest(&self, offset: u64, len: u64) -> &[u8] {
        &self.remote.image[offset as usize..(offset + len) as usize]
    }

    async fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        self.dev.read(offset, &mut buf).await.unwrap();
        buf
    }

    async fn inner_image(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.dev.size() as usize];
        self.dev.inner().read(0, &mut buf).await.unwrap();
        buf
    }

    fn inner_writes(&self) -> Vec<(u64, u64)> {
        lock(&self.dev.inner().writes).clone()
    }

    async fn wait_sync_done(&self) {
        for _ in 0..3000 {
            if !self.dev.sync_stats().running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "background sync did not finish: {:?}",
            self.dev.sync_stats()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_lets_only_reads_of_blocks_it_holds_go_to_the_file_directly() {
    let f = fixture(8, |b| b == 2);
    let file = f.dev.read_file().expect("the store's file is passed on");
    assert_eq!(Some(file), f.dev.inner().store.read_file());
    // Not active (no switch under way): every read passes through.
    assert!(f.dev.read_directly(2 * BS, BS));
    f.activate();
    assert!(!f.dev.read_directly(2 * BS, BS), "a stale block");
    assert!(
        !f.dev.read_directly(BS, 2 * BS),
        "a range with a stale block"
    );
    assert!(f.dev.read_directly(3 * BS, 5 * BS));
    assert!(!f.dev.read_directly(7 * BS, 2 * BS), "past the end");
    // Once fetched, the block is this node's like any other.
    assert_eq!(f.read(2 * BS, BS).await, f.newest(2 * BS, BS));
    assert!(f.dev.read_directly(2 * BS, BS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_reads_of_stale_blocks_return_remote_bytes_and_clear_bits() {
    let f = fixture(64, |b| b % 2 == 0);
    f.activate();
    assert!(f.dev.needs_fetch(0, BS));
    assert!(!f.dev.needs_fetch(BS, BS));
    assert_eq!(f.dev.stale_bytes(), 32 * BS);
    assert_eq!(f.read(4 * BS, 4 * BS).await, f.newest(4 * BS, 4 * BS));
    for b in 4..8 {
        assert!(!f.stale.test(b), "block {b}");
        assert!(f.remote.count(b) <= 1);
    }
    assert_eq!(f.remote.count(4), 1);
    assert_eq!(f.remote.count(6), 1);
    assert_eq!(f.remote.count(5), 0, "present block never fetched");
    // The data is in the local store now: a second read fetches nothing.
    let before = f.remote.requests().len();
    assert_eq!(f.read(4 * BS, 4 * BS).await, f.newest(4 * BS, 4 * BS));
    assert_eq!(f.remote.requests().len(), before);
    assert!(f.dev.sync_stats().on_demand_fetches >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_unaligned_partial_reads() {
    let f = fixture(32, |b| b >= 3);
    f.activate();
    // Sector-aligned, not block-aligned, across a present/stale boundary.
    let offset = 2 * BS + 3584;
    let len = 512 + BS + 1024;
    assert_eq!(f.read(offset, len).await, f.newest(offset, len));
    assert!(!f.stale.test(3) && !f.stale.test(4));
    assert_eq!(f.remote.count(2), 0);
    // One sector in the middle of a stale block.
    assert_eq!(
        f.read(20 * BS + 1536, 512).await,
        f.newest(20 * BS + 1536, 512)
    );
    assert!(!f.stale.test(20));
    // Invalid requests fail with EINVAL and fetch nothing.
    let requests = f.remote.requests().len();
    let mut buf = vec![0u8; 100];
    let err = f.dev.read(30 * BS, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&err), libc::EINVAL);
    let mut buf = vec![0u8; 2 * BS as usize];
    let err = f.dev.read(31 * BS, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&err), libc::EINVAL);
    let err = f
        .dev
        .write(31 * BS + 1, Bytes::from(vec![0; 512]), false)
        .await;
    assert_eq!(errno_of(&err.unwrap_err()), libc::EINVAL);
    let err = f.dev.ensure_present(32 * BS, 512).await.unwrap_err();
    assert_eq!(errno_of(&err), libc::EINVAL);
    assert_eq!(f.remote.requests().len(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_present_blocks_are_never_fetched() {
    let f = fixture(256, |b| (100..110).contains(&b));
    f.activate();
    assert_eq!(f.read(0, 100 * BS).await, &f.local[..100 * BS as usize]);
    assert_eq!(
        f.read(110 * BS, 146 * BS).await,
        &f.local[110 * BS as usize..]
    );
    assert!(f.remote.requests().is_empty());
    assert_eq!(f.read(95 * BS, 20 * BS).await, f.newest(95 * BS, 20 * BS));
    assert_eq!(f.remote.requests(), vec![(100 * BS, 10 * BS)]);
    assert_eq!(f.stale.count_ones(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_concurrent_readers_of_one_block_fetch_it_once() {
    let f = fixture(64, |_| true);
    *lock(&f.remote.delay) = Some((Duration::from_millis(50), Duration::from_millis(50)));
    f.activate();
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let dev = Arc::clone(&f.dev);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 512];
                let offset = 5 * BS + (i % 8) * 512;
                dev.read(offset, &mut buf).await.unwrap();
                (offset, buf)
            })
        })
        .collect();
    for reader in readers {
        let (offset, buf) = reader.await.unwrap();
        assert_eq!(buf, f.newest(offset, 512));
    }
    assert_eq!(f.remote.count(5), 1);
    assert_eq!(f.remote.max_per_block(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_read_ahead_coalesces_neighbours_and_splits_big_runs() {
    let ra = READ_AHEAD / BS;
    let f = fixture(2048, |b| b != 600);
    f.activate();
    // One block read: one fetch of it plus the read-ahead.
    assert_eq!(f.read(0, BS).await, f.newest(0, BS));
    assert_eq!(f.remote.requests(), vec![(0, (1 + ra) * BS)]);
    // Sequential reads inside the read-ahead fetch nothing more.
    assert_eq!(f.read(BS, ra * BS).await, f.newest(BS, ra * BS));
    assert_eq!(f.remote.requests().len(), 1);
    // Read-ahead stops at a present block (600).
    assert_eq!(f.read(590 * BS, BS).await, f.newest(590 * BS, BS));
    assert_eq!(f.remote.requests()[1], (590 * BS, 10 * BS));
    // A 3 MiB read of stale blocks: concurrent fetches of at most 1 MiB,
    // covering the range (and then the read-ahead) exactly once.
    let start = 1000 * BS;
    let len = 3 << 20;
    assert_eq!(f.read(start, len).await, f.newest(start, len));
    let big = &f.remote.requests()[2..];
    assert!(big.len() >= 3, "{big:?}");
    assert!(big.iter().all(|&(_, l)| l <= MAX_FETCH));
    let covered: u64 = big.iter().map(|&(_, l)| l).sum();
    assert_eq!(covered, len + READ_AHEAD);
    assert_eq!(f.remote.max_per_block(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_full_block_write_needs_no_fetch() {
    let f = fixture(32, |_| true);
    f.activate();
    let data = Bytes::from(pattern(7, 2 * BS as usize));
    f.dev.write(7 * BS, data.clone(), false).await.unwrap();
    assert!(f.remote.requests().is_empty());
    assert!(!f.stale.test(7) && !f.stale.test(8));
    assert!(f.stale.test(6) && f.stale.test(9));
    assert_eq!(f.read(7 * BS, 2 * BS).await, data);
    assert!(f.remote.requests().is_empty());
    // Setting bits by a write needs persisting before the write returns.
    assert!(lock(&f.persists)
        .iter()
        .any(|r| r.contains(&7) && r.contains(&8)));
    // Discard and write-zeroes of whole blocks: no fetch either.
    f.dev.discard(10 * BS, BS).await.unwrap();
    f.dev.write_zeroes(11 * BS, BS).await.unwrap();
    assert_eq!(f.read(10 * BS, 2 * BS).await, vec![0u8; 2 * BS as usize]);
    assert!(f.remote.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_partial_write_to_stale_block_fetches_first_and_merges() {
    let f = fixture(32, |_| true);
    f.activate();
    // Covers the end of block 9, all of 10, the start of 11.
    let offset = 9 * BS + 3072;
    let data = pattern(9, 1024 + BS as usize + 512);
    f.dev
        .write(offset, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    let mut requests = f.remote.requests();
    requests.sort();
    assert_eq!(requests, vec![(9 * BS, BS), (11 * BS, BS)]);
    let mut expect = f.newest(9 * BS, 3 * BS).to_vec();
    expect[3072..3072 + data.len()].copy_from_slice(&data);
    assert_eq!(f.read(9 * BS, 3 * BS).await, expect);
    assert_eq!(f.remote.requests().len(), 2);
    // A partial discard of a stale block merges too.
    f.dev.discard(20 * BS + 512, 1024).await.unwrap();
    let mut expect = f.newest(20 * BS, BS).to_vec();
    expect[512..1536].fill(0);
    assert_eq!(f.read(20 * BS, BS).await, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_background_sync_completes_with_same_answers_skipping_writes() {
    // Blocks 0..64 are stale but already hold the newest data locally
    // (e.g. a write that reached us before the switch): the holder answers
    // Same and nothing is written.
    let blocks = 512;
    let f = fixture_with(
        blocks,
        |b| b % 3 != 0,
        |mut image| {
            let local = pattern(1, image.len());
            image[..64 * BS as usize].copy_from_slice(&local[..64 * BS as usize]);
            Remote::new(image)
        },
    );
    f.activate();
    f.dev.start_background_sync(SyncOptions {
        chunk: 16 * BS,
        ..SyncOptions::default()
    });
    f.wait_sync_done().await;
    let stats = f.dev.sync_stats();
    assert_eq!(stats.stale_bytes, 0);
    assert_eq!(stats.eta_seconds, Some(0));
    assert!(!stats.running);
    assert_eq!(f.stale.count_ones(), 0);
    assert_eq!(f.inner_image().await, f.remote.image);
    assert!(f.remote.same_replies.load(SeqCst) > 0);
    assert_eq!(
        stats.same_bytes + stats.fetched_bytes,
        f.remote.requests().iter().map(|r| r.1).sum::<u64>()
    );
    // No write went to blocks 0..64; present blocks were never fetched.
    assert!(f.inner_writes().iter().all(|&(o, _)| o >= 64 * BS));
    for b in (0..blocks).filter(|b| b % 3 == 0) {
        assert_eq!(f.remote.count(b), 0);
    }
    assert_eq!(f.remote.max_per_block(), 1);
    assert_eq!(stats.on_demand_fetches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_background_sync_pulls_hot_extents_first_and_respects_the_rate() {
    let extent_blocks = EXTENT_BLOCKS;
    let f = fixture(3 * extent_blocks, |_| true);
    f.activate();
    f.dev.start_background_sync(SyncOptions {
        hot_extents: vec![2, 99],
        concurrency: 1,
        chunk: 1 << 20,
        rate: 32 << 20,
    });
    let started = std::time::Instant::now();
    f.wait_sync_done().await;
    let requests = f.remote.requests();
    assert_eq!(requests[0].0, 2 * extent_blocks * BS);
    assert!(requests[..4].iter().all(|r| r.0 >= 2 * extent_blocks * BS));
    // 12 MiB at 32 MiB/s: the first chunk is free, the rest is paced.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.inner_image().await, f.remote.image);
}

const EXTENT_BLOCKS: u64 = crate::meta::EXTENT_SIZE / BS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_guest_writes_racing_background_sync_are_never_overwritten() {
    let blocks = 256u64;
    let writers = 4u64;
    let f = fixture(blocks, |b| b % 37 != 5);
    *lock(&f.remote.delay) = Some((Duration::from_millis(1), Duration::from_millis(6)));
    *lock(&f.dev.inner().write_delay) = Some(Duration::from_millis(2));
    f.activate();
    f.dev.start_background_sync(SyncOptions {
        chunk: 8 * BS,
        concurrency: 4,
        ..SyncOptions::default()
    });
    // Each writer owns the blocks b with b % writers == w, so the model is
    // exact: the remote image with every completed write applied.
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let dev = Arc::clone(&f.dev);
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut done = Vec::new();
                for i in 0..150u32 {
                    let block = rng.gen_range(0..blocks / writers) * writers + w;
                    let sectors = BS / 512;
                    let first = rng.gen_range(0..sectors);
                    let count = rng.gen_range(1..=sectors - first);
                    let offset = block * BS + first * 512;
                    let len = count * 512;
                    let kind = rng.gen_range(0..10);
                    let data = if kind == 0 {
                        dev.write_zeroes(offset, len).await.unwrap();
                        vec![0u8; len as usize]
                    } else {
                        let data = pattern((i as u8) ^ (w as u8 * 64), len as usize);
                        dev.write(offset, Bytes::from(data.clone()), kind == 1)
                            .await
                            .unwrap();
                        data
                    };
                    done.push((offset, data));
                    if i % 16 == 0 {
                        // Interleave reads too: they must see newest data.
                        let mut buf = vec![0u8; BS as usize];
                        dev.read(block * BS, &mut buf).await.unwrap();
                        assert_eq!(
                            &buf[(first * 512) as usize..][..len as usize],
                            &done.last().unwrap().1[..]
                        );
                    }
                }
                done
            })
        })
        .collect();
    let mut model = f.remote.image.clone();
    for task in tasks {
        for (offset, data) in task.await.unwrap() {
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
    }
    f.wait_sync_done().await;
    assert_eq!(f.stale.count_ones(), 0);
    let image = f.inner_image().await;
    let first_bad = image.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_bad,
        None,
        "block {:?} differs",
        first_bad.map(|p| p as u64 / BS)
    );
    assert_eq!(f.read(0, blocks * BS).await, model);
    assert_eq!(f.remote.max_per_block(), 1, "a block was fetched twice");
    assert_eq!(f.dev.shared.inflight.len(), 0, "a claim leaked");
    assert!(f.remote.requests().len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_source_errors_give_eio_and_leave_bits_set() {
    let f = fixture(32, |_| true);
    f.activate();
    f.remote.fail.store(true, SeqCst);
    let mut buf = vec![0u8; BS as usize];
    let err = f.dev.read(3 * BS, &mut buf).await.unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO);
    let err = f
        .dev
        .write(5 * BS + 512, Bytes::from(vec![1; 512]), false)
        .await;
    assert_eq!(errno_of(&err.unwrap_err()), libc::EIO);
    assert_eq!(f.stale.count_ones(), 32);
    assert!(f.dev.sync_stats().last_error.is_some());
    f.remote.fail.store(false, SeqCst);
    assert_eq!(f.read(3 * BS, BS).await, f.newest(3 * BS, BS));
    f.dev
        .write(5 * BS + 512, Bytes::from(vec![1; 512]), false)
        .await
        .unwrap();
    let mut expect = f.newest(5 * BS, BS).to_vec();
    expect[512..1024].fill(1);
    assert_eq!(f.read(5 * BS, BS).await, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_background_sync_retries_after_errors() {
    let f = fixture(64, |_| true);
    f.remote.fail.store(true, SeqCst);
    f.activate();
    f.dev.start_background_sync(SyncOptions {
        chunk: 16 * BS,
        ..SyncOptions::default()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = f.dev.sync_stats();
    assert!(stats.running);
    assert_eq!(stats.stale_bytes, 64 * BS);
    assert!(stats.last_error.is_some());
    f.remote.fail.store(false, SeqCst);
    f.wait_sync_done().await;
    assert_eq!(f.stale.count_ones(), 0);
    assert_eq!(f.inner_image().await, f.remote.image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_write_over_fetched_block_persists_its_clear_before_returning() {
    let f = fixture(64, |b| b < 8);
    f.activate();
    f.dev.flush().await.unwrap();
    // A fetch clears bit 2 in memory only.
    assert_eq!(f.read(2 * BS, BS).await, f.newest(2 * BS, BS));
    assert!(!f.stale.test(2));
    assert!(f.stale.dirty_page_count() > 0);
    lock(&f.persists).clear();
    f.dev
        .write(2 * BS, Bytes::from(vec![5; BS as usize]), false)
        .await
        .unwrap();
    assert!(lock(&f.persists).iter().any(|r| r.contains(&2)));
    // A partial write into a block fetched for it: persisted as well.
    lock(&f.persists).clear();
    f.dev
        .write(4 * BS + 512, Bytes::from(vec![6; 512]), false)
        .await
        .unwrap();
    assert!(lock(&f.persists).iter().any(|r| r.contains(&4)));
    // After a flush, a write to a block that was never stale persists nothing.
    f.dev.flush().await.unwrap();
    assert_eq!(f.stale.dirty_page_count(), 0);
    lock(&f.persists).clear();
    f.dev
        .write(40 * BS, Bytes::from(vec![7; BS as usize]), false)
        .await
        .unwrap();
    assert!(lock(&f.persists).is_empty());
    // A block fetched before the flush needs nothing either.
    f.read(5 * BS, BS).await;
    f.dev.flush().await.unwrap();
    lock(&f.persists).clear();
    f.dev
        .write(5 * BS, Bytes::from(vec![8; BS as usize]), false)
        .await
        .unwrap();
    assert!(lock(&f.persists).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_inactive_layer_is_pass_through() {
    let f = fixture(32, |_| true);
    assert!(!f.dev.is_active());
    assert!(!f.dev.needs_fetch(0, BS));
    // Local (old) bytes, no fetch, bits untouched.
    assert_eq!(f.read(0, 4 * BS).await, &f.local[..4 * BS as usize]);
    f.dev.ensure_present(0, BS).await.unwrap();
    f.dev
        .write(8 * BS, Bytes::from(vec![3; BS as usize]), false)
        .await
        .unwrap();
    f.dev.flush().await.unwrap();
    assert!(f.remote.requests().is_empty());
    assert_eq!(f.stale.count_ones(), 32);
    assert!(lock(&f.persists).is_empty());
    assert_eq!(f.read(8 * BS, BS).await, vec![3; BS as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_deactivate_waits_for_in_flight_fetches() {
    let f = fixture_with(
        32,
        |_| true,
        |image| Remote {
            gate: Some(Semaphore::new(0)),
            ..Remote::new(image)
        },
    );
    f.activate();
    let reader = {
        let dev = Arc::clone(&f.dev);
        tokio::spawn(async move {
            let mut buf = vec![0u8; BS as usize];
            dev.read(BS, &mut buf).await.map(|()| buf)
        })
    };
    while f.remote.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deactivate = {
        let dev = Arc::clone(&f.dev);
        tokio::spawn(async move { dev.deactivate().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!deactivate.is_finished());
    assert!(!reader.is_finished());
    assert!(!f.dev.is_active());
    lock(&f.persists).clear();
    f.remote.gate.as_ref().unwrap().add_permits(100);
    deactivate.await.unwrap();
    // The fetch's clears were persisted on the way out.
    assert!(lock(&f.persists).iter().any(|r| r.contains(&1)));
    assert_eq!(reader.await.unwrap().unwrap(), f.newest(BS, BS));
    // Now a pass-through: the next stale block reads the old local bytes.
    let requests = f.remote.requests().len();
    let far = 0;
    assert_eq!(
        f.read(far, BS).await,
        &f.local[far as usize..(far + BS) as usize]
    );
    assert_eq!(f.remote.requests().len(), requests);
    assert!(f.stale.test(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_serves_callers_on_a_non_tokio_executor() {
    // The ublk queues poll on smol; the source (here: tokio timers) must
    // still run on the runtime.
    let f = fixture(32, |_| true);
    *lock(&f.remote.delay) = Some((Duration::from_millis(1), Duration::from_millis(2)));
    f.activate();
    let dev = Arc::clone(&f.dev);
    let (read, merged) = tokio::task::spawn_blocking(move || {
        smol::block_on(async {
            dev.write(3 * BS + 512, Bytes::from(vec![9; 512]), false)
                .await
                .unwrap();
            dev.flush().await.unwrap();
            let mut read = vec![0u8; BS as usize];
            dev.read(20 * BS, &mut read).await.unwrap();
            let mut merged = vec![0u8; BS as usize];
            dev.read(3 * BS, &mut merged).await.unwrap();
            (read, merged)
        })
    })
    .await
    .unwrap();
    assert_eq!(read, f.newest(20 * BS, BS));
    let mut expect = f.newest(3 * BS, BS).to_vec();
    expect[512..1024].fill(9);
    assert_eq!(merged, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_background_sync_trickles_while_the_guest_is_busy() {
    // 64 MiB, all stale but the first 16 blocks, which the guest keeps reading.
    let blocks = 16 * EXTENT_BLOCKS;
    let f = fixture(blocks, |b| b >= 16);
    f.activate();
    let busy_until = std::time::Instant::now() + Duration::from_millis(400);
    f.dev.start_background_sync(SyncOptions {
        concurrency: 4,
        chunk: 1 << 20,
        ..SyncOptions::default()
    });
    while std::time::Instant::now() < busy_until {
        f.read(0, 16 * BS).await;
    }
    // One fetch at a time, 20 ms apart: far from the 64 an idle guest allows.
    let during = f.remote.requests().len();
    assert!(during <= 25, "{during} fetches while the guest was busy");
    f.wait_sync_done().await;
    assert_eq!(f.inner_image().await, f.remote.image);
}
