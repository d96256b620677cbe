//! FUSE over io_uring (Linux 6.14 and later): the kernel hands requests to ring entries the
//! daemon registered with `IORING_OP_URING_CMD` on /dev/fuse, instead of the daemon reading
//! them from /dev/fuse. Added to the vendored fuser (see `README.md` at the crate root).
//!
//! The protocol, as the kernel's `fs/fuse/dev_uring.c` speaks it:
//! - after INIT, with `FUSE_OVER_IO_URING` agreed, the daemon registers entries
//!   (`FUSE_IO_URING_CMD_REGISTER`) for every queue; a queue is a possible CPU, and a request
//!   goes to the queue of the CPU its task runs on. Until every queue has an entry, requests
//!   wait; from then on only forgets, interrupts and notifications use /dev/fuse;
//! - an entry is two buffers: a header (`struct fuse_uring_req_header`: the in/out header,
//!   the operation's own header, and `fuse_uring_ent_in_out` with the commit id and the payload
//!   size) and a payload buffer at least as large as the connection's largest request or reply;
//! - a request completes the entry's command; the daemon answers by writing `fuse_out_header`
//!   into the header and every reply argument into the payload, and submits
//!   `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits for the next request;
//! - on unmount or abort the kernel ends every command with `-ENOTCONN`.
//!
//! Each queue is served by threads of its own, each with its own ring and one entry, pinned to
//! the queue's CPU: an entry is free exactly when its thread is, so a request never waits behind
//! a busy handler while another thread of its queue idles, as with /dev/fuse.
//!
//! Requests are handed to fuser's own parser and `Filesystem` dispatch, rebuilt in /dev/fuse
//! layout in front of the payload (which stays where the kernel put it); replies go through
//! `ReplySender::Ring`.

use std::fmt;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `enum fuse_uring_cmd` of `<linux/fuse.h>`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_in_header` and `struct fuse_out_header`.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// `FUSE_URING_OP_IN_OUT_SZ`: room for an operation's own header.
const OP_IN_LEN: usize = 128;
/// Room in front of the payload buffer where a request is put back together.
const GAP: usize = 4096;
/// `user_data` of the eventfd poll that wakes a ring thread.
const WAKE: u64 = u64::MAX;

/// `struct fuse_uring_req_header` (288 bytes).
#[repr(C)]
struct RingHeader {
    in_out: [u8; 128],
    op_in: [u8; OP_IN_LEN],
    /// `struct fuse_uring_ent_in_out`
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

const _: () = assert!(std::mem::size_of::<RingHeader>() == 288);
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);

/// Whether this process can set up a ring of the kind FUSE needs (128-byte SQEs): io_uring may
/// be compiled out or switched off (`kernel.io_uring_disabled`). Checked before INIT, because
/// once `FUSE_OVER_IO_URING` is agreed the kernel holds every request until rings are registered.
pub(crate) fn probe() -> Result<(), String> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(2)
        .map(drop)
        .map_err(|e| format!("io_uring_setup with 128-byte SQEs failed: {e}"))
}

/// The number of queues the kernel makes: one per possible CPU.
pub(crate) fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map(|last| last + 1)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping, owned by the returned value.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Where a reply stands in its entry's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the kernel: waiting for a request, or one on its way.
    Kernel,
    /// The ring thread is in the filesystem's handler. `stage`: the request's payload is
    /// still borrowed from the payload buffer, so a reply waits in `staged` until the handler
    /// returned (the kernel reads replies from the same buffer).
    Dispatching { stage: bool },
    /// Answered while dispatching; the ring thread commits it when the handler returns.
    Replied,
    /// The handler returned without answering: whoever answers commits through `Wake`.
    Detached,
}

struct SlotState {
    phase: Phase,
    staged: Vec<u8>,
}

/// One ring entry: its buffers and the state its ring thread and repliers share.
pub(crate) struct Slot {
    index: usize,
    header: *mut RingHeader,
    payload: *mut u8,
    payload_len: usize,
    state: Mutex<SlotState>,
    wake: Arc<Wake>,
    ch: ChannelSender,
}

// SAFETY: the raw pointers point into mappings that outlive every `RingSender` (the ring thread
// keeps them until its entries are dead, and a reply after that only writes into memory that is
// still mapped: see `RingThread`); writes are serialised by `state`.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("index", &self.index).finish()
    }
}

/// What wakes a ring thread from another thread: replies that came after their handler returned,
/// and the request to stop.
struct Wake {
    eventfd: OwnedFd,
    late: Mutex<Vec<usize>>,
    stop: AtomicBool,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: a fresh fd we own.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            late: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    fn ring(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&raw const one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn drain(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a live u64 (non-blocking).
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&raw mut n).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Sends a reply into a ring entry (`ReplySender::Ring`).
#[derive(Clone, Debug)]
pub(crate) struct RingSender(Arc<Slot>);

impl RingSender {
    /// The /dev/fuse channel of the session (backing files for passthrough).
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.0.ch
    }

    /// Put the reply into the entry: `fuse_out_header` into its header, the rest into the
    /// payload buffer, and have it committed.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let slot = &*self.0;
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = [0u8; OUT_HEADER_LEN];
        let mut body: Vec<&[u8]> = Vec::with_capacity(data.len());
        let mut skip = OUT_HEADER_LEN;
        for s in data {
            let s: &[u8] = s;
            let head = skip.min(s.len());
            let at = OUT_HEADER_LEN - skip;
            out[at..at + head].copy_from_slice(&s[..head]);
            skip -= head;
            if head < s.len() {
                body.push(&s[head..]);
            }
        }
        let body_len = total.saturating_sub(OUT_HEADER_LEN);
        if total < OUT_HEADER_LEN || body_len > slot.payload_len {
            error!(
                "ring reply of {total} bytes does not fit the entry ({} bytes): answering EIO",
                slot.payload_len
            );
            // error field of fuse_out_header
            out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            body.clear();
        }
        let body_len: usize = body.iter().map(|b| b.len()).sum();
        // SAFETY: the header buffer is never borrowed by a request (the request was copied out
        // of it); writes to it are serialised by `state`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                out.as_ptr(),
                (*slot.header).in_out.as_mut_ptr(),
                OUT_HEADER_LEN,
            );
        }
        match state.phase {
            Phase::Dispatching { stage: true } => {
                state.staged.clear();
                for b in &body {
                    state.staged.extend_from_slice(b);
                }
                state.phase = Phase::Replied;
            }
            Phase::Dispatching { stage: false } => {
                slot.write_payload(&body, body_len);
                state.staged.clear();
                state.phase = Phase::Replied;
            }
            Phase::Detached => {
                slot.write_payload(&body, body_len);
                state.phase = Phase::Kernel;
                drop(state);
                slot.wake
                    .late
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(slot.index);
                slot.wake.ring();
            }
            Phase::Kernel | Phase::Replied => {
                return Err(io::Error::other("reply to a ring entry with no request"));
            }
        }
        Ok(())
    }
}

impl Slot {
    /// Copy a reply body into the payload buffer and record its size.
    fn write_payload(&self, body: &[&[u8]], len: usize) {
        let mut at = 0;
        for b in body {
            // SAFETY: `len <= payload_len` (checked by the caller); the payload buffer is not
            // borrowed by a request in these phases.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.payload.add(at), b.len()) };
            at += b.len();
        }
        // SAFETY: as above, for the header.
        unsafe { (*self.header).payload_sz = len as u32 };
    }
}

/// An entry's buffers, owned by its ring thread.
struct Buffers {
    _header: Mapping,
    _data: Mapping,
    iov: Box<[libc::iovec; 2]>,
}

/// Ring threads of one session, and how to stop them.
pub(crate) struct RingThreads {
    wakes: Vec<Arc<Wake>>,
    handles: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

impl RingThreads {
    /// Start `per_queue` threads for each of `queues` queues and register their entries.
    /// Fails (and stops what started) when a thread cannot set up its ring or the kernel refuses
    /// a registration.
    pub(crate) fn start<FS: Filesystem>(
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
        dev_fd: RawFd,
        queues: usize,
        per_queue: usize,
        payload_len: usize,
    ) -> io::Result<RingThreads> {
        let mut threads = RingThreads {
            wakes: Vec::new(),
            handles: Vec::new(),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        for qid in 0..queues {
            for t in 0..per_queue {
                let name = format!("fuse-ring-{qid}.{t}");
                let event_loop = make_loop(name.clone());
                let wake = Arc::new(Wake::new()?);
                threads.wakes.push(wake.clone());
                let ready = ready_tx.clone();
                let handle = std::thread::Builder::new().name(name).spawn(move || {
                    pin_to_cpu(qid);
                    let mut ring = match RingThread::new(
                        dev_fd,
                        qid as u16,
                        payload_len,
                        wake,
                        event_loop.ch.sender(),
                    ) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(e);
                        }
                    };
                    let registered = ring.register();
                    let failed = registered.as_ref().err().map(|e| e.to_string());
                    let _ = ready.send(registered.map(|_| ()));
                    drop(ready);
                    if let Some(e) = failed {
                        return Err(io::Error::other(e));
                    }
                    ring.serve(&event_loop)
                });
                match handle {
                    Ok(h) => threads.handles.push(h),
                    Err(e) => {
                        let _ = threads.stop();
                        return Err(e);
                    }
                }
            }
        }
        drop(ready_tx);
        for _ in 0..queues * per_queue {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = threads.stop();
                    return Err(e);
                }
                Err(_) => {
                    let _ = threads.stop();
                    return Err(io::Error::other("a ring thread ended before registering"));
                }
            }
        }
        Ok(threads)
    }

    /// Ask every ring thread to stop (they also stop by themselves when the kernel ends their
    /// entries) and wait for them. Returns the first error a thread ended with.
    pub(crate) fn stop(&mut self) -> io::Result<()> {
        for w in &self.wakes {
            w.stop.store(true, Ordering::SeqCst);
            w.ring();
        }
        self.join()
    }

    /// Wait for every ring thread to end.
    pub(crate) fn join(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for h in self.handles.drain(..) {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a ring thread panicked")));
            if let Err(e) = r {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

/// Pin the calling thread to `cpu` (best effort: a CPU may be offline or outside our cpuset,
/// and then the thread runs anywhere, which costs locality, not correctness).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "ring thread for queue {cpu} not pinned: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// One ring thread: its ring, its entry, and its wake-up.
struct RingThread {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev_fd: RawFd,
    qid: u16,
    slot: Arc<Slot>,
    /// Kept for the kernel: it writes into these until the entry is dead.
    buffers: Buffers,
    wake: Arc<Wake>,
    /// The command last submitted for the entry (resubmitted on EINTR/EAGAIN).
    last_cmd: u32,
    commit_id: u64,
    /// The entry is still the kernel's to use (no error completion yet).
    live: bool,
    /// Completions seen while registering, served first.
    pending: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(
        dev_fd: RawFd,
        qid: u16,
        payload_len: usize,
        wake: Arc<Wake>,
        ch: ChannelSender,
    ) -> io::Result<RingThread> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(8)
            .build(4)?;
        let page = 4096;
        let header = Mapping::new(page)?;
        let data = Mapping::new(GAP + payload_len.div_ceil(page) * page)?;
        let header_ptr = header.ptr.cast::<RingHeader>();
        // SAFETY: GAP < data.len.
        let payload = unsafe { data.ptr.add(GAP) };
        let iov = Box::new([
            libc::iovec {
                iov_base: header.ptr.cast(),
                iov_len: std::mem::size_of::<RingHeader>(),
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            },
        ]);
        let slot = Arc::new(Slot {
            index: 0,
            header: header_ptr,
            payload,
            payload_len,
            state: Mutex::new(SlotState {
                phase: Phase::Kernel,
                staged: Vec::new(),
            }),
            wake: wake.clone(),
            ch,
        });
        Ok(RingThread {
            ring,
            dev_fd,
            qid,
            slot,
            buffers: Buffers {
                _header: header,
                _data: data,
                iov,
            },
            wake,
            last_cmd: CMD_REGISTER,
            commit_id: 0,
            live: true,
            pending: Vec::new(),
        })
    }

    /// The SQE of a fuse ring command for the entry.
    fn command(&self, cmd_op: u32) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16, padding
        let mut cmd = [0u8; 80];
        let commit_id = if cmd_op == CMD_COMMIT_AND_FETCH {
            self.commit_id
        } else {
            0
        };
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut op = opcode::UringCmd80::new(types::Fd(self.dev_fd), cmd_op).cmd(cmd);
        if cmd_op == CMD_REGISTER {
            op = op.addr(Some(self.buffers.iov.as_ptr() as u64));
        }
        let sqe = op.build().user_data(self.slot.index as u64);
        if cmd_op != CMD_REGISTER {
            return sqe;
        }
        // The iovec count goes into sqe->len (offset 24), which UringCmd80 does not set.
        // SAFETY: Entry128 is a repr(C) 128-byte SQE (asserted above).
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: as above; every bit pattern of the SQE bytes is a valid Entry128.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }

    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        // SAFETY: the SQE points only at buffers this thread keeps alive (`buffers`).
        unsafe { self.ring.submission().push(sqe) }
            .map_err(|_| io::Error::other("ring submission queue full"))
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let poll = opcode::PollAdd::new(
            types::Fd(self.wake.eventfd.as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(WAKE);
        self.push(&squeue::Entry128::from(poll))
    }

    /// Register the entry; an immediate refusal (io_uring not agreed, bad buffer sizes) is an
    /// error here, a later one ends the thread like an unmount.
    fn register(&mut self) -> io::Result<()> {
        self.arm_wake()?;
        let sqe = self.command(CMD_REGISTER);
        self.push(&sqe)?;
        self.ring.submit()?;
        let early: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in &early {
            if *ud != WAKE && *res < 0 {
                return Err(io::Error::other(format!(
                    "the kernel refused a FUSE ring entry for queue {}: {}",
                    self.qid,
                    io::Error::from_raw_os_error(-res)
                )));
            }
        }
        self.pending = early;
        Ok(())
    }

    /// Queue the commit of the entry's reply (submitted with the next wait).
    fn commit(&mut self) -> io::Result<()> {
        self.last_cmd = CMD_COMMIT_AND_FETCH;
        let sqe = self.command(CMD_COMMIT_AND_FETCH);
        self.push(&sqe)
    }

    /// Serve requests until the kernel ends the entry (unmount, abort) or `stop`.
    fn serve<FS: Filesystem>(&mut self, se: &SessionEventLoop<FS>) -> io::Result<()> {
        let mut completions = std::mem::take(&mut self.pending);
        loop {
            for (user_data, res) in completions.drain(..) {
                if user_data == WAKE {
                    self.wake.drain();
                    if self.wake.stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let late = std::mem::take(
                        &mut *self.wake.late.lock().unwrap_or_else(|e| e.into_inner()),
                    );
                    for _ in late {
                        self.commit()?;
                    }
                    self.arm_wake()?;
                } else if res < 0 {
                    self.failed(-res)?;
                } else {
                    self.handle(se)?;
                }
            }
            if !self.live {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result())),
            );
        }
    }

    /// The entry's command ended with `errno`.
    fn failed(&mut self, errno: i32) -> io::Result<()> {
        match errno {
            libc::EINTR | libc::EAGAIN => {
                let sqe = self.command(self.last_cmd);
                self.push(&sqe)
            }
            // The connection is gone (unmount, abort) or the ring is going away.
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                debug!("ring queue {}: entry ended ({errno})", self.qid);
                self.live = false;
                Ok(())
            }
            _ if self.last_cmd == CMD_COMMIT_AND_FETCH => {
                // The kernel did not take this reply (its request is gone): the entry is
                // stuck on its side, so offer the buffers again as a new one.
                warn!(
                    "ring queue {}: commit refused ({}); registering the entry again",
                    self.qid,
                    io::Error::from_raw_os_error(errno)
                );
                self.last_cmd = CMD_REGISTER;
                let sqe = self.command(CMD_REGISTER);
                self.push(&sqe)
            }
            _ => {
                error!(
                    "ring queue {}: registration refused: {}",
                    self.qid,
                    io::Error::from_raw_os_error(errno)
                );
                self.live = false;
                Ok(())
            }
        }
    }

    /// A request arrived in the entry: dispatch it and commit the reply if it came.
    fn handle<FS: Filesystem>(&mut self, se: &SessionEventLoop<FS>) -> io::Result<()> {
        let slot = self.slot.clone();
        // SAFETY: the kernel wrote the header before completing the command, and writes it
        // again only after our next commit.
        let header = unsafe { &*slot.header };
        let word = |at: usize| u32::from_ne_bytes(header.in_out[at..at + 4].try_into().unwrap());
        let len = word(0) as usize;
        let unique = u64::from_ne_bytes(header.in_out[8..16].try_into().unwrap());
        self.commit_id = header.commit_id;
        let payload_sz = header.payload_sz as usize;
        let op_len = len
            .checked_sub(IN_HEADER_LEN + payload_sz)
            .filter(|n| *n <= OP_IN_LEN && payload_sz <= slot.payload_len);
        let Some(op_len) = op_len else {
            error!(
                "ring queue {}: malformed request (len {len}, payload {payload_sz}, opcode {})",
                self.qid,
                word(4)
            );
            self.answer_errno(unique, libc::EIO);
            return self.commit();
        };
        let front = IN_HEADER_LEN + op_len;
        // SAFETY: `front <= GAP`, so `start` lies in the gap in front of the payload, which the
        // kernel never touches; the header bytes are copied from the entry's header buffer.
        let start = unsafe {
            let start = slot.payload.sub(front);
            std::ptr::copy_nonoverlapping(header.in_out.as_ptr(), start, IN_HEADER_LEN);
            std::ptr::copy_nonoverlapping(
                header.op_in.as_ptr(),
                start.add(IN_HEADER_LEN),
                op_len,
            );
            start
        };
        let aligned = (start as usize) % std::mem::align_of::<u64>() == 0;
        // fuser's parser wants the request 8-byte aligned; an operation header of odd size
        // costs a copy.
        let mut scratch: Vec<u64> = Vec::new();
        let stage = aligned && payload_sz > 0;
        slot.state.lock().unwrap_or_else(|e| e.into_inner()).phase = Phase::Dispatching { stage };
        {
            let data: &[u8] = if aligned {
                // SAFETY: `len` bytes from `start`: the rebuilt headers and the payload; the
                // kernel does not write them while we hold the entry.
                unsafe { std::slice::from_raw_parts(start, len) }
            } else {
                scratch.resize(len.div_ceil(8), 0);
                // SAFETY: copies `len` bytes into a buffer of at least `len` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(start, scratch.as_mut_ptr().cast::<u8>(), len);
                    std::slice::from_raw_parts(scratch.as_ptr().cast::<u8>(), len)
                }
            };
            match RequestWithSender::new_ring(se.ch.sender(), RingSender(slot.clone()), data) {
                Ok(req) => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<crate::ReplyEmpty>().ok();
                    } else {
                        req.dispatch(se);
                    }
                }
                Err(e) => {
                    error!("ring queue {}: {e}", self.qid);
                    let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.phase = Phase::Replied;
                    state.staged.clear();
                    drop(state);
                    self.answer_errno(unique, libc::EIO);
                }
            }
        }
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.phase {
            Phase::Replied => {
                if stage {
                    let staged = std::mem::take(&mut state.staged);
                    slot.write_payload(&[&staged], staged.len());
                    state.staged = staged;
                }
                state.phase = Phase::Kernel;
                drop(state);
                self.commit()
            }
            Phase::Dispatching { .. } => {
                // Answered later, from another thread.
                state.phase = Phase::Detached;
                Ok(())
            }
            Phase::Kernel | Phase::Detached => Ok(()),
        }
    }

    /// Write an error reply for request `unique` into the entry.
    fn answer_errno(&self, unique: u64, errno: i32) {
        let mut out = [0u8; OUT_HEADER_LEN];
        out[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        out[8..16].copy_from_slice(&unique.to_ne_bytes());
        // SAFETY: the entry is ours until committed; nothing borrows its header.
        unsafe {
            std::ptr::copy_nonoverlapping(
                out.as_ptr(),
                (*self.slot.header).in_out.as_mut_ptr(),
                OUT_HEADER_LEN,
            );
            (*self.slot.header).payload_sz = 0;
        }
    }
}
