//! `vmsync-directory`: the directory server.
//!
//! Skeleton for now: the directory (members, primary, term, staleness per node)
//! is the subject of a later issue. It parses its configuration so that the
//! interface contract (`vmsync-directory --config FILE`) already holds.

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;

#[derive(Parser)]
#[command(version, about = "vmsync directory server")]
struct Args {
    /// Path to the directory server's TOML configuration.
    #[arg(long)]
    config: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Config {
    directory: DirectorySection,
    security: SecuritySection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DirectorySection {
    listen: String,
    state_dir: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SecuritySection {
    secret_file: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read", args.config.display()))?;
    let _config: Config = toml::from_str(&text)
        .with_context(|| format!("{}: invalid configuration", args.config.display()))?;
    anyhow::bail!("vmsync-directory: the directory service is not implemented yet")
}
