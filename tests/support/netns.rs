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
