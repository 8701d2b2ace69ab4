//! Guest writes while a peer resyncs, against the link: what a user feels
//! after a failover or a peer's return, when the primary resends a large
//! stale area over the same link its mirrored writes take.
//!
//! Two nodes, the secondary in a network namespace of its own behind a veth
//! shaped with `tc tbf` (1 Gbit/s, then 100 Mbit/s) that drops what would
//! queue longer than 5 ms (as a NIC queue with an AQM keeps a TCP flow
//! from filling it; this kernel has no `fq_codel`); protocol C; the guest
//! is a block-socket client on the primary writing 4 KiB at random offsets,
//! one at a time (QD1: each write's latency is what an fsync-heavy guest
//! waits). Per link rate, in one run:
//!
//! 1. the write latency with the peer up to date (the baseline);
//! 2. a full resync (`vmsyncctl invalidate` on the secondary) with the guest
//!    idle: its rate as a fraction of the link's TCP payload rate;
//! 3. the same resync with the guest writing throughout: the resync's rate
//!    again, and the write latency during it against the baseline.
//!
//! A third configuration repeats 100 Mbit/s with `resync_min_rate` set to
//! 80 Mbit/s (DRBD's `c-min-rate`): the operator's trade of guest latency
//! for resync time.
//!
//! Needs root. `cargo bench --bench resync [-- FILTER]` (FILTER matches the
//! configuration's name, e.g. `1gbit`). Environment: `VMSYNC_BENCH_BASELINE_SECS` (3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::blocksock::BlockClient;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::netns::{rate_bits, Star};
use support::{wait_for, Cluster, ClusterSpec};

const MIB: u64 = 1 << 20;
/// TCP payload per byte on the wire with full frames.
const PAYLOAD_FRACTION: f64 = 1448.0 / 1514.0;
const WRITE: u64 = 4096;

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let baseline_secs = std::env::var("VMSYNC_BENCH_BASELINE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // (name, link rate, device size: about two seconds of the link and
    // more, extra [replication] keys)
    let configs = [
        ("1gbit", "1gbit", 256 * MIB, ""),
        ("100mbit", "100mbit", 48 * MIB, ""),
        (
            "100mbit-min-rate-80mbit",
            "100mbit",
            48 * MIB,
            "resync_min_rate = \"80Mbit\"",
        ),
    ];
    let mut rows = Vec::new();
    for (name, rate, size, keys) in configs {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let row = run(name, rate, size, keys, Duration::from_secs(baseline_secs));
        println!("{row:?}");
        rows.push(row);
    }
    println!();
    println!("| config | link payload MB/s | resync MB/s, guest idle (ratio) | resync MB/s, guest writing (ratio) | 4K QD1 write latency mean / p50 / p99, peer up to date | the same during the resync | max during the resync | mean during ÷ mean before |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} ({:.2}) | {:.1} ({:.2}) | {} / {} / {} | {} / {} / {} | {} | {:.1} |",
            r.config,
            r.payload_mb_s,
            r.idle_resync_mb_s,
            r.idle_resync_mb_s / r.payload_mb_s,
            r.busy_resync_mb_s,
            r.busy_resync_mb_s / r.payload_mb_s,
            ms(r.before.mean),
            ms(r.before.p50),
            ms(r.before.p99),
            ms(r.during.mean),
            ms(r.during.p50),
            ms(r.during.p99),
            ms(r.during.max),
            r.during.mean.as_secs_f64() / r.before.mean.as_secs_f64(),
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct Row {
    config: &'static str,
    payload_mb_s: f64,
    idle_resync_mb_s: f64,
    busy_resync_mb_s: f64,
    before: Latencies,
    during: Latencies,
}

#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `n` is read through Debug
struct Latencies {
    n: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latencies {
    fn of(mut samples: Vec<Duration>) -> Latencies {
        assert!(!samples.is_empty(), "no write completed");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latencies {
            n: samples.len(),
            mean: samples.iter().sum::<Duration>() / samples.len() as u32,
            p50: at(0.5),
            p99: at(0.99),
            max: *samples.last().unwrap(),
        }
    }
}

fn run(
    config: &'static str,
    rate: &'static str,
    size: u64,
    replication_keys: &str,
    baseline: Duration,
) -> Row {
    let star = Star::create(1, rate);
    star.limit_queues("5ms");
    let mut cluster = Cluster::start_on_star(
        &star,
        ClusterSpec {
            nodes: 2,
            protocol: "C",
            size,
            extra_toml: format!("[replication]\n{replication_keys}\n"),
            ..ClusterSpec::default()
        },
        &[],
    );
    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1), "initial sync");
    let rt = support::runtime();
    let client = support::cluster::client(&rt, &cluster, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = rt.spawn(write_until(client.clone(), size, Arc::clone(&stop)));
    std::thread::sleep(baseline);
    stop.store(true, Ordering::Release);
    let before = Latencies::of(
        rt.block_on(writer)
            .unwrap()
            .into_iter()
            .map(|(_, latency)| latency)
            .collect(),
    );

    let idle_resync_mb_s = full_resync(&mut cluster, size).rate_mb_s;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = rt.spawn(write_until(client.clone(), size, Arc::clone(&stop)));
    let resync = full_resync(&mut cluster, size);
    stop.store(true, Ordering::Release);
    // Only the writes issued while the peer resynced: before it (the link
    // renegotiating after `invalidate`) writes are not mirrored at all.
    let during = Latencies::of(
        rt.block_on(writer)
            .unwrap()
            .into_iter()
            .filter(|(issued, _)| (resync.started..resync.finished).contains(issued))
            .map(|(_, latency)| latency)
            .collect(),
    );
    rt.block_on(client.flush()).expect("flush");
    assert!(
        cluster.wait_identical(None).is_ok(),
        "the replicas differ after the resyncs"
    );
    Row {
        config,
        payload_mb_s: rate_bits(rate) as f64 / 8.0 * PAYLOAD_FRACTION / 1e6,
        idle_resync_mb_s,
        busy_resync_mb_s: resync.rate_mb_s,
        before,
        during,
    }
}

/// One full resync, as the primary saw it.
struct Resync {
    /// When the primary first reported the peer resyncing.
    started: Instant,
    /// When it reported it up to date again.
    finished: Instant,
    rate_mb_s: f64,
}

/// Invalidates node 2 (a full resync from node 1) and waits until node 1
/// counts `size` more bytes resynced and the peer up to date.
fn full_resync(cluster: &mut Cluster, size: u64) -> Resync {
    let resynced = |c: &Cluster| c.peer(1, 2)["resynced_bytes"].as_u64().unwrap_or(0);
    let from = resynced(cluster);
    let out = cluster.daemon(2).ctl(&["invalidate"]);
    assert!(
        out.status.success(),
        "invalidate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut started = None;
    let finished = wait_for(
        || {
            let peer = cluster.peer(1, 2);
            if peer["state"] == "resyncing" {
                started.get_or_insert_with(Instant::now);
            }
            peer["resynced_bytes"].as_u64().unwrap_or(0) >= from + size
                && peer["state"] == "up-to-date"
        },
        Duration::from_secs(600),
    );
    let finished_at = Instant::now();
    assert!(
        finished,
        "the resync did not finish: {}",
        cluster.peer(1, 2)
    );
    let started = started.expect("the peer was never seen resyncing");
    Resync {
        started,
        finished: finished_at,
        rate_mb_s: size as f64 / (finished_at - started).as_secs_f64() / 1e6,
    }
}

/// Writes 4 KiB at random offsets, one at a time, until `stop`; returns
/// when each write was issued and how long it took.
async fn write_until(
    client: BlockClient,
    size: u64,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Duration)> {
    let mut rng = StdRng::seed_from_u64(size);
    let data = Bytes::from(vec![0x5a; WRITE as usize]);
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let offset = rng.gen_range(0..size / WRITE) * WRITE;
        let t = Instant::now();
        client
            .write(offset, data.clone(), false)
            .await
            .expect("write");
        latencies.push((t, t.elapsed()));
    }
    latencies
}
