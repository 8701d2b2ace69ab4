//! The daemon refuses bad input and writes nothing.
//!
//! Every case runs the real `vmsyncd --config F` on a standalone node (no
//! peers; `block_socket` set, so no ublk is needed) and checks what an
//! operator would: the daemon exits non-zero within seconds, its message
//! names the file and the key or reason, and neither the metadata nor the
//! backing file changed by a single byte (nor did a socket appear).
//! The control socket gets garbage too, and the daemon must keep serving.
//! Last, the positive path: a standalone node serves its block socket and
//! records whether it last stopped cleanly or crashed.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{ctl, runtime, ClusterSpec, Daemon, NodeFiles, TestDir};

const VMSYNCD: &str = env!("CARGO_BIN_EXE_vmsyncd");
const SIZE: u64 = 16 << 20;
/// How long a refusing daemon may take to exit.
const EXIT: Duration = Duration::from_secs(5);
const START: Duration = Duration::from_secs(15);

/// One standalone node (its config has no peers), metadata not created.
fn standalone() -> TestDir {
    TestDir::with_spec(ClusterSpec {
        nodes: 1,
        size: SIZE,
        ..ClusterSpec::default()
    })
}

fn node(dir: &TestDir) -> &NodeFiles {
    dir.node(1)
}

fn create_md(config: &Path, force: bool) -> std::process::Output {
    let args: &[&str] = if force {
        &["create-md", "--force"]
    } else {
        &["create-md"]
    };
    ctl(config, args)
}

fn must_create_md(config: &Path) {
    let out = create_md(config, false);
    assert!(
        out.status.success(),
        "create-md with {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything the daemon could have touched, byte for byte.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    metadata: Option<Vec<u8>>,
    /// Length and BLAKE3 of the backing file.
    backing: Option<(u64, blake3::Hash)>,
    control_socket: bool,
    block_socket: bool,
}

fn snapshot(node: &NodeFiles) -> Snapshot {
    Snapshot {
        metadata: std::fs::read(&node.metadata).ok(),
        backing: std::fs::read(&node.backing)
            .ok()
            .map(|b| (b.len() as u64, blake3::hash(&b))),
        control_socket: node.control_socket.exists(),
        block_socket: node.block_socket.exists(),
    }
}

/// A finished `vmsyncd` run.
struct Run {
    code: Option<i32>,
    stderr: String,
}

/// Runs `vmsyncd --config <config>` and waits for it to exit; panics if it
/// is still running after [`EXIT`].
fn run_vmsyncd(config: &Path) -> Run {
    let mut child = Command::new(VMSYNCD)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {VMSYNCD}: {e}"));
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + EXIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vmsyncd --config {} was still running after {EXIT:?}; stderr: {}",
                config.display(),
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stderr: reader.join().unwrap(),
    }
}

/// Runs the daemon on `config`, which must be refused: a non-zero exit (not
/// a crash by signal), a message naming every one of `mentions`, and not a
/// byte changed in the node's files.
fn assert_refused(node: &NodeFiles, config: &Path, mentions: &[&str]) -> String {
    let before = snapshot(node);
    let run = run_vmsyncd(config);
    let stderr = run.stderr;
    match run.code {
        Some(0) => panic!("vmsyncd accepted {}; stderr: {stderr}", config.display()),
        Some(_) => {}
        None => panic!("vmsyncd died by a signal; stderr: {stderr}"),
    }
    for m in mentions {
        assert!(
            stderr.contains(m),
            "vmsyncd's message does not mention \"{m}\":\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("panicked"),
        "vmsyncd panicked instead of refusing:\n{stderr}"
    );
    let after = snapshot(node);
    assert!(
        after.metadata == before.metadata,
        "the refused start changed the metadata file {}",
        node.metadata.display()
    );
    assert_eq!(
        after.backing,
        before.backing,
        "the refused start changed the backing file {}",
        node.backing.display()
    );
    assert_eq!(after, before, "the refused start left files behind");
    stderr
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Writes a variant of node 1's config to a new file and returns its path.
fn variant(dir: &TestDir, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let original = dir.config_toml(1);
    let edited = edit(original.clone());
    assert_ne!(edited, original, "the edit for {name} changed nothing");
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, edited).unwrap();
    path
}

/// Replaces exactly one occurrence of `from`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "\"{from}\" is not in the config exactly once:\n{text}"
    );
    text.replacen(from, to, 1)
}

// ---- configuration ---------------------------------------------------------

#[test]
fn invalid_toml_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let bad = variant(&dir, "invalid", |t| replace_once(&t, "[node]", "[node"));
    let stderr = assert_refused(node(&dir), &bad, &[path_str(&bad)]);
    assert!(
        stderr.contains("line ") || stderr.contains("TOML parse error"),
        "the message does not say where the syntax error is:\n{stderr}"
    );
}

#[test]
fn an_unknown_key_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let bad = variant(&dir, "unknown-key", |t| {
        replace_once(&t, "[node]\n", "[node]\ncolour = \"blue\"\n")
    });
    assert_refused(node(&dir), &bad, &[path_str(&bad), "colour"]);
}

#[test]
fn a_bad_size_suffix_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let bad = variant(&dir, "size", |t| {
        replace_once(&t, &format!("size = {SIZE}\n"), "size = \"12XB\"\n")
    });
    assert_refused(node(&dir), &bad, &[path_str(&bad), "resource.size", "XB"]);
}

#[test]
fn a_size_that_is_not_a_multiple_of_4k_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let bad = variant(&dir, "size-4k", |t| {
        replace_once(&t, &format!("size = {SIZE}\n"), "size = 1000\n")
    });
    assert_refused(
        node(&dir),
        &bad,
        &[path_str(&bad), "resource.size", "4 KiB"],
    );
}

#[test]
fn a_bad_address_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let listen = node(&dir).listen;
    let bad = variant(&dir, "address", |t| {
        replace_once(
            &t,
            &format!("listen = \"{listen}\""),
            "listen = \"localhost:port\"",
        )
    });
    assert_refused(
        node(&dir),
        &bad,
        &[path_str(&bad), "node.listen", "localhost:port"],
    );
}

#[test]
fn a_bad_peer_address_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let bad = variant(&dir, "peer-address", |t| {
        t + "\n[[peer]]\nid = 2\nname = \"n2\"\naddress = \"300.1.2.3:7000\"\n"
    });
    assert_refused(
        node(&dir),
        &bad,
        &[path_str(&bad), "peer[0].address", "300.1.2.3:7000"],
    );
}

#[test]
fn a_missing_config_file_is_refused() {
    let dir = standalone();
    must_create_md(&node(&dir).config);
    let missing = dir.path().join("does-not-exist.toml");
    assert_refused(node(&dir), &missing, &[path_str(&missing), "cannot read"]);
}

// ---- metadata ----------------------------------------------------------------

#[test]
fn metadata_with_a_flipped_byte_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let mut meta = std::fs::read(&n.metadata).unwrap();
    // Byte 44 is the low byte of the term, inside the checksummed sector;
    // flipped in both superblock copies (sectors 0 and 1), since one
    // damaged copy alone is survived by using the other.
    meta[44] ^= 0x01;
    meta[4096 + 44] ^= 0x01;
    std::fs::write(&n.metadata, &meta).unwrap();
    assert_refused(n, &n.config, &[path_str(&n.metadata), "checksum"]);
}

/// Half a sector of garbage over one superblock copy (sector 0 or 1 of the
/// metadata, a torn write): the daemon starts from the other copy. Over
/// both: refused, naming the file, and nothing written.
#[test]
fn a_torn_superblock_copy_is_survived_and_two_are_refused() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let tear = |copy: usize| {
        let mut meta = std::fs::read(&n.metadata).unwrap();
        meta[copy * 4096..copy * 4096 + 2048].fill(0xc3);
        std::fs::write(&n.metadata, &meta).unwrap();
    };
    for copy in [0, 1] {
        // A clean stop first, so both copies are valid before the tear.
        let mut d = start(n);
        assert!(d.sigterm_and_wait(START).success());
        tear(copy);
        let mut d = start(n);
        let status = d.status_json();
        assert_eq!(status["role"], "standalone", "torn copy {copy}: {status}");
        assert_eq!(status["term"], 0, "{status}");
        assert!(d.sigterm_and_wait(START).success());
    }
    tear(0);
    tear(1);
    assert_refused(
        n,
        &n.config,
        &[path_str(&n.metadata), "both superblock copies"],
    );
}

#[test]
fn metadata_of_another_resource_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    let other = variant(&dir, "other", |t| {
        replace_once(&t, "name = \"r0\"", "name = \"other\"")
    });
    must_create_md(&other);
    assert_refused(n, &n.config, &[path_str(&n.metadata), "'other'", "'r0'"]);
}

#[test]
fn metadata_of_another_size_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    let bigger = variant(&dir, "bigger", |t| {
        replace_once(
            &t,
            &format!("size = {SIZE}\n"),
            &format!("size = {}\n", 2 * SIZE),
        )
    });
    must_create_md(&bigger);
    assert_refused(
        n,
        &n.config,
        &[
            path_str(&n.metadata),
            &(2 * SIZE).to_string(),
            &SIZE.to_string(),
        ],
    );
}

#[test]
fn metadata_of_another_node_id_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    let other_id = variant(&dir, "id7", |t| replace_once(&t, "id = 1\n", "id = 7\n"));
    must_create_md(&other_id);
    assert_refused(n, &n.config, &[path_str(&n.metadata), "node id 7"]);
}

#[test]
fn missing_metadata_is_refused_and_not_created() {
    let dir = standalone();
    let n = node(&dir);
    assert_refused(n, &n.config, &[path_str(&n.metadata)]);
    assert!(!n.metadata.exists(), "the daemon created metadata");
}

#[test]
fn a_file_that_is_not_metadata_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    let junk: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&n.metadata, &junk).unwrap();
    assert_refused(
        n,
        &n.config,
        &[path_str(&n.metadata), "not vmsync metadata"],
    );
}

// ---- backing store -------------------------------------------------------------

#[test]
fn a_backing_file_smaller_than_the_size_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&n.backing)
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    assert_refused(
        n,
        &n.config,
        &[
            path_str(&n.backing),
            &(SIZE / 2).to_string(),
            &SIZE.to_string(),
        ],
    );
}

#[test]
fn a_missing_backing_file_is_refused_and_not_created() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    std::fs::remove_file(&n.backing).unwrap();
    assert_refused(n, &n.config, &[path_str(&n.backing)]);
    assert!(!n.backing.exists(), "the daemon created the backing file");
}

// ---- create-md -------------------------------------------------------------------

/// Starts the node's daemon and waits until it answers.
fn start(node: &NodeFiles) -> Daemon {
    let mut d = Daemon::start(node);
    d.wait_ready(START);
    d
}

#[test]
fn create_md_twice_needs_force() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    // Make the metadata distinguishable from a fresh one: a crashed run
    // leaves it marked unclean, and the next start reports the crash.
    start(n).sigkill();
    let used = std::fs::read(&n.metadata).unwrap();

    let out = create_md(&n.config, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "create-md overwrote metadata");
    assert!(
        stderr.contains(path_str(&n.metadata))
            && stderr.contains("already holds vmsync metadata")
            && stderr.contains("--force"),
        "create-md's refusal does not say what and how: {stderr}"
    );
    assert!(
        std::fs::read(&n.metadata).unwrap() == used,
        "a refused create-md changed the metadata"
    );
    let mut d = start(n);
    assert_eq!(
        d.status_json()["last_shutdown"],
        "crash",
        "the first metadata (which recorded the crash) was not kept"
    );
    d.sigkill();

    let out = create_md(&n.config, true);
    assert!(
        out.status.success(),
        "create-md --force: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = start(n);
    let status = d.status_json();
    assert_eq!(status["last_shutdown"], "clean", "{status}");
    assert_eq!(status["term"], 0, "{status}");
    assert!(d.sigterm_and_wait(START).success());
}

#[test]
fn create_md_does_not_overwrite_other_data() {
    let dir = standalone();
    let n = node(&dir);
    let junk = b"important data that is not vmsync metadata\n".repeat(100);
    std::fs::write(&n.metadata, &junk).unwrap();
    let out = create_md(&n.config, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "create-md overwrote other data");
    assert!(
        stderr.contains("other data") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&n.metadata).unwrap(), junk);
}

#[test]
fn create_md_refuses_while_the_daemon_runs() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let mut d = start(n);
    let before = std::fs::read(&n.metadata).unwrap();
    let out = create_md(&n.config, true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "create-md --force replaced the metadata of a running daemon"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(std::fs::read(&n.metadata).unwrap() == before);
    assert_eq!(d.status_json()["role"], "standalone");
    assert!(d.sigterm_and_wait(START).success());
}

#[test]
fn a_second_daemon_for_the_same_node_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let mut first = start(n);
    let run = run_vmsyncd(&n.config);
    assert!(
        run.code.is_some_and(|c| c != 0),
        "a second daemon started on the same metadata: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(path_str(&n.metadata)) && run.stderr.contains("in use"),
        "{}",
        run.stderr
    );
    assert!(first.is_running());
    assert_eq!(first.status_json()["role"], "standalone");
    assert!(first.sigterm_and_wait(START).success());
}

// ---- control socket ------------------------------------------------------------------

/// Sends `bytes` on a new control connection (then closes our sending
/// side) and returns the daemon's reply line, if it sent one.
fn control_exchange(socket: &Path, bytes: &[u8]) -> Option<Value> {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The daemon may answer (and close) before reading everything.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let line = String::from_utf8_lossy(&reply);
    let line = line.lines().next()?;
    Some(serde_json::from_str(line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}")))
}

fn assert_error_reply(reply: Option<Value>, what: &str, mentions: &str) {
    let reply = reply.unwrap_or_else(|| panic!("no reply to {what}"));
    assert_eq!(reply["ok"], false, "{what} was accepted: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(mentions),
        "the reply to {what} does not mention \"{mentions}\": {reply}"
    );
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_and_the_daemon_serves_on() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let mut d = start(n);
    let socket = &n.control_socket;

    // A client that connects and says nothing must not hold up others.
    let idle = UnixStream::connect(socket).unwrap();

    let cases: &[(&str, &[u8], &str)] = &[
        ("text", b"hello daemon\n", "malformed request"),
        (
            "an unknown command",
            b"{\"command\":\"self-destruct\"}\n",
            "malformed request",
        ),
        (
            "a shutdown without its force field",
            b"{\"command\":\"shutdown\"}\n",
            "malformed request",
        ),
        (
            "a shutdown with a mistyped field",
            b"{\"command\":\"shutdown\",\"force\":\"yes\"}\n",
            "malformed request",
        ),
        ("invalid UTF-8", b"\xff\xfe\x00\x01garbage\n", "request"),
        (
            "a line with no newline",
            b"{\"command\":",
            "malformed request",
        ),
        ("an empty connection", b"", "malformed request"),
    ];
    for (what, bytes, mentions) in cases {
        assert_error_reply(control_exchange(socket, bytes), what, mentions);
        assert!(d.is_running(), "the daemon exited after {what}");
        let status = d.status_json();
        assert_eq!(status["role"], "standalone", "after {what}: {status}");
    }

    // A request line past the daemon's limit is cut off, not buffered
    // without bound; whether or not the reply arrives before the daemon
    // drops the rest, the daemon carries on.
    let huge = vec![b'x'; 1 << 20];
    if let Some(reply) = control_exchange(socket, &huge) {
        assert_eq!(reply["ok"], false, "{reply}");
    }
    assert!(
        d.is_running(),
        "the daemon exited after an oversized request"
    );

    drop(idle);
    let status = d.status_json();
    assert_eq!(status["role"], "standalone", "{status}");
    assert!(
        std::fs::read_to_string(&n.log)
            .unwrap()
            .contains("bad control request"),
        "the daemon did not log the bad control requests"
    );
    assert!(d.sigterm_and_wait(START).success());
}

// ---- the positive path -----------------------------------------------------------------

#[test]
fn a_standalone_node_serves_its_block_socket_and_records_how_it_stopped() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let rt = runtime();

    let mut d = start(n);
    let status = d.status_json();
    assert_eq!(status["role"], "standalone", "{status}");
    assert_eq!(status["device"], path_str(&n.block_socket), "{status}");
    assert_eq!(status["last_shutdown"], "clean", "{status}");
    assert_eq!(status["size"], SIZE, "{status}");
    assert_eq!(status["metadata"], "unclean", "in use: {status}");
    assert_eq!(status["peers"].as_array().map(Vec::len), Some(0));

    // Writes through the block socket land in the backing file.
    let offset = 3 << 20;
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    {
        let client = rt
            .block_on(blockdev::blocksock::BlockClient::connect(&n.block_socket))
            .expect("connect to the block socket");
        rt.block_on(client.write(offset, data.clone(), false))
            .unwrap();
        rt.block_on(client.write(0, vec![0x5a; 4096], true))
            .unwrap();
        rt.block_on(client.flush()).unwrap();
        let back = rt.block_on(client.read(offset, data.len())).unwrap();
        assert!(back == data, "the device reads back other data");
    }
    let image = std::fs::read(&n.backing).unwrap();
    assert_eq!(image.len() as u64, SIZE);
    let at = offset as usize;
    assert!(
        image[at..at + data.len()] == data[..],
        "the write did not reach the backing file"
    );
    assert!(image[..4096].iter().all(|&b| b == 0x5a));

    // SIGTERM: a clean stop.
    let exit = d.sigterm_and_wait(START);
    assert!(exit.success(), "SIGTERM: {exit}");
    assert!(!n.control_socket.exists(), "control socket left behind");
    let mut d = start(n);
    let status = d.status_json();
    assert_eq!(status["last_shutdown"], "clean", "after SIGTERM: {status}");

    // SIGKILL: a crash, reported by the next start.
    d.sigkill();
    let mut d = start(n);
    let status = d.status_json();
    assert_eq!(status["last_shutdown"], "crash", "after SIGKILL: {status}");
    assert_eq!(status["device"], path_str(&n.block_socket), "{status}");
    let image = std::fs::read(&n.backing).unwrap();
    assert!(
        image[at..at + data.len()] == data[..],
        "data written before the stops is gone"
    );
    assert!(d.sigterm_and_wait(START).success());
}

#[test]
fn the_control_socket_is_private_and_idle_clients_are_dropped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let _d = start(n);
    let socket = &n.control_socket;
    let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode is {mode:o}");

    // A client that connects and sends nothing is dropped after the
    // request timeout (10 s) with an error, while others are served.
    let mut idle = UnixStream::connect(socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let connected = Instant::now();
    let out = ctl(&n.config, &["status", "--json"]);
    assert!(out.status.success(), "status while a client idles");
    let mut reply = Vec::new();
    let _ = idle.read_to_end(&mut reply);
    let took = connected.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "the idle client was dropped after {took:?}"
    );
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.contains("no request within"), "reply: {reply}");
    assert!(ctl(&n.config, &["status"]).status.success());
}

#[test]
fn an_unknown_control_group_is_refused() {
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let config = variant(&dir, "control-group", |t| {
        replace_once(
            &t,
            "[node]\n",
            "[node]\ncontrol_group = \"no-such-group-vmsync\"\n",
        )
    });
    assert_refused(
        n,
        &config,
        &[
            "node.control_group",
            "no group named \"no-such-group-vmsync\"",
        ],
    );
}

// The file mode is the first gate; the peer credentials are checked again
// on every connection, so a socket made reachable by mistake still refuses
// other users. Needs root (to run a client as another user).
#[test]
fn a_client_of_another_user_is_refused_even_through_an_open_socket() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let dir = standalone();
    let n = node(&dir);
    must_create_md(&n.config);
    let _d = start(n);
    let socket = &n.control_socket;
    // Open the way for uid 65534: every directory above, and the socket.
    let mut at = socket.parent();
    while let Some(d) = at {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011)).unwrap();
        }
        at = d.parent();
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmsyncctl"))
        .args(["--socket", path_str(socket), "status"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run vmsyncctl as nobody");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "uid 65534 was served: {text}");
    assert!(text.contains("permission denied"), "{text}");
    assert!(ctl(&n.config, &["status"]).status.success());
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert!(
        log.contains("control connection refused") && log.contains("uid 65534"),
        "the refusal is not logged"
    );
}
