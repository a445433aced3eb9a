//! Exact trace by basis HVPs against an explicitly assembled Hessian; dataset-level
//! weighting over batches; determinism across threads.

mod curvature_support;

use curvature_support::{explicit_hessian, rel_err, Mlp};
use flatmin_engine::curvature::{
    exact_trace, exact_trace_of, BatchLoss, Hessian, HvpConfig, ParamLayout,
};
use flatmin_engine::{Result, Tape, Var};

#[test]
fn exact_trace_equals_explicit_hessian_trace() {
    let mlp = Mlp::<f64>::new(11, 1);
    let full = explicit_hessian(&mlp.params, |t, v| mlp.loss(t, v));
    let d = full.len();
    assert_eq!(d, 66);
    let want: f64 = (0..d).map(|i| full[i][i]).sum();
    let h = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let tr = exact_trace(&h).unwrap();
    let err = (tr.trace - want).abs();
    eprintln!("trace {} explicit {want} abs err {err:.2e}", tr.trace);
    assert!(err <= 1e-12 * want.abs().max(1.0), "abs err {err:e}");
    assert_eq!(tr.dim, d);
    assert_eq!(tr.hvps, d);
    assert_eq!(tr.passes, d.div_ceil(32));
    assert!((tr.normalized_trace - want / d as f64).abs() < 1e-13);
    // The diagonal and the per-tensor traces.
    let layout = h.layout();
    let mut worst: f64 = 0.0;
    for b in &tr.blocks {
        let r = layout.range(b.index);
        assert_eq!(b.shape, layout.shape(b.index));
        for (e, &x) in b.diagonal.iter().enumerate() {
            worst = worst.max((x - full[r.start + e][r.start + e]).abs());
        }
        let block_want: f64 = r.clone().map(|i| full[i][i]).sum();
        assert!((b.trace - block_want).abs() < 1e-13, "block {}", b.index);
    }
    eprintln!("worst diagonal error {worst:.2e}");
    assert!(worst < 1e-14);
    // A subset of tensors costs only their scalars.
    let sub = exact_trace_of(&h, &[2, 0]).unwrap();
    assert_eq!(sub.hvps, 21 + 35);
    assert_eq!(sub.blocks[0].index, 2);
    assert_eq!(sub.blocks[0].diagonal, tr.blocks[2].diagonal);
    assert_eq!(sub.blocks[1].diagonal, tr.blocks[0].diagonal);
    assert!(exact_trace_of(&h, &[1, 1]).is_err());
    assert!(exact_trace_of(&h, &[4]).is_err());
}

#[test]
fn directions_per_pass_changes_at_most_the_last_bits() {
    let mlp = Mlp::<f64>::new(9, 2);
    let mut traces = Vec::new();
    for k in [1, 5, 32, 100] {
        let h = Hessian::from_fn(
            &mlp.params,
            |t, v| mlp.loss(t, v),
            HvpConfig::with_directions(k),
        )
        .unwrap();
        let tr = exact_trace(&h).unwrap();
        assert_eq!(tr.passes, 66usize.div_ceil(k));
        traces.push(tr.trace);
    }
    for t in &traces {
        assert!(rel_err(*t, traces[0]) < 1e-13, "{traces:?}");
    }
}

/// The MLP's samples split into batches of unequal size; each batch loss is a mean.
struct Split<'a> {
    mlp: &'a Mlp<f64>,
    bounds: Vec<usize>,
}

impl BatchLoss<f64> for Split<'_> {
    fn num_batches(&self) -> usize {
        self.bounds.len() - 1
    }
    fn batch_weight(&self, b: usize) -> f64 {
        (self.bounds[b + 1] - self.bounds[b]) as f64
    }
    fn record(&self, b: usize, tape: &mut Tape<f64>, params: &[Var]) -> Result<Var> {
        self.mlp
            .loss_on(self.bounds[b]..self.bounds[b + 1], tape, params)
    }
}

#[test]
fn unequal_batches_are_weighted_by_size() {
    let mlp = Mlp::<f64>::new(17, 3);
    let whole = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let split = Split {
        mlp: &mlp,
        bounds: vec![0, 5, 8, 17],
    };
    let parts = Hessian::new(&mlp.params, &split, HvpConfig::with_directions(16)).unwrap();
    let a = exact_trace(&whole).unwrap();
    let b = exact_trace(&parts).unwrap();
    eprintln!(
        "whole {} batched {} rel {:.2e}",
        a.trace,
        b.trace,
        rel_err(b.trace, a.trace)
    );
    assert!(rel_err(b.trace, a.trace) < 1e-13);
    assert_eq!(b.hvps, 66);
    assert_eq!(b.passes, 3 * 66usize.div_ceil(16));
    for (x, y) in a.blocks.iter().zip(&b.blocks) {
        for (p, q) in x.diagonal.iter().zip(&y.diagonal) {
            assert!((p - q).abs() < 1e-14);
        }
    }
    // Loss, gradient and arbitrary products agree too.
    let (la, ga) = whole.loss_and_grad().unwrap();
    let (lb, gb) = parts.loss_and_grad().unwrap();
    assert!((la - lb).abs() < 1e-14);
    assert!(ga.iter().zip(&gb).all(|(p, q)| (p - q).abs() < 1e-14));
    let v: Vec<f64> = (0..66)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0)
        .collect();
    let ha = whole.apply(std::slice::from_ref(&v)).unwrap();
    let hb = parts.apply(std::slice::from_ref(&v)).unwrap();
    assert!(ha[0].iter().zip(&hb[0]).all(|(p, q)| (p - q).abs() < 1e-14));
    // Equal-sized batches with the default weight are a plain mean.
    let eq = Hessian::from_batches(
        &mlp.params,
        vec![1.0; 2],
        |b, t, v| mlp.loss_on(b * 8..b * 8 + 8, t, v),
        HvpConfig::default(),
    )
    .unwrap();
    let first = Mlp {
        params: mlp.params.clone(),
        x: mlp.x.clone(),
        labels: mlp.labels.clone(),
    };
    let h16 = Hessian::from_fn(
        &first.params,
        |t, v| first.loss_on(0..16, t, v),
        HvpConfig::default(),
    )
    .unwrap();
    let c = exact_trace(&eq).unwrap();
    let d16 = exact_trace(&h16).unwrap();
    assert!(rel_err(c.trace, d16.trace) < 1e-13);
}

#[test]
fn bit_identical_for_any_thread_count_and_concurrency() {
    let mlp = Mlp::<f32>::new(13, 4);
    let run = |threads: usize, concurrent: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let cfg = HvpConfig {
                directions_per_pass: 8,
                concurrent_passes: concurrent,
            };
            let h = Hessian::from_batches(
                &mlp.params,
                vec![6.0, 7.0],
                |b, t, v| mlp.loss_on(if b == 0 { 0..6 } else { 6..13 }, t, v),
                cfg,
            )
            .unwrap();
            let tr = exact_trace(&h).unwrap();
            let diag: Vec<u64> = tr
                .blocks
                .iter()
                .flat_map(|b| b.diagonal.iter().map(|x| x.to_bits()))
                .collect();
            (tr.trace.to_bits(), diag)
        })
    };
    let base = run(1, 1);
    for (threads, concurrent) in [(2, 1), (3, 3), (2, 4)] {
        assert_eq!(
            run(threads, concurrent),
            base,
            "{threads} threads, {concurrent} passes"
        );
    }
}

#[test]
fn f32_agrees_with_f64() {
    let m64 = Mlp::<f64>::new(10, 5);
    let m32 = Mlp::<f32> {
        params: m64.params.iter().map(|p| p.cast()).collect(),
        x: m64.x.cast(),
        labels: m64.labels.clone(),
    };
    let h64 = Hessian::from_fn(&m64.params, |t, v| m64.loss(t, v), HvpConfig::default()).unwrap();
    let h32 = Hessian::from_fn(&m32.params, |t, v| m32.loss(t, v), HvpConfig::default()).unwrap();
    let a = exact_trace(&h64).unwrap().trace;
    let b = exact_trace(&h32).unwrap().trace;
    eprintln!("f64 {a} f32 {b} rel {:.2e}", rel_err(b, a));
    assert!(rel_err(b, a) < 1e-5);
}

#[test]
fn layout_round_trip_and_bad_inputs() {
    let mlp = Mlp::<f64>::new(4, 6);
    let layout = ParamLayout::new(&mlp.params);
    assert_eq!(layout.dim(), 66);
    assert_eq!(layout.locate(0), Some((0, 0)));
    assert_eq!(layout.locate(35), Some((1, 0)));
    assert_eq!(layout.locate(65), Some((3, 2)));
    assert_eq!(layout.locate(66), None);
    let flat = layout.flatten(&mlp.params).unwrap();
    let back: Vec<flatmin_engine::Tensor<f64>> = layout.unflatten(&flat).unwrap();
    assert_eq!(back, mlp.params);
    assert!(layout.unflatten::<f64>(&flat[1..]).is_err());
    let loss = |t: &mut Tape<f64>, v: &[Var]| mlp.loss(t, v);
    let bad = HvpConfig {
        directions_per_pass: 0,
        concurrent_passes: 1,
    };
    assert!(Hessian::from_fn(&mlp.params, loss, bad).is_err());
    assert!(Hessian::from_fn(&[], loss, HvpConfig::default()).is_err());
    assert!(Hessian::from_batches(
        &mlp.params,
        vec![1.0, 0.0],
        |_, t, v| mlp.loss(t, v),
        HvpConfig::default()
    )
    .is_err());
    assert!(Hessian::from_batches(
        &mlp.params,
        vec![],
        |_, t, v| mlp.loss(t, v),
        HvpConfig::default()
    )
    .is_err());
    let h = Hessian::from_fn(&mlp.params, loss, HvpConfig::default()).unwrap();
    assert!(h.apply(&[vec![0.0; 3]]).is_err());
    // A loss that fails reports the engine error.
    let failing = Hessian::from_fn(
        &mlp.params,
        |t, v| t.cross_entropy(v[0], &[0]),
        HvpConfig::default(),
    )
    .unwrap();
    assert!(exact_trace(&failing).is_err());
    // A memory budget picks K from the recorded sizes.
    let k_small = h.directions_for_budget(1 << 12).unwrap();
    let k_big = h.directions_for_budget(1 << 24).unwrap();
    assert!(
        k_small >= 1 && k_small < k_big && k_big <= 256,
        "{k_small} {k_big}"
    );
    // Constants carry no tangent: a large one recorded beside the loss costs no budget.
    let with_constant = Hessian::from_fn(
        &mlp.params,
        |t, v| {
            t.constant(flatmin_engine::Tensor::zeros(&[100_000]));
            mlp.loss(t, v)
        },
        HvpConfig::default(),
    )
    .unwrap();
    assert_eq!(
        with_constant.bytes_per_direction().unwrap(),
        h.bytes_per_direction().unwrap()
    );
}
