//! A small seeded random number generator whose whole state is one `u64`, so it can be
//! checkpointed exactly (as 16-bit limbs, which every float type represents exactly) and a
//! resumed run continues the same stream.
//!
//! The generator is SplitMix64 (Steele, Lea & Flood 2014): a Weyl sequence passed through a
//! 64-bit mixer, period 2^64, passes BigCrush. Uniform floats take the top 53 bits; normals
//! come from the Box–Muller transform in f64; uniform integers use rejection, so they are
//! exactly uniform. Every derived draw is a fixed function of the state, independent of the
//! platform's thread count or timing.

use crate::{OptimError, Result};
use flatmin_engine::{Scalar, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed derived from `seed` and a purpose `tag`, so that independent streams (perturbation
/// draws, reservoir draws, ...) never coincide.
pub fn derive_seed(seed: u64, tag: u64) -> u64 {
    mix(mix(seed.wrapping_add(GOLDEN)) ^ mix(tag.wrapping_mul(GOLDEN).wrapping_add(1)))
}

/// SplitMix64 generator (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: mix(seed) }
    }

    /// The generator's state (restore it with [`Rng::from_state`]).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator continuing from a saved state.
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform on [0, 1), with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (exactly uniform, by rejection). `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        // Reject the lowest 2^64 mod n values: the rest is a whole number of blocks of n,
        // so every residue is equally likely.
        let threshold = n.wrapping_neg() % n;
        loop {
            let r = self.next_u64();
            if r >= threshold {
                return r % n;
            }
        }
    }

    /// A random sign, +1 or −1 with probability 1/2 each.
    pub fn sign(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// Two independent standard normals (Box–Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let u1 = 1.0 - self.uniform(); // (0, 1]: the logarithm is finite
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        (r * a.cos(), r * a.sin())
    }

    /// `k` distinct positions out of `0..n`, uniformly (partial Fisher–Yates), in draw order.
    pub fn sample_without_replacement(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "cannot draw {k} of {n} without replacement");
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }

    /// A direction drawn uniformly from the unit sphere of the space of tensors shaped like
    /// `like` (all of them together): `z / ‖z‖` with `z ~ N(0, I)` drawn in f64.
    pub fn sphere<T: Scalar>(&mut self, like: &[Tensor<T>]) -> Vec<Tensor<T>> {
        let n: usize = like.iter().map(|t| t.numel()).sum();
        loop {
            let mut z = Vec::with_capacity(n + 1);
            while z.len() < n {
                let (a, b) = self.normal_pair();
                z.push(a);
                z.push(b);
            }
            z.truncate(n);
            let norm = z.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 && norm.is_finite() {
                let mut out = Vec::with_capacity(like.len());
                let mut at = 0;
                for t in like {
                    let data = z[at..at + t.numel()]
                        .iter()
                        .map(|&v| T::c(v / norm))
                        .collect();
                    at += t.numel();
                    out.push(Tensor::from_vec(t.shape(), data).expect("shape matches the data"));
                }
                return out;
            }
        }
    }
}

/// Encodes integers as a tensor of 16-bit limbs (4 per value, least significant first), which
/// f32 and f64 represent exactly, for optimizer state.
pub fn encode_u64<T: Scalar>(values: &[u64]) -> Tensor<T> {
    let data = values
        .iter()
        .flat_map(|&v| (0..4).map(move |k| T::c(((v >> (16 * k)) & 0xFFFF) as f64)))
        .collect();
    Tensor::from_vec(&[4 * values.len()], data).expect("limb count matches")
}

/// Decodes [`encode_u64`]; `name` is reported when the tensor is not a valid encoding.
pub fn decode_u64<T: Scalar>(t: &Tensor<T>, name: &str) -> Result<Vec<u64>> {
    if t.shape().len() != 1 || !t.numel().is_multiple_of(4) {
        return Err(OptimError::State(name.to_string()));
    }
    let mut out = Vec::with_capacity(t.numel() / 4);
    for chunk in t.data().chunks(4) {
        let mut v = 0u64;
        for (k, limb) in chunk.iter().enumerate() {
            let x = limb.to_f64().unwrap_or(f64::NAN);
            if !(0.0..=65535.0).contains(&x) || x.fract() != 0.0 {
                return Err(OptimError::State(name.to_string()));
            }
            v |= (x as u64) << (16 * k);
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_f32_limbs() {
        let mut r = Rng::new(42);
        for _ in 0..5 {
            r.next_u64();
        }
        let t = encode_u64::<f32>(&[r.state(), u64::MAX, 0]);
        let back = decode_u64(&t, "x").unwrap();
        assert_eq!(back, vec![r.state(), u64::MAX, 0]);
        let mut a = Rng::from_state(back[0]);
        assert_eq!(a.next_u64(), r.next_u64());
    }

    #[test]
    fn draws_are_in_range_and_roughly_right() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let (mut s, mut s2, mut signs) = (0.0, 0.0, 0.0);
        let mut counts = [0usize; 7];
        for _ in 0..n {
            let (a, b) = r.normal_pair();
            s += a + b;
            s2 += a * a + b * b;
            signs += r.sign();
            counts[r.below(7) as usize] += 1;
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        let m = s / (2 * n) as f64;
        let v = s2 / (2 * n) as f64;
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.01, "mean {m} var {v}");
        assert!((signs / n as f64).abs() < 0.01);
        for c in counts {
            assert!(
                (c as f64 / n as f64 - 1.0 / 7.0).abs() < 0.005,
                "{counts:?}"
            );
        }
        let pick = r.sample_without_replacement(10, 4);
        let mut sorted = pick.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
        assert!(pick.iter().all(|&i| i < 10));
    }

    #[test]
    fn sphere_is_unit_and_isotropic() {
        let mut r = Rng::new(3);
        let like = vec![Tensor::<f64>::zeros(&[2]), Tensor::zeros(&[1, 2])];
        let n = 100_000;
        let mut second = [0.0f64; 4];
        for _ in 0..n {
            let g = r.sphere(&like);
            let flat: Vec<f64> = g.iter().flat_map(|t| t.data().to_vec()).collect();
            let norm: f64 = flat.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-12);
            for (s, v) in second.iter_mut().zip(&flat) {
                *s += v * v;
            }
        }
        for s in second {
            assert!(
                (s / n as f64 - 0.25).abs() < 0.005,
                "E g_j^2 = {}",
                s / n as f64
            );
        }
    }
}
