//! The structural trace (per-sample backward over a network description) against the exact trace
//! and diagonal by basis HVPs on the same net recorded on the tape: smooth MLPs (GGN part
//! plus activation sources), a conv net with a smooth activation inside, a residual net with
//! BatchNorm in eval mode and max pooling; refusals; batching and thread independence.

use flatmin_engine::curvature::{
    exact_trace, structural_support, structural_trace, Batches, Hessian, HvpConfig,
    StructuralAccumulator, StructuralOptions, StructuralTrace,
};
use flatmin_engine::net::{Activation, ConvOptions, Net, NodeId, NormStats, RunningStats};
use flatmin_engine::{Loss, Scalar, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A net, its parameters, its BatchNorm statistics (`None`: batch statistics) and one batch
/// of data.
struct Case<T> {
    net: Net,
    params: Vec<Tensor<T>>,
    running: Option<Vec<(Vec<T>, Vec<T>)>>,
    x: Tensor<T>,
    labels: Vec<usize>,
    /// The objective on the logits.
    loss_fn: Loss,
}

fn uniform<T: Scalar>(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor<T> {
    Tensor::uniform(shape, lo, hi, rng)
}

impl<T: Scalar> Case<T> {
    fn with_data(
        net: Net,
        params: Vec<Tensor<T>>,
        running: Option<Vec<(Vec<T>, Vec<T>)>>,
        n: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut shape = vec![n];
        shape.extend_from_slice(net.input_shape());
        let classes = net.output_shape()[0];
        let x = uniform(&mut rng, &shape, -1.5, 1.5);
        let labels = (0..n).map(|_| rng.gen_range(0..classes)).collect();
        Case {
            net,
            params,
            running,
            x,
            labels,
            loss_fn: Loss::CrossEntropy,
        }
    }

    fn with_loss(mut self, loss_fn: Loss) -> Self {
        self.loss_fn = loss_fn;
        self
    }

    fn norm(&self) -> NormStats<'_, T> {
        match &self.running {
            None => NormStats::Batch,
            Some(r) => NormStats::Running(
                r.iter()
                    .map(|(mean, var)| RunningStats { mean, var })
                    .collect(),
            ),
        }
    }

    fn loss(
        &self,
        t: &mut flatmin_engine::Tape<T>,
        v: &[flatmin_engine::Var],
        x: flatmin_engine::Var,
        labels: &[usize],
    ) -> flatmin_engine::Result<flatmin_engine::Var> {
        self.net.loss(t, v, x, &self.norm(), labels, self.loss_fn)
    }

    fn structural(&self, diagonal: bool) -> StructuralTrace {
        let opts = StructuralOptions {
            diagonal,
            loss: self.loss_fn,
            ..StructuralOptions::default()
        };
        structural_trace(
            &self.net,
            &self.params,
            &self.norm(),
            &self.x,
            &self.labels,
            &opts,
        )
        .unwrap()
    }
}

/// `x -> f1(W1 x + b1) -> f2(W2 · + b2) -> ... -> logits`, parameters [W1, b1, W2, b2, ...].
fn mlp<T: Scalar>(widths: &[usize], acts: &[Activation], n: usize, seed: u64) -> Case<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = Net::new(&[widths[0]]);
    let mut params = Vec::new();
    let mut h = net.input();
    for (i, w) in widths.windows(2).enumerate() {
        let bound = 1.6 / (w[0] as f64).sqrt();
        params.push(uniform(&mut rng, &[w[1], w[0]], -bound, bound));
        params.push(uniform(&mut rng, &[w[1]], -0.5, 0.5));
        h = net.linear(&format!("fc{i}"), h, w[1], true).unwrap();
        if i < acts.len() {
            h = net.activation(h, acts[i]).unwrap();
        }
    }
    Case::with_data(net, params, None, n, seed + 100)
}

/// conv(2→3, 3x3, pad 1, bias) → tanh → max-pool 2 → conv(3→4, 3x3, stride 2, pad 1) → relu
/// → avg-pool 2 → flatten → linear(4→3), on 2x8x8 inputs.
fn conv_net<T: Scalar>(n: usize, seed: u64) -> Case<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let params = vec![
        uniform(&mut rng, &[3, 2, 3, 3], -0.5, 0.5),
        uniform(&mut rng, &[3], -0.3, 0.3),
        uniform(&mut rng, &[4, 3, 3, 3], -0.5, 0.5),
        uniform(&mut rng, &[3, 4], -0.8, 0.8),
        uniform(&mut rng, &[3], -0.3, 0.3),
    ];
    let mut net = Net::new(&[2, 8, 8]);
    let pad1 = ConvOptions {
        padding: 1,
        ..ConvOptions::default()
    };
    let mut h = net.conv2d("conv1", net.input(), 3, 3, pad1).unwrap();
    h = net.activation(h, Activation::Tanh).unwrap();
    h = net.max_pool2d(h, 2, 2).unwrap();
    let strided = ConvOptions {
        stride: 2,
        padding: 1,
        bias: false,
    };
    h = net.conv2d("conv2", h, 4, 3, strided).unwrap();
    h = net.relu(h).unwrap();
    h = net.avg_pool2d(h, 2, 2).unwrap();
    h = net.flatten(h).unwrap();
    net.linear("fc", h, 3, true).unwrap();
    Case::with_data(net, params, None, n, seed + 7)
}

/// Builds a net with its parameters and running statistics drawn as layers are added.
struct Builder<T> {
    net: Net,
    params: Vec<Tensor<T>>,
    running: Vec<(Vec<T>, Vec<T>)>,
    rng: StdRng,
    layers: usize,
}

impl<T: Scalar> Builder<T> {
    fn param(&mut self, shape: &[usize], lo: f64, hi: f64) {
        let t = uniform(&mut self.rng, shape, lo, hi);
        self.params.push(t);
    }

    fn name(&mut self, kind: &str) -> String {
        self.layers += 1;
        format!("{kind}{}", self.layers)
    }

    fn conv(&mut self, x: NodeId, cout: usize, k: usize, stride: usize, pad: usize) -> NodeId {
        let cin = self.net.node(x).shape[0];
        let b = 1.2 / ((cin * k * k) as f64).sqrt();
        self.param(&[cout, cin, k, k], -b, b);
        let opts = ConvOptions {
            stride,
            padding: pad,
            bias: false,
        };
        let name = self.name("conv");
        self.net.conv2d(&name, x, cout, k, opts).unwrap()
    }

    fn bn(&mut self, x: NodeId) -> NodeId {
        let c = self.net.node(x).shape[0];
        self.param(&[c], 0.6, 1.4);
        self.param(&[c], -0.3, 0.3);
        let mean = (0..c)
            .map(|_| T::c(self.rng.gen_range(-0.3..0.3)))
            .collect();
        let var = (0..c).map(|_| T::c(self.rng.gen_range(0.4..1.6))).collect();
        self.running.push((mean, var));
        let name = self.name("bn");
        self.net.batch_norm2d(&name, x).unwrap()
    }
}

/// A reduced ResNet (widths [4, 8]) on 3x8x8 inputs: conv-BN-relu, max-pool, one identity
/// BasicBlock, one downsampling BasicBlock with a 1x1 conv + BN shortcut, global average
/// pooling, linear. `train`: BatchNorm on batch statistics.
fn resnet<T: Scalar>(n: usize, seed: u64, train: bool) -> Case<T> {
    let mut b = Builder {
        net: Net::new(&[3, 8, 8]),
        params: Vec::new(),
        running: Vec::new(),
        rng: StdRng::seed_from_u64(seed),
        layers: 0,
    };
    let x = b.net.input();
    let mut h = b.conv(x, 4, 3, 1, 1);
    h = b.bn(h);
    h = b.net.relu(h).unwrap();
    h = b.net.max_pool2d(h, 2, 2).unwrap();
    for (cin, cout, stride) in [(4, 4, 1), (4, 8, 2)] {
        let mut o = b.conv(h, cout, 3, stride, 1);
        o = b.bn(o);
        o = b.net.relu(o).unwrap();
        o = b.conv(o, cout, 3, 1, 1);
        o = b.bn(o);
        let short = if stride != 1 || cin != cout {
            let s = b.conv(h, cout, 1, stride, 0);
            b.bn(s)
        } else {
            h
        };
        o = b.net.add(o, short).unwrap();
        h = b.net.relu(o).unwrap();
    }
    h = b.net.adaptive_avg_pool2d(h).unwrap();
    h = b.net.flatten(h).unwrap();
    b.param(&[5, 8], -0.6, 0.6);
    b.param(&[5], -0.2, 0.2);
    b.net.linear("fc", h, 5, true).unwrap();
    let running = (!train).then_some(b.running);
    Case::with_data(b.net, b.params, running, n, seed + 3)
}

fn basis(case: &Case<f64>) -> flatmin_engine::curvature::ExactTrace {
    let h = Hessian::from_fn(
        &case.params,
        |t, v| {
            let x = t.constant(case.x.clone());
            case.loss(t, v, x, &case.labels)
        },
        HvpConfig::default(),
    )
    .unwrap();
    exact_trace(&h).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// Structural trace, per-tensor traces and diagonal against basis HVPs; returns the
/// structural result.
fn check_against_basis(name: &str, case: &Case<f64>) -> StructuralTrace {
    let s = case.structural(true);
    let e = basis(case);
    let err = rel(s.trace, e.trace);
    eprintln!(
        "{name}: structural {:.15e} (GGN {:.6e}, activations {:.6e}), basis {:.15e}, rel err {err:.2e}, d = {}",
        s.trace, s.ggn_trace, s.activation_trace, e.trace, s.dim
    );
    assert!(err < 1e-10, "{name}: trace rel err {err:e}");
    assert_eq!(s.dim, e.dim);
    assert!((s.normalized_trace - s.trace / s.dim as f64).abs() <= 1e-15 * s.trace.abs());
    let scale = e
        .blocks
        .iter()
        .flat_map(|b| b.diagonal.iter())
        .fold(0.0f64, |m, &v| m.max(v.abs()));
    let mut worst: f64 = 0.0;
    for (sb, eb) in s.blocks.iter().zip(&e.blocks) {
        assert_eq!(sb.shape, eb.shape);
        let tol = 1e-10 * eb.trace.abs().max(1e-3 * e.trace.abs());
        assert!(
            (sb.trace - eb.trace).abs() <= tol,
            "{name}: tensor {} trace {} vs {}",
            sb.index,
            sb.trace,
            eb.trace
        );
        let diag = sb.diagonal.as_ref().unwrap();
        for (a, b) in diag.iter().zip(&eb.diagonal) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!(
        "{name}: worst diagonal error {:.2e} (relative to the largest entry)",
        worst / scale
    );
    assert!(worst <= 1e-10 * scale, "{name}: diagonal error {worst:e}");
    s
}

#[test]
fn tanh_mlp_ggn_plus_sources_is_the_trace() {
    let case = mlp::<f64>(&[12, 9, 4], &[Activation::Tanh], 7, 1);
    let s = check_against_basis("tanh mlp", &case);
    // The activation part matters: the GGN alone is not the trace.
    assert!(
        rel(s.ggn_trace, s.trace) > 1e-4,
        "GGN part {} trace {}",
        s.ggn_trace,
        s.trace
    );
    assert_eq!(s.class_columns, 4);
    assert_eq!(s.source_columns, 7 * 9);
    assert_eq!(s.samples, 7);
}

#[test]
fn deep_mlp_with_gelu_softplus_sigmoid() {
    let acts = [Activation::Gelu, Activation::Softplus, Activation::Sigmoid];
    let case = mlp::<f64>(&[6, 7, 6, 5, 4], &acts, 5, 2);
    let s = check_against_basis("gelu/softplus/sigmoid mlp", &case);
    assert!(s.activation_trace.abs() > 1e-6 * s.trace.abs());
    // Each activation alone, too.
    for (i, f) in acts.into_iter().enumerate() {
        let case = mlp::<f64>(&[6, 8, 8, 3], &[f, f], 4, 10 + i as u64);
        check_against_basis(&format!("{f:?} mlp"), &case);
    }
}

#[test]
fn relu_mlp_is_pure_ggn() {
    let case = mlp::<f64>(&[10, 8, 8, 3], &[Activation::Relu, Activation::Relu], 6, 3);
    let s = check_against_basis("relu mlp", &case);
    assert_eq!(s.activation_trace, 0.0);
    assert_eq!(s.source_columns, 0);
}

#[test]
fn conv_net_with_pooling_and_a_smooth_activation_inside() {
    let case = conv_net::<f64>(4, 4);
    let s = check_against_basis("conv net", &case);
    assert!(s.source_columns > 0);
}

#[test]
fn residual_net_with_batchnorm_eval_and_max_pool() {
    let case = resnet::<f64>(3, 5, false);
    let s = check_against_basis("resnet [4, 8]", &case);
    assert_eq!(s.activation_trace, 0.0);
}

#[test]
fn mse_objective_is_traced_exactly_on_every_net_class() {
    // The one-hot MSE has a constant Hessian in the logits, (2/C) I: the GGN part changes,
    // the activation sources follow the MSE gradient.
    let cases = [
        (
            "tanh mlp, mse",
            mlp::<f64>(&[12, 9, 4], &[Activation::Tanh], 7, 1),
        ),
        ("conv net, mse", conv_net::<f64>(4, 4)),
        ("resnet [4, 8], mse", resnet::<f64>(3, 5, false)),
    ];
    for (name, case) in cases {
        let ce = case.structural(false).trace;
        let case = case.with_loss(Loss::Mse);
        let s = check_against_basis(name, &case);
        assert!(rel(s.trace, ce) > 1e-3, "{name}: the MSE trace equals CE's");
    }
}

#[test]
fn refusals_name_the_reason() {
    let opts = StructuralOptions::default();
    // BatchNorm on batch statistics.
    let case = resnet::<f64>(3, 5, true);
    let sup = structural_support(&case.net, &case.params, &case.norm(), &opts).unwrap();
    let reason = sup.refusal.expect("train-mode BatchNorm is refused");
    assert!(
        reason.contains("batch statistics") && reason.contains("train mode"),
        "{reason}"
    );
    let err = structural_trace(
        &case.net,
        &case.params,
        &case.norm(),
        &case.x,
        &case.labels,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("does not apply") && err.contains("train mode"),
        "{err}"
    );
    eprintln!("{err}");

    // Running statistics that do not match the net are an error.
    let mut case = resnet::<f64>(3, 5, false);
    case.running.as_mut().unwrap().pop();
    assert!(structural_support(&case.net, &case.params, &case.norm(), &opts).is_err());

    // Too many curvature sources per sample.
    let case = conv_net::<f64>(2, 4);
    let small = StructuralOptions {
        max_sources_per_sample: 100,
        ..StructuralOptions::default()
    };
    let sup = structural_support(&case.net, &case.params, &case.norm(), &small).unwrap();
    let reason = sup.refusal.unwrap();
    assert!(
        reason.contains("192 units per sample") && reason.contains("limit 100"),
        "{reason}"
    );
    let ok = structural_support(&case.net, &case.params, &case.norm(), &opts).unwrap();
    assert!(ok.applies());
    assert_eq!(ok.sources_per_sample, 192);
    assert_eq!(ok.classes, 3);

    // Malformed input is an error, not a refusal: parameters that do not fit the net.
    let mut rng = StdRng::seed_from_u64(0);
    let params = vec![uniform::<f64>(&mut rng, &[4, 4], -1.0, 1.0)];
    let mut net = Net::new(&[4]);
    net.linear("fc", net.input(), 3, false).unwrap();
    let err = structural_support(&net, &params, &NormStats::Batch, &opts).unwrap_err();
    assert!(err.to_string().contains("fc.weight"), "{err}");
}

#[test]
fn batches_combine_like_sample_weighted_hessians() {
    let case = mlp::<f64>(&[8, 6, 3], &[Activation::Tanh], 8, 6);
    let whole = case.structural(false);
    let opts = StructuralOptions {
        chunk_size: 3,
        ..StructuralOptions::default()
    };
    let norm = case.norm();
    let mut acc = StructuralAccumulator::new(&case.net, &case.params, &norm, &opts).unwrap();
    let parts = [(0, 5), (5, 8)];
    for &(a, b) in &parts {
        let x = Tensor::from_vec(&[b - a, 8], case.x.data()[a * 8..b * 8].to_vec()).unwrap();
        acc.add_batch(&x, &case.labels[a..b]).unwrap();
    }
    let split = acc.finish().unwrap();
    assert!(
        rel(split.trace, whole.trace) < 1e-14,
        "{} vs {}",
        split.trace,
        whole.trace
    );
    assert!(rel(split.loss, whole.loss) < 1e-14);
    // The same weighting as a Hessian over batches with sample-count weights.
    let h = Hessian::new(
        &case.params,
        Batches::new(
            vec![5.0, 3.0],
            |b: usize, t: &mut flatmin_engine::Tape<f64>, v: &[flatmin_engine::Var]| {
                let (lo, hi) = parts[b];
                let x = Tensor::from_vec(&[hi - lo, 8], case.x.data()[lo * 8..hi * 8].to_vec())?;
                let x = t.constant(x);
                case.loss(t, v, x, &case.labels[lo..hi])
            },
        ),
        HvpConfig::default(),
    )
    .unwrap();
    let e = exact_trace(&h).unwrap();
    assert!(
        rel(split.trace, e.trace) < 1e-10,
        "{} vs {}",
        split.trace,
        e.trace
    );
}

#[test]
fn same_bits_for_any_thread_count_and_f32_agrees() {
    let case = resnet::<f64>(6, 8, false);
    let run = |threads: usize, diagonal: bool| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| case.structural(diagonal))
    };
    let one = run(1, true);
    let two = run(2, true);
    assert_eq!(one.trace.to_bits(), two.trace.to_bits());
    assert_eq!(one.blocks, two.blocks);
    // Without the diagonal, convolutions may take the Gram route: other bits, same bits
    // across thread counts.
    let (a, b) = (run(1, false), run(3, false));
    assert_eq!(a.blocks, b.blocks);
    assert!(rel(a.trace, one.trace) < 1e-13);

    let case32 = Case::<f32> {
        net: case.net.clone(),
        params: case.params.iter().map(|p| p.cast()).collect(),
        running: case.running.as_ref().map(|r| {
            r.iter()
                .map(|(m, v)| {
                    let cast = |a: &Vec<f64>| a.iter().map(|&x| x as f32).collect();
                    (cast(m), cast(v))
                })
                .collect()
        }),
        x: case.x.cast(),
        labels: case.labels.clone(),
        loss_fn: case.loss_fn,
    };
    let s32 = case32.structural(false);
    let err = rel(s32.trace, one.trace);
    eprintln!("f32 {} f64 {} rel {err:.1e}", s32.trace, one.trace);
    assert!(err < 1e-4);
}
