//! `grainfs reload [MOUNT]`: ask the daemon to read its config file again (as SIGHUP does):
//! groups, schedules, retention and policy change without a remount; a bad file, or a change
//! to a key that needs a remount, is refused with its key and line, and the config in force
//! stays.

use std::path::PathBuf;

use clap::Args as ClapArgs;

use super::snapshot::{locate, print_json, Where};
use super::CliError;
use crate::control::{self, Request, Response};

/// Arguments of `grainfs reload`.
#[derive(Debug, ClapArgs)]
pub struct ReloadArgs {
    /// The mount (or a path inside it); default: the mount the working directory is in, or
    /// the only one.
    pub mount: Option<PathBuf>,
    /// The config the mount was started with (to find a store outside the backing dir).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Print what changed as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(args: &ReloadArgs) -> Result<(), CliError> {
    let at = Where {
        mount: args.mount.clone(),
        config: args.config.clone(),
    };
    let (_, _, store_dir) = locate(&at)?;
    match control::request(&store_dir, &Request::Reload) {
        Ok(Response::Reloaded { changes }) => {
            if args.json {
                return print_json(&serde_json::json!({ "reloaded": true, "changes": changes }));
            }
            if changes.is_empty() {
                println!("reloaded: no change");
            }
            for c in changes {
                println!("reloaded: {c}");
            }
            Ok(())
        }
        Ok(Response::Error { message }) => Err(CliError::Usage(format!(
            "reload refused, the config in force stays: {message}"
        ))),
        Ok(other) => Err(CliError::Usage(format!(
            "daemon: unexpected answer {other:?}"
        ))),
        Err(e) => Err(CliError::Usage(format!(
            "no daemon answers at {} ({e}): reload needs a running mount",
            store_dir.display()
        ))),
    }
}
