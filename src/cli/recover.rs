//! `grainfs recover`: the writes a killed daemon had accepted and parked but that could not be
//! replayed safely at the next mount (the file was gone, replaced or changed meanwhile), kept in
//! `<store>/lost+found/`. It lists them, applies a set to a file the user names, or discards
//! one. It reads and writes only lost+found and the file named with `--to`.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Subcommand};

use super::snapshot::{locate, print_json, Where};
use super::CliError;
use crate::snapshot::recover;

/// Arguments of `grainfs recover`.
#[derive(Debug, ClapArgs)]
pub struct RecoverArgs {
    #[command(subcommand)]
    pub command: Option<RecoverCommand>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: Where,
}

/// The recover subcommands (none: list).
#[derive(Debug, Subcommand)]
pub enum RecoverCommand {
    /// List the parked writes kept in lost+found (the default).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: Where,
    },
    /// Write a kept set into FILE (through the mount, so tracking sees it), in the order the
    /// writes were parked, then fsync it.
    Apply {
        /// A name `grainfs recover` lists.
        name: String,
        /// The file to write them into (it must exist).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        #[command(flatten)]
        at: Where,
    },
    /// Delete a kept set.
    Discard {
        name: String,
        #[command(flatten)]
        at: Where,
    },
}

pub(super) fn run(args: &RecoverArgs) -> Result<(), CliError> {
    let io = |what: String| move |source| CliError::Io { what, source };
    match &args.command {
        None => list(&args.at, args.json),
        Some(RecoverCommand::List { json, at }) => list(at, *json || args.json),
        Some(RecoverCommand::Apply { name, to, at }) => {
            let (_, _, store) = locate(at)?;
            let n = recover::apply(&store, name, to).map_err(io(format!("applying {name}")))?;
            println!("{name}: wrote {n} parked write(s) into {}", to.display());
            Ok(())
        }
        Some(RecoverCommand::Discard { name, at }) => {
            let (_, _, store) = locate(at)?;
            recover::discard(&store, name).map_err(io(format!("discarding {name}")))?;
            println!("{name}: discarded");
            Ok(())
        }
    }
}

fn list(at: &Where, json: bool) -> Result<(), CliError> {
    let (_, _, store) = locate(at)?;
    let kept = recover::list(&store).map_err(|source| CliError::Io {
        what: format!("reading {}", store.join(recover::LOST_FOUND).display()),
        source,
    })?;
    if json {
        return print_json(&kept);
    }
    recover::write_table(&mut std::io::stdout().lock(), &kept).map_err(|source| CliError::Io {
        what: "writing the list".into(),
        source,
    })
}
