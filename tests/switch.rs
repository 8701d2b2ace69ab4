//! The machine switch through the directory server: `vmsyncctl promote` on
//! a node that lacks most blocks makes the disk usable there at once; reads
//! fetch what is missing from the nodes that hold it, a background sync
//! pulls the rest, and every replica ends up byte-identical.
//!
//! Real `vmsync-directory` and `vmsyncd` processes on loopback; the guest
//! is a block-socket client of the primary's top layer.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use blockdev::blocksock::BlockClient;
use serde_json::Value;
use support::directory::Directory;
use support::{ctl, runtime, wait_for, ClusterSpec, Daemon, Model, TestDir, Workload};

const START: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(90);

/// A directory and a few nodes, each started and stopped by the test.
struct Site {
    rt: tokio::runtime::Runtime,
    daemons: Vec<Option<Daemon>>,
    directory: Directory,
    dir: TestDir,
}

impl Site {
    /// `nodes` nodes in `lan_groups` (default "home"), protocol C, with
    /// `extra` appended to every node's config; metadata created, the
    /// directory running, no node started.
    fn new(nodes: u32, lan_groups: &[&str], extra: &str) -> Site {
        let address = Directory::reserve_address();
        let dir = TestDir::with_spec(ClusterSpec {
            nodes,
            protocol: "C",
            lan_groups: lan_groups.iter().map(|g| g.to_string()).collect(),
            extra_toml: format!("{}\n{extra}", Directory::node_toml(address)),
            ..ClusterSpec::default()
        });
        for n in &dir.nodes {
            let out = ctl(&n.config, &["create-md"]);
            assert!(out.status.success(), "create-md: {}", text(&out));
        }
        let mut directory = Directory::layout(address, dir.path(), &dir.secret);
        directory.start();
        Site {
            rt: runtime(),
            daemons: (0..nodes).map(|_| None).collect(),
            directory,
            dir,
        }
    }

    fn start(&mut self, id: u32) {
        let mut daemon = Daemon::start(self.dir.node(id));
        daemon.wait_ready(START);
        self.daemons[id as usize - 1] = Some(daemon);
    }

    /// A clean stop (SIGTERM): a primary demotes and reports first.
    fn stop(&mut self, id: u32) {
        let mut daemon = self.daemons[id as usize - 1].take().expect("running");
        let status = daemon.sigterm_and_wait(Duration::from_secs(60));
        assert!(status.success(), "n{id} did not stop cleanly: {status}");
    }

    fn kill(&mut self, id: u32) {
        self.daemons[id as usize - 1]
            .take()
            .expect("running")
            .sigkill();
    }

    fn daemon(&self, id: u32) -> &Daemon {
        self.daemons[id as usize - 1].as_ref().expect("running")
    }

    fn status(&self, id: u32) -> Value {
        self.daemon(id).status_json()
    }

    fn ctl(&self, id: u32, args: &[&str]) -> Output {
        self.daemon(id).ctl(args)
    }

    /// Promotes `id` through the directory; returns vmsyncctl's message.
    fn promote(&self, id: u32) -> String {
        let out = self.ctl(id, &["promote"]);
        assert!(out.status.success(), "promote n{id}: {}", text(&out));
        text(&out)
    }

    fn client(&self, id: u32) -> BlockClient {
        self.rt
            .block_on(BlockClient::connect(&self.dir.node(id).block_socket))
            .expect("connect to the primary's block socket")
    }

    fn write(&self, client: &BlockClient, gen: &mut Workload, count: usize, model: Model) -> Model {
        let ops = gen.ops(count);
        let model = self
            .rt
            .block_on(support::workload::run(client, &ops, 16, model))
            .expect("the guest's writes succeed");
        self.rt.block_on(client.flush()).expect("flush");
        model
    }

    /// Reads `range` through `client` and compares it with the model.
    fn assert_reads(&self, client: &BlockClient, model: &Model, range: std::ops::Range<u64>) {
        const CHUNK: u64 = 1 << 20;
        let mut at = range.start;
        while at < range.end {
            let len = CHUNK.min(range.end - at);
            let data = self
                .rt
                .block_on(client.read(at, len as usize))
                .unwrap_or_else(|e| panic!("read {at}+{len}: {e}"));
            let want = &model.image()[at as usize..(at + len) as usize];
            if data != want {
                let first = data.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "read {at}+{len} differs from the model at byte {}",
                    at + first as u64
                );
            }
            at += len;
        }
    }

    /// Node 1, primary, writes `count` ops of `gen` with the running
    /// `mirrors` holding them too, then stops cleanly (its final report
    /// goes to the directory). Returns what the device holds.
    fn first_primary_writes(&mut self, mirrors: &[u32], gen: &mut Workload, count: usize) -> Model {
        self.start(1);
        for &id in mirrors {
            self.start(id);
        }
        self.promote(1);
        self.wait_up_to_date(1, mirrors);
        let client = self.client(1);
        let model = self.write(&client, gen, count, Model::zeroed(self.dir.spec.size));
        self.wait_up_to_date(1, mirrors);
        drop(client);
        self.stop(1);
        model
    }

    /// Restarts node 1 (as a holder) and switches to node 2, which never
    /// held a byte; returns a guest's client on node 2.
    fn switch_to_empty_node_2(&mut self) -> BlockClient {
        self.start(1);
        self.start(2);
        self.promote(2);
        self.client(2)
    }

    fn stale_bytes(&self, id: u32) -> u64 {
        self.status(id)["sync"]["stale_bytes"].as_u64().unwrap()
    }

    fn wait_sync_done(&self, id: u32) {
        let done = wait_for(
            || {
                self.daemon(id)
                    .try_status_json()
                    .is_some_and(|s| s["sync"]["stale_bytes"] == 0)
            },
            CONVERGE,
        );
        assert!(
            done,
            "n{id}'s background sync did not finish: {}",
            self.status(id)
        );
    }

    /// Waits until `primary` sees every peer in `peers` up to date.
    fn wait_up_to_date(&self, primary: u32, peers: &[u32]) {
        let ok = wait_for(
            || {
                self.daemon(primary).try_status_json().is_some_and(|s| {
                    peers.iter().all(|id| {
                        s["peers"].as_array().is_some_and(|ps| {
                            ps.iter().any(|p| {
                                p["id"] == *id
                                    && p["state"] == "up-to-date"
                                    && p["stale_bytes"] == 0
                            })
                        })
                    })
                })
            },
            CONVERGE,
        );
        assert!(
            ok,
            "peers {peers:?} of n{primary} not up to date: {}",
            self.status(primary)
        );
    }

    fn hash(&self, id: u32) -> blake3::Hash {
        support::blake3_of_file(&self.dir.node(id).backing, self.dir.spec.size)
    }

    /// Waits until every node in `ids` holds exactly `model` on disk.
    fn wait_identical(&self, ids: &[u32], model: &Model) {
        let want = model.blake3();
        let mut last = Vec::new();
        let ok = wait_for(
            || {
                last = ids.iter().map(|&id| (id, self.hash(id) == want)).collect();
                last.iter().all(|(_, same)| *same)
            },
            CONVERGE,
        );
        assert!(
            ok,
            "backings not equal to the model (node, equal): {last:?}"
        );
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Node 1 writes with node 3 mirrored and stops cleanly; node 2, which never
/// held a byte, is promoted. Every read on node 2 returns node 1's data at
/// once, the guest writes on node 2 while the background sync runs, the
/// switch to node 3 happens before that sync finishes, then back to node 1;
/// every replica ends byte-identical to what the guest wrote.
#[test]
fn a_switch_to_an_empty_node_serves_everything_at_once_and_converges() {
    // A slow background sync keeps node 2 half synced long enough.
    let mut site = Site::new(3, &[], "[replication]\nsync_rate = \"4MiB\"\n");
    let size = site.dir.spec.size;
    let mut gen = Workload::new(7, size);
    let model = site.first_primary_writes(&[3], &mut gen, 3000);

    site.start(2);
    let started = Instant::now();
    let message = site.promote(2);
    assert!(message.contains("fetched from other nodes"), "{message}");
    assert_eq!(site.status(2)["role"], "primary");
    assert!(
        site.stale_bytes(2) > size / 2,
        "node 2 should lack (nearly) everything"
    );
    let client = site.client(2);
    // The first reads are served at once, from node 3 (node 1 is down).
    site.assert_reads(&client, &model, 0..4 << 20);
    eprintln!("switch to first 4 MiB read: {:?}", started.elapsed());
    site.start(1);
    let model = site.write(&client, &mut gen, 500, model);
    // Half the device read (the rest is left to the slow background sync).
    site.assert_reads(&client, &model, 0..size / 2);
    let stale = site.stale_bytes(2);
    drop(client);

    // Switch to node 3 while node 2 still lacks blocks.
    let message = site.promote(3);
    assert!(!message.contains("forced"), "{message}");
    assert_eq!(site.status(2)["role"], "secondary");
    assert!(
        stale > 0,
        "node 2 finished its sync before the next switch: raise the data or lower sync_rate"
    );
    let client = site.client(3);
    site.assert_reads(&client, &model, 0..size);
    let model = site.write(&client, &mut gen, 300, model);
    site.wait_up_to_date(3, &[1, 2]);
    site.wait_identical(&[1, 2, 3], &model);
    drop(client);

    // And back to node 1.
    site.promote(1);
    let client = site.client(1);
    site.assert_reads(&client, &model, 0..size);
    let model = site.write(&client, &mut gen, 200, model);
    site.wait_up_to_date(1, &[2, 3]);
    site.wait_identical(&[1, 2, 3], &model);
    let term = site.status(1)["term"].as_u64().unwrap();
    assert_eq!(term, 4, "four promotions, four terms");
}

/// `vmsyncctl adjust` changes `sync_rate` for a background sync already
/// running, as it does every other rate.
#[test]
fn adjust_reaches_a_background_sync_already_running() {
    let mut site = Site::new(2, &[], "[replication]\nsync_rate = \"1MiB\"\n");
    let size = site.dir.spec.size;
    let mut gen = Workload::new(11, size);
    let model = site.first_primary_writes(&[], &mut gen, 500);
    let _client = site.switch_to_empty_node_2();
    std::thread::sleep(Duration::from_secs(2));
    let stale = site.stale_bytes(2);
    assert!(
        stale > size / 2,
        "at 1 MiB/s node 2 should still lack most of {size} bytes, lacks {stale}"
    );

    let config = site.dir.config_toml(2);
    let unlimited = config.replace("sync_rate = \"1MiB\"", "sync_rate = 0");
    assert_ne!(config, unlimited);
    site.dir.write_config(2, &unlimited);
    let out = site.ctl(2, &["adjust"]);
    assert!(out.status.success(), "adjust: {}", text(&out));
    assert!(
        text(&out).contains("sync_rate 1048576 → 0"),
        "{}",
        text(&out)
    );
    // What is left (over 32 MiB: half a minute at the old rate) comes at
    // once.
    assert!(
        wait_for(|| site.stale_bytes(2) == 0, Duration::from_secs(10)),
        "the lifted sync_rate did not reach the running sync: {}",
        site.status(2)
    );
    site.wait_identical(&[2], &model);
}

/// The guest hammers the very blocks the background sync is pulling: no
/// fetched (older) data may ever overwrite what the guest wrote.
#[test]
fn guest_writes_racing_the_background_sync_are_never_overwritten() {
    let mut site = Site::new(2, &[], "[replication]\nsync_rate = \"16MiB\"\n");
    let size = site.dir.spec.size;
    let mut gen = Workload::new(11, size);
    let model = site.first_primary_writes(&[], &mut gen, 2000);
    let client = site.switch_to_empty_node_2();
    // Small writes all over the device, many partial blocks, at QD16,
    // while the sync pulls in ascending order under them.
    let mut model = model;
    for _ in 0..5 {
        model = site.write(&client, &mut gen, 1500, model);
    }
    site.assert_reads(&client, &model, 0..size);
    site.wait_sync_done(2);
    site.wait_up_to_date(2, &[1]);
    site.wait_identical(&[1, 2], &model);
}

/// A holder dies in the middle of the reads: the other holder serves them.
/// With no holder left a read fails (EIO) after `fetch_timeout_ms`, and
/// succeeds once a holder is back.
#[test]
fn reads_go_to_another_holder_and_fail_only_when_none_answers() {
    let mut site = Site::new(
        3,
        &[],
        "[replication]\nsync_rate = \"1MiB\"\nfetch_timeout_ms = 2000\n",
    );
    let size = site.dir.spec.size;
    let mut gen = Workload::new(23, size);
    let model = site.first_primary_writes(&[3], &mut gen, 2000);
    let client = site.switch_to_empty_node_2();
    site.assert_reads(&client, &model, 0..8 << 20);
    site.kill(3);
    site.assert_reads(&client, &model, 8 << 20..24 << 20);
    site.kill(1);
    let started = Instant::now();
    let err = site
        .rt
        .block_on(client.read(size - (1 << 20), 4096))
        .expect_err("no node holds the block: the read must fail, not return stale data");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(30),
        "failed after {waited:?}: {err}"
    );
    let log = std::fs::read_to_string(&site.dir.node(2).log).unwrap();
    assert!(
        log.contains("cannot fetch blocks this node lacks"),
        "no log line names the missing blocks"
    );
    site.start(3);
    site.assert_reads(&client, &model, size - (1 << 20)..size);
}

/// The directory's state survives SIGKILL; while it is down the primary
/// keeps serving and mirroring, and only promote and demote are refused,
/// with a clear error.
#[test]
fn the_directory_survives_sigkill_and_its_absence_only_blocks_switching() {
    let mut site = Site::new(2, &[], "");
    let size = site.dir.spec.size;
    site.start(1);
    site.start(2);
    site.promote(1);
    site.wait_up_to_date(1, &[2]);
    site.directory.sigkill();
    let client = site.client(1);
    let mut gen = Workload::new(31, size);
    let model = site.write(&client, &mut gen, 500, Model::zeroed(size));
    site.wait_up_to_date(1, &[2]);
    let out = site.ctl(2, &["promote"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("directory"), "{}", text(&out));
    assert_eq!(site.status(2)["role"], "secondary");
    drop(client);

    site.directory.start();
    let message = site.promote(2);
    assert!(message.contains("term 2"), "{message}");
    assert_eq!(site.status(1)["role"], "secondary");
    // Restarted again: term 2 and node 2 as primary were durable.
    site.directory.sigkill();
    site.directory.start();
    let message = site.promote(1);
    assert!(message.contains("term 3"), "{message}");
    let client = site.client(1);
    site.assert_reads(&client, &model, 0..size);
    site.wait_up_to_date(1, &[2]);
    site.wait_identical(&[1, 2], &model);
}

/// A primary that froze is overridden with `promote --force`; when it
/// wakes up, the directory's newer term fences it: it refuses writes.
#[test]
fn a_frozen_primary_overridden_by_force_is_fenced_when_it_wakes() {
    let mut site = Site::new(2, &[], "");
    let size = site.dir.spec.size;
    site.start(1);
    site.start(2);
    site.promote(1);
    site.wait_up_to_date(1, &[2]);
    let client = site.client(1);
    let mut gen = Workload::new(41, size);
    let model = site.write(&client, &mut gen, 300, Model::zeroed(size));
    site.wait_up_to_date(1, &[2]);
    let pid = nix::unistd::Pid::from_raw(site.daemon(1).pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let refused = site.ctl(2, &["promote"]);
    assert!(
        !refused.status.success(),
        "promote without --force must wait for the frozen primary"
    );
    assert!(text(&refused).contains("unreachable"), "{}", text(&refused));
    let out = site.ctl(2, &["promote", "--force"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(out.status.success(), "promote --force: {}", text(&out));
    assert!(text(&out).contains("may be lost"), "{}", text(&out));
    let fenced = wait_for(
        || {
            site.daemon(1)
                .try_status_json()
                .is_some_and(|s| s["fenced"] == true)
        },
        Duration::from_secs(20),
    );
    assert!(fenced, "the old primary was not fenced: {}", site.status(1));
    let err = site
        .rt
        .block_on(client.write(0, vec![0xee; 4096], false))
        .expect_err("a fenced primary must refuse writes");
    eprintln!("fenced write refused: {err}");
    let on_two = site.client(2);
    site.assert_reads(&on_two, &model, 0..size);
}

/// The new primary crashes in the middle of its background sync, after the
/// guest wrote (and flushed) over blocks that had just been fetched.
/// Restarted and promoted again, it still knows which blocks it lacks:
/// reads return the right bytes, the flushed writes are not overwritten by
/// a second fetch, and the sync finishes.
#[test]
fn a_new_primary_killed_mid_sync_resumes_without_losing_writes() {
    let mut site = Site::new(2, &[], "[replication]\nsync_rate = \"2MiB\"\n");
    let size = site.dir.spec.size;
    let mut gen = Workload::new(53, size);
    let model = site.first_primary_writes(&[], &mut gen, 2000);
    let client = site.switch_to_empty_node_2();
    // Fetch the first quarter, then overwrite pieces of it.
    site.assert_reads(&client, &model, 0..size / 4);
    let mut over = Workload::new(59, size / 4);
    let model = site.write(&client, &mut over, 400, model);
    assert!(site.stale_bytes(2) > 0, "the sync finished too early");
    drop(client);
    site.kill(2);
    site.start(2);
    let message = site.promote(2);
    assert!(message.contains("fetched from other nodes"), "{message}");
    let client = site.client(2);
    site.assert_reads(&client, &model, 0..size);
    site.wait_sync_done(2);
    site.wait_up_to_date(2, &[1]);
    site.wait_identical(&[1, 2], &model);
}

/// Promoting a WAN node (another LAN group) is a machine switch like any
/// other: right after a burst the WAN push has not finished, and the
/// remote node, promoted, serves every block at once (what it lacks is
/// fetched from node 1 over the WAN) and syncs the rest. Once the push has
/// caught up, the same switch finds nothing to fetch: the lazy push did the
/// work ahead of time.
#[test]
fn a_wan_node_is_promoted_like_any_other_and_the_push_leaves_it_nothing_to_fetch() {
    let mut site = Site::new(
        2,
        &["home", "away"],
        "[replication]\nwan_rate = \"16Mbit\"\n",
    );
    let size = site.dir.spec.size;
    let mut gen = Workload::new(17, size);
    site.start(1);
    site.start(2);
    site.promote(1);
    site.wait_up_to_date(1, &[2]);
    let client = site.client(1);
    let model = site.write(&client, &mut gen, 600, Model::zeroed(size));
    let lagging = site.status(1)["peers"][0]["stale_bytes"].as_u64().unwrap();
    assert!(lagging > 0, "the WAN peer kept up with the burst");
    drop(client);
    site.stop(1);

    // Switch while the push lags: node 2 lacks what node 1 did not push.
    site.start(1);
    let started = Instant::now();
    site.promote(2);
    let at_switch = site.stale_bytes(2);
    assert!(
        at_switch > 0,
        "node 2 lacked nothing although the push lagged"
    );
    let client = site.client(2);
    site.assert_reads(&client, &model, 0..size);
    let served = started.elapsed();
    site.wait_sync_done(2);
    let synced = started.elapsed();
    eprintln!(
        "WAN node promoted with {at_switch} bytes not yet pushed: whole device read after {served:?}, \
         background sync done after {synced:?}"
    );
    let model = site.write(&client, &mut gen, 200, model);
    drop(client);
    site.wait_up_to_date(2, &[1]);
    site.wait_identical(&[1, 2], &model);

    // Back to node 1, then let the push finish before switching again.
    site.promote(1);
    let client = site.client(1);
    let model = site.write(&client, &mut gen, 600, model);
    drop(client);
    site.wait_up_to_date(1, &[2]);
    site.stop(1);
    site.start(1);
    let started = Instant::now();
    site.promote(2);
    let elapsed = started.elapsed();
    assert_eq!(
        site.stale_bytes(2),
        0,
        "the push had brought node 2 up to date: nothing may be left to fetch"
    );
    let client = site.client(2);
    site.assert_reads(&client, &model, 0..size);
    eprintln!(
        "WAN node promoted after the push caught up: nothing to fetch, promote took {elapsed:?}"
    );
    site.wait_identical(&[1, 2], &model);
}

/// A resize going round online with a directory: every running daemon
/// restarts in place at the new size and the directory takes it back (a
/// member may be larger than the primary's copy while a resize goes
/// round, and contact it any number of times). The primary, on a block
/// socket here, is refused until demoted; then it grows too, a switch to
/// the other node (taking over the old primary's pre-resize report) and
/// back serves the grown device with every write intact, and both
/// replicas end identical.
#[test]
fn a_resize_goes_round_online_and_the_directory_follows() {
    let mut site = Site::new(2, &[], "");
    let old = site.dir.spec.size;
    let new = 2 * old;
    site.start(1);
    site.start(2);
    site.promote(1);
    site.wait_up_to_date(1, &[2]);
    let client = site.client(1);
    let mut gen = Workload::new(31, old);
    let model = site.write(&client, &mut gen, 300, Model::zeroed(old));
    site.wait_up_to_date(1, &[2]);
    drop(client);
    let pids = [site.daemon(1).pid(), site.daemon(2).pid()];
    for id in 1..=2 {
        // Node 1's new area full of garbage, node 2's zeros.
        let fill = if id == 1 { 0x5a } else { 0 };
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&site.dir.node(id).backing)
                .unwrap(),
            &vec![fill; (new - old) as usize],
            old,
        )
        .unwrap();
        let toml = site
            .dir
            .config_toml(id)
            .replace(&format!("size = {old}\n"), &format!("size = {new}\n"));
        site.dir.write_config(id, &toml);
    }

    let said = text(&site.ctl(2, &["resize"]));
    assert!(said.contains(&format!("n2 serves {new} bytes")), "{said}");
    let said = text(&site.ctl(1, &["resize"]));
    assert!(said.contains("block socket"), "{said}");
    assert_eq!(site.status(1)["size"], old);

    // Demoted (its final report describes the old size), it grows in
    // place too.
    let out = site.ctl(1, &["demote"]);
    assert!(out.status.success(), "demote: {}", text(&out));
    let said = text(&site.ctl(1, &["resize"]));
    assert!(said.contains(&format!("n1 serves {new} bytes")), "{said}");
    assert_eq!(
        [site.daemon(1).pid(), site.daemon(2).pid()],
        pids,
        "not restarted in place"
    );

    // A switch to node 2 takes over that pre-resize report: it serves the
    // grown device, old data intact, its own new area kept (zeros) and
    // sent to node 1 (whose garbage there goes).
    site.promote(2);
    assert_eq!(site.status(2)["size"], new, "{}", site.status(2));
    assert_eq!(
        site.status(2)["sync"]["stale_bytes"],
        0,
        "{}",
        site.status(2)
    );
    let mut image = model.image().to_vec();
    image.resize(new as usize, 0);
    let model = Model::from_image(image);
    let client = site.client(2);
    site.assert_reads(&client, &model, 0..new);
    let mut gen = Workload::new(32, new);
    let model = site.write(&client, &mut gen, 300, model);
    site.wait_up_to_date(2, &[1]);
    drop(client);

    // And back to node 1, at the new size.
    site.promote(1);
    assert_eq!(site.status(1)["size"], new, "{}", site.status(1));
    let client = site.client(1);
    site.assert_reads(&client, &model, 0..new);
    let model = site.write(&client, &mut gen, 200, model);
    site.wait_up_to_date(1, &[2]);
    for id in 1..=2 {
        assert_eq!(
            support::blake3_of_file(&site.dir.node(id).backing, new),
            model.blake3(),
            "n{id} does not hold the grown device's data"
        );
    }
}
