//! Running the real `vmsyncd` and `vmsyncctl` binaries from tests.
//!
//! Tests drive nodes exactly as an operator would: one daemon process per
//! node, controlled through `vmsyncctl`. Killing a process (SIGKILL) is the
//! crash the replication protocol must survive, so it is a first-class action.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::testdir::NodeFiles;

pub const VMSYNCD: &str = env!("CARGO_BIN_EXE_vmsyncd");
pub const VMSYNCCTL: &str = env!("CARGO_BIN_EXE_vmsyncctl");

/// How often [`wait_for`] re-checks.
const POLL: Duration = Duration::from_millis(20);

/// Log lines shown when a test fails while a daemon runs.
const LOG_TAIL_LINES: usize = 80;

/// One running `vmsyncd`. Dropping it kills the process (SIGKILL), so a
/// failing test never leaves daemons behind.
pub struct Daemon {
    child: Option<Child>,
    pub node: NodeFiles,
}

impl Daemon {
    /// Starts `vmsyncd --config <node.config>`, appending its output to
    /// `node.log` (restarts add to the same log, after a marker line).
    pub fn start(node: &NodeFiles) -> Daemon {
        Daemon::start_on(node, None)
    }

    /// Like [`Daemon::start`], but the process (every thread it will ever
    /// have, io_uring workers included) runs only on `cpus`, when given.
    /// Benchmarks use this to give the primary and its peers CPUs of their
    /// own, as on separate machines.
    pub fn start_on(node: &NodeFiles, cpus: Option<&[usize]>) -> Daemon {
        Daemon::start_with(node, cpus, &[], &[])
    }

    /// Like [`Daemon::start_on`], with more command-line arguments and
    /// environment variables for the daemon (e.g. `--log-format json`,
    /// `NOTIFY_SOCKET`). An environment value of `None` removes the variable.
    pub fn start_with(
        node: &NodeFiles,
        cpus: Option<&[usize]>,
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Daemon {
        Daemon::spawn(node, Command::new(VMSYNCD), cpus, args, env)
    }

    /// Like [`Daemon::start`], inside network namespace `netns` (through
    /// `ip netns exec`, which execs the daemon: the child is the daemon).
    pub fn start_in_netns(node: &NodeFiles, netns: &str) -> Daemon {
        Daemon::start_in_netns_with_env(node, netns, &[])
    }

    /// [`Daemon::start_in_netns`] with environment variables set (`None`:
    /// removed).
    pub fn start_in_netns_with_env(
        node: &NodeFiles,
        netns: &str,
        env: &[(&str, Option<&str>)],
    ) -> Daemon {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, VMSYNCD]);
        Daemon::spawn(node, command, None, &[], env)
    }

    fn spawn(
        node: &NodeFiles,
        mut command: Command,
        cpus: Option<&[usize]>,
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Daemon {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        writeln!(
            log,
            "===== test harness: starting vmsyncd for {} =====",
            node.name
        )
        .unwrap();
        let stderr = log.try_clone().unwrap();
        if let Some(cpus) = cpus {
            let set = cpu_set(cpus);
            // SAFETY: the closure runs in the forked child before exec and
            // only makes one system call.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).map_err(Into::into)
                });
            }
        }
        command
            .arg("--config")
            .arg(&node.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            // Plain text: the log is a file read by people and by `print_log_tail`.
            .env("NO_COLOR", "1");
        command.args(args);
        for (key, value) in env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {VMSYNCD}: {e}"));
        Daemon {
            child: Some(child),
            node: node.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon was stopped").id()
    }

    /// Whether the process is still alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Kills the process with SIGKILL and reaps it: a crash, no clean-up.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM (a clean stop request) and waits for the exit. Panics if
    /// the process is still running after `timeout`.
    pub fn sigterm_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon was already stopped");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                self.child = Some(child);
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM",
                    self.node.name
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `vmsyncctl --config <node.config> <args>`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.node.config, args)
    }

    /// `vmsyncctl status --json`, or `None` while the daemon does not answer.
    pub fn try_status_json(&self) -> Option<serde_json::Value> {
        let output = self.ctl(&["status", "--json"]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// `vmsyncctl status --json`; panics with vmsyncctl's message on failure.
    pub fn status_json(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        assert!(
            output.status.success(),
            "status of {} failed: {}",
            self.node.name,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "status of {} is not JSON ({e}): {}",
                self.node.name,
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Waits until the daemon answers on its control socket.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let ready = wait_for(
            || self.try_status_json().is_some() || !self.is_running(),
            timeout,
        );
        assert!(
            self.is_running(),
            "{} exited during start-up; see {}",
            self.node.name,
            self.node.log.display()
        );
        assert!(
            ready,
            "{} did not answer within {timeout:?}",
            self.node.name
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            print_log_tail(&self.node.name, &self.node.log);
        }
    }
}

/// Runs `vmsyncctl --socket <socket> <args>`: the daemon without its
/// config file (which vmsyncctl would read first).
pub fn ctl_socket(socket: &str, args: &[&str]) -> Output {
    Command::new(VMSYNCCTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {VMSYNCCTL}: {e}"))
}

/// Runs `vmsyncctl --config <config> <args>` (for commands that need no
/// daemon, such as `create-md`, or for a node whose daemon is down).
pub fn ctl(config: &Path, args: &[&str]) -> Output {
    Command::new(VMSYNCCTL)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {VMSYNCCTL}: {e}"))
}

/// Polls `predicate` until it holds (true) or `timeout` passes (false).
/// Blocking: call it from plain `#[test]` code, not from inside an async task.
pub fn wait_for(mut predicate: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if predicate() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn print_log_tail(name: &str, log: &Path) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    eprintln!(
        "----- last {} lines of {name}'s log ({}) -----",
        tail.len(),
        log.display()
    );
    for line in tail {
        eprintln!("{line}");
    }
    eprintln!("----- end of {name}'s log -----");
}

/// A CPU set of the given CPU numbers.
pub fn cpu_set(cpus: &[usize]) -> nix::sched::CpuSet {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).expect("CPU number within CpuSet::count()");
    }
    set
}
