//! The control socket: a Unix socket in the store (`control.sock`, mode 0600, inside the 0700
//! store dir) speaking JSON lines: one request per connection, answered by one response line,
//! which long work (a snapshot, a delete) precedes with `progress` lines. While it runs the
//! client may send a `cancel` line; a client that is gone (a progress line cannot be written)
//! cancels too. Shared by the daemon (server) and the CLI (client); it owns the wire format
//! and nothing else.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::SnapshotName;
use crate::snapshot::diff::DiffReport;
use crate::snapshot::job::{Job, JobProgress};
use crate::snapshot::lifecycle::PruneReport;
use crate::snapshot::rollback::{RollbackReport, RollbackRequest};
use crate::snapshot::{CreateReport, CreateRequest};
use crate::track::ChangeMap;

/// File name of the socket in the store.
pub const SOCKET: &str = "control.sock";

/// The socket path of a store.
pub fn socket_path(store: &Path) -> PathBuf {
    store.join(SOCKET)
}

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon alive?
    Ping,
    /// Change maps of the volumes under `paths` (relative to the backing dir; empty: all).
    Status {
        #[serde(default)]
        paths: Vec<String>,
    },
    /// Take a snapshot (or plan one, with `dry_run`).
    SnapshotCreate(CreateRequest),
    /// Delete a snapshot (serialised with snapshot creation). The name is checked as the
    /// request is read: a bad one is refused at the socket.
    SnapshotDelete { name: SnapshotName },
    /// Apply retention to `group` (None: every group), or say what it would remove.
    Prune {
        group: Option<String>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Read the config file again and follow it (groups, schedules, retention, policy).
    Reload,
    /// What changed from `from` to `to` (snapshot names or `live`), under `paths`.
    Diff {
        from: String,
        to: String,
        #[serde(default)]
        paths: Vec<String>,
    },
    /// Return the live volumes of a snapshot to its content (serialised with snapshots).
    Rollback(RollbackRequest),
    /// Sent after a request on its connection: stop that request's work at its next safe
    /// point (nothing committed, nothing half-applied).
    Cancel,
}

/// A scheduled run that failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunFailure {
    pub at_ns: u64,
    pub message: String,
}

/// One group as `status` shows it: its schedule and retention, its newest snapshot, the next
/// scheduled run and the last failure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    /// As the config writes it (`every 15m`, `0 3 * * *`); None: snapshots only on request.
    pub schedule: Option<String>,
    /// The interval between two slots now (what `status --check` measures age against).
    pub period_ns: Option<u64>,
    /// Retention rules (`last=3 daily=7`, or `none`).
    pub keep: String,
    /// Snapshots of the group in the store.
    pub snapshots: u64,
    pub last_snapshot: Option<String>,
    pub last_snapshot_ns: Option<u64>,
    /// When the scheduler runs next (only from a live daemon).
    pub next_run_ns: Option<u64>,
    pub last_failure: Option<RunFailure>,
}

/// What `status` reports (also built offline from the saved state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// True when a live daemon answered; false when read from the saved state.
    pub live: bool,
    pub backing: String,
    pub mountpoint: Option<String>,
    pub tracking: bool,
    pub block_size: u64,
    pub partition_size: u64,
    pub interval_secs: f64,
    pub volumes: Vec<ChangeMap>,
    /// The groups (configured, or found in the store).
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
}

/// A response from the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Not the answer yet: how far the request's work is.
    Progress(JobProgress),
    Pong,
    Status(StatusReport),
    Snapshot(CreateReport),
    Deleted {
        name: SnapshotName,
    },
    Pruned(PruneReport),
    /// The config was read again; `changes` says what differs, one line each.
    Reloaded {
        changes: Vec<String>,
    },
    Diff(DiffReport),
    RolledBack(RollbackReport),
    Error {
        message: String,
    },
}

/// What serves requests: the request, and the job that carries its progress and cancel.
pub type Handler = dyn Fn(Request, &Job) -> Response + Send + Sync;

/// Bind the store's socket (replacing a stale one: the caller holds the store lock) and serve
/// each connection on its own thread with `handle`.
pub fn serve(store: &Path, handle: Arc<Handler>) -> io::Result<()> {
    let path = socket_path(store);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // bind creates the socket with the process umask (0 in the daemon): make it private from
    // the start rather than chmod it after. The daemon calls this before any other thread runs.
    let old_umask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&path);
    unsafe { libc::umask(old_umask) };
    let listener = bound
        .map_err(|e| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(conn, &*handle));
            }
        })?;
    Ok(())
}

/// Write one response line; false if the client is gone.
fn send(out: &Mutex<UnixStream>, resp: &Response) -> bool {
    let Ok(mut text) = serde_json::to_string(resp) else {
        return false;
    };
    text.push('\n');
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    out.write_all(text.as_bytes()).is_ok()
}

fn serve_conn(conn: UnixStream, handle: &Handler) {
    let Ok(out) = conn.try_clone() else {
        return;
    };
    let out = Arc::new(Mutex::new(out));
    let mut lines = BufReader::new(conn).lines();
    let req = loop {
        match lines.next() {
            Some(Ok(line)) if line.trim().is_empty() => continue,
            Some(Ok(line)) => break serde_json::from_str::<Request>(&line),
            _ => return,
        }
    };
    let req = match req {
        Ok(Request::Cancel) => Err("cancel: no request of this connection runs".to_string()),
        Ok(r) => Ok(r),
        Err(e) => Err(format!("bad request: {e}")),
    };
    let req = match req {
        Ok(r) => r,
        Err(message) => {
            send(&out, &Response::Error { message });
            return;
        }
    };
    // One thread writes the lines, so the work never waits on the client: a progress line
    // that finds the queue full (a client that stopped reading: Ctrl-Z, a stuck terminal) is
    // dropped, not waited for, since work may report while it holds writers and readers.
    let gone = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Response>(8);
    let (o, g) = (out.clone(), gone.clone());
    let writer = std::thread::Builder::new()
        .name("control-out".into())
        .spawn(move || {
            for resp in rx {
                // A client gone (a line cannot be written) waits for nothing: cancel.
                if !g.load(Ordering::Acquire) && !send(&o, &resp) {
                    g.store(true, Ordering::Release);
                }
                // The answer is the last line (the job, and so a sender, may live on).
                if !matches!(resp, Response::Progress(_)) {
                    return;
                }
            }
        });
    let Ok(writer) = writer else { return };
    let progress = Mutex::new(tx.clone());
    let job = Arc::new(Job::watched(move |p| {
        let tx = progress.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.try_send(Response::Progress(p.clone()));
    }));
    // The rest of the connection: a `cancel` line. A half-closed client (EOF) still waits
    // for its answer, so EOF alone cancels nothing.
    let j = job.clone();
    let _ = std::thread::Builder::new()
        .name("control-cancel".into())
        .spawn(move || {
            for line in lines {
                let Ok(line) = line else { return };
                if let Ok(Request::Cancel) = serde_json::from_str::<Request>(&line) {
                    j.cancel();
                }
            }
        });
    let watch = job.clone();
    let resp = std::thread::scope(|s| {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(Duration::from_millis(200))
            {
                if gone.load(Ordering::Acquire) {
                    watch.cancel();
                    return;
                }
            }
        });
        let resp = handle(req, &job);
        drop(done);
        resp
    });
    // After every progress line queued before it; then the writer ends.
    let _ = tx.send(resp);
    let _ = writer.join();
    // Ends the cancel reader (its read returns EOF).
    let _ = out
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shutdown(std::net::Shutdown::Both);
}

/// Send one request to the daemon of `store` and read its response (within a minute).
pub fn request(store: &Path, req: &Request) -> io::Result<Response> {
    request_within(store, req, Some(Duration::from_secs(60)))
}

/// Send one request and wait for its response up to `timeout` (None: as long as it takes, for
/// a snapshot of large volumes).
pub fn request_within(
    store: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> io::Result<Response> {
    request_watching(store, req, timeout, &mut |_| {}, None)
}

/// `request_within`, passing each progress line to `progress`, and sending `cancel` once
/// `cancel` becomes true (checked 5 times a second); the answer to a cancelled request is
/// still waited for, since it says what was left.
pub fn request_watching(
    store: &Path,
    req: &Request,
    timeout: Option<Duration>,
    progress: &mut dyn FnMut(&JobProgress),
    cancel: Option<&AtomicBool>,
) -> io::Result<Response> {
    let mut conn = UnixStream::connect(socket_path(store))?;
    let mut text = serde_json::to_string(req).map_err(io::Error::other)?;
    text.push('\n');
    conn.write_all(text.as_bytes())?;
    let tick = Duration::from_millis(200);
    conn.set_read_timeout(match (cancel, timeout) {
        (Some(_), Some(t)) => Some(t.min(tick)),
        (Some(_), None) => Some(tick),
        (None, t) => t,
    })?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    let (start, mut sent_cancel) = (std::time::Instant::now(), false);
    loop {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Err(ended()),
            Ok(_) if line.ends_with(b"\n") => {
                let resp: Response = serde_json::from_slice(&line)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                line.clear();
                match resp {
                    Response::Progress(p) => progress(&p),
                    other => return Ok(other),
                }
            }
            Ok(_) => return Err(ended()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // What was read stays in `line`; a timeout only means "look around".
                if timeout.is_some_and(|t| start.elapsed() >= t) {
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ended()),
            Err(e) => return Err(e),
        }
        if let Some(c) = cancel {
            if c.load(Ordering::Acquire) && !sent_cancel {
                sent_cancel = true;
                // The daemon may have answered and closed its side already (EPIPE): the
                // answer is still there to read, and it is what counts.
                let _ = writer.write_all(b"{\"op\":\"cancel\"}\n");
            }
        }
    }
}

/// Whether a failed `request` means no daemon serves the store (no socket, or a stale one):
/// a command that works offline then opens the store itself.
pub fn no_daemon(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// The daemon took the request and closed the connection without an answer: it ended (killed,
/// crashed or unmounted) while working on it.
fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the daemon ended before it answered",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        serve(
            dir.path(),
            Arc::new(|r, _: &Job| match r {
                Request::Ping => Response::Pong,
                Request::Status { paths } => Response::Error {
                    message: paths.join(","),
                },
                _ => Response::Pong,
            }),
        )
        .unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(request(dir.path(), &Request::Ping).unwrap(), Response::Pong);
        let r = request(
            dir.path(),
            &Request::Status {
                paths: vec!["a".into(), "b".into()],
            },
        )
        .unwrap();
        assert_eq!(
            r,
            Response::Error {
                message: "a,b".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status { paths: vec![] }).unwrap(),
            r#"{"op":"status","paths":[]}"#
        );
    }
}
