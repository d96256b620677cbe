//! The one seeded generator of the tests: `Noise` for bytes (blake3 in XOF mode, fast even in a
//! debug build) and `Rng` for decisions (xorshift64*). Both are pure functions of their seed, so
//! a failure that prints its seed replays exactly; neither may ever read a clock or the OS's
//! randomness.

/// Deterministic pseudo-random bytes: the blake3 XOF stream of a seed.
pub struct Noise(blake3::OutputReader);

impl Noise {
    /// The stream of a numeric seed (the XOF of its 8 little-endian bytes).
    pub fn new(seed: u64) -> Noise {
        Noise::named(seed.to_le_bytes())
    }

    /// The stream of a label, for tests whose data reads better by name ("gen3", "damaged").
    pub fn named(label: impl AsRef<[u8]>) -> Noise {
        Noise(blake3::Hasher::new().update(label.as_ref()).finalize_xof())
    }

    /// The next `len` bytes of the stream.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    /// Fill `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }
}

/// xorshift64*: deterministic decisions (offsets, lengths, which operation next) from a seed.
pub struct Rng(u64);

impl Rng {
    /// Any seed, 0 included: it is spread over the word and made odd (xorshift has no zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}
