//! A deterministic random write workload and the model of its result.
//!
//! The model is only well defined if no two overlapping operations are ever
//! in flight together (a device may apply concurrent overlapping writes in
//! either order). [`run`] guarantees that: it dispatches in sequence order
//! and holds back an operation while an earlier overlapping one is still
//! running, so the device ends up exactly as if the ops ran one by one —
//! while non-overlapping ops still keep `qd` requests in flight.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use blockdev::blocksock::BlockClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Every offset and length is a multiple of this.
pub const BLOCK: u64 = 4096;

/// One request of the workload. Write data is not stored: it is derived
/// from `seed`, so thousands of ops cost no memory and the model can
/// regenerate exactly what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
        seed: u64,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

impl Op {
    /// The bytes this op changes; `None` for a flush.
    pub fn range(&self) -> Option<Range<u64>> {
        match *self {
            Op::Write { offset, len, .. }
            | Op::Discard { offset, len }
            | Op::WriteZeroes { offset, len } => Some(offset..offset + len),
            Op::Flush => None,
        }
    }

    /// Sends this op through `client`.
    pub async fn issue(&self, client: &BlockClient) -> io::Result<()> {
        match *self {
            Op::Write {
                len,
                fua,
                seed,
                offset,
            } => {
                let mut data = vec![0u8; len as usize];
                fill_pattern(seed, &mut data);
                client.write(offset, data, fua).await
            }
            Op::Flush => client.flush().await,
            Op::Discard { offset, len } => client.discard(offset, len).await,
            Op::WriteZeroes { offset, len } => client.write_zeroes(offset, len).await,
        }
    }
}

/// Fills `buf` with the data of the write with this `seed`: every 8-byte
/// word differs between writes and positions, so a misplaced, torn or stale
/// block changes the hash.
pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let value = splitmix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        word.copy_from_slice(&value.to_le_bytes()[..word.len()]);
    }
}

/// Fills `buf` with text-like data for the write with this `seed`: lines
/// of words from a 4096-word vocabulary of made-up words, picked with a
/// skew (short, common words most), and numbers. It compresses about as
/// well as source code or logs do (zstd about 2.5x, LZ4 about 1.7x: the
/// WAN benchmark prints the figures), unlike [`fill_pattern`], and no two
/// writes are alike.
pub fn fill_text(seed: u64, buf: &mut [u8]) {
    let mut state = splitmix64(seed);
    let mut next = move || {
        state = splitmix64(state);
        state
    };
    let mut at = 0;
    let mut column = 0;
    while at < buf.len() {
        let r = next();
        // Zipf's law, as in natural language: word n comes up about 1/n
        // as often as the first (log-uniform over the vocabulary).
        let u = (r & 0xff_ffff) as f64 / (1u64 << 24) as f64;
        let index = 4096f64.powf(u) as u64 - 1;
        let piece = if (r >> 40) % 11 == 0 {
            ((r >> 44) % 10_000).to_string().into_bytes()
        } else {
            made_up_word(index)
        };
        for &b in piece.iter().chain(if column > 60 { b"\n" } else { b" " }) {
            if at == buf.len() {
                return;
            }
            buf[at] = b;
            at += 1;
        }
        column = if column > 60 {
            0
        } else {
            column + piece.len() + 1
        };
    }
}

/// Word number `index` of the made-up vocabulary: 2 to 11 lower-case
/// letters, longer for higher numbers.
fn made_up_word(index: u64) -> Vec<u8> {
    let h = splitmix64(index ^ 0x5EED);
    let len = 2 + ((index + 1).ilog2() as u64 / 2 + h % 4) as usize;
    (0..len.min(11))
        .map(|i| b'a' + ((h >> (i * 5)) % 26) as u8)
        .collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Proportions of the generated ops (percentages of all ops).
#[derive(Debug, Clone)]
pub struct Mix {
    /// A flush after every this many ops, besides random ones.
    pub flush_every: u64,
    pub flush_percent: u32,
    pub discard_percent: u32,
    pub write_zeroes_percent: u32,
    /// Share of writes sent with FUA.
    pub fua_percent: u32,
    /// Share of ranged ops aimed at the first `hot_bytes`, to force overlaps.
    pub hot_percent: u32,
    pub hot_bytes: u64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            flush_every: 64,
            flush_percent: 2,
            discard_percent: 5,
            write_zeroes_percent: 5,
            fua_percent: 10,
            hot_percent: 30,
            hot_bytes: 1 << 20,
        }
    }
}

/// Generates ops for a device of `size` bytes from a seed: the same seed
/// always gives the same sequence.
pub struct Workload {
    rng: StdRng,
    size: u64,
    generated: u64,
    pub mix: Mix,
}

impl Workload {
    pub fn new(seed: u64, size: u64) -> Self {
        assert!(
            size >= 1 << 20 && size.is_multiple_of(BLOCK),
            "device of {size} bytes is too small or unaligned"
        );
        Workload {
            rng: StdRng::seed_from_u64(seed),
            size,
            generated: 0,
            mix: Mix::default(),
        }
    }

    pub fn ops(&mut self, count: usize) -> Vec<Op> {
        (0..count).map(|_| self.next_op()).collect()
    }

    pub fn next_op(&mut self) -> Op {
        self.generated += 1;
        if self.generated.is_multiple_of(self.mix.flush_every) {
            return Op::Flush;
        }
        let roll = self.rng.gen_range(0..100);
        let flush = self.mix.flush_percent;
        let discard = flush + self.mix.discard_percent;
        let zeroes = discard + self.mix.write_zeroes_percent;
        if roll < flush {
            Op::Flush
        } else if roll < discard {
            let blocks = self.rng.gen_range(1..=256);
            let (offset, len) = self.range_of_blocks(blocks);
            Op::Discard { offset, len }
        } else if roll < zeroes {
            let blocks = self.rng.gen_range(1..=256);
            let (offset, len) = self.range_of_blocks(blocks);
            Op::WriteZeroes { offset, len }
        } else {
            // 4 KiB to 256 KiB, each power of two equally likely, so small
            // writes dominate the count and large ones the bytes.
            let blocks = 1 << self.rng.gen_range(0..=6);
            let (offset, len) = self.range_of_blocks(blocks);
            let fua = self.rng.gen_range(0..100) < self.mix.fua_percent;
            Op::Write {
                offset,
                len,
                fua,
                seed: self.rng.gen(),
            }
        }
    }

    /// Places `blocks` blocks at a random aligned offset, sometimes inside
    /// the hot area so that ops overlap often.
    fn range_of_blocks(&mut self, blocks: u64) -> (u64, u64) {
        let len = blocks * BLOCK;
        let area = if self.rng.gen_range(0..100) < self.mix.hot_percent {
            self.mix.hot_bytes.min(self.size).max(len)
        } else {
            self.size
        };
        let offset = self.rng.gen_range(0..=(area - len) / BLOCK) * BLOCK;
        (offset, len)
    }
}

/// What the device must contain: an in-memory image.
#[derive(Clone)]
pub struct Model {
    image: Vec<u8>,
}

impl Model {
    /// The model of a fresh (all-zero) device.
    pub fn zeroed(size: u64) -> Self {
        Model {
            image: vec![0u8; size as usize],
        }
    }

    /// The model of a device that currently holds `image`.
    pub fn from_image(image: Vec<u8>) -> Self {
        Model { image }
    }

    pub fn size(&self) -> u64 {
        self.image.len() as u64
    }

    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Applies one completed op.
    pub fn apply(&mut self, op: &Op) {
        let Some(range) = op.range() else { return };
        let bytes = &mut self.image[range.start as usize..range.end as usize];
        match *op {
            Op::Write { seed, .. } => fill_pattern(seed, bytes),
            _ => bytes.fill(0),
        }
    }

    pub fn blake3(&self) -> blake3::Hash {
        blake3::hash(&self.image)
    }
}

/// Runs `ops` through `client` (queue depth 16) on top of `model` and
/// flushes, from blocking test code; returns what the device must now hold.
pub fn write_flushed(
    rt: &tokio::runtime::Runtime,
    client: &BlockClient,
    ops: &[Op],
    model: Model,
) -> Model {
    let model = rt
        .block_on(run(client, ops, 16, model))
        .expect("the workload's writes succeed");
    rt.block_on(client.flush()).expect("flush");
    model
}

/// Runs `ops` against `client` with up to `qd` in flight, starting from a
/// device described by `start`; returns the model of the result. The first
/// failing op stops the run (ops already started still finish) and is named
/// in the error.
pub async fn run(client: &BlockClient, ops: &[Op], qd: usize, start: Model) -> io::Result<Model> {
    assert!(qd > 0, "queue depth must be at least 1");
    if let Some(op) = ops
        .iter()
        .find(|op| op.range().is_some_and(|r| r.end > start.size()))
    {
        panic!(
            "{op:?} lies beyond the modelled device of {} bytes",
            start.size()
        );
    }
    let dispatcher = Arc::new(Dispatcher {
        ops: ops.into(),
        state: Mutex::new(DispatchState::default()),
        changed: Notify::new(),
    });
    let mut workers = JoinSet::new();
    for _ in 0..qd {
        let dispatcher = Arc::clone(&dispatcher);
        let client = client.clone();
        workers.spawn(async move { dispatcher.work(&client).await });
    }
    let mut first_error = None;
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done.expect("workload worker panicked") {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut model = start;
    for op in ops {
        model.apply(op);
    }
    Ok(model)
}

/// Hands out ops in sequence order, never one that overlaps an op still in
/// flight.
struct Dispatcher {
    ops: Arc<[Op]>,
    state: Mutex<DispatchState>,
    /// Signalled whenever an op completes (a held-back op may now go).
    changed: Notify,
}

#[derive(Default)]
struct DispatchState {
    next: usize,
    in_flight: Vec<(usize, Range<u64>)>,
    failed: bool,
}

impl Dispatcher {
    async fn work(&self, client: &BlockClient) -> io::Result<()> {
        while let Some(index) = self.take().await {
            let op = self.ops[index];
            let result = op.issue(client).await;
            self.finish(index, result.is_err());
            result.map_err(|e| io::Error::new(e.kind(), format!("op #{index} {op:?}: {e}")))?;
        }
        Ok(())
    }

    async fn take(&self) -> Option<usize> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a completion in between still wakes us.
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().unwrap();
                if state.failed || state.next == self.ops.len() {
                    return None;
                }
                let index = state.next;
                let range = self.ops[index].range().unwrap_or(0..0);
                let blocked = state
                    .in_flight
                    .iter()
                    .any(|(_, r)| r.start < range.end && range.start < r.end);
                if !blocked {
                    state.next += 1;
                    state.in_flight.push((index, range));
                    return Some(index);
                }
            }
            notified.await;
        }
    }

    fn finish(&self, index: usize, failed: bool) {
        let mut state = self.state.lock().unwrap();
        state.in_flight.retain(|(i, _)| *i != index);
        state.failed |= failed;
        drop(state);
        self.changed.notify_waiters();
    }
}
