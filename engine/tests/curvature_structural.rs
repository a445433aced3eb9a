//! The structural trace (per-sample backward over a declared `Net`) against the exact trace
//! and diagonal by basis HVPs on the same net recorded on the tape: smooth MLPs (GGN part
//! plus activation sources), a conv net with a smooth activation inside, a residual net with
//! BatchNorm in eval mode and max pooling; refusals; batching and thread independence.

use flatmin_engine::curvature::{
    exact_trace, structural_support, structural_trace, Batches, Hessian, HvpConfig, Net, NormStats,
    StructuralAccumulator, StructuralOptions, StructuralTrace,
};
use flatmin_engine::{Scalar, Tensor, Unary};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A net, its parameters and one batch of data.
struct Case<T> {
    net: Net<T>,
    params: Vec<Tensor<T>>,
    x: Tensor<T>,
    labels: Vec<usize>,
}

fn uniform<T: Scalar>(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor<T> {
    Tensor::uniform(shape, lo, hi, rng)
}

impl<T: Scalar> Case<T> {
    fn with_data(
        net: Net<T>,
        params: Vec<Tensor<T>>,
        sample: &[usize],
        n: usize,
        classes: usize,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut shape = vec![n];
        shape.extend_from_slice(sample);
        let x = uniform(&mut rng, &shape, -1.5, 1.5);
        let labels = (0..n).map(|_| rng.gen_range(0..classes)).collect();
        Case {
            net,
            params,
            x,
            labels,
        }
    }

    fn structural(&self, diagonal: bool) -> StructuralTrace {
        let opts = StructuralOptions {
            diagonal,
            ..StructuralOptions::default()
        };
        structural_trace(&self.net, &self.params, &self.x, &self.labels, &opts).unwrap()
    }
}

/// `x -> f1(W1 x + b1) -> f2(W2 · + b2) -> ... -> logits`, parameters [W1, b1, W2, b2, ...].
fn mlp<T: Scalar>(widths: &[usize], acts: &[Unary<T>], n: usize, seed: u64) -> Case<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = Net::new();
    let mut params = Vec::new();
    let mut h = net.input();
    for (i, w) in widths.windows(2).enumerate() {
        let bound = 1.6 / (w[0] as f64).sqrt();
        params.push(uniform(&mut rng, &[w[1], w[0]], -bound, bound));
        params.push(uniform(&mut rng, &[w[1]], -0.5, 0.5));
        h = net.linear(h, 2 * i, Some(2 * i + 1));
        if i < acts.len() {
            h = net.activation(h, acts[i]);
        }
    }
    Case::with_data(
        net,
        params,
        &[widths[0]],
        n,
        *widths.last().unwrap(),
        seed + 100,
    )
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
    let mut net = Net::new();
    let mut h = net.conv2d(net.input(), 0, Some(1), 1, 1);
    h = net.activation(h, Unary::Tanh);
    h = net.max_pool2d(h, 2, 2);
    h = net.conv2d(h, 2, None, 2, 1);
    h = net.relu(h);
    h = net.avg_pool2d(h, 2, 2);
    h = net.flatten(h);
    net.linear(h, 3, Some(4));
    Case::with_data(net, params, &[2, 8, 8], n, 3, seed + 7)
}

/// Parameter list with a running-statistics BatchNorm appended by [`bn`].
struct Builder<T> {
    net: Net<T>,
    params: Vec<Tensor<T>>,
    rng: StdRng,
    train: bool,
}

impl<T: Scalar> Builder<T> {
    fn param(&mut self, shape: &[usize], lo: f64, hi: f64) -> usize {
        let t = uniform(&mut self.rng, shape, lo, hi);
        self.params.push(t);
        self.params.len() - 1
    }

    fn conv(
        &mut self,
        x: flatmin_engine::curvature::NodeId,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> flatmin_engine::curvature::NodeId {
        let b = 1.2 / ((cin * k * k) as f64).sqrt();
        let w = self.param(&[cout, cin, k, k], -b, b);
        self.net.conv2d(x, w, None, stride, pad)
    }

    fn bn(
        &mut self,
        x: flatmin_engine::curvature::NodeId,
        c: usize,
    ) -> flatmin_engine::curvature::NodeId {
        let g = self.param(&[c], 0.6, 1.4);
        let b = self.param(&[c], -0.3, 0.3);
        let stats = if self.train {
            NormStats::Batch
        } else {
            let mean = (0..c)
                .map(|_| T::c(self.rng.gen_range(-0.3..0.3)))
                .collect();
            let var = (0..c).map(|_| T::c(self.rng.gen_range(0.4..1.6))).collect();
            NormStats::Running { mean, var }
        };
        self.net.batch_norm2d(x, g, b, stats, 1e-5)
    }
}

/// A reduced ResNet (widths [4, 8]) on 3x8x8 inputs: conv-BN-relu, max-pool, one identity
/// BasicBlock, one downsampling BasicBlock with a 1x1 conv + BN shortcut, global average
/// pooling, linear.
fn resnet<T: Scalar>(n: usize, seed: u64, train: bool) -> Case<T> {
    let mut b = Builder {
        net: Net::new(),
        params: Vec::new(),
        rng: StdRng::seed_from_u64(seed),
        train,
    };
    let x = b.net.input();
    let mut h = b.conv(x, 3, 4, 3, 1, 1);
    h = b.bn(h, 4);
    h = b.net.relu(h);
    h = b.net.max_pool2d(h, 2, 2);
    for (cin, cout, stride) in [(4, 4, 1), (4, 8, 2)] {
        let mut o = b.conv(h, cin, cout, 3, stride, 1);
        o = b.bn(o, cout);
        o = b.net.relu(o);
        o = b.conv(o, cout, cout, 3, 1, 1);
        o = b.bn(o, cout);
        let short = if stride != 1 || cin != cout {
            let s = b.conv(h, cin, cout, 1, stride, 0);
            b.bn(s, cout)
        } else {
            h
        };
        o = b.net.add(o, short);
        h = b.net.relu(o);
    }
    h = b.net.global_avg_pool(h);
    let w = b.param(&[5, 8], -0.6, 0.6);
    let bias = b.param(&[5], -0.2, 0.2);
    b.net.linear(h, w, Some(bias));
    Case::with_data(b.net, b.params, &[3, 8, 8], n, 5, seed + 3)
}

fn basis(case: &Case<f64>) -> flatmin_engine::curvature::ExactTrace {
    let h = Hessian::from_fn(
        &case.params,
        |t, v| {
            let x = t.constant(case.x.clone());
            case.net.loss(t, v, x, &case.labels)
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
    let case = mlp::<f64>(&[12, 9, 4], &[Unary::Tanh], 7, 1);
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
    let acts = [Unary::Gelu, Unary::Softplus, Unary::Sigmoid];
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
    let case = mlp::<f64>(&[10, 8, 8, 3], &[Unary::Relu, Unary::Relu], 6, 3);
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
fn refusals_name_the_reason() {
    let opts = StructuralOptions::default();
    // BatchNorm on batch statistics.
    let case = resnet::<f64>(3, 5, true);
    let sup = structural_support(&case.net, &case.params, &[3, 8, 8], &opts).unwrap();
    let reason = sup.refusal.expect("train-mode BatchNorm is refused");
    assert!(
        reason.contains("batch statistics") && reason.contains("train mode"),
        "{reason}"
    );
    let err = structural_trace(&case.net, &case.params, &case.x, &case.labels, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not apply") && err.contains("train mode"),
        "{err}"
    );
    eprintln!("{err}");

    // A parameter entering two layers.
    let mut rng = StdRng::seed_from_u64(0);
    let mut net = Net::<f64>::new();
    let h = net.linear(net.input(), 0, None);
    let h = net.activation(h, Unary::Tanh);
    net.linear(h, 0, None);
    let params = vec![uniform(&mut rng, &[4, 4], -1.0, 1.0)];
    let sup = structural_support(&net, &params, &[4], &opts).unwrap();
    assert!(sup.refusal.unwrap().contains("enters two layers"));

    // Too many curvature sources per sample.
    let case = conv_net::<f64>(2, 4);
    let small = StructuralOptions {
        max_sources_per_sample: 100,
        ..StructuralOptions::default()
    };
    let sup = structural_support(&case.net, &case.params, &[2, 8, 8], &small).unwrap();
    let reason = sup.refusal.unwrap();
    assert!(
        reason.contains("192 units per sample") && reason.contains("limit 100"),
        "{reason}"
    );
    let ok = structural_support(&case.net, &case.params, &[2, 8, 8], &opts).unwrap();
    assert!(ok.applies());
    assert_eq!(ok.sources_per_sample, 192);
    assert_eq!(ok.classes, 3);

    // Malformed input is an error, not a refusal.
    let params = vec![uniform(&mut rng, &[4, 4], -1.0, 1.0)];
    let mut net = Net::<f64>::new();
    net.linear(net.input(), 3, None);
    assert!(structural_support(&net, &params, &[4], &opts).is_err());
}

#[test]
fn batches_combine_like_sample_weighted_hessians() {
    let case = mlp::<f64>(&[8, 6, 3], &[Unary::Tanh], 8, 6);
    let whole = case.structural(false);
    let opts = StructuralOptions {
        chunk_size: 3,
        ..StructuralOptions::default()
    };
    let mut acc = StructuralAccumulator::new(&case.net, &case.params, &[8], &opts).unwrap();
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
                case.net.loss(t, v, x, &case.labels[lo..hi])
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
        net: resnet::<f32>(6, 8, false).net,
        params: case.params.iter().map(|p| p.cast()).collect(),
        x: case.x.cast(),
        labels: case.labels.clone(),
    };
    let s32 = case32.structural(false);
    let err = rel(s32.trace, one.trace);
    eprintln!("f32 {} f64 {} rel {err:.1e}", s32.trace, one.trace);
    assert!(err < 1e-4);
}
