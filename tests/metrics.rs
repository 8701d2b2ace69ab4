//! The Prometheus endpoint (`[metrics] listen`): real `vmsyncd` processes,
//! scraped over HTTP on loopback while a workload runs.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::cluster::client;
use support::daemon::VMSYNCD;
use support::testdir::free_ports;
use support::{ctl, runtime, wait_for, Cluster, ClusterSpec, Model, Workload};

/// `GET path` on `address`: (status code, body).
fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("the metrics endpoint accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

/// The value of the sample `series` (name and labels as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample `{series}` in:\n{text}"))
}

/// The bytes a workload op writes with data (discards and zeroes carry none).
fn write_len(op: &support::Op) -> u64 {
    match *op {
        support::Op::Write { len, .. } => len,
        _ => 0,
    }
}

/// Two nodes, each with its own metrics port.
fn cluster_with_metrics() -> (Cluster, Vec<SocketAddr>) {
    let ports = free_ports(2);
    let addresses = ports.clone();
    let cluster = Cluster::start_edited(
        ClusterSpec {
            nodes: 2,
            protocol: "C",
            ..ClusterSpec::default()
        },
        move |dir| {
            for (id, address) in (1..=2).zip(&addresses) {
                let toml = dir.config_toml(id) + &format!("\n[metrics]\nlisten = \"{address}\"\n");
                dir.write_config(id, &toml);
            }
        },
    );
    (cluster, ports)
}

#[test]
fn metrics_show_state_and_the_counters_move_under_load() {
    let rt = runtime();
    let (cluster, metrics) = cluster_with_metrics();
    let (code, before) = get(metrics[0], "/metrics");
    assert_eq!(code, 200, "{before}");
    assert_eq!(value(&before, "vmsync_role{role=\"secondary\"}"), 1.0);
    assert_eq!(value(&before, "vmsync_peer_connected{peer=\"n2\"}"), 1.0);
    assert!(before.trim_end().ends_with("# EOF"), "{before}");

    cluster.promote(1);
    assert!(cluster.wait_peers_up_to_date(1));
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(9, size);
    let ops = gen.ops(300);
    let c1 = client(&rt, &cluster, 1);
    let model = rt
        .block_on(support::workload::run(&c1, &ops, 16, Model::zeroed(size)))
        .expect("writes");
    rt.block_on(c1.flush()).unwrap();
    let written: u64 = ops.iter().map(write_len).sum();
    assert!(written > 0);

    let (_, after) = get(metrics[0], "/metrics");
    assert_eq!(value(&after, "vmsync_role{role=\"primary\"}"), 1.0);
    assert_eq!(value(&after, "vmsync_device_exposed"), 1.0);
    assert_eq!(
        value(&after, "vmsync_request_bytes_total{op=\"write\"}"),
        written as f64,
        "every byte the workload wrote is counted once"
    );
    let writes = ops.iter().filter(|op| write_len(op) > 0).count() as f64;
    assert_eq!(
        value(
            &after,
            "vmsync_request_duration_seconds_count{op=\"write\"}"
        ),
        writes
    );
    assert!(value(&after, "vmsync_requests_total{op=\"flush\"}") >= 1.0);
    assert_eq!(
        value(&after, "vmsync_request_errors_total{op=\"write\"}"),
        0.0
    );
    // Protocol C: every write went to the peer as it happened.
    assert_eq!(
        value(&after, "vmsync_peer_replicated_bytes_total{peer=\"n2\"}"),
        written as f64
    );
    assert_eq!(
        value(
            &after,
            "vmsync_peer_state{peer=\"n2\",state=\"up-to-date\"}"
        ),
        1.0
    );
    assert_eq!(value(&after, "vmsync_peer_stale_bytes{peer=\"n2\"}"), 0.0);
    // The secondary's endpoint tells its own story.
    let (_, secondary) = get(metrics[1], "/metrics");
    assert_eq!(value(&secondary, "vmsync_role{role=\"secondary\"}"), 1.0);
    assert_eq!(
        value(
            &secondary,
            "vmsync_peer_state{peer=\"n1\",state=\"primary\"}"
        ),
        1.0
    );

    // The link goes down: writes now leave stale bytes for the peer.
    let out = cluster.daemons[0].ctl(&["disconnect", "n2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_for(
        || sample(
            &get(metrics[0], "/metrics").1,
            "vmsync_peer_connected{peer=\"n2\"}"
        ) == Some(0.0),
        Duration::from_secs(10)
    ));
    let more = gen.ops(50);
    rt.block_on(support::workload::run(&c1, &more, 16, model))
        .unwrap();
    let (_, down) = get(metrics[0], "/metrics");
    assert!(
        value(&down, "vmsync_peer_stale_bytes{peer=\"n2\"}") > 0.0,
        "{down}"
    );
    assert_eq!(
        value(
            &down,
            "vmsync_peer_state{peer=\"n2\",state=\"disconnected\"}"
        ),
        1.0
    );

    let (code, _) = get(metrics[0], "/other");
    assert_eq!(code, 404);
}

/// A metrics address that is taken or malformed stops the daemon at start
/// with a message naming the key, before it touches the metadata.
#[test]
fn a_bad_metrics_address_is_refused_at_start_and_changes_nothing() {
    let dir = support::TestDir::new(1);
    let node = dir.node(1);
    let out = ctl(&node.config, &["create-md"]);
    assert!(out.status.success());
    let metadata_before = std::fs::read(&node.metadata).unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    for (listen, message) in [
        (taken.local_addr().unwrap().to_string(), "[metrics] listen"),
        ("localhost".to_string(), "metrics.listen"),
    ] {
        let toml = dir.config_toml(1) + &format!("\n[metrics]\nlisten = \"{listen}\"\n");
        dir.write_config(1, &toml);
        let out = std::process::Command::new(VMSYNCD)
            .arg("--config")
            .arg(&node.config)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "vmsyncd started with metrics at {listen}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{listen}: {stderr}");
        assert_eq!(
            std::fs::read(&node.metadata).unwrap(),
            metadata_before,
            "the metadata changed although the daemon refused to start"
        );
    }
}
