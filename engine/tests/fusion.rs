//! Fused ops against the ops they fuse: BatchNorm with its ReLU epilogue
//! (`Tape::batch_norm2d_relu`) gives the values, tangents, gradients and Hessian-vector
//! products of `batch_norm2d` followed by `relu`, bit for bit, in train and eval mode, for the
//! gradient alone (ȳ masked on the fly) and with tangent directions (ȳ, ȳ˙ masked first); the
//! same for the add (`Tape::add_relu`) and for a convolution with its max pooling, with or
//! without a ReLU between them (`Tape::conv2d_max_pool`); `Net::record` fuses only where each
//! fused node has one consumer, and `Net::record_each_node` fuses nothing.

mod tape_support;

use flatmin_engine::net::{Activation, ConvOptions, Net, NormStats, RunningStats};
use flatmin_engine::{BnMode, MaxPoolAfter, Result, Tape, Tensor, Unary, Var};
use tape_support::{bits, params, randn};

/// Everything a recording gives: output value and tangent, and per parameter its gradient
/// and HVP, as bits.
type Outcome = Vec<Vec<u32>>;

/// Records `f` on a tape with `k` directions over the parameters `theta`, then a curved
/// objective Σ w·y², and returns [`Outcome`].
fn outcome(
    theta: &[Tensor<f32>],
    k: usize,
    f: impl Fn(&mut Tape<f32>, &[Var]) -> Result<Var>,
) -> Outcome {
    let mut tape = Tape::<f32>::new(k);
    let vars = params(&mut tape, theta, 100);
    let y = f(&mut tape, &vars).unwrap();
    let w = tape.constant(randn(tape.value(y).shape(), 99));
    let sq = tape.square(y).unwrap();
    let weighted = tape.mul(sq, w).unwrap();
    let loss = tape.sum(weighted).unwrap();
    let grads = tape.backward(loss).unwrap();
    let mut out = vec![bits(tape.value(y))];
    out.extend(tape.tangent(y).map(bits));
    for &v in &vars {
        out.push(bits(&grads.grad(&tape, v)));
        out.push(bits(&grads.hvp(&tape, v)));
    }
    out
}

/// The fused op and BN then ReLU agree bit for bit, train and eval, gradient and HVP, with
/// planes that are and are not a multiple of the vector width.
#[test]
fn batch_norm_relu_fused_matches_the_two_ops_bit_for_bit() {
    let (mean, var) = ([0.3f32, -0.2, 0.1], [1.5f32, 0.7, 0.2]);
    for (shape, seed) in [([4, 3, 5, 7], 1), ([2, 3, 16, 16], 2)] {
        let theta = [
            randn(&shape, seed),
            randn(&[3], seed + 10),
            randn(&[3], seed + 20),
        ];
        for mode in [
            BnMode::Train,
            BnMode::Eval {
                mean: &mean,
                var: &var,
            },
        ] {
            for k in [0, 2] {
                let fused = outcome(&theta, k, |t, v| {
                    Ok(t.batch_norm2d_relu(v[0], v[1], v[2], mode, 1e-5)?.0)
                });
                let apart = outcome(&theta, k, |t, v| {
                    let (y, _) = t.batch_norm2d(v[0], v[1], v[2], mode, 1e-5)?;
                    t.relu(y)
                });
                assert_eq!(fused, apart, "{shape:?} {mode:?} k={k}");
                // The ReLU did clip: the mask is not trivially all ones.
                assert!(fused[0].contains(&0), "{shape:?} {mode:?}");
            }
        }
    }
}

/// The fused add and ReLU and the two ops agree bit for bit, one shape and broadcast.
#[test]
fn add_relu_fused_matches_the_two_ops_bit_for_bit() {
    for (b_shape, seed) in [(vec![4, 3, 5, 7], 3), (vec![3, 1, 1], 4)] {
        let theta = [randn(&[4, 3, 5, 7], seed), randn(&b_shape, seed + 10)];
        for k in [0, 2] {
            let fused = outcome(&theta, k, |t, v| t.add_relu(v[0], v[1]));
            let apart = outcome(&theta, k, |t, v| {
                let s = t.add(v[0], v[1])?;
                t.relu(s)
            });
            assert_eq!(fused, apart, "{b_shape:?} k={k}");
            assert!(fused[0].contains(&0), "{b_shape:?}");
        }
    }
}

/// conv → BN → ReLU → conv → BN → [ReLU, and the residual add reads the BN too] → add → ReLU
/// → pool → linear, and the same by hand with every op apart.
fn small_net() -> Net {
    let mut net = Net::new(&[2, 6, 6]);
    let pad1 = ConvOptions {
        padding: 1,
        bias: false,
        ..ConvOptions::default()
    };
    let mut h = net.conv2d("c1", net.input(), 3, 3, pad1).unwrap();
    h = net.batch_norm2d("b1", h).unwrap();
    h = net.relu(h).unwrap();
    let c = net.conv2d("c2", h, 3, 3, pad1).unwrap();
    let b = net.batch_norm2d("b2", c).unwrap();
    let r = net.relu(b).unwrap();
    h = net.add(r, b).unwrap();
    h = net.activation(h, Activation::Relu).unwrap();
    h = net.adaptive_avg_pool2d(h).unwrap();
    h = net.flatten(h).unwrap();
    net.linear("fc", h, 4, true).unwrap();
    net
}

/// [`small_net`] recorded op by op, no fusion.
fn small_net_by_hand(t: &mut Tape<f32>, v: &[Var], x: Var, modes: [BnMode<f32>; 2]) -> Result<Var> {
    let c1 = t.conv2d(x, v[0], None, 1, 1)?;
    let (b1, _) = t.batch_norm2d(c1, v[1], v[2], modes[0], 1e-5)?;
    let r1 = t.relu(b1)?;
    let c2 = t.conv2d(r1, v[3], None, 1, 1)?;
    let (b2, _) = t.batch_norm2d(c2, v[4], v[5], modes[1], 1e-5)?;
    let r2 = t.relu(b2)?;
    let s = t.add(r2, b2)?;
    let r3 = t.relu(s)?;
    let p = t.global_avg_pool(r3)?;
    let f = t.flatten(p)?;
    let z = t.linear(f, v[6], Some(v[7]))?;
    t.cross_entropy(z, &[0, 3, 1])
}

/// `Net::record` fuses the first BN and the add with their ReLUs (not the second BN: it has
/// two readers), and the net's gradient and HVP are those of the ops recorded apart, bit for bit.
#[test]
fn record_fuses_batch_norms_and_adds_with_their_only_relu() {
    let net = small_net();
    let theta: Vec<Tensor<f32>> = net
        .params()
        .iter()
        .enumerate()
        .map(|(i, s)| randn(&s.shape, 40 + i as u64))
        .collect();
    let x = randn(&[3, 2, 6, 6], 7);
    let (m1, v1, m2, v2) = ([0.1f32, 0.0, -0.1], [0.5f32, 1.0, 2.0], [0.0; 3], [1.0; 3]);
    let running = || {
        NormStats::Running(vec![
            RunningStats {
                mean: &m1,
                var: &v1,
            },
            RunningStats {
                mean: &m2,
                var: &v2,
            },
        ])
    };
    let eval = [
        BnMode::Eval {
            mean: &m1,
            var: &v1,
        },
        BnMode::Eval {
            mean: &m2,
            var: &v2,
        },
    ];
    for (norm, modes) in [(NormStats::Batch, [BnMode::Train; 2]), (running(), eval)] {
        for k in [0, 2] {
            let fused = outcome(&theta, k, |t, v| {
                let xv = t.constant(x.clone());
                let rec = net.record(t, v, xv, &norm)?;
                assert_eq!(rec.vars[2], rec.vars[3], "b1 and its ReLU share a value");
                assert_ne!(rec.vars[5], rec.vars[6], "b2 has two readers");
                assert_eq!(
                    rec.vars[7], rec.vars[8],
                    "the add and its ReLU share a value"
                );
                let loss = t.cross_entropy(rec.output(), &[0, 3, 1])?;
                t.reshape(loss, &[1])
            });
            let apart = outcome(&theta, k, |t, v| {
                let xv = t.constant(x.clone());
                let loss = small_net_by_hand(t, v, xv, modes)?;
                t.reshape(loss, &[1])
            });
            assert_eq!(fused, apart, "k={k}");
        }
    }
}

/// The fused convolution and max pooling (with and without the ReLU between them) and the
/// separate ops agree bit for bit: values, tangents, gradients and HVPs, with and without
/// bias, 2x2 windows (the vector path) and overlapping 3x3 windows with stride 2, planes that
/// are and are not a multiple of the window.
#[test]
fn conv_max_pool_fused_matches_the_separate_ops_bit_for_bit() {
    // (input shape, output channels, pool kernel, pool stride)
    let cases = [
        ([2, 3, 12, 12], 8, 2, 2),
        ([3, 2, 9, 11], 5, 3, 2),
        ([1, 4, 7, 6], 16, 2, 2),
    ];
    for (i, &(xs, c_out, kernel, stride)) in cases.iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        for bias in [false, true] {
            let mut theta = vec![randn(&xs, seed), randn(&[c_out, xs[1], 3, 3], seed + 1)];
            if bias {
                theta.push(randn(&[c_out], seed + 2));
            }
            for relu in [false, true] {
                let after = MaxPoolAfter {
                    relu,
                    kernel,
                    stride,
                };
                for k in [0, 2] {
                    // The shift makes the objective's gradient nonzero where the ReLU is off.
                    let shift = Unary::AddScalar(0.5);
                    let fused = outcome(&theta, k, |t, v| {
                        let z = t.conv2d_max_pool(v[0], v[1], v.get(2).copied(), 1, 1, after)?;
                        t.unary(z, shift)
                    });
                    let apart = outcome(&theta, k, |t, v| {
                        let mut y = t.conv2d(v[0], v[1], v.get(2).copied(), 1, 1)?;
                        if relu {
                            y = t.relu(y)?;
                        }
                        let z = t.max_pool2d(y, kernel, stride)?;
                        t.unary(z, shift)
                    });
                    assert_eq!(fused, apart, "case {i} bias {bias} relu {relu} k={k}");
                }
            }
        }
    }
}

/// conv → ReLU → max-pool and conv → max-pool → ReLU (cnn-s' order), a convolution read twice
/// and a ReLU read twice: the net's values, gradients and HVPs from [`Net::record`] (which fuses
/// the first two chains, not the others) and from [`Net::record_each_node`] (every node its own
/// value) agree bit for bit.
#[test]
fn record_fuses_convolutions_with_their_max_pooling() {
    let pad1 = ConvOptions {
        padding: 1,
        ..ConvOptions::default()
    };
    let mut net = Net::new(&[3, 12, 12]);
    let c1 = net.conv2d("c1", net.input(), 8, 3, pad1).unwrap();
    let r1 = net.relu(c1).unwrap();
    let p1 = net.max_pool2d(r1, 2, 2).unwrap();
    let c2 = net.conv2d("c2", p1, 8, 3, pad1).unwrap();
    let p2 = net.max_pool2d(c2, 2, 2).unwrap();
    let r2 = net.relu(p2).unwrap();
    let c3 = net.conv2d("c3", r2, 8, 3, pad1).unwrap();
    let p3 = net.max_pool2d(c3, 3, 3).unwrap();
    let q3 = net.max_pool2d(c3, 3, 3).unwrap();
    let c4 = net.conv2d("c4", r2, 8, 3, pad1).unwrap();
    let r4 = net.relu(c4).unwrap();
    let p4 = net.max_pool2d(r4, 3, 3).unwrap();
    let q4 = net.max_pool2d(r4, 3, 3).unwrap();
    let (s3, s4) = (net.add(p3, q3).unwrap(), net.add(p4, q4).unwrap());
    let s = net.add(s3, s4).unwrap();
    let f = net.flatten(s).unwrap();
    net.linear("fc", f, 4, true).unwrap();
    let theta: Vec<Tensor<f32>> = net
        .params()
        .iter()
        .enumerate()
        .map(|(i, s)| randn(&s.shape, 300 + i as u64))
        .collect();
    let x = randn(&[3, 3, 12, 12], 8);
    for k in [0, 2] {
        let run = |fuse: bool| {
            outcome(&theta, k, |t, v| {
                let xv = t.constant(x.clone());
                let rec = match fuse {
                    true => net.record(t, v, xv, &NormStats::Batch)?,
                    false => net.record_each_node(t, v, xv, &NormStats::Batch)?,
                };
                let shared = |a: flatmin_engine::net::NodeId, b: flatmin_engine::net::NodeId| {
                    rec.vars[a.index()] == rec.vars[b.index()]
                };
                assert_eq!(shared(c1, p1) && shared(r1, p1), fuse, "c1 → relu → pool");
                assert_eq!(shared(c2, p2), fuse, "c2 → pool");
                assert!(!shared(c2, r2) && !shared(c3, p3), "c3 has two readers");
                assert!(
                    !shared(c4, r4) && !shared(r4, p4),
                    "c4's ReLU has two readers"
                );
                let loss = t.cross_entropy(rec.output(), &[0, 3, 1])?;
                t.reshape(loss, &[1])
            })
        };
        assert_eq!(run(true), run(false), "k={k}");
    }
}
