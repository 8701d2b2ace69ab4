//! Two network namespaces joined by a veth pair shaped with `tc tbf`: a
//! slow WAN link between two sites, each of which is a LAN of its own
//! (nodes of one site share its namespace and reach each other over its
//! loopback, unshaped). Needs root (`ip netns`); removed on drop.
//!
//! Processes run inside with `ip netns exec` (see
//! `Daemon::start_in_netns`); Unix sockets (control, block socket) live in
//! the file system and work across namespaces, so the test drives the
//! daemons as usual.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One end of the link.
pub struct Site {
    pub netns: String,
    pub veth: String,
    pub ip: IpAddr,
}

pub struct WanLink {
    pub home: Site,
    pub away: Site,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed (network namespaces need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl WanLink {
    /// Creates the namespaces and the link, shaped to `rate` (tc syntax,
    /// e.g. "8mbit") in each direction.
    pub fn create(rate: &str) -> WanLink {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Names unique per process and link; interface names fit 15 bytes.
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let subnet = (std::process::id() as u8).wrapping_add(n as u8);
        let site = |side: &str, host: u8| Site {
            netns: format!("vms-{tag}-{side}"),
            veth: format!("vw{tag}{side}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 213, subnet, host)),
        };
        let link = WanLink {
            home: site("h", 1),
            away: site("a", 2),
        };
        for s in [&link.home, &link.away] {
            run(&["ip", "netns", "add", &s.netns]);
        }
        run(&[
            "ip",
            "link",
            "add",
            &link.home.veth,
            "netns",
            &link.home.netns,
            "type",
            "veth",
            "peer",
            "name",
            &link.away.veth,
            "netns",
            &link.away.netns,
        ]);
        for s in [&link.home, &link.away] {
            let ns = s.netns.as_str();
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", s.ip),
                "dev",
                &s.veth,
            ]);
            run(&["ip", "-n", ns, "link", "set", &s.veth, "up"]);
            // Token bucket on each side's egress: the link's rate both ways.
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", &s.veth, "root", "tbf",
                "rate", rate, "burst", "32kbit", "latency", "400ms",
            ]);
        }
        link
    }

    /// Bytes `site` has sent over the link so far (its veth end's
    /// transmit counter: Ethernet, IP and TCP headers included).
    pub fn sent_by(site: &Site) -> u64 {
        let out = Command::new("ip")
            .args([
                "-n",
                &site.netns,
                "-s",
                "-j",
                "link",
                "show",
                "dev",
                &site.veth,
            ])
            .output()
            .expect("ip link show");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        json[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no tx counter in {json}"))
    }

    /// Bytes sent home to away and away to home so far.
    pub fn bytes(&self) -> (u64, u64) {
        (WanLink::sent_by(&self.home), WanLink::sent_by(&self.away))
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end (and so the pair).
        for s in [&self.home, &self.away] {
            let _ = Command::new("ip").args(["netns", "del", &s.netns]).output();
        }
    }
}

/// One spoke of a [`Star`]: a namespace joined to the hub by its own veth.
pub struct Spoke {
    pub netns: String,
    /// The spoke's end of its link, and its address.
    pub veth: String,
    pub ip: IpAddr,
    /// The hub's end of this spoke's link, and its address on it.
    pub hub_veth: String,
    pub hub_ip: IpAddr,
}

/// A hub namespace joined to each spoke namespace by a veth of its own,
/// shaped with `tc tbf` to the same rate both ways: a primary (the hub)
/// and its peers on separate machines, each behind its own link. The hub
/// forwards between spokes, so peers reach each other through it.
pub struct Star {
    pub hub: String,
    pub spokes: Vec<Spoke>,
    /// Each link's `tbf` rate and bucket.
    rate: String,
    burst: String,
}

impl Star {
    /// `spokes` links shaped to `rate` (tc syntax, e.g. "1gbit").
    pub fn create(spokes: usize, rate: &str) -> Star {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 10_000);
        let base = (std::process::id() as u8).wrapping_add(n as u8 * 8);
        let hub = format!("vms-{tag}-hub");
        run(&["ip", "netns", "add", &hub]);
        run(&["ip", "-n", &hub, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &hub,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        // The bucket must hold a few timer ticks of traffic at this rate,
        // or tbf cannot reach it.
        let burst = format!("{}b", (rate_bits(rate) / 8 / 100).max(32 * 1024));
        let mut star = Star {
            hub,
            spokes: Vec::new(),
            rate: rate.to_string(),
            burst: burst.clone(),
        };
        for i in 0..spokes {
            let subnet = base.wrapping_add(i as u8);
            let spoke = Spoke {
                netns: format!("vms-{tag}-s{i}"),
                veth: format!("vs{tag}s{i}"),
                ip: IpAddr::V4(Ipv4Addr::new(10, 214, subnet, 2)),
                hub_veth: format!("vs{tag}h{i}"),
                hub_ip: IpAddr::V4(Ipv4Addr::new(10, 214, subnet, 1)),
            };
            run(&["ip", "netns", "add", &spoke.netns]);
            run(&["ip", "-n", &spoke.netns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "link",
                "add",
                &spoke.hub_veth,
                "netns",
                &star.hub,
                "type",
                "veth",
                "peer",
                "name",
                &spoke.veth,
                "netns",
                &spoke.netns,
            ]);
            for (ns, dev, ip) in [
                (&star.hub, &spoke.hub_veth, spoke.hub_ip),
                (&spoke.netns, &spoke.veth, spoke.ip),
            ] {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    dev,
                ]);
                run(&["ip", "-n", ns, "link", "set", dev, "up"]);
                run(&[
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle",
                    "1:", "tbf", "rate", rate, "burst", &burst, "latency", "50ms",
                ]);
            }
            run(&[
                "ip",
                "-n",
                &spoke.netns,
                "route",
                "add",
                "default",
                "via",
                &spoke.hub_ip.to_string(),
            ]);
            star.spokes.push(spoke);
        }
        star
    }

    /// Moves every link's receive processing into NAPI kernel threads of
    /// its own (GRO on, `threaded` set on both ends of each veth), as on
    /// separate machines, where a packet is received on the receiver's CPU.
    /// Otherwise a veth delivers a packet in softirq context on the sending
    /// CPU, so the peers' TCP receive work is charged to whichever process
    /// sent it (the primary). Needs `ethtool`.
    pub fn receive_in_napi_threads(&self) {
        for spoke in &self.spokes {
            for (ns, dev) in [(&self.hub, &spoke.hub_veth), (&spoke.netns, &spoke.veth)] {
                run(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"]);
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sh",
                    "-c",
                    &format!("echo 1 > /sys/class/net/{dev}/threaded"),
                ]);
            }
        }
    }

    /// Shortens what each link's shaper may queue from 50 ms of its rate
    /// to `latency`, dropping what would wait longer (as an AQM would: a
    /// TCP flow then backs off instead of filling the queue). A latency
    /// measured across the link then shows the sender's own queueing, not
    /// the shaper's. (This machine's kernel has no `fq_codel`.)
    pub fn limit_queues(&self, latency: &str) {
        for spoke in &self.spokes {
            for (ns, dev) in [(&self.hub, &spoke.hub_veth), (&spoke.netns, &spoke.veth)] {
                let tbf = format!(
                    "tc qdisc change dev {dev} root handle 1: tbf rate {} burst {} latency {latency}",
                    self.rate, self.burst
                );
                let mut args = vec!["ip", "netns", "exec", ns.as_str()];
                args.extend(tbf.split_whitespace());
                run(&args);
            }
        }
    }

    /// Bytes the hub sent on spoke `i`'s link (headers included).
    pub fn hub_sent(&self, i: usize) -> u64 {
        WanLink::sent_by(&Site {
            netns: self.hub.clone(),
            veth: self.spokes[i].hub_veth.clone(),
            ip: self.spokes[i].hub_ip,
        })
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.hub).chain(self.spokes.iter().map(|s| &s.netns)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A tc rate ("100mbit", "1gbit", "8kbit") in bits per second.
pub fn rate_bits(rate: &str) -> u64 {
    let lower = rate.to_ascii_lowercase();
    let at = lower
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(at);
    let n: f64 = number.parse().expect("a tc rate such as 100mbit");
    let scale = match unit {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bit" | "" => 1.0,
        other => panic!("unknown tc rate unit {other}"),
    };
    (n * scale) as u64
}
