//! The OCF resource agent (`packaging/ocf/vmsync`), called action by action
//! the way Pacemaker calls it, against real daemons it starts itself
//! ("direct" mode: the test machine has no systemd as init).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::Duration;

use support::{ctl, wait_for, ClusterSpec, TestDir};

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_ARGS: i32 = 2;
const OCF_ERR_UNIMPLEMENTED: i32 = 3;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_MASTER: i32 = 8;
const OCF_ERR_GENERIC: i32 = 1;

fn agent_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/ocf/vmsync")
}

fn bindir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vmsyncd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One node's agent instance, as Pacemaker would configure it.
struct Agent {
    config: PathBuf,
    state_dir: PathBuf,
}

impl Agent {
    fn for_node(dir: &TestDir, id: u32) -> Agent {
        let state_dir = dir.path().join(format!("ocf-{id}"));
        Agent {
            config: dir.node(id).config.clone(),
            state_dir,
        }
    }

    fn run(&self, action: &str) -> Output {
        Command::new("sh")
            .arg(agent_path())
            .arg(action)
            .env("OCF_RESKEY_resource", "r0")
            .env("OCF_RESKEY_config", &self.config)
            .env("OCF_RESKEY_daemon", "direct")
            .env("OCF_RESKEY_bindir", bindir())
            .env("OCF_RESKEY_state_dir", &self.state_dir)
            .env("OCF_RESKEY_start_timeout", "30")
            .output()
            .unwrap()
    }

    fn code(&self, action: &str) -> i32 {
        let out = self.run(action);
        out.status
            .code()
            .unwrap_or_else(|| panic!("{action} killed: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn expect(&self, action: &str, code: i32) {
        let out = self.run(action);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{action}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    /// A failing test leaves no daemon behind.
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.state_dir.join("r0.ocf.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn role(config: &Path) -> String {
    let out = ctl(config, &["role"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_agent_runs_a_promotable_clone_through_its_life_cycle() {
    let dir = TestDir::with_spec(ClusterSpec::default());
    for n in &dir.nodes {
        let out = ctl(&n.config, &["create-md"]);
        assert!(out.status.success());
    }
    let a = Agent::for_node(&dir, 1);
    let b = Agent::for_node(&dir, 2);

    // Not running yet: monitor says so and stop is a no-op success.
    a.expect("monitor", OCF_NOT_RUNNING);
    a.expect("stop", OCF_SUCCESS);
    // Pacemaker never promotes an instance that is not started.
    a.expect("promote", OCF_ERR_GENERIC);

    a.expect("start", OCF_SUCCESS);
    b.expect("start", OCF_SUCCESS);
    a.expect("start", OCF_SUCCESS); // idempotent
    a.expect("monitor", OCF_SUCCESS);
    assert_eq!(role(&a.config), "secondary");

    a.expect("promote", OCF_SUCCESS);
    a.expect("monitor", OCF_RUNNING_MASTER);
    assert_eq!(role(&a.config), "primary");
    b.expect("monitor", OCF_SUCCESS);
    a.expect("promote", OCF_SUCCESS); // idempotent

    // Two primaries are refused by the daemons (once b has heard of a's
    // promotion over the relinked connection), so by the agent too.
    let b_sees_a_primary = wait_for(
        || {
            let out = ctl(&b.config, &["status", "--json"]);
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            status["peers"][0]["state"] == "primary" && status["peers"][0]["connected"] == true
        },
        Duration::from_secs(15),
    );
    assert!(b_sees_a_primary, "b never saw a as its connected primary");
    let out = b.run("promote");
    assert_eq!(out.status.code(), Some(OCF_ERR_GENERIC));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("promote refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(role(&b.config), "secondary");

    // A switch as Pacemaker does it: demote one, promote the other (by
    // score, which monitor sets from `dstate`: b qualifies once its
    // resync from a ended).
    let b_current = wait_for(
        || {
            let out = ctl(&b.config, &["dstate"]);
            String::from_utf8_lossy(&out.stdout).trim() == "up-to-date"
        },
        Duration::from_secs(30),
    );
    assert!(b_current, "b never became up-to-date");
    a.expect("demote", OCF_SUCCESS);
    a.expect("monitor", OCF_SUCCESS);
    b.expect("promote", OCF_SUCCESS);
    b.expect("monitor", OCF_RUNNING_MASTER);

    // A daemon that runs but does not answer for a moment (as one that
    // restarts itself in place to grow, `vmsyncctl resize`) is not
    // reported as stopped: monitor waits for its answer.
    // (Its control socket is away meanwhile, as between the two processes.)
    let socket = dir.node(2).control_socket.clone();
    let away = socket.with_extension("away");
    std::fs::rename(&socket, &away).unwrap();
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        std::fs::rename(&away, &socket).unwrap();
    });
    let started = std::time::Instant::now();
    b.expect("monitor", OCF_RUNNING_MASTER);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "monitor did not wait"
    );
    resume.join().unwrap();

    // Stop of a promoted instance demotes it first, then stops the daemon.
    b.expect("stop", OCF_SUCCESS);
    b.expect("monitor", OCF_NOT_RUNNING);
    a.expect("stop", OCF_SUCCESS);
    a.expect("monitor", OCF_NOT_RUNNING);
    assert!(
        !a.state_dir.join("r0.ocf.pid").exists(),
        "pid file left behind"
    );
}

#[test]
fn meta_data_validation_and_bad_calls() {
    let dir = TestDir::with_spec(ClusterSpec::default());
    let a = Agent::for_node(&dir, 1);
    let out = a.run("meta-data");
    assert!(out.status.success());
    let xml = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "<resource-agent name=\"vmsync\"",
        "<parameter name=\"resource\" unique=\"1\" required=\"1\">",
        "<action name=\"promote\"",
        "<action name=\"demote\"",
    ] {
        assert!(xml.contains(needle), "meta-data lacks {needle}: {xml}");
    }
    a.expect("validate-all", OCF_SUCCESS);
    assert_eq!(a.code("frobnicate"), OCF_ERR_UNIMPLEMENTED);
    assert_eq!(
        Command::new("sh")
            .arg(agent_path())
            .output()
            .unwrap()
            .status
            .code(),
        Some(OCF_ERR_ARGS)
    );

    // A missing configuration: validate and start refuse with
    // ERR_CONFIGURED, naming the file; nothing is started.
    let missing = Agent {
        config: dir.path().join("nope.toml"),
        state_dir: dir.path().join("ocf-missing"),
    };
    let out = missing.run("validate-all");
    assert_eq!(out.status.code(), Some(OCF_ERR_CONFIGURED));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml is missing"));
    missing.expect("start", OCF_ERR_CONFIGURED);
    missing.expect("monitor", OCF_NOT_RUNNING);
    assert!(!missing.state_dir.join("r0.ocf.pid").exists());

    // A daemon that cannot start (no metadata created): start fails with
    // the daemon's own reason, and does not wait for the timeout.
    let out = a.run("start");
    assert_eq!(out.status.code(), Some(OCF_ERR_GENERIC));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmsyncd exited during start-up"), "{err}");
}
