//! `grainfs snapshot verify`: re-hash every stored block of the named snapshots (default: all)
//! and rebuild every volume, reading the store directly, daemon or not; exit 1 on a mismatch.
//! Blocks stored by reflink whose blake3 the store has not computed yet are read and counted
//! as "not yet hashed": not proven, and said so, but no failure. It never repairs or deletes
//! anything.

use super::super::progress::Progress;
use super::super::status::human;
use super::{locate, open_store, parse_name, print_json, CliError, Where};
use crate::ids::SnapshotName;
use crate::store::{Store, VerifyReport};

pub(super) fn run(names: &[String], json: bool, at: &Where) -> Result<(), CliError> {
    let (_, _, store) = locate(at)?;
    let store = open_store(&store)?;
    let names = if names.is_empty() {
        store.names().map_err(|e| CliError::Usage(e.to_string()))?
    } else {
        names.to_vec()
    };
    let names = names
        .iter()
        .map(|n| parse_name(n))
        .collect::<Result<Vec<_>, _>>()?;
    let reports = verify(&store, &names, json)?;
    let bad: Vec<&VerifyReport> = reports.iter().filter(|r| !r.ok()).collect();
    if json {
        print_json(&reports)?;
    } else {
        for r in &reports {
            println!(
                "{}: {} volume(s), {} block(s), {}: {}",
                r.snapshot,
                r.volumes,
                r.blocks,
                human(r.bytes),
                match (r.ok(), r.unhashed_blocks) {
                    (false, _) => "DAMAGED".to_string(),
                    (true, 0) => "ok".to_string(),
                    (true, n) => format!(
                        "ok so far, {n} block(s) not yet hashed (reflinked at capture; the daemon \
                         hashes them in the background: verify again to prove them)"
                    ),
                }
            );
            for p in &r.problems {
                println!(
                    "    {}{}: {} (stored in {})",
                    p.volume.as_deref().unwrap_or("(snapshot)"),
                    p.block.map_or(String::new(), |b| format!(" block {b}")),
                    p.what,
                    p.stored_in
                );
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{} of {} snapshot(s) failed verification: {}",
            bad.len(),
            reports.len(),
            bad.iter()
                .map(|r| r.snapshot.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Verify `names`, with a progress bar (bytes, rate, ETA) when stderr is a terminal.
fn verify(
    store: &Store,
    names: &[SnapshotName],
    quiet: bool,
) -> Result<Vec<VerifyReport>, CliError> {
    let total: u64 = names.iter().map(|n| store.data_bytes(n).unwrap_or(0)).sum();
    let bar = Progress::bytes("verify", total, quiet);
    let mut out = Vec::new();
    for n in names {
        bar.message(n.to_string());
        let r = store
            .verify_with(n, &mut |_, bytes| bar.inc(bytes))
            .map_err(|e| CliError::Usage(e.to_string()))?;
        out.push(r);
    }
    bar.finish();
    Ok(out)
}
