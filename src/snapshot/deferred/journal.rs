//! The deferred-write journal's on-disk format, written and read:
//! `<store>/deferred/<dev>-<ino>.log`, one per volume with parked writes. A fixed header (magic,
//! epoch, the header's length, the volume's ctime after the daemon's own last change) and a
//! JSON header naming the file, then records, each hashed with the epoch so that records of an
//! earlier epoch, the zeros of allocated space and a record cut short by a kill all read as the
//! end.
//!
//! It owns the layout: the daemon's writer (`JournalWriter`: create, append, mark applied, note
//! the ctime, start a new epoch) and the reader a replay uses (`Journal`). It never decides
//! what to park, when a write lands or whether a replay may write: `deferred.rs` and
//! `recover.rs` do.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::VolumeId;
use crate::sys::{self, FileIdentity};

/// The journals' directory in the store.
pub const DIR: &str = "deferred";
const MAGIC: &[u8; 8] = b"GRAINDW2";
/// Journal header: MAGIC, epoch u64, header length u32, 4 pad, the file's ctime after the
/// daemon's own last change (seconds i64, nanoseconds u32, 4 pad), then the header JSON.
const HEADER_FIXED: usize = 40;
const EPOCH_AT: u64 = 8;
const CTIME_AT: u64 = 24;
const RECORD_MAGIC: u32 = 0x4457_5243; // "CRWD"
/// Record: magic u32, applied u8, 3 pad, seq u64, offset u64, len u32, epoch u32 (low half),
/// blake3 of epoch, seq, offset, time and data, time parked (ns since the epoch) u64; then
/// the data.
const RECORD_HEADER: usize = 72;
const APPLIED_AT: u64 = 4;
/// The journal grows by this much at a time.
const JOURNAL_CHUNK: u64 = 4 << 20;
/// The header's version.
const VERSION: u32 = 2;

/// Who the journal belongs to, written at its start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalHeader {
    pub version: u32,
    pub boot_id: String,
    /// The volume's file: device, inode, generation, birth time.
    pub file: FileIdentity,
    /// Path relative to the backing dir when the capture began (renames are followed by inode).
    pub path: String,
}

impl JournalHeader {
    /// The header of a journal for `file`, at `path` in the backing dir, written in this boot.
    pub fn new(file: FileIdentity, path: &str) -> JournalHeader {
        JournalHeader {
            version: VERSION,
            boot_id: sys::boot_id(),
            file,
            path: path.to_string(),
        }
    }
}

/// The journal's file name for volume `id`.
pub fn journal_name(id: VolumeId) -> String {
    format!("{:x}-{:x}.log", id.dev, id.ino)
}

/// Open (creating) the journal directory under the store dir `store`.
pub fn open_dir(store: &std::path::Path) -> io::Result<OwnedFd> {
    let dir = store.join(DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    sys::open_dir_path(&dir)
}

/// The hash a record carries: of the journal's epoch, its seq, offset and time, and its data.
fn record_hash(epoch: u64, seq: u64, offset: u64, time: u64, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(&time.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// Keep the volume's ctime `(seconds, nanoseconds)` in the journal `file`.
pub fn write_ctime(file: &File, ctime: (i64, u32)) -> io::Result<()> {
    let mut slot = [0u8; 12];
    slot[..8].copy_from_slice(&ctime.0.to_le_bytes());
    slot[8..].copy_from_slice(&ctime.1.to_le_bytes());
    file.write_all_at(&slot, CTIME_AT)
}

/// Mark the record at `record_at` of the journal `file` written to the volume: a replay must
/// not write it again over later writes to the same bytes.
pub fn mark_applied(file: &File, record_at: u64) -> io::Result<()> {
    file.write_all_at(&[1], record_at + APPLIED_AT)
}

/// The journal of one volume as the daemon writes it.
pub struct JournalWriter {
    file: Arc<File>,
    /// Where records start (after the header) and end, and how far the file is allocated.
    records_start: u64,
    end: u64,
    allocated: u64,
    /// Records of other epochs are not this journal's.
    epoch: u64,
    next_seq: u64,
}

impl JournalWriter {
    /// Create (or truncate) the journal `name` in the directory `dir`, with `header` (its
    /// JSON) and no records.
    pub fn create(dir: RawFd, name: &CStr, header: &[u8]) -> io::Result<JournalWriter> {
        let fd = sys::openat(
            dir,
            name,
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )?;
        let f = File::from(fd);
        let epoch = 0u64;
        let mut head = Vec::with_capacity(HEADER_FIXED + header.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&epoch.to_le_bytes());
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.resize(HEADER_FIXED, 0);
        head.extend_from_slice(header);
        f.write_all_at(&head, 0)?;
        let records_start = head.len() as u64;
        Ok(JournalWriter {
            file: Arc::new(f),
            records_start,
            end: records_start,
            allocated: records_start,
            epoch,
            next_seq: 0,
        })
    }

    /// The journal file, to note a ctime or mark a record applied without the writer.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Append a record of `data` parked for `offset`; returns where it starts. The journal is
    /// allocated ahead in chunks: a record then never grows the file, which can wait for the
    /// filesystem's journal, and a full disk shows up here, before the write is accepted, not
    /// when it is written.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<u64> {
        let want = (RECORD_HEADER + data.len()) as u64;
        let at = self.end;
        let f = &self.file;
        if at + want > self.allocated {
            let grow = JOURNAL_CHUNK.max(want);
            sys::fallocate(f.as_raw_fd(), 0, self.allocated, grow)?;
            self.allocated += grow;
        }
        let seq = self.next_seq;
        let time = crate::sys::now_ns();
        let mut rec = [0u8; RECORD_HEADER];
        rec[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec[8..16].copy_from_slice(&seq.to_le_bytes());
        rec[16..24].copy_from_slice(&offset.to_le_bytes());
        rec[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
        rec[28..32].copy_from_slice(&self.epoch.to_le_bytes()[..4]);
        rec[32..64].copy_from_slice(&record_hash(self.epoch, seq, offset, time, data));
        rec[64..72].copy_from_slice(&time.to_le_bytes());
        let iov = [
            libc::iovec {
                iov_base: rec.as_ptr() as *mut libc::c_void,
                iov_len: rec.len(),
            },
            libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            },
        ];
        // SAFETY: both iovecs point into buffers that outlive the call.
        let n = unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), 2, at as libc::off_t) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as u64 != want {
            // Short (the allocation above makes that unlikely): the fragment is unmade and the
            // next record goes in its place; left behind, it would hide every later record
            // from a replay (reading stops at the first record that fails its hash).
            let _ = f.write_all_at(&[0u8; 4], at);
            self.end = at;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.end = at + want;
        self.next_seq += 1;
        Ok(at)
    }

    /// Nothing is parked any more: if records were written, a new epoch in the header disowns
    /// them all, and the next ones go from the start again, so the journal stays small across
    /// a long capture. If the header cannot be written, the records stay owned (and marked).
    pub fn start_new_epoch(&mut self) {
        if self.end <= self.records_start {
            return;
        }
        let epoch = self.epoch + 1;
        if self
            .file
            .write_all_at(&epoch.to_le_bytes(), EPOCH_AT)
            .is_ok()
        {
            self.epoch = epoch;
            self.end = self.records_start;
        }
    }
}

/// One record of a journal as read back.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    pub offset: u64,
    /// When it was parked, ns since the Unix epoch.
    pub time_ns: u64,
    /// Already written to the volume (a replay skips it).
    pub applied: bool,
    /// Where the record starts in the journal, and where its data is.
    pub record_at: u64,
    data_at: usize,
    pub len: usize,
}

/// A journal read back whole (after the daemon that wrote it ended).
pub struct Journal {
    pub header: JournalHeader,
    /// The file's ctime after the writing daemon's last own change (0, 0: none noted).
    pub ctime: (i64, u32),
    /// The records of the current epoch, in the order they were parked.
    pub records: Vec<Record>,
    bytes: Vec<u8>,
}

impl Journal {
    /// Read and check a journal file; an error says why it is not one this version reads.
    pub fn read(path: &std::path::Path) -> io::Result<Journal> {
        Journal::parse(std::fs::read(path)?)
    }

    fn parse(bytes: Vec<u8>) -> io::Result<Journal> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a deferred-write journal of this version ({why})"),
            )
        };
        if bytes.len() < HEADER_FIXED || &bytes[..8] != MAGIC {
            return Err(bad("magic"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let epoch = u64_at(EPOCH_AT as usize);
        let hlen = u32_at(16) as usize;
        let ctime = (
            u64_at(CTIME_AT as usize) as i64,
            u32_at(CTIME_AT as usize + 8),
        );
        let header: JournalHeader = serde_json::from_slice(
            bytes
                .get(HEADER_FIXED..HEADER_FIXED + hlen)
                .ok_or_else(|| bad("header"))?,
        )
        .map_err(|_| bad("header"))?;
        let mut records = Vec::new();
        let mut at = HEADER_FIXED + hlen;
        while at + RECORD_HEADER <= bytes.len() {
            if u32_at(at) != RECORD_MAGIC {
                break;
            }
            let seq = u64_at(at + 8);
            let offset = u64_at(at + 16);
            let len = u32_at(at + 24) as usize;
            let time_ns = u64_at(at + 64);
            let data_at = at + RECORD_HEADER;
            let Some(data) = bytes.get(data_at..data_at + len) else {
                break;
            };
            if bytes[at + 32..at + 64] != record_hash(epoch, seq, offset, time_ns, data) {
                // The end: zeros of the allocated space, a record of an earlier epoch (written
                // over by this one's), or one cut short by the kill (its write never returned).
                break;
            }
            records.push(Record {
                seq,
                offset,
                time_ns,
                applied: bytes[at + APPLIED_AT as usize] != 0,
                record_at: at as u64,
                data_at,
                len,
            });
            at = data_at + len;
        }
        Ok(Journal {
            header,
            ctime,
            records,
            bytes,
        })
    }

    /// The bytes a record parked.
    pub fn data(&self, r: &Record) -> &[u8] {
        &self.bytes[r.data_at..r.data_at + r.len]
    }

    /// The records not yet written to the volume.
    pub fn unapplied(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| !r.applied)
    }

    /// Mark `r` written in the journal file `file` (which this was read from), after noting
    /// `ctime` (the volume's, right after writing it) as the writing daemon does.
    pub fn mark_applied(file: &File, r: &Record, ctime: (i64, u32)) -> io::Result<()> {
        write_ctime(file, ctime)?;
        mark_applied(file, r.record_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &std::path::Path) -> JournalWriter {
        let d = sys::open_dir_path(dir).unwrap();
        let file = FileIdentity {
            dev: 1,
            ino: 2,
            generation: Some(3),
            btime: Some((4, 5)),
        };
        let header = serde_json::to_vec(&JournalHeader::new(file, "v")).unwrap();
        JournalWriter::create(d.as_raw_fd(), c"v.log", &header).unwrap()
    }

    /// What the daemon wrote is what a replay reads, and a new epoch disowns every earlier
    /// record (a replay must never write those again).
    #[test]
    fn a_replay_reads_what_was_written_and_nothing_of_an_earlier_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = writer(tmp.path());
        let a = w.append(4096, b"first").unwrap();
        w.append(0, b"second").unwrap();
        mark_applied(w.file(), a).unwrap();
        write_ctime(w.file(), (7, 8)).unwrap();
        let j = Journal::read(&tmp.path().join("v.log")).unwrap();
        assert_eq!(j.ctime, (7, 8));
        let got: Vec<_> = j
            .records
            .iter()
            .map(|r| (r.offset, r.applied, j.data(r)))
            .collect();
        assert_eq!(
            got,
            vec![(4096, true, &b"first"[..]), (0, false, &b"second"[..])]
        );
        w.start_new_epoch();
        w.append(8192, b"third").unwrap();
        let j = Journal::read(&tmp.path().join("v.log")).unwrap();
        let got: Vec<_> = j.records.iter().map(|r| (r.offset, j.data(r))).collect();
        assert_eq!(got, vec![(8192, &b"third"[..])]);
    }
}
