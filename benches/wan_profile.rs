//! The thesis's WAN experiment (Kim 2011, Table 3.2): replay the write
//! profile measured while a large file was decompressed — 5-second dirty
//! rates from 0 to 14.2 MB/s over about a minute — on a primary whose
//! remote LAN group (two nodes) sits behind a WAN link shaped with `tc tbf`
//! (7 Mbit/s by default), and report, from one run:
//!
//! * the time from the end of the burst until both remote nodes are
//!   current, against the physical limit (distinct dirty bytes ÷ link
//!   rate), as a ratio (target: within 1.2x);
//! * the bytes that crossed the WAN (interface counters of the shaped
//!   veth), against an `rsync --inplace --no-whole-file` of the primary's
//!   image to a copy of the pre-burst image at the remote site, over the
//!   same link, in the same run (target: fewer for vmsync, which serves two
//!   remote nodes where rsync serves one);
//! * the guest's write latency during the burst, against the same burst on
//!   a cluster with no WAN peer at all (target: within 1.1x).
//!
//! Sites are network namespaces joined by a veth (`tests/support/netns`);
//! each site's nodes share its loopback (their LAN). Needs root, `tc` and
//! `rsync`.
//!
//! What the guest writes (`VMSYNC_BENCH_DATA`): `noise` (the default)
//! compresses not at all, the worst case for vmsync's compression and the
//! one where the bytes are decided by framing alone; `text` is text-like
//! data (`fill_text`: made-up words with natural language's skew, zstd
//! about 2.6x per write, LZ4 about 1.5x, gzip about 2.3x — real source
//! code does better on all three), closer to what decompressing an
//! archive writes.
//! With `text` rsync also runs with `-z`, a second baseline that
//! compresses too (rsync 3.2+ picks zstd, one stream over the whole image,
//! where vmsync compresses each 256 KiB message on its own).
//!
//! Environment: `VMSYNC_BENCH_SCALE` (default 0.25: the profile's rates are
//! scaled, its timing is kept; 1 replays the full 357 MB, which takes about
//! 15 minutes at 7 Mbit/s, twice: once for vmsync, once for rsync),
//! `VMSYNC_BENCH_WAN` (tc rate, default `7mbit`), `VMSYNC_BENCH_DATA`,
//! `VMSYNC_BENCH_CONNECTIONS` (set: print what each TCP connection at the
//! remote site moved while the remote site caught up — where the bytes
//! beyond the data go).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockdev::blocksock::BlockClient;
use support::workload::{fill_pattern, fill_text};
use support::{runtime, wait_for, Cluster, ClusterSpec};

/// MB/s written in each 5-second interval (Table 3.2).
const PROFILE_MB_PER_S: [f64; 13] = [
    0.040, 0.013, 0.0, 0.003, 3.734, 14.155, 9.845, 6.554, 11.088, 9.474, 10.080, 4.970, 1.402,
];
const INTERVAL: Duration = Duration::from_secs(5);
/// The guest's write size (a file system writing back a big file).
const WRITE: u64 = 256 * 1024;
const MIB: u64 = 1 << 20;

fn main() {
    let scale: f64 = env_or("VMSYNC_BENCH_SCALE", 0.25);
    let wan = std::env::var("VMSYNC_BENCH_WAN").unwrap_or_else(|_| "7mbit".into());
    let link_rate = support::netns::rate_bits(&wan) / 8;
    let text = match std::env::var("VMSYNC_BENCH_DATA").as_deref() {
        Ok("text") => true,
        Ok("noise") | Err(_) => false,
        Ok(other) => panic!("VMSYNC_BENCH_DATA={other}: noise or text"),
    };
    let plan = Plan::new(scale, text);
    let size = (plan.total.div_ceil(64 * MIB) + 1) * 64 * MIB;
    println!(
        "thesis write profile x{scale}: {} intervals of 5 s, {:.1} MB distinct ({}), device {} MiB, WAN {wan}",
        PROFILE_MB_PER_S.len(),
        plan.total as f64 / 1e6,
        plan.compressibility(),
        size / MIB
    );
    let rt = runtime();

    // Baseline: the same burst on a primary with one LAN peer and no WAN peer.
    let baseline = {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            protocol: "C",
            size,
            ..ClusterSpec::default()
        });
        cluster.promote(1);
        assert!(cluster.wait_peers_up_to_date(1), "initial sync");
        let client = support::cluster::client(&rt, &cluster, 1);
        rt.block_on(replay(&client, &plan))
    };

    // vmsync: home (primary + LAN peer) and away (two nodes) over the link.
    let (link, cluster, client) = support::cluster::two_sites_of_two_sized(
        &rt,
        &wan,
        // The budget above the link: the link is what limits.
        &format!("{}kbit", link_rate * 2 * 8 / 1000),
        size,
    );
    let before_image = cluster.dir.path().join("remote-copy.img");
    std::fs::copy(&cluster.dir.node(1).backing, &before_image).expect("copy the pre-burst image");
    let connections_before =
        std::env::var_os("VMSYNC_BENCH_CONNECTIONS").map(|_| connection_counts(&link.away.netns));
    let before = link.bytes();
    let mut latencies = rt.block_on(replay(&client, &plan));
    let burst_end = Instant::now();
    latencies.backlog_at_end = cluster.peer(1, 3)["stale_bytes"].as_u64().unwrap_or(0);
    let current = wait_for(
        || {
            [3, 4].iter().all(|&id| {
                let p = cluster.peer(1, id);
                p["state"] == "up-to-date" && p["stale_bytes"] == 0
            })
        },
        Duration::from_secs(3600),
    );
    assert!(current, "the remote site did not catch up");
    let lag = burst_end.elapsed().as_secs_f64();
    if let Some(before) = &connections_before {
        // What each TCP connection at the remote site moved during the
        // measured window (payload bytes; packets include pure acks).
        for (connection, now) in connection_counts(&link.away.netns) {
            let then = before.get(&connection).copied().unwrap_or_default();
            println!(
                "connection {connection}: sent {} B, received {} B, packets out {}, in {}",
                now[0] - then[0],
                now[1] - then[1],
                now[2] - then[2],
                now[3] - then[3]
            );
        }
    }
    let after = link.bytes();
    let vmsync_bytes = after.0 - before.0;
    let vmsync_back = after.1 - before.1;
    let backlog_at_end = latencies.backlog_at_end;
    for id in [3, 4] {
        assert_eq!(
            cluster.hash(id),
            cluster.hash(1),
            "remote node {id} differs from the primary"
        );
    }

    // rsync of the primary's image to the pre-burst copy, over the same link
    // (and, for compressible data, once more with rsync's compression).
    let before_image_z = cluster.dir.path().join("remote-copy-z.img");
    if text {
        std::fs::copy(&before_image, &before_image_z).expect("copy the pre-burst image");
    }
    let rsync = rsync_over(&link, &cluster.dir.node(1).backing, &before_image, &[]);
    let rsync_z = text.then(|| {
        rsync_over(
            &link,
            &cluster.dir.node(1).backing,
            &before_image_z,
            &["-z"],
        )
    });

    // The link cannot carry data before the guest writes it: the earliest
    // the remote site can be current is when a link-rate drain of the
    // profile (a fluid model, no overhead) empties after the last write.
    let fluid_backlog = plan.backlog_at_end(link_rate);
    let physical = fluid_backlog as f64 / link_rate as f64;
    let backlog_limit = backlog_at_end as f64 / link_rate as f64;
    println!();
    println!("| measure | vmsync | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| remote site current, after the burst ended | {lag:.1} s | physical limit {physical:.1} s ({:.1} MB a link-rate drain of the profile still holds at its end ÷ link rate) | {} | ≤ 1.2 |",
        fluid_backlog as f64 / 1e6,
        if physical > 0.5 {
            format!("{:.2}", lag / physical)
        } else {
            "– (the link keeps up with the profile at this scale)".to_string()
        }
    );
    println!(
        "| ... against what the first remote node still lacked at the end | {lag:.1} s | {backlog_limit:.1} s ({:.1} MB ÷ link rate) | {} | – |",
        backlog_at_end as f64 / 1e6,
        if backlog_limit > 0.5 {
            format!("{:.2}", lag / backlog_limit)
        } else {
            "–".to_string()
        }
    );
    let vmsync_total = vmsync_bytes + vmsync_back;
    let against = |label: &str, name: &str, r: &Rsync, target: &str| {
        println!(
            "| {label} | {:.2} MB | {name} {:.2} MB in {:.1} s | {:.3} | {target} |",
            vmsync_total as f64 / 1e6,
            (r.bytes + r.back) as f64 / 1e6,
            r.seconds,
            vmsync_total as f64 / (r.bytes + r.back) as f64
        )
    };
    against(
        "WAN bytes, both ways (2 remote nodes vs rsync to 1)",
        "rsync",
        &rsync,
        "< 1",
    );
    if let Some(z) = &rsync_z {
        against(
            "... against rsync -z (it picks zstd, one stream for the whole image)",
            "rsync -z",
            z,
            "–",
        );
    }
    println!(
        "| ... to the remote site | {:.2} MB | rsync {:.2} MB | {:.3} | – |",
        vmsync_bytes as f64 / 1e6,
        rsync.bytes as f64 / 1e6,
        vmsync_bytes as f64 / rsync.bytes as f64
    );
    println!(
        "| ... back (TCP acks; hashes and acks, or rsync's block checksums) | {:.2} MB | rsync {:.2} MB | {:.3} | – |",
        vmsync_back as f64 / 1e6,
        rsync.back as f64 / 1e6,
        vmsync_back as f64 / rsync.back.max(1) as f64
    );
    println!(
        "| bytes over the WAN per distinct dirty byte | {:.3} | rsync {:.3} | – | – |",
        vmsync_bytes as f64 / plan.total as f64,
        rsync.bytes as f64 / plan.total as f64
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let v = latencies.quantile(q);
        let b = baseline.quantile(q);
        println!(
            "| guest write latency {name} during the burst | {:.2} ms | no WAN peer {:.2} ms | {:.2} | ≤ 1.1 |",
            v * 1e3,
            b * 1e3,
            v / b
        );
    }
    println!(
        "| mean | {:.2} ms | {:.2} ms | {:.2} | ≤ 1.1 |",
        latencies.mean() * 1e3,
        baseline.mean() * 1e3,
        latencies.mean() / baseline.mean()
    );
    drop(client);
    drop(cluster);
    drop(link);
}

/// Per established TCP connection in `netns` ("local<->peer"): bytes sent,
/// bytes received, packets out, packets in (`ss -ti`).
fn connection_counts(netns: &str) -> std::collections::BTreeMap<String, [u64; 4]> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tinH"])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut counts = std::collections::BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() != Some(&"ESTAB") || fields.len() < 5 {
            continue;
        }
        let info = lines.get(i + 1).copied().unwrap_or("");
        let field = |key: &str| {
            info.split_whitespace()
                .find_map(|w| w.strip_prefix(key).and_then(|v| v.parse().ok()))
                .unwrap_or(0)
        };
        counts.insert(
            format!("{}<->{}", fields[3], fields[4]),
            [
                field("bytes_sent:"),
                field("bytes_received:"),
                field("segs_out:"),
                field("segs_in:"),
            ],
        );
    }
    counts
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The writes of each interval: distinct, sequential 256 KiB writes, of
/// incompressible or of text-like data.
struct Plan {
    intervals: Vec<u64>,
    total: u64,
    text: bool,
}

impl Plan {
    fn new(scale: f64, text: bool) -> Plan {
        let intervals: Vec<u64> = PROFILE_MB_PER_S
            .iter()
            .map(|rate| {
                let bytes = rate * 1e6 * INTERVAL.as_secs_f64() * scale;
                (bytes as u64).div_ceil(WRITE) * WRITE
            })
            .collect();
        let total = intervals.iter().sum();
        Plan {
            intervals,
            total,
            text,
        }
    }

    /// The data of the write at `offset`.
    fn fill(&self, offset: u64, data: &mut [u8]) {
        if self.text {
            fill_text(offset / WRITE + 1, data);
        } else {
            fill_pattern(offset / WRITE + 1, data);
        }
    }

    /// How well the data compresses in the pieces the push compresses
    /// (256 KiB, one write each): "zstd 2.6x, lz4 1.5x".
    fn compressibility(&self) -> String {
        use protocol::compress::{compress, Codec};
        let mut data = vec![0u8; WRITE as usize];
        let ratio = |codec: Codec, data: &mut [u8]| {
            let packed: u64 = (0..self.total / WRITE)
                .map(|w| {
                    self.fill(w * WRITE, data);
                    compress(codec, data).map_or(WRITE, |(_, packed)| packed.len() as u64)
                })
                .sum();
            self.total as f64 / packed as f64
        };
        format!(
            "{}: zstd {:.2}x, lz4 {:.2}x",
            if self.text { "text" } else { "noise" },
            ratio(Codec::Zstd, &mut data),
            ratio(Codec::Lz4, &mut data)
        )
    }

    /// Bytes a link of `rate` bytes/s, draining the writes as they come,
    /// still has to carry when the profile ends.
    fn backlog_at_end(&self, rate: u64) -> u64 {
        let per_interval = rate as f64 * INTERVAL.as_secs_f64();
        self.intervals.iter().fold(0.0f64, |backlog, &written| {
            (backlog + written as f64 - per_interval).max(0.0)
        }) as u64
    }
}

struct Latencies {
    seconds: Vec<f64>,
    /// Bytes the primary's remote peers still lacked when the burst ended
    /// (0 for the baseline).
    backlog_at_end: u64,
}

impl Latencies {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.seconds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[((sorted.len() - 1) as f64 * q) as usize]
    }

    fn mean(&self) -> f64 {
        self.seconds.iter().sum::<f64>() / self.seconds.len() as f64
    }
}

/// Writes the profile through `client`: each interval's bytes spread evenly
/// over its 5 seconds, one write at a time, flushed every second.
async fn replay(client: &BlockClient, plan: &Plan) -> Latencies {
    let mut seconds = Vec::new();
    let mut offset = 0u64;
    let mut data = vec![0u8; WRITE as usize];
    let start = tokio::time::Instant::now();
    for (i, &bytes) in plan.intervals.iter().enumerate() {
        let begin = start + INTERVAL * i as u32;
        let writes = bytes / WRITE;
        for w in 0..writes {
            let due = begin + INTERVAL.mul_f64(w as f64 / writes as f64);
            tokio::time::sleep_until(due).await;
            plan.fill(offset, &mut data);
            let t = Instant::now();
            client
                .write(offset, data.clone(), false)
                .await
                .expect("guest write");
            seconds.push(t.elapsed().as_secs_f64());
            offset += WRITE;
            if (w + 1) % 16 == 0 {
                client.flush().await.expect("guest flush");
            }
        }
        tokio::time::sleep_until(begin + INTERVAL).await;
    }
    client.flush().await.expect("guest flush");
    Latencies {
        seconds,
        backlog_at_end: 0,
    }
}

struct Rsync {
    /// Bytes sent to the remote site, and back from it.
    bytes: u64,
    back: u64,
    seconds: f64,
}

/// `rsync --inplace --no-whole-file EXTRA SOURCE` (in the home namespace)
/// to an rsync daemon in the away namespace serving `target`'s directory.
fn rsync_over(
    link: &support::netns::WanLink,
    source: &std::path::Path,
    target: &std::path::Path,
    extra: &[&str],
) -> Rsync {
    let dir = target.parent().expect("a directory");
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[remote]\npath = {}\nread only = no\n",
            dir.display()
        ),
    )
    .unwrap();
    let port = 18730;
    let mut daemon: Child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &link.away.netns,
            "rsync",
            "--daemon",
            "--no-detach",
        ])
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--address={}", link.away.ip))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsync --daemon (install rsync)");
    std::thread::sleep(Duration::from_millis(500));
    let name = target.file_name().unwrap().to_string_lossy().to_string();
    let before = link.bytes();
    let started = Instant::now();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &link.home.netns,
            "rsync",
            "--inplace",
            "--no-whole-file",
        ])
        .args(extra)
        .arg(source)
        .arg(format!("rsync://{}:{port}/remote/{name}", link.away.ip))
        .output()
        .expect("rsync");
    let seconds = started.elapsed().as_secs_f64();
    let after = link.bytes();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        support::blake3_of_file(source, std::fs::metadata(source).unwrap().len()),
        support::blake3_of_file(target, std::fs::metadata(target).unwrap().len()),
        "rsync's copy differs"
    );
    Rsync {
        bytes: after.0 - before.0,
        back: after.1 - before.1,
        seconds,
    }
}
