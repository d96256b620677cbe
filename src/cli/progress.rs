//! Progress on a terminal for long work (verify, create, restore, rollback, delete): bytes
//! done of a total, rate and ETA on stderr. Hidden when stderr is not a terminal or `--json`
//! asked for a final report only, so scripts and logs see nothing of it.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::CliError;
use crate::control::{self, Request, Response};

/// A bytes progress bar, or nothing.
pub(crate) struct Progress(indicatif::ProgressBar);

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

/// What a long request to the daemon came to.
pub(crate) struct Answer {
    pub response: Response,
    /// Ctrl-C was pressed and the daemon told to cancel (the response says what was left).
    pub cancelled: bool,
}

/// Send `req` (long work: a snapshot, a rollback, a delete) to the daemon of `store` and wait
/// for its answer as long as it takes, showing its progress as `what` on a terminal (not when
/// `quiet`). When `cancellable`, the first Ctrl-C asks the daemon to cancel and keeps waiting
/// for what it says; a second one ends this command at once (the daemon then still cancels,
/// its client gone). Otherwise Ctrl-C ends this command as usual and the work goes on.
pub(crate) fn request_job(
    store: &Path,
    req: &Request,
    what: &str,
    quiet: bool,
    cancellable: bool,
) -> std::io::Result<Answer> {
    let cancel = Arc::new(AtomicBool::new(false));
    let handlers = if cancellable {
        // The order matters: the conditional exit sees the flag before the other sets it.
        let exit =
            signal_hook::flag::register_conditional_shutdown(libc::SIGINT, 130, cancel.clone())?;
        vec![
            exit,
            signal_hook::flag::register(libc::SIGINT, cancel.clone())?,
        ]
    } else {
        Vec::new()
    };
    let bar = Progress::bytes(what, 0, quiet);
    let r = std::thread::scope(|s| {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let c = &cancel;
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(std::time::Duration::from_millis(100))
            {
                if c.load(Ordering::Acquire) {
                    eprintln!("grainfs: cancelling {what}; Ctrl-C again to stop waiting");
                    return;
                }
            }
        });
        let r = control::request_watching(
            store,
            req,
            None,
            &mut |p| {
                bar.set_total(p.total);
                bar.set(p.done);
                bar.message(p.phase.clone());
            },
            Some(&cancel),
        );
        drop(done);
        r
    });
    let cancelled = cancel.load(Ordering::Acquire);
    for h in handlers {
        signal_hook::low_level::unregister(h);
    }
    bar.finish();
    Ok(Answer {
        response: r?,
        cancelled,
    })
}

/// What a long request's command says when the daemon does not give the answer it wants.
pub(crate) struct Unanswered<'a> {
    pub backing: &'a Path,
    pub store: &'a Path,
    /// The work, as in "the daemon ... ended {during}" ("while it took the snapshot").
    pub during: &'a str,
    /// What that leaves, after a colon ("nothing was committed").
    pub leaves: &'a str,
    /// Why a daemon is needed, after "mount it first" is said.
    pub needs: &'a str,
}

/// The answer of `request_job` as `pick` takes it (Err: the daemon's error, or an answer of
/// another kind, or no daemon, each said for a user); `too_late` is said on stderr when Ctrl-C
/// came after the work could still be cancelled.
pub(crate) fn job_answer<T>(
    answer: std::io::Result<Answer>,
    pick: impl FnOnce(Response) -> Result<T, Box<Response>>,
    too_late: impl FnOnce(&T) -> String,
    say: Unanswered,
) -> Result<T, CliError> {
    match answer {
        Ok(Answer {
            response,
            cancelled,
        }) => match pick(response) {
            Ok(r) => {
                if cancelled {
                    eprintln!("grainfs: too late to cancel: {}", too_late(&r));
                }
                Ok(r)
            }
            Err(other) => match *other {
                Response::Error { message } => Err(CliError::Usage(message)),
                other => Err(CliError::Usage(format!(
                    "daemon: unexpected answer {other:?}"
                ))),
            },
        },
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CliError::Usage(format!(
            "the daemon serving {} ended {} (killed or crashed; its log is {} when it ran in the background): {}",
            say.backing.display(),
            say.during,
            say.store.join("grainfs.log").display(),
            say.leaves
        ))),
        Err(e) => Err(CliError::Usage(format!(
            "no grainfs daemon answers for {} ({e}); {}: mount it first",
            say.backing.display(),
            say.needs
        ))),
    }
}
