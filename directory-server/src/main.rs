//! `vmsync-directory --config FILE`: the directory server.
//!
//! It keeps, per resource, the members, the primary and its term, and the
//! last report of which blocks every node lacks, durably (redb under
//! `state_dir`); it answers nodes' joins, promotions (asking the current
//! primary to demote first) and reports. See [`server`] and [`store`].

mod config;
mod server;
mod store;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "vmsync directory server")]
struct Args {
    /// Path to the directory server's TOML configuration.
    #[arg(long)]
    config: std::path::PathBuf,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(&args) {
        eprintln!("vmsync-directory: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = config::Config::load(&args.config)?;
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
        tokio::select! {
            _ = directory.serve(listener) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, exiting"),
        }
        Ok(())
    })
}
