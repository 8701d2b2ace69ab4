//! Replication throughput: what mirroring to LAN peers costs a guest.
//!
//! Each configuration is a cluster of real `vmsyncd` processes on loopback
//! with file backings (the same set-up as `tests/replication.rs`). The
//! workload runs through the block socket of node 1, the top-layer API the
//! ublk frontend also serves, with [`BlockClient`]:
//!
//! * 4 KiB random writes at queue depth 32;
//! * 1 MiB sequential writes at queue depth 4.
//!
//! Configurations: a standalone node (0 peers, the baseline), then 1 and 2
//! LAN peers with protocol A, then with protocol C. Multi-node clusters are
//! promoted on node 1 and fully synced before anything is measured.
//!
//! Output per configuration and workload: IOPS, MB/s, p50/p99 latency, the
//! ratio to the 0-peer baseline of the same run, CPU use of every process,
//! and the peers' state right after the run (a peer that fell "behind" was
//! not really mirrored to, so its row is flagged). A markdown table ends it.
//!
//! `cargo bench --bench replication [-- FILTER...]`, where a FILTER picks
//! configurations by key (`local`, `1A-plain`, `1A`, `2A`, `1C-plain`, `1C`,
//! `2C`; `-plain`: links not protected after the handshake, the baseline of
//! what protection costs, compared in a table of its own). Environment:
//! `VMSYNC_BENCH_SECS` (measured seconds per workload, 5),
//! `VMSYNC_BENCH_WARMUP_SECS` (1), `VMSYNC_BENCH_SIZE_MIB` (device size, 128),
//! `VMSYNC_BENCH_DIRECT_IO=1` (O_DIRECT backings), `VMSYNC_BENCH_KEEP_CACHE=1`
//! (do not evict the backing images from the page cache before each
//! workload; see [`drop_page_cache`]), `VMSYNC_BENCH_EXTRA_TOML` (appended
//! to every config, e.g. `$'[replication]\nmax_epoch_writes = 8192'`),
//! `VMSYNC_BENCH_LOG` (the daemons' `RUST_LOG`, `warn`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::blocksock::BlockClient;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use support::{ctl, Cluster, ClusterSpec, Daemon, TestDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Longest wait for the initial full sync (or a drain between workloads).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// One cluster layout.
#[derive(Clone, Copy)]
struct Setup {
    /// Short name for filters and the table.
    key: &'static str,
    peers: u32,
    protocol: &'static str,
    /// Links sealed after the handshake (the product); false runs the
    /// daemons with `VMSYNC_BENCH_UNPROTECTED_LINKS=1`, the baseline of
    /// what protection costs.
    protected: bool,
}

impl Setup {
    fn label(&self) -> String {
        let plain = if self.protected {
            ""
        } else {
            ", links NOT protected (baseline)"
        };
        match self.peers {
            0 => "local (0 peers)".into(),
            1 => format!("1 peer, protocol {}{plain}", self.protocol),
            n => format!("{n} peers, protocol {}{plain}", self.protocol),
        }
    }

    /// The unprotected twin of a protected setup, by key.
    fn plain_key(&self) -> String {
        format!("{}-plain", self.key)
    }
}

const fn setup(key: &'static str, peers: u32, protocol: &'static str, protected: bool) -> Setup {
    Setup {
        key,
        peers,
        protocol,
        protected,
    }
}

/// Each unprotected baseline runs right before its protected twin, so
/// the two see the same machine state.
const SETUPS: [Setup; 7] = [
    setup("local", 0, "A", true),
    setup("1A-plain", 1, "A", false),
    setup("1A", 1, "A", true),
    setup("2A", 2, "A", true),
    setup("1C-plain", 1, "C", false),
    setup("1C", 1, "C", true),
    setup("2C", 2, "C", true),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block: u64,
    qd: usize,
    pattern: Pattern,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "4k randwrite qd32",
        block: 4 * KIB,
        qd: 32,
        pattern: Pattern::Random,
    },
    Workload {
        name: "1M seqwrite qd4",
        block: MIB,
        qd: 4,
        pattern: Pattern::Sequential,
    },
];

struct Params {
    measure: Duration,
    warmup: Duration,
    size: u64,
    direct_io: bool,
    /// Skip [`drop_page_cache`] before each workload.
    keep_cache: bool,
    /// Appended to every node's config (e.g. a `[replication]` table).
    extra_toml: String,
    /// `VMSYNC_BENCH_PIN=1`: CPUs for node 1 and the bench client, and
    /// CPUs for the peers (halves of the machine), standing in for the
    /// separate machines peers are in real use. `None`: all share all CPUs.
    pinning: Option<(Vec<usize>, Vec<usize>)>,
}

/// Splits the machine's CPUs into a half for the primary (and the bench
/// client, playing the guest) and a half for the peers.
fn split_cpus() -> Option<(Vec<usize>, Vec<usize>)> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if cpus.len() < 2 {
        return None;
    }
    let (primary, peers) = cpus.split_at(cpus.len() / 2);
    Some((primary.to_vec(), peers.to_vec()))
}

/// What one workload run measured.
struct Measurement {
    ops: u64,
    elapsed: Duration,
    block: u64,
    p50_us: u64,
    p99_us: u64,
    /// CPU use over the measured window, in % of one core.
    cpu: Vec<(String, f64)>,
    /// Busy share of all cores over the window (from /proc/stat), in %.
    machine_busy: f64,
    /// Interrupt and softirq share of all cores over the window, in %: on
    /// loopback most of it is TCP receive processing for our own links.
    machine_irq: f64,
    /// "state/stale_bytes" of each peer of node 1 right after the run.
    peers: Vec<String>,
}

impl Measurement {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn mbps(&self) -> f64 {
        self.iops() * self.block as f64 / 1e6
    }

    /// CPU % (of one core) spent in interrupts and softirqs.
    fn irq_cpu(&self) -> f64 {
        self.machine_irq * cores()
    }

    /// CPU % (of one core) used outside the cluster, the bench and interrupt
    /// handling: other processes' load, which skews the numbers.
    fn other_cpu(&self) -> f64 {
        let ours: f64 = self.cpu.iter().map(|(_, c)| c).sum();
        (self.machine_busy * cores() - ours - self.irq_cpu()).max(0.0)
    }

    /// CPU time node 1 (the primary) spends per request, in µs: its
    /// throughput ceiling on a machine of its own is cores / this.
    fn n1_cpu_us_per_op(&self) -> f64 {
        let n1 = self.cpu.first().map_or(0.0, |(_, c)| *c);
        n1 / 100.0 * self.elapsed.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }

    /// Whether every peer was still mirrored to when the run ended.
    fn all_peers_mirrored(&self) -> bool {
        self.peers.iter().all(|p| p.starts_with("up-to-date"))
    }
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main() {
    // The daemons inherit this through `Daemon::start` (which defaults to
    // debug logging); set before any thread is spawned.
    let log = std::env::var("VMSYNC_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    std::env::set_var("RUST_LOG", log);

    let params = Params {
        measure: Duration::from_secs(env_u64("VMSYNC_BENCH_SECS", 5)),
        warmup: Duration::from_secs(env_u64("VMSYNC_BENCH_WARMUP_SECS", 1)),
        size: env_u64("VMSYNC_BENCH_SIZE_MIB", 128) * MIB,
        direct_io: env_u64("VMSYNC_BENCH_DIRECT_IO", 0) != 0,
        keep_cache: env_u64("VMSYNC_BENCH_KEEP_CACHE", 0) != 0,
        extra_toml: std::env::var("VMSYNC_BENCH_EXTRA_TOML").unwrap_or_default(),
        pinning: if env_u64("VMSYNC_BENCH_PIN", 0) != 0 {
            Some(split_cpus().expect("VMSYNC_BENCH_PIN needs at least 2 CPUs"))
        } else {
            None
        },
    };
    if let Some((primary, _)) = &params.pinning {
        // Only the main thread exists yet: the client runtime's threads
        // inherit this.
        nix::sched::sched_setaffinity(
            nix::unistd::Pid::from_raw(0),
            &support::daemon::cpu_set(primary),
        )
        .expect("pin the bench client");
    }
    // `cargo bench` passes `--bench`; other arguments filter configurations.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let setups: Vec<Setup> = SETUPS
        .iter()
        .copied()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| f.eq_ignore_ascii_case(s.key)))
        .collect();

    let started = Instant::now();
    println!(
        "vmsync replication bench: {} MiB device, {} backings ({}), {}s warm-up + {}s per workload, {} CPUs",
        params.size / MIB,
        if params.direct_io {
            "O_DIRECT file"
        } else {
            "buffered file"
        },
        if params.keep_cache {
            "page cache kept"
        } else {
            "page cache dropped before each workload"
        },
        params.warmup.as_secs(),
        params.measure.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    if !params.extra_toml.is_empty() {
        println!("extra config: {:?}", params.extra_toml);
    }
    match &params.pinning {
        Some((primary, peers)) => println!(
            "pinned: node 1 and the bench client on CPUs {primary:?}, peers on CPUs {peers:?}"
        ),
        None => println!("not pinned: every process shares every CPU"),
    }

    let mut results: Vec<(Setup, Vec<(Workload, Measurement)>)> = Vec::new();
    for setup in setups {
        println!("\n== {} ==", setup.label());
        let rows = bench_setup(setup, &params);
        results.push((setup, rows));
    }

    let baseline = results
        .iter()
        .find(|(s, _)| s.peers == 0)
        .map(|(_, rows)| rows);
    println!(
        "\n## Results ({} MiB device, {}s per workload, loopback, {} backings, {})\n",
        params.size / MIB,
        params.measure.as_secs(),
        if params.direct_io {
            "O_DIRECT"
        } else {
            "buffered"
        },
        if params.pinning.is_some() {
            "primary and peers pinned to separate CPUs"
        } else {
            "all processes share all CPUs"
        },
    );
    println!("| configuration | workload | IOPS | MB/s | p50 µs | p99 µs | vs local | CPU % n1 / peers / bench / irq (other) | n1 CPU µs/op | peers after |");
    println!("|---|---|---:|---:|---:|---:|---:|---|---:|---|");
    for (setup, rows) in &results {
        for (i, (w, m)) in rows.iter().enumerate() {
            let ratio = baseline
                .and_then(|b| b.get(i))
                .map_or("-".to_string(), |(_, b)| {
                    format!("{:.2}", m.iops() / b.iops())
                });
            let cpu: Vec<String> = m.cpu.iter().map(|(_, c)| format!("{c:.0}")).collect();
            let peers = if m.peers.is_empty() {
                "-".to_string()
            } else {
                m.peers.join(", ")
            };
            println!(
                "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} / {:.0} ({:.0}) | {:.1} | {} |",
                setup.label(),
                w.name,
                m.iops(),
                m.mbps(),
                m.p50_us,
                m.p99_us,
                ratio,
                cpu.join(" / "),
                m.irq_cpu(),
                m.other_cpu(),
                m.n1_cpu_us_per_op(),
                peers,
            );
        }
    }
    println!(
        "\n(vs local: IOPS ratio to the 0-peer run above, equal to the MB/s ratio; \
         targets: protocol A, 2 peers >= 0.90; protocol C >= 0.60)"
    );
    print_protection_cost(&results);
    println!("total run time {:.0}s", started.elapsed().as_secs_f64());
}

/// What link protection costs: each protected setup against its
/// unprotected twin of the same run (throughput ratio, and the primary's
/// CPU time per request — utime + stime from /proc, what getrusage reports
/// inside the process — protected over unprotected).
fn print_protection_cost(results: &[(Setup, Vec<(Workload, Measurement)>)]) {
    let pairs: Vec<_> = results
        .iter()
        .filter(|(s, _)| s.protected && s.peers > 0)
        .filter_map(|(s, rows)| {
            let plain = results.iter().find(|(p, _)| p.key == s.plain_key())?;
            Some((s, rows, &plain.1))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    println!("\n## What link protection costs (protected vs unprotected, same run)\n");
    println!("| configuration | workload | MB/s unprotected | MB/s protected | throughput ratio | n1 CPU µs/op unprotected | protected | CPU ratio |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (setup, rows, plain) in pairs {
        for ((w, m), (_, p)) in rows.iter().zip(plain.iter()) {
            println!(
                "| {} peer(s), protocol {} | {} | {:.1} | {:.1} | **{:.2}** | {:.1} | {:.1} | {:.2} |",
                setup.peers,
                setup.protocol,
                w.name,
                p.mbps(),
                m.mbps(),
                m.mbps() / p.mbps(),
                p.n1_cpu_us_per_op(),
                m.n1_cpu_us_per_op(),
                m.n1_cpu_us_per_op() / p.n1_cpu_us_per_op().max(0.001),
            );
        }
    }
    println!("\n(target: throughput ratio >= 0.90 for 1 MiB writes)");
}

/// Starts the cluster for `setup`, syncs it and runs every workload.
fn bench_setup(setup: Setup, params: &Params) -> Vec<(Workload, Measurement)> {
    let t0 = Instant::now();
    let cluster = start_cluster(setup, params);
    if setup.peers > 0 {
        cluster.promote(1);
        assert!(
            wait_synced(&cluster),
            "initial sync did not finish within {SYNC_TIMEOUT:?}"
        );
    }
    println!(
        "cluster up{} in {:.1}s",
        if setup.peers > 0 { " and synced" } else { "" },
        t0.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(BlockClient::connect(&cluster.dir.node(1).block_socket))
        .expect("connect to node 1's block socket");
    let mut pids: Vec<(String, u32)> = cluster
        .daemons
        .iter()
        .map(|d| (d.node.name.clone(), d.pid()))
        .collect();
    pids.push(("bench".into(), std::process::id()));

    let mut rows = Vec::new();
    for w in WORKLOADS {
        if !params.keep_cache {
            drop_page_cache(&cluster);
        }
        let mut m = rt.block_on(run_workload(&client, w, params, &pids));
        rt.block_on(client.flush())
            .expect("flush after the workload");
        m.peers = peer_states(&cluster);
        print_measurement(&w, &m);
        // Let the peers drain before the next workload so a backlog (or a
        // peer that fell behind and resyncs) does not count against it.
        if setup.peers > 0 && !wait_synced(&cluster) {
            println!("  warning: peers did not catch up within {SYNC_TIMEOUT:?}");
        }
        rows.push((w, m));
    }
    drop(client);
    drop(rt);
    rows
}

/// Like `Cluster::start`, but optionally with O_DIRECT backings (a `[node]`
/// key, so it cannot go through `ClusterSpec::extra_toml`).
fn start_cluster(setup: Setup, params: &Params) -> Cluster {
    let spec = ClusterSpec {
        nodes: setup.peers + 1,
        size: params.size,
        protocol: setup.protocol,
        block_socket: true,
        extra_toml: params.extra_toml.clone(),
        ..ClusterSpec::default()
    };
    let dir = TestDir::with_spec(spec);
    if params.direct_io {
        for id in 1..=dir.spec.nodes {
            let toml = dir
                .config_toml(id)
                .replace("\n[node]\n", "\n[node]\ndirect_io = true\n");
            dir.write_config(id, &toml);
        }
    }
    for n in &dir.nodes {
        let out = ctl(&n.config, &["create-md"]);
        assert!(
            out.status.success(),
            "create-md: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let daemons = dir
        .nodes
        .iter()
        .map(|node| {
            let cpus = params.pinning.as_ref().map(|(primary, peers)| {
                if node.id == 1 {
                    primary.as_slice()
                } else {
                    peers.as_slice()
                }
            });
            let env: &[(&str, Option<&str>)] = if setup.protected {
                &[]
            } else {
                &[("VMSYNC_BENCH_UNPROTECTED_LINKS", Some("1"))]
            };
            Daemon::start_with(node, cpus, &[], env)
        })
        .collect();
    let mut cluster = Cluster { dir, daemons };
    for d in &mut cluster.daemons {
        d.wait_ready(support::cluster::START);
    }
    for id in 1..=cluster.dir.spec.nodes {
        cluster.wait_linked(id);
    }
    cluster
}

/// Writes back and evicts every node's backing image from the page cache,
/// so each workload starts from the same cold cache in every configuration.
///
/// Without this the comparison is skewed by the set-up, not by replication:
/// the initial full sync *reads* the primary's whole sparse image, which
/// fills the page cache with large folios over holes, and on recent kernels
/// (seen on 6.18 ext4) a 4 KiB buffered write into such a folio costs about
/// five times one into an empty cache (`ext4_block_write_begin` walks the
/// whole folio). The 0-peer baseline never reads its image, so it would not
/// pay that. `VMSYNC_BENCH_KEEP_CACHE=1` skips this to show the effect.
fn drop_page_cache(cluster: &Cluster) {
    use std::os::fd::AsRawFd;
    for node in &cluster.dir.nodes {
        let file = std::fs::File::open(&node.backing).expect("open a backing image");
        file.sync_data().expect("write back a backing image");
        // SAFETY: a plain advisory call on a file descriptor we own.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(
            rc,
            0,
            "posix_fadvise(DONTNEED) on {}",
            node.backing.display()
        );
    }
}

/// `Cluster::wait_peers_up_to_date` with a timeout that fits bigger devices.
fn wait_synced(cluster: &Cluster) -> bool {
    support::wait_for(
        || {
            cluster.daemons[0]
                .try_status_json()
                .and_then(|s| {
                    s["peers"].as_array().map(|ps| {
                        ps.iter()
                            .all(|p| p["state"] == "up-to-date" && p["stale_bytes"] == 0)
                    })
                })
                .unwrap_or(false)
        },
        SYNC_TIMEOUT,
    )
}

fn peer_states(cluster: &Cluster) -> Vec<String> {
    let status = cluster.status(1);
    status["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let state = p["state"].as_str().unwrap_or("?");
                    let stale = p["stale_bytes"].as_u64().unwrap_or(0);
                    if stale == 0 {
                        state.to_string()
                    } else {
                        format!("{state} ({} KiB stale)", stale / KIB)
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn print_measurement(w: &Workload, m: &Measurement) {
    let cpu: Vec<String> = m
        .cpu
        .iter()
        .map(|(name, c)| format!("{name} {c:.0}%"))
        .collect();
    println!(
        "  {:<18} {:>9.0} IOPS {:>8.1} MB/s  p50 {:>6} µs  p99 {:>6} µs  ({} ops in {:.2}s)",
        w.name,
        m.iops(),
        m.mbps(),
        m.p50_us,
        m.p99_us,
        m.ops,
        m.elapsed.as_secs_f64()
    );
    let mut line = format!(
        "  {:<18} cpu: {}, irq+softirq {:.0}%, other processes {:.0}% (machine {:.0}% busy); n1 {:.1} µs CPU/op",
        "",
        cpu.join(", "),
        m.irq_cpu(),
        m.other_cpu(),
        m.machine_busy,
        m.n1_cpu_us_per_op(),
    );
    if !m.peers.is_empty() {
        let _ = write!(line, "; peers after: {}", m.peers.join(", "));
    }
    println!("{line}");
    if !m.all_peers_mirrored() {
        println!("  {:<18} note: a peer was not mirrored to at the end of the run; its ratio overstates protocol cost", "");
    }
}

/// Runs `w` for warm-up + measure with `w.qd` requests always in flight.
/// Only requests that complete inside the measured window count.
async fn run_workload(
    client: &BlockClient,
    w: Workload,
    params: &Params,
    pids: &[(String, u32)],
) -> Measurement {
    let mut data = vec![0u8; w.block as usize];
    StdRng::seed_from_u64(w.block).fill_bytes(&mut data);
    let data = Bytes::from(data);
    let blocks = params.size / w.block;
    let t0 = tokio::time::Instant::now();
    let measure_from = t0 + params.warmup;
    let end = measure_from + params.measure;
    let next_seq = Arc::new(AtomicU64::new(0));

    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..w.qd {
        let client = client.clone();
        let data = data.clone();
        let next_seq = Arc::clone(&next_seq);
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(worker as u64 + 1);
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            loop {
                let start = tokio::time::Instant::now();
                if start >= end {
                    break;
                }
                let block = match w.pattern {
                    Pattern::Random => rng.gen_range(0..blocks),
                    Pattern::Sequential => next_seq.fetch_add(1, Ordering::Relaxed) % blocks,
                };
                client
                    .write(block * w.block, data.clone(), false)
                    .await
                    .expect("write through the block socket");
                let done = tokio::time::Instant::now();
                if done >= measure_from && done <= end {
                    let us = (done - start).as_micros().min(u32::MAX as u128) as u32;
                    latencies.push(us);
                }
            }
            latencies
        });
    }

    tokio::time::sleep_until(measure_from).await;
    let cpu_before = cpu_ticks(pids);
    let machine_before = machine_ticks();
    let window_start = Instant::now();
    tokio::time::sleep_until(end).await;
    let cpu_after = cpu_ticks(pids);
    let machine_after = machine_ticks();
    let window = window_start.elapsed();

    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("workload task"));
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as u64
    };
    let hz = clock_ticks_per_sec();
    let cpu = pids
        .iter()
        .zip(cpu_before.iter().zip(&cpu_after))
        .map(|((name, _), (b, a))| {
            let secs = a.saturating_sub(*b) as f64 / hz;
            (name.clone(), 100.0 * secs / window.as_secs_f64())
        })
        .collect();
    let (machine_busy, machine_irq) = match (machine_before, machine_after) {
        (Some(before), Some(after)) if after.total > before.total => {
            let total = (after.total - before.total) as f64;
            (
                100.0 * after.busy.saturating_sub(before.busy) as f64 / total,
                100.0 * after.irq.saturating_sub(before.irq) as f64 / total,
            )
        }
        _ => (0.0, 0.0),
    };
    Measurement {
        ops: latencies.len() as u64,
        elapsed: params.measure,
        block: w.block,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu,
        machine_busy,
        machine_irq,
        peers: Vec::new(),
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime of each process (all its threads), in clock ticks.
fn cpu_ticks(pids: &[(String, u32)]) -> Vec<u64> {
    pids.iter()
        .map(|(_, pid)| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return 0;
            };
            // Fields after the parenthesised command name, which may hold spaces.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line (state, field 3, is 0 here).
            let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            get(11).unwrap_or(0) + get(12).unwrap_or(0)
        })
        .collect()
}

/// Jiffies of all CPUs together, from /proc/stat.
struct MachineTicks {
    busy: u64,
    /// irq + softirq (part of `busy`).
    irq: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = values.iter().take(8).sum();
    let field = |i: usize| values.get(i).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: total - field(3) - field(4),
        irq: field(5) + field(6),
        total,
    })
}
