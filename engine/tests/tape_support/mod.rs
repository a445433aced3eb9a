//! Shared fixtures of the tests that compare two recordings bit for bit: seeded tensors,
//! parameters with seeded tangent directions, and bits.
#![allow(dead_code)]

use flatmin_engine::{Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A standard-normal f32 tensor from `seed`.
pub fn randn(shape: &[usize], seed: u64) -> Tensor<f32> {
    Tensor::randn(shape, &mut StdRng::seed_from_u64(seed))
}

/// The bits of a tensor, to compare results exactly.
pub fn bits(t: &Tensor<f32>) -> Vec<u32> {
    t.data().iter().map(|v| v.to_bits()).collect()
}

/// `theta` as parameters of `tape`, each with `tape`'s directions drawn from seeds
/// `dir_seed`, `dir_seed + 1`, ... (none when the tape has no directions).
pub fn params(tape: &mut Tape<f32>, theta: &[Tensor<f32>], dir_seed: u64) -> Vec<Var> {
    let k = tape.directions();
    theta
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut shape = vec![k];
            shape.extend_from_slice(p.shape());
            let dir = (k > 0).then(|| randn(&shape, dir_seed + i as u64));
            tape.param(p.clone(), dir).unwrap()
        })
        .collect()
}
