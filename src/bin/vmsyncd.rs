//! `vmsyncd --config FILE`: runs one resource's node daemon in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vmsync::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "vmsyncd",
    version,
    about = "vmsync node daemon: serves and replicates one resource"
)]
struct Args {
    /// The node's TOML configuration.
    #[arg(long, required_unless_present = "man")]
    config: Option<PathBuf>,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// Print this program's man page (roff) to stdout and exit.
    #[arg(long, hide = true)]
    man: bool,
    /// Grow the metadata to the configured size before starting (how the
    /// daemon restarts itself for `vmsyncctl resize`).
    #[arg(long, hide = true)]
    grow_metadata: bool,
    /// With --grow-metadata: the new area is identical on every node.
    #[arg(long, hide = true, requires = "grow_metadata")]
    assume_clean: bool,
}

/// `vmsyncctl resize` on a running daemon: replaces this process (same
/// pid, so a service manager keeps tracking it) by vmsyncd with the same
/// arguments plus the grow. Threads, rings and descriptors go away as if
/// the process had died, which the ublk device survives. Returns only if
/// `exec` failed.
fn restart_to_grow(grow: vmsync::node::Grow) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "vmsyncd".into());
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0(arg0)
        .args(args.filter(|a| a != "--grow-metadata" && a != "--assume-clean"))
        .arg("--grow-metadata");
    if grow.assume_clean {
        command.arg("--assume-clean");
    }
    command.exec()
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.man {
        return match clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmsyncd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    vmsync::logging::init(args.log_format);
    let Some(config_path) = args.config else {
        eprintln!("vmsyncd: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match vmsync::config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmsyncd: {e}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("VMSYNC_BENCH_UNPROTECTED_LINKS").is_some_and(|v| v == "1") {
        // For `benches/replication.rs` only: the baseline of what link
        // protection costs. Every peer must run the same way.
        tracing::warn!(
            "VMSYNC_BENCH_UNPROTECTED_LINKS=1: links are NOT encrypted or authenticated after the handshake (benchmark baseline only)"
        );
        protocol::net::disable_link_protection_for_benchmarks();
    }
    if std::env::var_os("VMSYNC_BENCH_UNSHARED_RECORDS").is_some_and(|v| v == "1") {
        // For `benches/links.rs` only: the baseline of sealing a write
        // once for every peer (each connection seals its own instead).
        tracing::warn!("VMSYNC_BENCH_UNSHARED_RECORDS=1: each link seals its own records (benchmark baseline only)");
        vmsync::replication::disable_shared_records_for_benchmarks();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmsyncd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let grow = args.grow_metadata.then_some(vmsync::node::Grow {
        assume_clean: args.assume_clean,
    });
    match runtime.block_on(vmsync::node::run(config, grow)) {
        Ok(vmsync::node::Exit::Stopped) => ExitCode::SUCCESS,
        Ok(vmsync::node::Exit::RestartToGrow(grow)) => {
            let e = restart_to_grow(grow);
            eprintln!("vmsyncd: cannot restart itself to grow: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmsyncd: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text an outer message
/// already includes (many of our errors quote their source).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text
}
