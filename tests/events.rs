//! `vmsyncctl events` and `vmsyncctl status --watch`: what a cluster
//! manager or an operator watching a failover sees. Real `vmsyncd`
//! processes on loopback; `vmsyncctl events` runs as a child process and
//! its lines are read as they come.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::client;
use support::daemon::VMSYNCCTL;
use support::{runtime, wait_for, Cluster, ClusterSpec, Model, Workload};

/// A running `vmsyncctl events`, its lines collected by a thread.
struct EventStream {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl EventStream {
    fn start(config: &std::path::Path, args: &[&str]) -> EventStream {
        let mut child = Command::new(VMSYNCCTL)
            .arg("--config")
            .arg(config)
            .arg("events")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vmsyncctl events starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        EventStream {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Collects lines until one satisfies `wanted` (true) or `timeout`.
    fn wait_until(&mut self, timeout: Duration, wanted: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        panic!("events --json printed a non-JSON line ({e}): {line}")
                    });
                    self.seen.push(line);
                    if wanted(&event) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    fn events(&self) -> Vec<Value> {
        self.seen
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event matcher: kind, object, peer and the properties that must hold.
fn is(
    kind: &str,
    object: &str,
    peer: Option<&str>,
    props: &[(&str, Value)],
) -> impl Fn(&Value) -> bool {
    let kind = kind.to_string();
    let object = object.to_string();
    let peer = peer.map(str::to_string);
    let props: Vec<(String, Value)> = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    move |e: &Value| {
        e["kind"] == kind.as_str()
            && e["object"] == object.as_str()
            && peer.as_deref().is_none_or(|p| e["peer"] == p)
            && props.iter().all(|(k, v)| &e["props"][k] == v)
    }
}

/// Asserts that `expected` occur in `events` in this order (other events
/// may come between them).
type Matcher = Box<dyn Fn(&Value) -> bool>;

fn assert_in_order(events: &[Value], expected: &[(&str, Matcher)]) {
    let mut rest = events.iter();
    for (what, matches) in expected {
        assert!(
            rest.any(matches),
            "expected `{what}` (in this order) among the events:\n{}",
            events
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Every transition of a failover, as node 2 sees it: its primary dies,
/// node 2 is promoted and its device appears, the old primary comes back,
/// is resynced with what node 2 wrote meanwhile, and is up to date.
#[test]
fn events_show_every_transition_of_a_failover_in_order() {
    let rt = runtime();
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        protocol: "C",
        ..ClusterSpec::default()
    });
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(5, size);
    cluster.promote(1);
    let c1 = client(&rt, &cluster, 1);
    let model = rt
        .block_on(support::workload::run(
            &c1,
            &gen.ops(200),
            16,
            Model::zeroed(size),
        ))
        .expect("writes on node 1");
    rt.block_on(c1.flush()).unwrap();
    drop(c1);
    assert!(cluster.wait_peers_up_to_date(1));

    let config2 = cluster.dir.node(2).config.clone();
    let mut events = EventStream::start(&config2, &["--json"]);
    assert!(
        events.wait_until(Duration::from_secs(10), is("exists", "verify", None, &[])),
        "no exists events at subscription: {:?}",
        events.seen
    );

    cluster.daemon(1).sigkill();
    assert!(events.wait_until(
        Duration::from_secs(20),
        is("change", "peer", Some("n1"), &[("connected", false.into())])
    ));
    cluster.promote(2);
    let c2 = client(&rt, &cluster, 2);
    let model = rt
        .block_on(support::workload::run(&c2, &gen.ops(100), 16, model))
        .expect("writes on node 2");
    rt.block_on(c2.flush()).unwrap();

    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    assert!(
        events.wait_until(
            Duration::from_secs(60),
            is(
                "change",
                "peer",
                Some("n1"),
                &[("state", "up-to-date".into())]
            )
        ),
        "node 1 never became up to date: {:?}",
        events.seen
    );
    assert!(cluster.wait_identical(Some(model.blake3())).is_ok());

    let seen = events.events();
    let socket = cluster.dir.node(2).block_socket.display().to_string();
    assert_in_order(
        &seen,
        &[
            (
                "exists resource role=secondary",
                Box::new(is(
                    "exists",
                    "resource",
                    None,
                    &[("role", "secondary".into()), ("disk", "up-to-date".into())],
                )),
            ),
            (
                "exists device path=null",
                Box::new(is("exists", "device", None, &[("path", Value::Null)])),
            ),
            (
                "exists peer:n1 connected, primary",
                Box::new(is(
                    "exists",
                    "peer",
                    Some("n1"),
                    &[("connected", true.into()), ("state", "primary".into())],
                )),
            ),
            (
                "change peer:n1 connected=false",
                Box::new(is(
                    "change",
                    "peer",
                    Some("n1"),
                    &[("connected", false.into())],
                )),
            ),
            (
                "change resource role=primary",
                Box::new(is(
                    "change",
                    "resource",
                    None,
                    &[("role", "primary".into())],
                )),
            ),
            (
                "change device path=<block socket>",
                Box::new(is(
                    "change",
                    "device",
                    None,
                    &[("path", socket.clone().into())],
                )),
            ),
            (
                "change peer:n1 connected=true role=secondary",
                Box::new(is(
                    "change",
                    "peer",
                    Some("n1"),
                    &[("connected", true.into()), ("role", "secondary".into())],
                )),
            ),
            (
                "change peer:n1 state=resyncing",
                Box::new(is(
                    "change",
                    "peer",
                    Some("n1"),
                    &[("state", "resyncing".into())],
                )),
            ),
            (
                "change peer:n1 state=up-to-date",
                Box::new(is(
                    "change",
                    "peer",
                    Some("n1"),
                    &[("state", "up-to-date".into())],
                )),
            ),
        ],
    );
    // Sequence numbers only grow.
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// `events --now` prints the present state as text and exits; a running
/// `events` ends with a `destroy` line when the daemon stops.
#[test]
fn events_now_prints_the_state_and_a_stopping_daemon_ends_the_stream() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    });
    let now = cluster.daemon(1).ctl(&["events", "--now"]);
    assert!(
        now.status.success(),
        "{}",
        String::from_utf8_lossy(&now.stderr)
    );
    let text = String::from_utf8_lossy(&now.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("exists resource ") && lines[0].contains(" role=secondary"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("exists peer:n2 ") && l.contains("connected=true")),
        "{text}"
    );
    assert!(lines.contains(&"exists device path=-"), "{text}");

    let config = cluster.dir.node(1).config.clone();
    let mut events = EventStream::start(&config, &["--json"]);
    assert!(events.wait_until(Duration::from_secs(10), is("exists", "verify", None, &[])));
    let out = cluster.daemon(1).ctl(&["shutdown"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        events.wait_until(
            Duration::from_secs(10),
            is(
                "destroy",
                "resource",
                None,
                &[("reason", serde_json::json!("stop"))]
            )
        ),
        "no destroy event: {:?}",
        events.seen
    );
    let status = events.child.wait().expect("vmsyncctl events exits");
    assert!(
        status.success(),
        "vmsyncctl events failed after destroy: {status}"
    );
}

/// Bad arguments are refused with a clear message, and `status --watch`
/// without a terminal prints one plain line per interval.
#[test]
fn status_watch_prints_lines_without_a_terminal_and_bad_arguments_are_refused() {
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    });
    for (args, message) in [
        (
            &["status", "--watch", "--interval", "0"][..],
            "not a number of seconds from 0.1 to 3600",
        ),
        (&["status", "--interval", "2"][..], "--watch"),
        (&["status", "--watch", "--json"][..], "cannot be used with"),
        (&["events", "--bogus"][..], "unexpected argument"),
    ] {
        let out = cluster.daemon(1).ctl(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }

    let mut watch = Command::new(VMSYNCCTL)
        .arg("--config")
        .arg(&cluster.dir.node(1).config)
        .args(["status", "--watch", "--interval", "0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The daemon goes away: watch reports it and exits with an error.
    cluster.daemon(1).sigterm_and_wait(Duration::from_secs(10));
    assert!(wait_for(
        || watch.try_wait().unwrap().is_some(),
        Duration::from_secs(10)
    ));
    let out = watch.wait_with_output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("r0 on n1: secondary (term ") && l.contains("; n2 ")),
        "{text}"
    );
}

/// A split brain is announced: node 1 writes while cut off from node 2,
/// dies; node 2 is promoted and writes; node 1 comes back as secondary and
/// node 2 (primary) refuses the link. Its events say `split-brain` for n1.
#[test]
fn events_announce_a_split_brain() {
    let rt = runtime();
    let (mut cluster, proxy) = support::cluster::proxied_pair(&rt, "C", "");
    let size = cluster.dir.spec.size;
    let mut gen = Workload::new(41, size);
    let c1 = client(&rt, &cluster, 1);
    rt.block_on(support::workload::run(
        &c1,
        &gen.ops(100),
        16,
        Model::zeroed(size),
    ))
    .unwrap();
    rt.block_on(c1.flush()).unwrap();
    assert!(cluster.wait_peers_up_to_date(1));
    proxy.cut();
    assert!(wait_for(
        || cluster.peer(1, 2)["connected"] == false && cluster.peer(2, 1)["connected"] == false,
        Duration::from_secs(20)
    ));
    rt.block_on(support::workload::run(
        &c1,
        &gen.ops(50),
        16,
        Model::zeroed(size),
    ))
    .unwrap();
    rt.block_on(c1.flush()).unwrap();
    drop(c1);
    cluster.daemon(1).sigkill();
    cluster.promote(2);
    let c2 = client(&rt, &cluster, 2);
    rt.block_on(support::workload::run(
        &c2,
        &gen.ops(50),
        16,
        Model::zeroed(size),
    ))
    .unwrap();
    rt.block_on(c2.flush()).unwrap();

    let config2 = cluster.dir.node(2).config.clone();
    let mut events = EventStream::start(&config2, &["--json"]);
    proxy.heal();
    *cluster.daemon(1) = support::Daemon::start(cluster.dir.node(1));
    cluster.daemon(1).wait_ready(support::cluster::START);
    assert!(
        events.wait_until(
            Duration::from_secs(30),
            is("split-brain", "peer", Some("n1"), &[])
        ),
        "no split-brain event: {:?}",
        events.seen
    );
    let event = events.events().pop().unwrap();
    assert!(
        event["props"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("split brain")),
        "{event}"
    );
    // A refused link retried with backoff is not announced again and again.
    std::thread::sleep(Duration::from_secs(3));
    while let Ok(line) = events.lines.try_recv() {
        events.seen.push(line);
    }
    let announced = events
        .events()
        .iter()
        .filter(|e| e["kind"] == "split-brain")
        .count();
    assert_eq!(announced, 1, "{:?}", events.seen);
}
