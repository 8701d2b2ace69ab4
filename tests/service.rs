//! Running vmsync as a service: systemd's readiness protocol, log formats
//! for log collectors, and the generated man pages and shell completions.
//!
//! The readiness tests stand in for systemd the way systemd itself talks to
//! a `Type=notify` service: a Unix datagram socket named by `NOTIFY_SOCKET`
//! in the daemon's environment, on which it sends `READY=1` and `STATUS=...`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{ctl, ClusterSpec, Daemon, TestDir};

const VMSYNCCTL: &str = env!("CARGO_BIN_EXE_vmsyncctl");
const VMSYNCD: &str = env!("CARGO_BIN_EXE_vmsyncd");
const START: Duration = Duration::from_secs(15);

/// The service manager's end of `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: String,
    /// Every message received so far, in order.
    messages: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            path: path.to_str().unwrap().to_string(),
            messages: Vec::new(),
        }
    }

    /// Collects what arrives for `span`.
    fn collect_for(&mut self, span: Duration) {
        let deadline = Instant::now() + span;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.messages
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Waits for a message containing `READY=1`; true when one came.
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.saw_ready() {
                return true;
            }
            self.collect_for(Duration::from_millis(100));
        }
        self.saw_ready()
    }

    fn saw_ready(&self) -> bool {
        self.messages
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1"))
    }

    fn statuses(&self) -> Vec<&str> {
        self.messages
            .iter()
            .flat_map(|m| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .collect()
    }
}

fn create_md(dir: &TestDir) {
    for n in &dir.nodes {
        let out = ctl(&n.config, &["create-md"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_secondary_is_ready_only_once_a_peer_has_linked() {
    let dir = TestDir::with_spec(ClusterSpec::default());
    create_md(&dir);
    let mut notify = NotifySocket::bind(dir.path());
    let mut secondary = Daemon::start_with(
        dir.node(2),
        None,
        &[],
        &[("NOTIFY_SOCKET", Some(&notify.path))],
    );
    secondary.wait_ready(START);
    // Alone, it answers its control socket but is not usable yet: no READY,
    // and the status line says what it waits for.
    notify.collect_for(Duration::from_secs(2));
    assert!(
        !notify.saw_ready(),
        "READY before any peer linked: {:?}",
        notify.messages
    );
    let statuses = notify.statuses();
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("secondary") && s.contains("0/1 peers linked (waiting for a peer)")),
        "no waiting status line: {statuses:?}"
    );

    let mut primary = Daemon::start(dir.node(1));
    primary.wait_ready(START);
    assert!(
        notify.wait_ready(START),
        "no READY=1 after the peer started: {:?}",
        notify.messages
    );
    let linked = secondary.status_json()["peers"][0]["connected"].as_bool();
    assert_eq!(linked, Some(true), "READY sent but the peer is not linked");
    assert!(
        notify
            .statuses()
            .iter()
            .any(|s| s.contains("1/1 peers linked")),
        "{:?}",
        notify.messages
    );

    // A clean stop tells the manager it is stopping.
    secondary.sigterm_and_wait(START);
    notify.collect_for(Duration::from_millis(300));
    assert!(
        notify.messages.iter().any(|m| m.contains("STOPPING=1")),
        "{:?}",
        notify.messages
    );
}

#[test]
fn a_standalone_disk_is_ready_when_its_device_exists() {
    let dir = TestDir::with_spec(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    create_md(&dir);
    let mut notify = NotifySocket::bind(dir.path());
    let mut node = Daemon::start_with(
        dir.node(1),
        None,
        &[],
        &[("NOTIFY_SOCKET", Some(&notify.path))],
    );
    assert!(notify.wait_ready(START), "{:?}", notify.messages);
    node.wait_ready(START);
    let device = node.status_json()["device"].as_str().map(str::to_string);
    assert_eq!(
        device.as_deref(),
        dir.node(1).block_socket.to_str(),
        "READY but no device"
    );
    assert!(
        notify
            .statuses()
            .iter()
            .any(|s| s.starts_with("standalone up-to-date, ")),
        "{:?}",
        notify.messages
    );
}

/// The log lines after the harness's last start marker.
fn log_since_start(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.rfind("===== test harness").unwrap();
    text[start..].lines().skip(1).map(str::to_string).collect()
}

#[test]
fn json_logs_are_one_object_per_line_with_the_node_span() {
    let dir = TestDir::with_spec(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    create_md(&dir);
    let mut node = Daemon::start_with(dir.node(1), None, &["--log-format", "json"], &[]);
    node.wait_ready(START);
    node.sigterm_and_wait(START);
    let lines = log_since_start(&dir.node(1).log);
    assert!(lines.len() >= 2, "{lines:?}");
    let mut saw_ready = false;
    for line in &lines {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
        assert!(entry["timestamp"].is_string(), "{line}");
        if entry["fields"]["message"] == "vmsyncd ready" {
            saw_ready = true;
            assert_eq!(entry["span"]["resource"], "r0", "{line}");
            assert_eq!(entry["span"]["node"], "n1", "{line}");
        }
    }
    assert!(saw_ready, "{lines:?}");
}

#[test]
fn text_logs_to_a_file_carry_no_colour_codes() {
    let dir = TestDir::with_spec(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    create_md(&dir);
    // Without the harness's NO_COLOR: stderr being a file must be enough.
    let mut node = Daemon::start_with(dir.node(1), None, &[], &[("NO_COLOR", None)]);
    node.wait_ready(START);
    node.sigterm_and_wait(START);
    let lines = log_since_start(&dir.node(1).log);
    assert!(
        lines.iter().any(|l| l.contains("vmsyncd ready")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\x1b')),
        "ANSI escapes in a log file: {lines:?}"
    );
}

#[test]
fn a_bad_log_format_is_refused_with_the_choices() {
    let dir = TestDir::new(1);
    let out = Command::new(VMSYNCD)
        .args(["--config", dir.node(1).config.to_str().unwrap()])
        .args(["--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'xml'") && err.contains("json"),
        "{err}"
    );
}

fn vmsyncctl(args: &[&str]) -> std::process::Output {
    Command::new(VMSYNCCTL).args(args).output().unwrap()
}

#[test]
fn completions_cover_every_verb_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vmsyncctl(&["completions", shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        for verb in [
            "status",
            "promote",
            "demote",
            "verify",
            "gen-secret",
            "create-md",
        ] {
            assert!(script.contains(verb), "{shell} completion lacks {verb}");
        }
    }
    let out = vmsyncctl(&["completions", "cmd.exe"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'cmd.exe'"));
}

#[test]
fn man_pages_are_generated_for_every_verb_and_the_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmsyncctl(&["man", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "vmsyncctl.1",
        "vmsyncctl-status.1",
        "vmsyncctl-promote.1",
        "vmsyncctl-gen-secret.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH vmsyncctl"), "{page} is not a man page");
    }
    let promote = std::fs::read_to_string(dir.path().join("vmsyncctl-promote.1")).unwrap();
    assert!(promote.contains("force"), "{promote}");

    let out = Command::new(VMSYNCD).arg("--man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains(".TH vmsyncd") && page.contains("log\\-format"),
        "{page}"
    );

    let missing = dir.path().join("no/such/dir");
    let out = vmsyncctl(&["man", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot write man pages into") && err.contains("no/such/dir"),
        "{err}"
    );
    assert!(!missing.exists());
}

#[test]
fn the_daemon_without_config_says_so() {
    let out = Command::new(VMSYNCD).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

#[test]
fn every_log_line_of_a_replicating_node_names_its_resource_and_node() {
    let dir = TestDir::with_spec(ClusterSpec::default());
    create_md(&dir);
    let mut n1 = Daemon::start_with(dir.node(1), None, &["--log-format", "json"], &[]);
    let mut n2 = Daemon::start(dir.node(2));
    n1.wait_ready(START);
    n2.wait_ready(START);
    assert!(support::wait_for(
        || n1.status_json()["peers"][0]["connected"] == true,
        START
    ));
    let out = n1.ctl(&["promote"]);
    assert!(out.status.success());
    assert!(support::wait_for(
        || n1.status_json()["peers"][0]["state"] == "up-to-date",
        START
    ));
    n1.sigterm_and_wait(START);
    let lines = log_since_start(&dir.node(1).log);
    let mut link_lines = 0;
    for line in &lines {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        let spans = entry["spans"].as_array().cloned().unwrap_or_default();
        let in_node = spans
            .iter()
            .any(|s| s["resource"] == "r0" && s["node"] == "n1");
        assert!(in_node, "a log line without the node's span: {line}");
        if spans
            .iter()
            .any(|s| s["name"] == "link" && s["peer"] == "n2")
        {
            link_lines += 1;
        }
    }
    assert!(link_lines > 0, "no line names the link to n2: {lines:?}");
}
