//! The kernel's own price of a peer, the baseline of "CPU per extra peer":
//! no vmsync, one thread in the primary's namespace hands every peer the
//! same 1 MiB buffers over the same shaped links (blocking `write_all`s,
//! the buffers rotating through 64 MiB so that, like a guest's writes, they
//! are cold), and a sink in each peer's namespace reads and drops them.
//! The sender thread's CPU per MiB is what sending costs before any
//! replication protocol: the copy into the socket, TCP, the shaper, the
//! acks and, on veths without NAPI threads, the receiver's work that runs
//! in softirq context on the sending CPU. With `MSG_ZEROCOPY` (the
//! `*-zerocopy` configuration) the copy into the socket goes; a veth still
//! copies at delivery, in the receiver's NAPI thread.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::{rate_bits, schedstat_seconds, Row, Star, Workload, PAYLOAD_FRACTION};

const PORT: u16 = 7999;
/// Distinct buffers the sender rotates through (of `Workload::block` each).
const BUFFERS: usize = 64;

/// Moves the calling thread (only it) into network namespace `netns`.
fn enter(netns: &str) {
    let ns = File::open(format!("/run/netns/{netns}")).expect("open the namespace");
    setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    schedstat_seconds(std::path::Path::new("/proc/thread-self/schedstat"))
        .expect("the thread's schedstat")
}

/// What the sender measured: requests (one buffer to every peer) in the
/// window, requests in all, its CPU seconds in the window.
struct Sent {
    in_window: u64,
    all: u64,
    cpu_s: f64,
}

/// Sends all of `buf` on `conn` with `MSG_ZEROCOPY` (the kernel sends from
/// our pages and tells us when it is done with them), reaping the
/// completion notices as they come so the socket's option memory does not
/// fill. The buffers are never rewritten, so nothing waits for them.
fn send_zero_copy(conn: &TcpStream, buf: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = conn.as_raw_fd();
    let mut sent = 0;
    while sent < buf.len() {
        let rest = &buf[sent..];
        // SAFETY: `rest` is valid for reads of its length for the call.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_ZEROCOPY) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                reap_notices(fd);
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        reap_notices(fd);
    }
    Ok(())
}

/// Reads every pending zero-copy completion notice off the error queue.
fn reap_notices(fd: std::os::fd::RawFd) {
    let mut control = [0u8; 256];
    loop {
        // SAFETY: an all-zero msghdr is valid; the control buffer outlives
        // the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: `msg` points at valid memory for the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            return;
        }
    }
}

pub(super) fn run(
    config: &'static str,
    (rate, peers, napi_threads, zero_copy): (&'static str, usize, bool, bool),
    w: Workload,
    (secs, warmup): (u64, u64),
) -> Row {
    let star = Star::create(peers, rate);
    if napi_threads {
        star.receive_in_napi_threads();
    }
    let (ready_tx, ready_rx) = mpsc::channel();
    let sinks: Vec<_> = star
        .spokes
        .iter()
        .map(|spoke| {
            let (netns, ip, ready) = (spoke.netns.clone(), spoke.ip, ready_tx.clone());
            std::thread::spawn(move || {
                enter(&netns);
                let listener = TcpListener::bind(SocketAddr::new(ip, PORT)).expect("bind");
                ready.send(()).expect("ready");
                let (mut conn, _) = listener.accept().expect("accept");
                let mut buf = vec![0u8; 1 << 20];
                while conn.read(&mut buf).expect("sink read") > 0 {}
            })
        })
        .collect();
    for _ in 0..peers {
        ready_rx.recv().expect("sink ready");
    }

    let hub = star.hub.clone();
    let targets: Vec<SocketAddr> = star
        .spokes
        .iter()
        .map(|s| SocketAddr::new(s.ip, PORT))
        .collect();
    let before: Vec<u64> = (0..peers).map(|i| star.hub_sent(i)).collect();
    let block = w.block as usize;
    let sender = std::thread::spawn(move || {
        let mut data = vec![0u8; block * BUFFERS];
        StdRng::seed_from_u64(w.block).fill_bytes(&mut data);
        enter(&hub);
        let mut conns: Vec<TcpStream> = targets
            .iter()
            .map(|a| TcpStream::connect(a).expect("connect to the sink"))
            .collect();
        if zero_copy {
            for conn in &conns {
                use std::os::fd::AsRawFd;
                let on: libc::c_int = 1;
                // SAFETY: `on` is a valid c_int for the call.
                let rc = unsafe {
                    libc::setsockopt(
                        conn.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ZEROCOPY,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as _,
                    )
                };
                assert_eq!(rc, 0, "SO_ZEROCOPY: {}", std::io::Error::last_os_error());
            }
        }
        let start = Instant::now();
        let (from, end) = (
            start + Duration::from_secs(warmup),
            start + Duration::from_secs(warmup + secs),
        );
        let mut window: Option<(u64, f64)> = None;
        let mut all = 0u64;
        loop {
            let buf = &data[(all as usize % BUFFERS) * block..][..block];
            for conn in &mut conns {
                if zero_copy {
                    send_zero_copy(conn, buf).expect("send to the sink");
                } else {
                    conn.write_all(buf).expect("send to the sink");
                }
            }
            all += 1;
            let now = Instant::now();
            if window.is_none() && now >= from {
                window = Some((all, thread_cpu_seconds()));
            }
            if now >= end {
                let (first, cpu0) = window.expect("the window began");
                break Sent {
                    in_window: all - first,
                    all,
                    cpu_s: thread_cpu_seconds() - cpu0,
                };
            }
        }
    });
    let sent = sender.join().expect("sender");
    for sink in sinks {
        sink.join().expect("sink");
    }
    let after: Vec<u64> = (0..peers).map(|i| star.hub_sent(i)).collect();
    let written_total = (sent.all * w.block) as f64;
    let cpu_us_per_op = sent.cpu_s * 1e6 / sent.in_window.max(1) as f64;
    Row {
        config,
        rate,
        peers,
        workload: w.name,
        mb_per_s: (sent.in_window * w.block) as f64 / secs as f64 / 1e6,
        payload_mb_per_s: rate_bits(rate) as f64 / 8.0 * PAYLOAD_FRACTION / 1e6,
        wire_per_byte: before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) as f64 / written_total)
            .collect(),
        cpu_us_per_op,
        idle_cpu_percent: 0.0,
        cpu_net_us_per_op: cpu_us_per_op,
    }
}
