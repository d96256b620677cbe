//! `grainfs snapshot hold|release`: put a tag on a snapshot so that nothing deletes or prunes it,
//! or take tags off. Holds are a small store-wide record the store writes durably; this command
//! writes it through the store itself, with or without a daemon (the daemon reads the record
//! afresh at every delete). It never deletes a snapshot.

use serde::Serialize;

use super::{locate, open_store, parse_name, print_json, store_error, CliError, Where};

/// What `hold --json` prints.
#[derive(Serialize)]
struct Held<'a> {
    name: &'a str,
    tag: &'a str,
    /// False when the snapshot already had this hold.
    added: bool,
}

/// What `release --json` prints.
#[derive(Serialize)]
struct Released<'a> {
    name: &'a str,
    released: Vec<String>,
}

pub(super) fn hold(name: &str, tag: &str, json: bool, at: &Where) -> Result<(), CliError> {
    let name = parse_name(name)?;
    let (_, _, store) = locate(at)?;
    let added = open_store(&store)?.hold(&name, tag).map_err(store_error)?;
    if json {
        return print_json(&Held {
            name: name.as_str(),
            tag,
            added,
        });
    }
    if added {
        println!("held {name} (tag {tag})");
    } else {
        println!("{name} was already held (tag {tag})");
    }
    Ok(())
}

pub(super) fn release(
    name: &str,
    tag: Option<&str>,
    json: bool,
    at: &Where,
) -> Result<(), CliError> {
    let name = parse_name(name)?;
    let (_, _, store) = locate(at)?;
    let released = open_store(&store)?
        .release(&name, tag)
        .map_err(store_error)?;
    if json {
        return print_json(&Released {
            name: name.as_str(),
            released,
        });
    }
    let s = if released.len() == 1 { "" } else { "s" };
    println!("released {name} (tag{s} {})", released.join(", "));
    Ok(())
}
