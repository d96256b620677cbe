//! The dirty bitmap of one volume: one bit per block, set with atomic operations on the write
//! path, swapped for an empty one at a snapshot barrier.
//!
//! Setting bits never allocates unless the volume grew past the bitmap's capacity (amortised
//! doubling under the write side of an RwLock); every other write takes only the read side.
//! It must never lose a bit: `take` swaps words atomically, so a bit set concurrently with a
//! take lands either in the taken copy or in the live map, never in neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Result of marking a block range dirty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marked {
    /// Blocks that were clean and are now dirty.
    pub newly_dirty: u64,
    /// Blocks that were already dirty (overwrites since the last snapshot).
    pub already_dirty: u64,
}

/// A growable bitmap of dirty blocks.
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    words: RwLock<Vec<AtomicU64>>,
}

impl DirtyBitmap {
    /// An empty bitmap with room for `blocks` blocks.
    pub fn with_blocks(blocks: u64) -> DirtyBitmap {
        let n = blocks.div_ceil(64) as usize;
        DirtyBitmap {
            words: RwLock::new((0..n).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// A bitmap from saved words.
    pub fn from_words(words: &[u64]) -> DirtyBitmap {
        DirtyBitmap {
            words: RwLock::new(words.iter().map(|&w| AtomicU64::new(w)).collect()),
        }
    }

    fn ensure(&self, words_needed: usize) {
        if self.words.read().unwrap_or_else(|p| p.into_inner()).len() >= words_needed {
            return;
        }
        let mut w = self.words.write().unwrap_or_else(|p| p.into_inner());
        if w.len() < words_needed {
            let target = words_needed.max(w.len() * 2);
            w.resize_with(target, || AtomicU64::new(0));
        }
    }

    /// Mark blocks `first..=last` dirty.
    pub fn mark(&self, first: u64, last: u64) -> Marked {
        debug_assert!(first <= last);
        self.ensure((last / 64 + 1) as usize);
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        let mut m = Marked::default();
        let (fw, lw) = (first / 64, last / 64);
        for wi in fw..=lw {
            let lo = if wi == fw { first % 64 } else { 0 };
            let hi = if wi == lw { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            let word = &words[wi as usize];
            // A plain load first: rewriting hot blocks costs no cache-line write.
            let cur = word.load(Ordering::Relaxed);
            let old = if cur & mask == mask {
                cur
            } else {
                word.fetch_or(mask, Ordering::AcqRel)
            };
            let was = (old & mask).count_ones() as u64;
            m.already_dirty += was;
            m.newly_dirty += mask.count_ones() as u64 - was;
        }
        m
    }

    /// True if block `b` is dirty.
    pub fn is_dirty(&self, b: u64) -> bool {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        words
            .get((b / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    /// Dirty blocks in `first..end`.
    pub fn count_range(&self, first: u64, end: u64) -> u64 {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for_words(first, end, |wi, mask| {
            if let Some(w) = words.get(wi) {
                n += (w.load(Ordering::Acquire) & mask).count_ones() as u64;
            }
        });
        n
    }

    /// All dirty blocks.
    pub fn count(&self) -> u64 {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    /// A copy of the words (for saving).
    pub fn words(&self) -> Vec<u64> {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    /// Take every dirty bit, leaving the map clean (the snapshot barrier's swap).
    pub fn take(&self) -> Vec<u64> {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// Put bits back (abort of a snapshot, or recovery): OR them into the live map.
    pub fn merge(&self, bits: &[u64]) {
        self.ensure(bits.len());
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        for (w, &b) in words.iter().zip(bits) {
            if b != 0 {
                w.fetch_or(b, Ordering::AcqRel);
            }
        }
    }

    /// Clear bits of blocks at or past `first` (the volume shrank below them).
    pub fn clear_from(&self, first: u64) {
        let words = self.words.read().unwrap_or_else(|p| p.into_inner());
        for (i, w) in words.iter().enumerate() {
            let base = i as u64 * 64;
            if base + 64 <= first {
                continue;
            }
            let keep = if first > base {
                (1u64 << (first - base)) - 1
            } else {
                0
            };
            w.fetch_and(keep, Ordering::AcqRel);
        }
    }
}

/// Call `f(word, mask)` for each word of bits `first..end`, with the mask of the bits in range:
/// bitmap work in words, not bits, so it stays quick on volumes of millions of blocks.
pub fn for_words(first: u64, end: u64, mut f: impl FnMut(usize, u64)) {
    let mut b = first;
    while b < end {
        let w = b / 64;
        let lo = b % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        f(w as usize, mask);
        b = (w + 1) * 64;
    }
}

/// Set bits of a plain word slice in `first..end` (bits past the slice count as clear).
pub fn count_words_range(bits: &[u64], first: u64, end: u64) -> u64 {
    let mut n = 0;
    for_words(first, end, |w, mask| {
        n += (bits.get(w).copied().unwrap_or(0) & mask).count_ones() as u64
    });
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn word_ranges_count_and_mask_exactly() {
        let bits = vec![u64::MAX, 0b1011, u64::MAX];
        assert_eq!(count_words_range(&bits, 0, 192), 64 + 3 + 64);
        assert_eq!(count_words_range(&bits, 3, 5), 2);
        assert_eq!(count_words_range(&bits, 63, 66), 1 + 1 + 1);
        assert_eq!(count_words_range(&bits, 64, 64), 0);
        assert_eq!(count_words_range(&bits, 190, 200), 2);
        for (first, end) in [(0, 1), (5, 70), (64, 128), (1, 191)] {
            let slow = (first..end)
                .filter(|&b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
                .count() as u64;
            assert_eq!(count_words_range(&bits, first, end), slow, "{first}..{end}");
        }
    }

    #[test]
    fn mark_counts_new_and_old_bits() {
        let b = DirtyBitmap::default();
        assert_eq!(
            b.mark(3, 70),
            Marked {
                newly_dirty: 68,
                already_dirty: 0
            }
        );
        assert_eq!(
            b.mark(60, 130),
            Marked {
                newly_dirty: 60,
                already_dirty: 11
            }
        );
        assert_eq!(b.count(), 128);
        assert_eq!(b.count_range(0, 64), 61);
        assert_eq!(b.count_range(64, 128), 64);
        assert!(b.is_dirty(3) && !b.is_dirty(2) && b.is_dirty(130) && !b.is_dirty(131));
    }

    #[test]
    fn full_word_and_single_bit_masks() {
        let b = DirtyBitmap::default();
        assert_eq!(b.mark(64, 127).newly_dirty, 64);
        assert_eq!(
            b.mark(127, 127),
            Marked {
                newly_dirty: 0,
                already_dirty: 1
            }
        );
        assert_eq!(b.words()[1], u64::MAX);
    }

    #[test]
    fn take_leaves_it_clean_and_merge_restores() {
        let b = DirtyBitmap::default();
        b.mark(5, 9);
        let taken = b.take();
        assert_eq!(b.count(), 0);
        b.mark(100, 100);
        b.merge(&taken);
        assert_eq!(b.count(), 6);
    }

    #[test]
    fn clear_from_drops_blocks_past_the_end() {
        let b = DirtyBitmap::default();
        b.mark(0, 199);
        b.clear_from(70);
        assert_eq!(b.count(), 70);
        assert!(b.is_dirty(69) && !b.is_dirty(70));
    }

    #[test]
    fn concurrent_writers_give_exact_counts() {
        let b = Arc::new(DirtyBitmap::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut new = 0;
                    // Interleaved ranges so threads share words; growth races too.
                    for i in 0..2000u64 {
                        let first = i * 16 + t * 2;
                        new += b.mark(first, first + 1).newly_dirty;
                    }
                    new
                })
            })
            .collect();
        let new: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(b.count(), new);
        assert_eq!(new, 8 * 2000 * 2);
    }
}
