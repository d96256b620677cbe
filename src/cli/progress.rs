//! Progress on a terminal for long work (verify, create, restore, rollback, delete): bytes
//! done of a total, rate and ETA on stderr. Hidden when stderr is not a terminal or `--json`
//! asked for a final report only, so scripts and logs see nothing of it.

use std::io::IsTerminal;

/// A bytes progress bar, or nothing.
// Some methods wait for their first users (create, restore, rollback, delete).
#[allow(dead_code)]
pub(crate) struct Progress(indicatif::ProgressBar);

#[allow(dead_code)]
impl Progress {
    /// A bar for `total` bytes of `what` ("verify", "restore"...), shown only on a terminal and
    /// when `quiet` is false.
    pub(crate) fn bytes(what: &str, total: u64, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(what.to_string());
        Progress(b)
    }

    /// Nothing shown.
    pub(crate) fn hidden() -> Progress {
        Progress(indicatif::ProgressBar::hidden())
    }

    /// `n` more bytes done.
    pub(crate) fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Bytes done so far, as the work reports it.
    pub(crate) fn set(&self, done: u64) {
        self.0.set_position(done);
    }

    /// The total changed (it was an estimate).
    pub(crate) fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }

    /// What is being worked on now (a volume, a snapshot).
    pub(crate) fn message(&self, msg: impl Into<String>) {
        self.0.set_message(msg.into());
    }

    /// Done: remove the bar (the command prints its report after).
    pub(crate) fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
