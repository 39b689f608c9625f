//! The tests' random numbers: one seeded generator (`rand`'s xoshiro256++, the same sequence
//! on every platform for a seed), so a failing case can be run again from its seed.

pub use rand::{Rng, RngExt, SeedableRng};

/// The generator of every test, bench and fuzz helper.
pub type TestRng = rand::rngs::Xoshiro256PlusPlus;

/// A generator seeded with `seed`.
pub fn rng(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// `len` pseudo-random bytes from `seed`, for large binary payloads.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rng(seed).fill(&mut bytes[..]);
    bytes
}
