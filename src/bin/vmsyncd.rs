//! `vmsyncd --config FILE`: runs one resource's node daemon in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "vmsync node daemon: serves and replicates one resource"
)]
struct Args {
    /// The node's TOML configuration.
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    vmsync::logging::init();
    let args = Args::parse();
    let config = match vmsync::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmsyncd: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(vmsync::node::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmsyncd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
