//! `vmsyncctl`: the command line for a node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use vmsync::control::{self, Request, Status};

#[derive(Parser)]
#[command(name = "vmsyncctl", version, about = "Control a vmsync node")]
struct Args {
    /// The daemon's control socket.
    #[arg(long, global = true, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// The node's configuration (its control socket is used).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Initialise the metadata of a new replica (needs --config).
    CreateMd {
        /// Overwrite existing valid metadata.
        #[arg(long)]
        force: bool,
    },
    /// Grow this replica to the configuration's `[resource] size` after
    /// its backing store grew (needs --config; on every node). With the
    /// daemon running it restarts itself under the device, which then
    /// grows (Linux 6.16+); else the metadata is grown offline. The new
    /// area is resynced from the primary.
    Resize {
        /// The new area is identical on every node (e.g. all zeros): do
        /// not resync it.
        #[arg(long)]
        assume_clean: bool,
    },
    /// Show role, term, device, peers.
    Status {
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every --interval seconds, with a progress bar for each
        /// resync, background sync and verify (until interrupted).
        #[arg(long)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 1.0, requires = "watch",
              value_parser = parse_interval)]
        interval: f64,
    },
    /// Print state changes as they happen, one line each (role, device,
    /// peer link and state, disk state, resync and sync progress, split
    /// brain), after one `exists` line per object for the present state
    /// (as `drbdsetup events2`). Runs until the daemon stops.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print the present state only, then exit.
        #[arg(long)]
        now: bool,
    },
    /// Print this node's role: primary, secondary or standalone (as
    /// `drbdadm role`; for scripts and resource agents).
    Role,
    /// Print this node's disk state: up-to-date, consistent, outdated,
    /// inconsistent, diskless (as `drbdadm dstate`).
    Dstate,
    /// Make this node primary and expose its device.
    Promote {
        #[arg(long)]
        force: bool,
    },
    /// Flush and remove the device; become secondary.
    Demote {
        #[arg(long)]
        force: bool,
    },
    /// Compare every block with every up-to-date peer by hash (on the
    /// primary, while the guest runs); prints the ranges that differ.
    Verify {
        /// Resync the differing ranges from this node's copy.
        #[arg(long)]
        repair: bool,
    },
    /// Give up this replica's data: full resync from the primary (on a
    /// secondary; as `drbdadm invalidate`).
    Invalidate,
    /// After a split brain, on the node whose changes are to be dropped:
    /// it keeps nothing of its own and is resynced from the primary (on a
    /// secondary; as `drbdadm connect --discard-my-data`).
    DiscardMyData,
    /// Take the link to one peer down and keep it down until `connect`
    /// (as `drbdadm disconnect`); not kept across a daemon restart.
    Disconnect {
        /// The peer's name or id.
        peer: String,
    },
    /// Let the link to a peer come up again (after `disconnect`).
    Connect {
        /// The peer's name or id.
        peer: String,
    },
    /// Re-read the daemon's configuration file and apply what changed
    /// ([replication] tunables) without a restart (as `drbdadm adjust`);
    /// refused, applying nothing, when other keys changed.
    Adjust,
    /// Stop the daemon cleanly (refused while the device is open, unless forced).
    Shutdown {
        #[arg(long)]
        force: bool,
    },
    /// Write a new random shared secret (32 random bytes as 64 hex digits
    /// and a newline; the daemons use the file's text as it is) to FILE,
    /// mode 0600. Copy the same file to every node and the directory.
    GenSecret {
        /// Where to write it.
        file: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script for vmsyncctl to stdout
    /// (e.g. `vmsyncctl completions bash > /usr/share/bash-completion/completions/vmsyncctl`).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write the man pages of vmsyncctl and each of its verbs
    /// (vmsyncctl.1, vmsyncctl-status.1, ...) into DIR.
    Man {
        /// An existing directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmsyncctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let config = args
        .config
        .as_deref()
        .map(vmsync::config::load)
        .transpose()
        .map_err(|e| e.to_string())?;
    let request = match &args.command {
        &Command::CreateMd { force } => {
            let config = config.ok_or("create-md needs --config FILE")?;
            vmsync::node::create_metadata(&config, force).map_err(|e| e.to_string())?;
            println!("metadata created: {}", config.node.metadata.display());
            return Ok(ExitCode::SUCCESS);
        }
        &Command::Resize { assume_clean } => {
            let config = config.ok_or("resize needs --config FILE")?;
            // A daemon that answers grows online; with none, offline.
            if call(&config.node.control_socket, &Request::Status).is_ok() {
                resize_online(&config, assume_clean)?;
                return Ok(ExitCode::SUCCESS);
            }
            let done =
                vmsync::node::resize_metadata(&config, assume_clean).map_err(|e| e.to_string())?;
            println!("{done}");
            return Ok(ExitCode::SUCCESS);
        }
        Command::GenSecret { file, force } => {
            write_secret(file, *force)?;
            println!("secret written: {}", file.display());
            return Ok(ExitCode::SUCCESS);
        }
        &Command::Completions { shell } => {
            let mut command = Args::command();
            clap_complete::generate(shell, &mut command, "vmsyncctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            clap_mangen::generate_to(Args::command(), dir)
                .map_err(|e| format!("cannot write man pages into {}: {e}", dir.display()))?;
            println!("man pages written: {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Status {
            watch: true,
            interval,
            ..
        } => {
            let socket = control_socket(&args.socket, &config)?;
            let interval = std::time::Duration::from_secs_f64(*interval);
            block_on(vmsync::ctl::watch::watch(&socket, interval))??;
            return Ok(ExitCode::SUCCESS);
        }
        &Command::Events { json, now } => {
            let socket = control_socket(&args.socket, &config)?;
            let format = if json {
                vmsync::ctl::events::Format::Json
            } else {
                vmsync::ctl::events::Format::Text
            };
            block_on(vmsync::ctl::events::follow(
                &socket,
                now,
                format,
                &mut std::io::stdout().lock(),
            ))??;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Status { .. } | Command::Role | Command::Dstate => Request::Status,
        &Command::Promote { force } => Request::Promote { force },
        &Command::Demote { force } => Request::Demote { force },
        &Command::Shutdown { force } => Request::Shutdown { force },
        &Command::Verify { repair } => Request::Verify { repair },
        Command::Invalidate => Request::Invalidate,
        Command::Adjust => Request::Adjust,
        Command::DiscardMyData => Request::DiscardMyData,
        Command::Disconnect { peer } => Request::Disconnect { peer: peer.clone() },
        Command::Connect { peer } => Request::Connect { peer: peer.clone() },
    };
    let socket = control_socket(&args.socket, &config)?;
    let response = call(&socket, &request)?;
    if !response.ok {
        return Err(response.error.unwrap_or_else(|| "request failed".into()));
    }
    match (args.command, response.status) {
        (Command::Status { json: true, .. }, Some(status)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
            );
        }
        (Command::Status { json: false, .. }, Some(status)) => print_status(&status),
        (Command::Role, Some(status)) => println!("{}", status.role),
        (Command::Dstate, Some(status)) => println!("{}", status.disk),
        _ => println!("{}", response.message.unwrap_or_else(|| "ok".into())),
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates `file` with mode 0600 from the start (the secret is never
/// readable by others, not even briefly) and writes a fresh secret.
fn write_secret(file: &Path, force: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if force {
        // Removed rather than truncated: an existing file may have looser
        // permissions, which a truncating open would keep.
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot replace {}: {e}", file.display())),
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} already exists; not overwriting a secret (use --force to replace it)",
                file.display()
            ),
            _ => format!("cannot create {}: {e}", file.display()),
        })?;
    out.write_all(protocol::generate_secret().as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// The daemon's control socket: `--socket`, or the one `--config` names.
fn control_socket(
    socket: &Option<PathBuf>,
    config: &Option<vmsync::config::Config>,
) -> Result<PathBuf, String> {
    match (socket, config) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(c)) => Ok(c.node.control_socket.clone()),
        (None, None) => Err("give --socket PATH or --config FILE".into()),
    }
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "'{text}' is not a number of seconds from 0.1 to 3600"
        )),
    }
}

/// Runs `work` on a small runtime of this thread.
fn block_on<T>(work: impl std::future::Future<Output = T>) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(runtime.block_on(work))
}

/// How long `resize` waits for the daemon to come back grown: opening the
/// metadata, re-attaching and, without a directory, listening to the
/// peers for a ping timeout first.
const RESIZE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// `resize` with the daemon running: asks it to grow, then waits until the
/// restarted daemon answers with the new size (or says why it could not).
fn resize_online(config: &vmsync::config::Config, assume_clean: bool) -> Result<(), String> {
    let socket = &config.node.control_socket;
    let response = call(socket, &Request::Resize { assume_clean })?;
    if !response.ok {
        return Err(response.error.unwrap_or_else(|| "resize failed".into()));
    }
    println!("{}", response.message.unwrap_or_default());
    let wanted = config.resource.size;
    let deadline = std::time::Instant::now() + RESIZE_PATIENCE;
    loop {
        // The old process answers (with the old size) until it is gone,
        // then nobody until the new one is ready.
        if let Ok(control::Response {
            status: Some(status),
            ..
        }) = call(socket, &Request::Status)
        {
            if let Some(why) = status.resize_error {
                return Err(format!(
                    "vmsyncd restarted but did not grow: {why}; it serves {} bytes as before",
                    status.size
                ));
            }
            if status.size == wanted {
                println!(
                    "{} serves {wanted} bytes{}",
                    status.node,
                    status
                        .device
                        .map(|d| format!(" on {d}"))
                        .unwrap_or_default()
                );
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "vmsyncd did not answer grown within {} s: see its log",
                RESIZE_PATIENCE.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn call(socket: &Path, request: &Request) -> Result<control::Response, String> {
    block_on(control::call(socket, request))?
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", socket.display()))
}

fn print_status(s: &Status) {
    println!(
        "resource {}  node {} (id {})  role {}",
        s.resource, s.node, s.node_id, s.role
    );
    println!(
        "  device {}  size {} bytes  term {}",
        s.device.as_deref().unwrap_or("-"),
        s.size,
        s.term
    );
    println!(
        "  disk {}  metadata {}  last shutdown {}  recovered extents {}",
        s.disk, s.metadata, s.last_shutdown, s.recovered_extents
    );
    if let Some(directory) = &s.directory {
        println!(
            "  directory {directory}{}",
            if s.fenced {
                "  FENCED: writes refused (the directory made another node primary)"
            } else {
                ""
            }
        );
    }
    if s.sync.stale_bytes > 0 || s.sync.fetched_bytes > 0 {
        let eta = s
            .sync
            .eta_seconds
            .map(|e| format!("{e}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  sync {}  missing {} bytes  fetched {} bytes  same by hash {} bytes  on-demand fetches {}  rate {} B/s  eta {}",
            s.sync.state,
            s.sync.stale_bytes,
            s.sync.fetched_bytes,
            s.sync.same_bytes,
            s.sync.on_demand_fetches,
            s.sync.rate_bytes_per_sec,
            eta
        );
        if let Some(error) = &s.sync.last_error {
            println!("    last sync error: {error}");
        }
    }
    if s.verify.state != "none" && !s.verify.state.is_empty() {
        let v = &s.verify;
        let eta = v
            .eta_seconds
            .map(|e| format!("{e}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  verify {}{}  {} of {} bytes  rate {} B/s  eta {}  differing blocks {}",
            v.state,
            if v.repair { " (repair)" } else { "" },
            v.bytes_done,
            v.total_bytes,
            v.rate_bytes_per_sec,
            eta,
            v.differing_blocks
        );
        if let Some(error) = &v.last_error {
            println!("    verify error: {error}");
        }
    }
    for p in &s.peers {
        let eta = p
            .eta_seconds
            .map(|e| format!("{e}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  peer {} (id {}) {} {}  {}  {}  protocol {}  stale {} bytes  rate {} B/s  eta {}  send queue {} bytes",
            p.name,
            p.id,
            p.address,
            p.link,
            if p.connected {
                "connected"
            } else if p.disconnected_by_operator {
                "disconnected (by the operator)"
            } else {
                "disconnected"
            },
            p.state,
            p.protocol,
            p.stale_bytes,
            p.resync_rate_bytes_per_sec,
            eta,
            p.send_queue_bytes
        );
        if let Some(w) = &p.wan {
            println!(
                "    wan push: stale {} bytes  rate {} B/s (budget {})  eta {}  on the wire {} bytes  saved {} by hash, {} by compression",
                w.stale_bytes,
                w.push_rate_bytes_per_sec,
                if w.budget_bytes_per_sec == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{} B/s", w.budget_bytes_per_sec)
                },
                w.eta_seconds
                    .map(|e| format!("{e}s"))
                    .unwrap_or_else(|| "-".into()),
                w.pushed_wire_bytes,
                w.saved_by_hash_bytes,
                w.saved_by_compression_bytes
            );
            if let Some(postmaster) = &w.postmaster {
                println!(
                    "    reads its blocks from {postmaster} (its group's postmaster): {} bytes by reference",
                    w.relayed_bytes
                );
            }
        }
        if let Some(error) = &p.last_error {
            println!("    last link error: {error}");
        }
    }
}
