//! A convolution's gradient alone goes through one pass over the samples that shares each
//! sample's padded output gradient between the input and the weight gradient (for "same"
//! stride-1 convolutions on AVX-512 machines; `ops/conv_stream.rs`); with tangents in play the
//! input, weight and bias gradients take their own passes. Both give the same bits, for plain
//! convolutions and for a convolution fused with its max pooling.

mod tape_support;

use flatmin_engine::{MaxPoolAfter, Result, Tape, Tensor, Var};
use tape_support::{bits, params, randn};

/// The gradients (as bits) of Σ c·f(θ) for random weights c, on a tape with `k` directions.
fn gradient_bits(
    theta: &[Tensor<f32>],
    k: usize,
    f: impl Fn(&mut Tape<f32>, &[Var]) -> Result<Var>,
) -> Vec<Vec<u32>> {
    let mut tape = Tape::<f32>::new(k);
    let vars = params(&mut tape, theta, 50);
    let y = f(&mut tape, &vars).unwrap();
    let c = tape.constant(randn(tape.value(y).shape(), 7));
    let weighted = tape.mul(y, c).unwrap();
    let loss = tape.sum(weighted).unwrap();
    let grads = tape.backward(loss).unwrap();
    vars.iter().map(|&v| bits(&grads.grad(&tape, v))).collect()
}

/// (input shape, output channels, kernel, bias, max pooling after it)
type Case = ([usize; 4], usize, usize, bool, Option<MaxPoolAfter>);

fn cases() -> Vec<Case> {
    let pool = |relu| {
        Some(MaxPoolAfter {
            relu,
            kernel: 2,
            stride: 2,
        })
    };
    vec![
        ([3, 4, 10, 9], 8, 3, true, None),
        ([20, 3, 8, 8], 16, 3, false, None),
        ([2, 5, 7, 12], 3, 5, true, None),
        ([4, 6, 6, 6], 64, 1, true, None),
        ([136, 2, 6, 6], 4, 3, true, None),
        ([5, 3, 12, 12], 32, 3, true, pool(false)),
        ([17, 2, 9, 10], 7, 3, false, pool(true)),
    ]
}

#[test]
fn gradient_alone_matches_the_gradient_beside_tangents_bit_for_bit() {
    for (i, (xs, c_out, kernel, bias, pool)) in cases().into_iter().enumerate() {
        let seed = 10 * i as u64;
        let mut theta = vec![
            randn(&xs, seed),
            randn(&[c_out, xs[1], kernel, kernel], seed + 1),
        ];
        if bias {
            theta.push(randn(&[c_out], seed + 2));
        }
        let pad = kernel / 2;
        let f = |t: &mut Tape<f32>, v: &[Var]| match pool {
            Some(after) => t.conv2d_max_pool(v[0], v[1], v.get(2).copied(), 1, pad, after),
            None => t.conv2d(v[0], v[1], v.get(2).copied(), 1, pad),
        };
        let alone = gradient_bits(&theta, 0, f);
        let beside = gradient_bits(&theta, 2, f);
        assert_eq!(alone, beside, "case {i}");
    }
}
