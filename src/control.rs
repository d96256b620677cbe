//! The control socket: a Unix socket in the store (`control.sock`, mode 0600, inside the 0700
//! store dir) speaking JSON lines, one request and one response per line. Shared by the daemon
//! (server) and the CLI (client); it owns the wire format and nothing else.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::SnapshotName;
use crate::snapshot::lifecycle::PruneReport;
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
    Error {
        message: String,
    },
}

/// Bind the store's socket (replacing a stale one: the caller holds the store lock) and serve
/// each connection on its own thread with `handle`.
pub fn serve(
    store: &Path,
    handle: Arc<dyn Fn(Request) -> Response + Send + Sync>,
) -> io::Result<()> {
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

fn serve_conn(conn: UnixStream, handle: &(dyn Fn(Request) -> Response + Send + Sync)) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let Ok(mut text) = serde_json::to_string(&resp) else {
            return;
        };
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
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
    let mut conn = UnixStream::connect(socket_path(store))?;
    conn.set_read_timeout(timeout)?;
    let mut text = serde_json::to_string(req).map_err(io::Error::other)?;
    text.push('\n');
    conn.write_all(text.as_bytes())?;
    let mut line = String::new();
    let n = BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionReset => ended(),
            _ => e,
        })?;
    if n == 0 {
        return Err(ended());
    }
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
            Arc::new(|r| match r {
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
