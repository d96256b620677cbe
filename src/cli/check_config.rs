//! `grainfs check-config FILE`: load and validate a config, print what it resolves to.

use std::path::PathBuf;

use clap::Args as ClapArgs;

use super::CliError;
use crate::config::Config;

/// Arguments of `grainfs check-config`.
#[derive(Debug, ClapArgs)]
pub struct CheckConfigArgs {
    /// The config file to check.
    pub file: PathBuf,
}

pub(super) fn run(args: &CheckConfigArgs) -> Result<(), CliError> {
    let config = Config::load(&args.file)?;
    let show = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("(not set)".to_string(), |p| p.display().to_string())
    };
    println!("{}: ok", args.file.display());
    println!("  backing     {}", show(&config.backing));
    println!("  mountpoint  {}", show(&config.mountpoint));
    if let Some(b) = &config.backing {
        println!("  store       {}", config.store_dir(b).display());
    }
    println!("  threads     {}", config.threads);
    println!(
        "  tracking    {} (block {} B, partition {} B, every {:?})",
        if config.tracking.enabled { "on" } else { "off" },
        config.tracking.block_size,
        config.tracking.partition_size,
        config.tracking.interval
    );
    for g in &config.groups {
        println!("  group {:<12} {}", g.name, g.volumes.join(" "));
    }
    Ok(())
}
