//! Running the real `vmsync-directory` from tests, and clusters that use it.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::testdir::free_ports;

/// The directory server binary: `VMSYNC_DIRECTORY_BIN` if set, else the
/// one in the target directory the test executable lives in
/// (`target/<profile>/deps/<test>` → `target/<profile>/vmsync-directory`).
/// `cargo test` does not build another package's binary: `scripts/test.sh`
/// runs `cargo build --workspace --bins` first.
pub fn directory_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMSYNC_DIRECTORY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable sits in target/<profile>/deps");
    let binary = profile_dir.join("vmsync-directory");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build [--release] --workspace --bins), \
         or set VMSYNC_DIRECTORY_BIN",
        binary.display()
    );
    binary
}

/// One running directory server. Dropping it kills the process.
pub struct Directory {
    child: Option<Child>,
    pub address: SocketAddr,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Directory {
    /// A free loopback address for a directory (nodes' configs need it
    /// before the test directory exists).
    pub fn reserve_address() -> SocketAddr {
        free_ports(1)[0]
    }

    /// Lays out a directory's config in `dir` (state under `dir/directory`)
    /// to listen on `address`; does not start it.
    pub fn layout(address: SocketAddr, dir: &Path, secret: &Path) -> Directory {
        let state_dir = dir.join("directory");
        let config = dir.join("directory.toml");
        std::fs::write(
            &config,
            format!(
                "[directory]\nlisten = \"{address}\"\nstate_dir = \"{}\"\n\n[security]\nsecret_file = \"{}\"\n",
                state_dir.display(),
                secret.display()
            ),
        )
        .unwrap();
        Directory {
            child: None,
            address,
            config,
            state_dir,
            log: dir.join("directory.log"),
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "directory already running");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== test harness: starting vmsync-directory =====").unwrap();
        let child = Command::new(directory_binary())
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start vmsync-directory");
        self.child = Some(child);
        let up = super::wait_for(
            || std::net::TcpStream::connect(self.address).is_ok(),
            Duration::from_secs(15),
        );
        assert!(up, "the directory did not listen on {}", self.address);
    }

    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `[directory]` table a node's config needs to use a directory at
    /// `address` (reporting often, so tests need not wait).
    pub fn node_toml(address: SocketAddr) -> String {
        format!("[directory]\naddress = \"{address}\"\nreport_interval_ms = 300\n")
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&self.log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("----- last lines of the directory's log -----");
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}
