//! The directory server (`vmsync-directory`, a real process) and the node's
//! client for it, over real sockets.
//!
//! The server binary is the one cargo builds next to this test's executable
//! (see `support::directory::directory_binary`).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockdev::meta::Bitmap;
use protocol::{GenerationIds, DIRECTORY_NODE_ID};
use tokio::net::TcpListener;
use vmsync::directory::{answer_demote, DirError, DirectoryClient, Member, Report};
use vmsync::replication::transport::{self, LocalIdentity};

const SECRET: &[u8] = b"directory-test-secret-0123456789";
const BLOCK: u32 = 4096;
const NBITS: u64 = 1 << 16;
const SIZE: u64 = NBITS * BLOCK as u64;

fn server_binary() -> PathBuf {
    support::directory::directory_binary()
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A running `vmsync-directory`; killed on drop.
struct Directory {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Directory {
    fn start() -> Directory {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), [SECRET, b"\n"].concat()).unwrap();
        let mut directory = Directory {
            dir,
            addr: free_addr(),
            child: None,
        };
        directory.spawn();
        directory
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("directory.toml")
    }

    fn spawn(&mut self) {
        std::fs::write(
            self.config_path(),
            format!(
                "[directory]\nlisten = \"{}\"\nstate_dir = \"{}\"\n\n[security]\nsecret_file = \"{}\"\n",
                self.addr,
                self.dir.path().join("state").display(),
                self.dir.path().join("secret").display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .unwrap();
        let child = Command::new(server_binary())
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the directory exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "the directory does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then a new process on the same state and address.
    fn kill_and_restart(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn client(&self, resource: &str, node_id: u32, address: SocketAddr) -> DirectoryClient {
        client_with(self.addr, resource, node_id, address, SECRET)
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- directory log ---\n{}", self.log());
        }
    }
}

fn identity(resource: &str, node_id: u32, secret: &[u8]) -> LocalIdentity {
    LocalIdentity {
        resource: resource.to_string(),
        node_id,
        secret: Arc::new(secret.to_vec()),
    }
}

fn client_with(
    directory: SocketAddr,
    resource: &str,
    node_id: u32,
    address: SocketAddr,
    secret: &[u8],
) -> DirectoryClient {
    DirectoryClient::new(
        directory,
        identity(resource, node_id, secret),
        Member {
            name: format!("node{node_id}"),
            address,
            lan_group: "home".into(),
            size: SIZE,
        },
    )
}

/// A bitmap with a pattern that depends on `seed`.
fn bitmap(seed: u64) -> Arc<Bitmap> {
    let b = Bitmap::new(NBITS, BLOCK);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let first = x % (NBITS - 64);
        b.set_range(first, (x >> 40) % 64 + 1);
    }
    Arc::new(b)
}

fn set_bits(b: &Bitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(bit) = b.find_next_set(at) {
        out.push(bit);
        at = bit + 1;
    }
    out
}

fn assert_same_bitmaps(got: &BTreeMap<u32, Bitmap>, want: &[(u32, Arc<Bitmap>)]) {
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        want.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    for (node, b) in want {
        assert!(b.count_ones() > 0);
        assert_eq!(set_bits(&got[node]), set_bits(b), "bitmap of node {node}");
    }
}

fn generation(n: u64) -> GenerationIds {
    GenerationIds {
        current: n,
        bitmap: n + 1,
        history: [n + 2, n + 3],
    }
}

fn report(term: u64, last: bool, seed: u64) -> Report {
    Report {
        term,
        generation: generation(seed),
        last,
        hot_extents: vec![seed, seed + 7, 3],
        bitmaps: vec![
            (1, bitmap(seed)),
            (2, bitmap(seed + 1)),
            (3, bitmap(seed + 2)),
        ],
    }
}

/// How an in-test primary answers the directory's DirDemote.
#[derive(Clone)]
enum Answer {
    Report(Report),
    Refuse(String),
}

/// A node that answers DirDemote on its listen address, as `vmsyncd` does;
/// records the (force, term) of every request.
async fn fake_primary(
    resource: &str,
    node_id: u32,
    answer: Answer,
) -> (SocketAddr, Arc<Mutex<Vec<(bool, u64)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let identity = identity(resource, node_id, SECRET);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let conn = transport::accept(&identity, stream, |id| id == DIRECTORY_NODE_ID)
                .await
                .unwrap();
            let answer = answer.clone();
            let log = log.clone();
            answer_demote(conn, move |force, term| async move {
                log.lock().unwrap().push((force, term));
                match answer {
                    Answer::Report(report) => Ok(report),
                    Answer::Refuse(reason) => Err(reason),
                }
            })
            .await
            .unwrap();
        }
    });
    (addr, seen)
}

fn expect_refused(result: Result<impl std::fmt::Debug, DirError>, needles: &[&str]) -> String {
    match result {
        Err(DirError::Refused(msg)) => {
            for needle in needles {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            }
            msg
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_promotion_grants_term_1_without_a_report() {
    let dir = Directory::start();
    let one = dir.client("r", 1, free_addr());
    let info = one.info().await.unwrap();
    assert_eq!((info.term, info.primary), (0, None));
    let grant = one.promote(false, NBITS, BLOCK).await.unwrap();
    assert_eq!(grant.term, 1);
    assert!(!grant.overridden);
    assert!(grant.prev.is_none());
    let info = dir.client("r", 2, free_addr()).info().await.unwrap();
    assert_eq!((info.term, info.primary), (1, Some(1)));
    // A restarted primary asking again gets a new term, no demotion.
    let grant = one.promote(false, NBITS, BLOCK).await.unwrap();
    assert_eq!(grant.term, 2);
    assert!(grant.prev.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_gives_the_new_primary_the_old_primarys_final_bitmaps() {
    let dir = Directory::start();
    let last = report(1, true, 100);
    let (addr1, seen) = fake_primary("r", 1, Answer::Report(last.clone())).await;
    let one = dir.client("r", 1, addr1);
    let two = dir.client("r", 2, free_addr());
    assert_eq!(one.promote(false, NBITS, BLOCK).await.unwrap().term, 1);
    // A periodic report, replaced by the final one below.
    let info = one.report(&report(1, false, 5)).await.unwrap();
    assert_eq!((info.term, info.primary), (1, Some(1)));

    let grant = two.promote(false, NBITS, BLOCK).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![(false, 1)]);
    assert_eq!(grant.term, 2);
    assert!(!grant.overridden);
    let prev = grant.prev.expect("the final report");
    assert_eq!(prev.primary, 1);
    assert_eq!(prev.term, 1);
    assert!(prev.last);
    assert_eq!(prev.generation, last.generation);
    assert_eq!(prev.hot_extents, last.hot_extents);
    assert!(prev.age < Duration::from_secs(10));
    assert_same_bitmaps(&prev.bitmaps, &last.bitmaps);
    let info = one.info().await.unwrap();
    assert_eq!((info.term, info.primary), (2, Some(2)));

    // The old primary is fenced.
    expect_refused(
        one.report(&report(1, false, 6)).await,
        &["fenced", "term 2"],
    );
    // The new one reports.
    two.report(&report(2, false, 7)).await.unwrap();
    // A node with fewer blocks cannot take the bitmaps.
    let err = dir
        .client("r", 3, free_addr())
        .promote(true, NBITS / 2, BLOCK)
        .await;
    assert!(
        matches!(err, Err(DirError::Protocol(_)) | Err(DirError::Refused(_))),
        "{err:?}"
    );
    // One whose device grew since the report takes them widened: the
    // blocks past the report are marked lacking (see `PrevReport`).
    let grown = dir
        .client("r", 3, free_addr())
        .promote(true, NBITS * 2, BLOCK)
        .await
        .unwrap();
    let prev = grown.prev.expect("the last report");
    assert_eq!(prev.covered_blocks, NBITS);
    for bitmap in prev.bitmaps.values() {
        assert_eq!(bitmap.nbits(), NBITS * 2);
        assert_eq!(bitmap.count_range(NBITS, NBITS), NBITS);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_primary_keeps_its_role() {
    let dir = Directory::start();
    let (addr1, seen) = fake_primary("r", 1, Answer::Refuse("the device is open".into())).await;
    let one = dir.client("r", 1, addr1);
    let two = dir.client("r", 2, free_addr());
    one.promote(false, NBITS, BLOCK).await.unwrap();
    one.report(&report(1, false, 9)).await.unwrap();
    expect_refused(
        two.promote(false, NBITS, BLOCK).await,
        &["node1 (id 1) refuses to demote: the device is open"],
    );
    expect_refused(
        two.promote(true, NBITS, BLOCK).await,
        &["the device is open"],
    );
    assert_eq!(*seen.lock().unwrap(), vec![(false, 1), (true, 1)]);
    let info = two.info().await.unwrap();
    assert_eq!((info.term, info.primary), (1, Some(1)));
    // Still the primary: its reports are accepted.
    one.report(&report(1, false, 10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_primary_is_overridden_only_with_force() {
    let dir = Directory::start();
    let one = dir.client("r", 1, free_addr()); // nobody listens there
    let two = dir.client("r", 2, free_addr());
    one.promote(false, NBITS, BLOCK).await.unwrap();
    let periodic = report(1, false, 42);
    one.report(&periodic).await.unwrap();
    expect_refused(
        two.promote(false, NBITS, BLOCK).await,
        &[
            "primary node1 (id 1)",
            "unreachable",
            "--force",
            "last report",
        ],
    );
    let info = two.info().await.unwrap();
    assert_eq!((info.term, info.primary), (1, Some(1)));

    let grant = two.promote(true, NBITS, BLOCK).await.unwrap();
    assert_eq!(grant.term, 2);
    assert!(grant.overridden);
    let prev = grant.prev.unwrap();
    assert_eq!((prev.primary, prev.term, prev.last), (1, 1, false));
    assert_same_bitmaps(&prev.bitmaps, &periodic.bitmaps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_from_a_non_primary_or_an_old_term_are_fenced() {
    let dir = Directory::start();
    let one = dir.client("r", 1, free_addr());
    let two = dir.client("r", 2, free_addr());
    // No primary at all yet.
    expect_refused(
        two.report(&report(0, false, 1)).await,
        &["fenced", "no node is primary"],
    );
    one.promote(false, NBITS, BLOCK).await.unwrap();
    one.promote(false, NBITS, BLOCK).await.unwrap(); // term 2
    expect_refused(
        two.report(&report(2, false, 1)).await,
        &["fenced: term 2 is current and node node1 (id 1) is primary"],
    );
    expect_refused(one.report(&report(1, false, 1)).await, &["fenced"]);
    // A final report leaves no primary.
    let info = one.report(&report(2, true, 1)).await.unwrap();
    assert_eq!((info.term, info.primary), (2, None));
    expect_refused(one.report(&report(2, false, 1)).await, &["fenced"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_sigkill() {
    let mut dir = Directory::start();
    let one = dir.client("r", 1, free_addr());
    one.promote(false, NBITS, BLOCK).await.unwrap();
    one.report(&report(1, false, 3)).await.unwrap();
    let last = report(1, true, 77);
    one.report(&last).await.unwrap();
    dir.kill_and_restart();

    let two = dir.client("r", 2, free_addr());
    let info = two.info().await.unwrap();
    assert_eq!((info.term, info.primary), (1, None));
    let grant = two.promote(false, NBITS, BLOCK).await.unwrap();
    assert_eq!(grant.term, 2);
    let prev = grant.prev.unwrap();
    assert_eq!((prev.primary, prev.term, prev.last), (1, 1, true));
    assert_eq!(prev.hot_extents, last.hot_extents);
    assert_same_bitmaps(&prev.bitmaps, &last.bitmaps);

    dir.kill_and_restart();
    let info = one.info().await.unwrap();
    assert_eq!((info.term, info.primary), (2, Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_independent_and_members_must_agree_on_size() {
    let dir = Directory::start();
    let a1 = dir.client("a", 1, free_addr());
    let b2 = dir.client("b", 2, free_addr());
    assert_eq!(a1.promote(false, NBITS, BLOCK).await.unwrap().term, 1);
    assert_eq!(b2.info().await.unwrap().term, 0);
    // Node 1 is primary of "a", not of "b": no demotion, term 1 of "b".
    assert_eq!(b2.promote(false, NBITS, BLOCK).await.unwrap().term, 1);
    a1.report(&report(1, false, 1)).await.unwrap();
    let b1 = dir.client("b", 1, free_addr());
    expect_refused(b1.report(&report(1, false, 1)).await, &["fenced"]);
    let info = a1.info().await.unwrap();
    assert_eq!((info.term, info.primary), (1, Some(1)));

    // A copy smaller than the primary's cannot hold the data.
    let small = DirectoryClient::new(
        dir.addr,
        identity("a", 3, SECRET),
        Member {
            name: "big".into(),
            address: free_addr(),
            lan_group: "away".into(),
            size: SIZE / 2,
        },
    );
    expect_refused(small.info().await, &["same size"]);
}

/// `vmsyncctl resize` goes round the nodes one at a time: a member may come
/// back larger (the others follow), a member not yet grown is refused and
/// told to resize, and once it has grown it is accepted again (and again:
/// a grown member once refused its second contact while another was still
/// recorded at the old size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_may_grow_one_at_a_time_but_never_come_back_smaller() {
    let dir = Directory::start();
    let sized = |node: u32, size: u64| {
        DirectoryClient::new(
            dir.addr,
            identity("r", node, SECRET),
            Member {
                name: format!("node{node}"),
                address: free_addr(),
                lan_group: "home".into(),
                size,
            },
        )
    };
    sized(1, SIZE).info().await.unwrap();
    sized(2, SIZE).info().await.unwrap();
    sized(1, SIZE * 2).info().await.unwrap();
    expect_refused(
        sized(2, SIZE).info().await,
        &["same size", "vmsyncctl resize"],
    );
    expect_refused(sized(3, SIZE).info().await, &["same size"]);
    sized(2, SIZE * 2).info().await.unwrap();
    // Joining again once grown: fine, however often.
    sized(1, SIZE * 2).info().await.unwrap();
    sized(2, SIZE * 2).info().await.unwrap();
    // Back to the old size: refused (shrinking is not a thing).
    expect_refused(sized(1, SIZE).info().await, &["same size"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_or_malformed_input_closes_only_that_connection() {
    let dir = Directory::start();
    let wrong = client_with(
        dir.addr,
        "r",
        1,
        free_addr(),
        b"not-the-secret-at-all-0123456789",
    );
    let err = wrong.info().await.unwrap_err();
    assert!(matches!(err, DirError::Unreachable(_)), "{err:?}");
    assert!(err.to_string().contains(&dir.addr.to_string()), "{err}");
    // Node ids beyond the metadata's slots are not accepted.
    assert!(dir.client("r", 40, free_addr()).info().await.is_err());
    // Garbage instead of a handshake.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(dir.addr).await.unwrap();
        s.write_all(&[0xff; 4096]).await.unwrap();
    }
    let ok = dir.client("r", 1, free_addr());
    assert_eq!(ok.promote(false, NBITS, BLOCK).await.unwrap().term, 1);
}

#[test]
fn a_bad_configuration_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dir.toml");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let run = |text: String| {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(server_binary())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let state = dir.path().join("state");
    let err = run(format!(
        "[directory]\nlisten = \"localhost\"\nstate_dir = \"{}\"\n[security]\nsecret_file = \"{}\"\n",
        state.display(),
        secret.display()
    ));
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("directory.listen"), "{err}");
    std::fs::write(&secret, "short\n").unwrap();
    let err = run(format!(
        "[directory]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[security]\nsecret_file = \"{}\"\n",
        state.display(),
        secret.display()
    ));
    assert!(err.contains("security.secret_file"), "{err}");
    let err =
        run("[directory]\nlisten = \"127.0.0.1:0\"\n[security]\nsecret_file = \"/x\"\n".into());
    assert!(err.contains("state_dir"), "{err}");
    assert!(!state.exists(), "nothing is created on bad configuration");
}
