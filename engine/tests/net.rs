//! The network description: state names and layouts, shape checks that name the layer, and
//! a small network with every layer kind through the one finite-difference checker (value,
//! gradient and HVP of its recorded forward pass, BatchNorm on batch and running statistics).

use flatmin_engine::check::check_op;
use flatmin_engine::net::{
    Activation, ConvOptions, Layer, Net, NodeId, NormStats, RunningStats, StateKind,
};
use flatmin_engine::{EngineError, Loss, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// conv(bias) → BN → GELU → max-pool → [conv(no bias, stride 2) + 1x1 shortcut] → tanh →
/// avg-pool → adaptive pool → flatten → identity → linear → sigmoid → linear.
fn every_layer() -> Net {
    let mut net = Net::new(&[2, 8, 8]);
    let pad1 = ConvOptions {
        padding: 1,
        ..ConvOptions::default()
    };
    let mut h = net.conv2d("stem", net.input(), 3, 3, pad1).unwrap();
    h = net.batch_norm2d("stem_bn", h).unwrap();
    h = net.activation(h, Activation::Gelu).unwrap();
    h = net.max_pool2d(h, 2, 2).unwrap();
    let strided = ConvOptions {
        stride: 2,
        padding: 1,
        bias: false,
    };
    let a = net.conv2d("block.conv", h, 4, 3, strided).unwrap();
    let short = ConvOptions {
        stride: 2,
        padding: 0,
        bias: false,
    };
    let b = net.conv2d("block.shortcut", h, 4, 1, short).unwrap();
    h = net.add(a, b).unwrap();
    h = net.activation(h, Activation::Tanh).unwrap();
    h = net
        .push(
            "pool",
            Layer::AvgPool2d {
                kernel: 1,
                stride: 1,
            },
            &[h],
        )
        .unwrap();
    h = net.adaptive_avg_pool2d(h).unwrap();
    h = net.flatten(h).unwrap();
    h = net.push("same", Layer::Identity, &[h]).unwrap();
    h = net.linear("fc1", h, 5, true).unwrap();
    h = net.activation(h, Activation::Sigmoid).unwrap();
    net.linear("fc2", h, 3, true).unwrap();
    net
}

#[test]
fn state_names_shapes_and_kinds_follow_pytorch() {
    let net = every_layer();
    let state: Vec<(String, Vec<usize>)> =
        net.state().into_iter().map(|s| (s.name, s.shape)).collect();
    let want: Vec<(&str, Vec<usize>)> = vec![
        ("stem.weight", vec![3, 2, 3, 3]),
        ("stem.bias", vec![3]),
        ("stem_bn.weight", vec![3]),
        ("stem_bn.bias", vec![3]),
        ("stem_bn.running_mean", vec![3]),
        ("stem_bn.running_var", vec![3]),
        ("stem_bn.num_batches_tracked", vec![]),
        ("block.conv.weight", vec![4, 3, 3, 3]),
        ("block.shortcut.weight", vec![4, 3, 1, 1]),
        ("fc1.weight", vec![5, 4]),
        ("fc1.bias", vec![5]),
        ("fc2.weight", vec![3, 5]),
        ("fc2.bias", vec![3]),
    ];
    let want: Vec<(String, Vec<usize>)> =
        want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    assert_eq!(state, want);
    assert_eq!(net.param_tensors(), 10);
    assert_eq!(net.params()[0].kind, StateKind::Weight { fan_in: 18 });
    assert_eq!(net.params()[1].kind, StateKind::Bias { fan_in: 18 });
    assert_eq!(net.output_shape(), &[3]);
    assert_eq!(net.batch_norms().len(), 1);
    // Each node's parameters are consecutive, in node order.
    let fc2 = net.find("fc2").unwrap();
    assert_eq!(net.node(fc2).params(), 8..10);
    // Multiply-adds per sample: conv 3·8·8·18, conv 4·2·2·27, shortcut 4·2·2·3, fc 20, 15.
    let macs: Vec<u64> = net.macs().into_iter().filter(|&m| m > 0).collect();
    assert_eq!(macs, vec![3 * 64 * 18, 16 * 27, 16 * 3, 20, 15]);
}

fn net_error(r: Result<NodeId, EngineError>) -> (String, String) {
    match r {
        Err(EngineError::Net { layer, detail }) => (layer, detail),
        other => panic!("expected a network error, got {other:?}"),
    }
}

#[test]
fn bad_layers_are_refused_with_the_layer_named() {
    let mut net = Net::new(&[3, 8, 8]);
    let x = net.input();
    let c = net.conv2d("c", x, 4, 3, ConvOptions::default()).unwrap();
    // Channels that do not match.
    let wrong = Layer::Conv2d {
        in_channels: 5,
        out_channels: 2,
        kernel: 3,
        stride: 1,
        padding: 0,
        bias: true,
    };
    let (layer, detail) = net_error(net.push("c2", wrong, &[c]));
    assert_eq!(layer, "c2");
    assert!(
        detail.contains("in_channels 5") && detail.contains("4 channels"),
        "{detail}"
    );
    // A window that does not fit (6x6 input, 7x7 kernel).
    let (layer, detail) = net_error(net.conv2d("big", c, 2, 7, ConvOptions::default()));
    assert_eq!(layer, "big");
    assert!(detail.contains("does not fit"), "{detail}");
    // Linear on an image.
    let (_, detail) = net_error(net.linear("fc", c, 10, true));
    assert!(detail.contains("[features]"), "{detail}");
    // A name used twice.
    let (layer, detail) = net_error(net.conv2d("c", c, 4, 1, ConvOptions::default()));
    assert_eq!(layer, "c");
    assert!(detail.contains("already used"), "{detail}");
    // Adding different shapes.
    let p = net.max_pool2d(c, 2, 2).unwrap();
    let (_, detail) = net_error(net.add(c, p));
    assert!(detail.contains("equal shapes"), "{detail}");
    // BatchNorm with the wrong channel count.
    let bn = Layer::BatchNorm2d {
        features: 3,
        eps: 1e-5,
        momentum: Some(0.1),
    };
    let (_, detail) = net_error(net.push("bn", bn, &[c]));
    assert!(detail.contains("num_features 3"), "{detail}");
    // A node that is not in the net.
    let (_, detail) = net_error(net.push("r", Layer::Identity, &[NodeId::from_index(99)]));
    assert!(detail.contains("not in the net"), "{detail}");
    // Nothing was added by the failed calls.
    assert_eq!(net.len(), 3);
}

/// Parameters in [`Net::params`] order.
fn params(net: &Net, seed: u64) -> Vec<Tensor<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    net.params()
        .iter()
        .map(|s| {
            let mut t = Tensor::uniform(&s.shape, -0.8, 0.8, &mut rng);
            if s.kind == StateKind::BnWeight {
                t.data_mut().iter_mut().for_each(|v| *v += 1.0);
            }
            t
        })
        .collect()
}

#[test]
fn the_recorded_net_passes_the_finite_difference_checker() {
    let net = every_layer();
    let theta = params(&net, 3);
    let x = Tensor::<f64>::randn(&[3, 2, 8, 8], &mut StdRng::seed_from_u64(4));
    let (mean, var) = (vec![0.1, -0.2, 0.05], vec![0.7, 1.3, 0.9]);
    let running = NormStats::Running(vec![RunningStats {
        mean: &mean,
        var: &var,
    }]);
    for (mode, norm) in [("batch", NormStats::Batch), ("running", running)] {
        let name = format!("net ({mode} statistics)");
        let report = check_op(&name, &theta, 1e-6, |t, v| {
            let xv = t.constant(x.clone());
            net.loss(t, v, xv, &norm, &[0, 2, 1], Loss::CrossEntropy)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{name}: worst {:.2e}", report.worst());
    }
}

#[test]
fn record_checks_its_inputs() {
    let net = every_layer();
    let theta = params(&net, 5);
    let mut tape = flatmin_engine::Tape::<f64>::new(0);
    let vars: Vec<_> = theta.iter().map(|p| tape.constant(p.clone())).collect();
    let x = tape.constant(Tensor::zeros(&[2, 3, 8, 8]));
    let err = net
        .record(&mut tape, &vars, x, &NormStats::Batch)
        .unwrap_err();
    assert!(err.to_string().contains("want [N, 2, 8, 8]"), "{err}");
    let x = tape.constant(Tensor::zeros(&[2, 2, 8, 8]));
    let err = net
        .record(&mut tape, &vars[1..], x, &NormStats::Batch)
        .unwrap_err();
    assert!(
        err.to_string().contains("9 parameter variables for 10"),
        "{err}"
    );
    let err = net
        .record(&mut tape, &vars, x, &NormStats::Running(Vec::new()))
        .unwrap_err();
    assert!(
        err.to_string().contains("0 running statistics for 1"),
        "{err}"
    );
    let rec = net.record(&mut tape, &vars, x, &NormStats::Batch).unwrap();
    assert_eq!(tape.value(rec.output()).shape(), &[2, 3]);
    assert_eq!(rec.batch_stats.len(), 1);
    // AdaptiveAvgPool2d keeps PyTorch's [N, C, 1, 1].
    let pool = net
        .nodes()
        .iter()
        .position(|n| n.layer == Layer::AdaptiveAvgPool2d);
    assert_eq!(tape.value(rec.vars[pool.unwrap()]).shape(), &[2, 4, 1, 1]);
}

/// Nets whose convolutions inference fuses with the activation and pooling after them, in
/// part, or (where another layer reads the intermediate value) not at all.
fn fusion_nets() -> Vec<(&'static str, Net)> {
    let pad1 = ConvOptions {
        padding: 1,
        ..ConvOptions::default()
    };
    let head = |net: &mut Net, h: NodeId| {
        let h = net.flatten(h).unwrap();
        net.linear("fc", h, 3, true).unwrap();
    };
    let mut nets = Vec::new();
    // cnn-s in small: conv → relu → max-pool, twice, then an MLP head.
    let mut net = Net::new(&[3, 16, 16]);
    let mut h = net.conv2d("c1", net.input(), 8, 3, pad1).unwrap();
    h = net.relu(h).unwrap();
    h = net.max_pool2d(h, 2, 2).unwrap();
    h = net.conv2d("c2", h, 16, 3, pad1).unwrap();
    h = net.relu(h).unwrap();
    h = net.max_pool2d(h, 2, 2).unwrap();
    head(&mut net, h);
    nets.push(("conv-relu-maxpool", net));
    // Another activation and average pooling; pooling without an activation, odd window.
    let mut net = Net::new(&[3, 16, 16]);
    h = net.conv2d("c1", net.input(), 8, 3, pad1).unwrap();
    h = net.activation(h, Activation::Tanh).unwrap();
    h = net.avg_pool2d(h, 2, 2).unwrap();
    h = net.conv2d("c2", h, 8, 3, pad1).unwrap();
    h = net.max_pool2d(h, 3, 2).unwrap();
    head(&mut net, h);
    nets.push(("conv-tanh-avgpool, conv-maxpool", net));
    // The activation is read twice (only conv + relu fuse); a convolution read twice (none).
    let mut net = Net::new(&[3, 16, 16]);
    let a = net.conv2d("c1", net.input(), 8, 3, pad1).unwrap();
    let r = net.relu(a).unwrap();
    let p = net.max_pool2d(r, 2, 2).unwrap();
    let b = net.conv2d("c2", r, 8, 3, pad1).unwrap();
    let q = net.relu(b).unwrap();
    let s = net.add(b, q).unwrap();
    let s = net.max_pool2d(s, 2, 2).unwrap();
    h = net.add(p, s).unwrap();
    head(&mut net, h);
    nets.push(("shared values", net));
    // Strided convolutions (implicit through phase planes on AVX-512 machines) with an
    // epilogue: 3x3 stride 2 → relu → max-pool; 1x1 stride 2 → tanh.
    let mut net = Net::new(&[3, 20, 20]);
    let s3 = ConvOptions {
        stride: 2,
        padding: 1,
        ..ConvOptions::default()
    };
    h = net.conv2d("c1", net.input(), 8, 3, s3).unwrap();
    h = net.relu(h).unwrap();
    h = net.max_pool2d(h, 2, 2).unwrap();
    let s1 = ConvOptions {
        stride: 2,
        ..ConvOptions::default()
    };
    h = net.conv2d("c2", h, 4, 1, s1).unwrap();
    h = net.activation(h, Activation::Tanh).unwrap();
    head(&mut net, h);
    nets.push(("strided conv-relu-maxpool, strided 1x1-tanh", net));
    nets.push(("every layer", every_layer()));
    nets
}

/// `Net::infer`'s output (with its fused convolution epilogues) equals the recorded forward
/// pass's output bit for bit, with batch and with running statistics, in f32 (where the
/// implicit convolutions that fuse run) and f64.
#[test]
fn inference_gives_the_recorded_output_bit_for_bit() {
    fn case<T: flatmin_engine::Scalar>(name: &str, net: &Net, theta: Vec<Tensor<T>>) {
        let mut shape = vec![5];
        shape.extend_from_slice(net.input_shape());
        let x64 = Tensor::<f64>::randn(&shape, &mut StdRng::seed_from_u64(8));
        let x = Tensor::from_vec(&shape, x64.data().iter().map(|&v| T::c(v)).collect()).unwrap();
        let bns = net.batch_norms().len();
        let (mean, var) = (vec![T::c(0.1); 3], vec![T::c(0.7); 3]);
        let running = (0..bns)
            .map(|_| RunningStats {
                mean: &mean,
                var: &var,
            })
            .collect();
        for norm in [NormStats::Batch, NormStats::Running(running)] {
            let mut tape = flatmin_engine::Tape::<T>::new(0);
            let vars: Vec<_> = theta.iter().map(|p| tape.constant(p.clone())).collect();
            let xv = tape.constant(x.clone());
            let rec = net.record(&mut tape, &vars, xv, &norm).unwrap();
            let refs: Vec<&Tensor<T>> = theta.iter().collect();
            let (out, stats) = net.infer(&refs, &x, &norm).unwrap();
            let want = tape.value(rec.output());
            assert_eq!(out.shape(), want.shape(), "{name}");
            let bits = |t: &Tensor<T>| {
                t.data()
                    .iter()
                    .map(|v| v.to_f64().unwrap().to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&out), bits(want), "{name}");
            assert_eq!(stats, rec.batch_stats, "{name}");
        }
    }
    for (name, net) in fusion_nets() {
        let theta = params(&net, 11);
        let theta32 = theta
            .iter()
            .map(|t| {
                Tensor::from_vec(t.shape(), t.data().iter().map(|&v| v as f32).collect()).unwrap()
            })
            .collect();
        case::<f32>(name, &net, theta32);
        case::<f64>(name, &net, theta);
    }
}

#[test]
fn infer_checks_its_inputs() {
    let net = every_layer();
    let theta = params(&net, 5);
    let refs: Vec<&Tensor<f64>> = theta.iter().collect();
    let err = net
        .infer(&refs, &Tensor::zeros(&[2, 3, 8, 8]), &NormStats::Batch)
        .unwrap_err();
    assert!(err.to_string().contains("want [N, 2, 8, 8]"), "{err}");
    let err = net
        .infer(&refs[1..], &Tensor::zeros(&[2, 2, 8, 8]), &NormStats::Batch)
        .unwrap_err();
    assert!(
        err.to_string().contains("9 parameter variables for 10"),
        "{err}"
    );
}
