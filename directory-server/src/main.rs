//! `vmsync-directory --config FILE`: the directory server.
//!
//! It keeps, per resource, the members, the primary and its term, and the
//! last report of which blocks every node lacks, durably (redb under
//! `state_dir`); it answers nodes' joins, promotions (asking the current
//! primary to demote first) and reports. See [`server`] and [`store`].

mod config;
mod server;
mod store;

use clap::{CommandFactory, Parser, ValueEnum};

#[derive(Parser)]
#[command(name = "vmsync-directory", version, about = "vmsync directory server")]
struct Args {
    /// Path to the directory server's TOML configuration.
    #[arg(long, required_unless_present = "man")]
    config: Option<std::path::PathBuf>,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print this program's man page (roff) to stdout and exit.
    #[arg(long, hide = true)]
    man: bool,
}

/// As vmsyncd's `--log-format` (the directory links none of vmsync's crates
/// but the protocol).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines; colour only when stderr is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() {
    let args = Args::parse();
    if args.man {
        if let Err(e) = clap_mangen::Man::new(Args::command()).render(&mut std::io::stdout()) {
            eprintln!("vmsync-directory: {e}");
            std::process::exit(1);
        }
        return;
    }
    init_logging(args.log_format);
    let Some(config) = &args.config else {
        eprintln!("vmsync-directory: --config FILE is required");
        std::process::exit(2);
    };
    if let Err(e) = run(config) {
        eprintln!("vmsync-directory: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a person at a terminal, not in log files.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

fn run(config_path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::Config::load(config_path)?;
    let store = store::Store::open(&config.state_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the state in {}: {e}",
            config.state_dir.join(store::DB_FILE).display()
        )
    })?;
    let directory = server::Directory::new(store, config.secret)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        tracing::info!(
            listen = %config.listen,
            state_dir = %config.state_dir.display(),
            "directory serving"
        );
        // Type=notify: ready once nodes can reach it (a no-op outside systemd).
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("serving on {}", config.listen)),
        ]);
        tokio::select! {
            _ = directory.serve(listener) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, exiting"),
        }
        Ok(())
    })
}
