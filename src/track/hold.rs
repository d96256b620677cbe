//! Reads held out of volumes while a rollback rewrites them: a reader must see each block as
//! it was before the rollback or after it, never a mix within one read.
//!
//! The read path pays two uncontended atomics on its own thread's stripe and one load while no
//! rollback runs (`ReadPass::begin`); while one runs, reads of tracked volumes enter their write
//! gate's shared side, which the rollback holds exclusively while it writes. A rollback
//! (`hold_reads`) first makes every new read take the gate path, then waits until every read
//! that started on the free path before it has finished: an RCU-like grace period per stripe.
//! It owns nothing else; it never blocks a read while no rollback runs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes of in-flight free reads; a thread always counts on the same one.
const STRIPES: usize = 32;

#[repr(align(128))]
struct Stripe(AtomicU64);

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Stripe = Stripe(AtomicU64::new(0));
static FREE_READS: [Stripe; STRIPES] = [ZERO; STRIPES];
/// Rollbacks holding reads now.
static HOLDS: AtomicU64 = AtomicU64::new(0);
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// How one read runs: free (no rollback holds reads; counted until dropped), or held (the
/// caller must enter the volume's gate, shared, around its read).
pub enum ReadPass {
    Free(usize),
    Held,
}

impl ReadPass {
    /// Start a read.
    pub fn begin() -> ReadPass {
        let s = MY_STRIPE.with(|s| *s);
        // SeqCst on both sides (here and in `hold_reads`): either this read sees the hold, or
        // the rollback sees this read counted and waits for it.
        FREE_READS[s].0.fetch_add(1, Ordering::SeqCst);
        if HOLDS.load(Ordering::SeqCst) == 0 {
            return ReadPass::Free(s);
        }
        FREE_READS[s].0.fetch_sub(1, Ordering::Release);
        ReadPass::Held
    }

    /// Whether the read must go through the volume's gate.
    pub fn held(&self) -> bool {
        matches!(self, ReadPass::Held)
    }
}

impl Drop for ReadPass {
    fn drop(&mut self) {
        if let ReadPass::Free(s) = self {
            FREE_READS[*s].0.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Reads are held while this lives (see `hold_reads`).
pub struct ReadHold(());

impl Drop for ReadHold {
    fn drop(&mut self) {
        HOLDS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Make every read from now on go through its volume's gate, and return once every read that
/// started before without it has finished. Reads that must wait here are reads in flight in
/// the backing file: this takes as long as the slowest of them.
pub fn hold_reads() -> ReadHold {
    HOLDS.fetch_add(1, Ordering::SeqCst);
    let hold = ReadHold(());
    for s in &FREE_READS {
        // Zero once is enough: a free read that begins after the hold sees it and leaves.
        let mut spins = 0u32;
        while s.0.load(Ordering::SeqCst) != 0 {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_waits_for_free_reads_and_turns_new_ones_held() {
        let r = ReadPass::begin();
        // Other tests of this binary may hold; only the order is checked.
        if r.held() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let h = hold_reads();
            tx.send(()).unwrap();
            let held = ReadPass::begin().held();
            drop(h);
            held
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "the hold did not wait for the read");
        drop(r);
        rx.recv().unwrap();
        assert!(t.join().unwrap());
    }
}
