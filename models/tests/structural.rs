//! The structural trace, which reads the model's network description (the one its forward
//! pass is recorded from), against basis HVPs on the forward pass itself (the full Hessian for
//! tiny-tanh and a reduced ResNet; chosen parameter tensors for mlp-s, cnn-s, resnet20 and
//! resnet18), with BatchNorm on running statistics; BatchNorm on batch statistics refused.

use flatmin_engine::curvature::{
    exact_trace, exact_trace_of, structural_support, structural_trace, ExactTrace, Hessian,
    HvpConfig, StructuralOptions, StructuralTrace,
};
use flatmin_engine::{EngineError, Tape, Tensor};
use flatmin_models::{Arch, BnUse, EntryKind, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A model of `arch` with BatchNorm running statistics from a few train-mode batches and
/// BatchNorm affine parameters away from their (1, 0) initialization.
fn model(arch: Arch, seed: u64) -> Model<f64> {
    let mut m = Model::<f64>::new(arch.net().unwrap(), seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xb17);
    if m.net().has_batch_norm() {
        for _ in 0..2 {
            let x = Tensor::<f64>::randn(&[4, 3, 32, 32], &mut rng);
            let e = m
                .evaluate(&x, &[0, 1, 2, 3], &[], BnUse::Train, false)
                .unwrap();
            m.update_running_stats(&e.bn_stats);
        }
        let kinds: Vec<EntryKind> = m
            .entries()
            .iter()
            .map(|e| e.kind)
            .filter(|k| k.trainable())
            .collect();
        for (p, k) in m.params_mut().into_iter().zip(kinds) {
            let (lo, hi) = match k {
                EntryKind::BnWeight => (0.5, 1.5),
                EntryKind::BnBias => (-0.3, 0.3),
                _ => continue,
            };
            p.data_mut()
                .iter_mut()
                .for_each(|v| *v = rng.gen_range(lo..hi));
        }
    }
    m
}

fn data(n: usize, seed: u64) -> (Tensor<f64>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Tensor::<f64>::randn(&[n, 3, 32, 32], &mut rng);
    let labels = (0..n).map(|_| rng.gen_range(0..10)).collect();
    (x, labels)
}

/// Basis-HVP trace of the given tensors (all when `None`) of the loss through
/// `Model::forward`, `k` directions per pass.
fn basis(
    m: &Model<f64>,
    x: &Tensor<f64>,
    labels: &[usize],
    tensors: Option<&[usize]>,
    k: usize,
) -> ExactTrace {
    let params = m.params_cloned();
    let h = Hessian::from_fn(
        &params,
        |t: &mut Tape<f64>, v| {
            let xv = t.constant(x.clone());
            let (z, _) = m
                .forward(t, v, xv, BnUse::Eval)
                .map_err(EngineError::from)?;
            t.cross_entropy(z, labels)
        },
        HvpConfig::with_directions(k),
    )
    .unwrap();
    match tensors {
        None => exact_trace(&h).unwrap(),
        Some(t) => exact_trace_of(&h, t).unwrap(),
    }
}

fn structural(
    m: &Model<f64>,
    x: &Tensor<f64>,
    labels: &[usize],
    diagonal: bool,
) -> StructuralTrace {
    let opts = StructuralOptions {
        diagonal,
        ..StructuralOptions::default()
    };
    structural_trace(
        m.net(),
        &m.params_cloned(),
        &m.norm_stats(BnUse::Eval),
        x,
        labels,
        &opts,
    )
    .unwrap()
}

/// Compares the per-tensor traces (and diagonals, when present) of the basis result `e` with
/// the structural `s`; returns the worst relative error.
fn compare(name: &str, m: &Model<f64>, s: &StructuralTrace, e: &ExactTrace) -> f64 {
    let names = m.param_names();
    let mut worst: f64 = 0.0;
    for b in &e.blocks {
        let sb = &s.blocks[b.index];
        let err = (sb.trace - b.trace).abs() / b.trace.abs().max(1e-300);
        eprintln!(
            "{name}: {:<28} structural {:.15e} basis {:.15e} rel {err:.1e}",
            names[b.index], sb.trace, b.trace
        );
        worst = worst.max(err);
        if let Some(diag) = &sb.diagonal {
            let scale = b.diagonal.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
            for (x, y) in diag.iter().zip(&b.diagonal) {
                assert!(
                    (x - y).abs() <= 1e-10 * scale,
                    "{name}: {} diagonal {x} vs {y}",
                    names[b.index]
                );
            }
        }
    }
    worst
}

fn index(m: &Model<f64>, name: &str) -> usize {
    m.param_names()
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
}

#[test]
fn tiny_tanh_full_trace_and_diagonal() {
    let m = model(Arch::parse("tiny-tanh").unwrap(), 3);
    let (x, labels) = data(6, 4);
    let s = structural(&m, &x, &labels, true);
    let e = basis(&m, &x, &labels, None, 32);
    let err = (s.trace - e.trace).abs() / e.trace.abs();
    eprintln!(
        "tiny-tanh: structural {:.15e} (GGN {:.6e} + tanh {:.6e}) basis {:.15e} rel {err:.1e}",
        s.trace, s.ggn_trace, s.activation_trace, e.trace
    );
    assert!(err < 1e-10);
    assert!(compare("tiny-tanh", &m, &s, &e) < 1e-10);
    assert_eq!(s.dim, 6506);
    assert_eq!(s.class_columns, 10);
    assert!(s.source_columns <= 6 * 32);
}

#[test]
fn reduced_resnet_full_trace_with_batchnorm_eval() {
    let arch = Arch::ResNet {
        blocks: vec![1, 1],
        widths: vec![4, 8],
    };
    let m = model(arch, 5);
    let (x, labels) = data(2, 6);
    let s = structural(&m, &x, &labels, true);
    let e = basis(&m, &x, &labels, None, 32);
    let err = (s.trace - e.trace).abs() / e.trace.abs();
    eprintln!(
        "resnet [4, 8]: structural {:.15e} basis {:.15e} rel {err:.1e} d {}",
        s.trace, e.trace, s.dim
    );
    assert!(err < 1e-10);
    assert!(compare("resnet [4, 8]", &m, &s, &e) < 1e-10);
}

#[test]
fn mlp_s_chosen_tensors() {
    let m = model(Arch::parse("mlp-s").unwrap(), 7);
    let (x, labels) = data(2, 8);
    let s = structural(&m, &x, &labels, true);
    let pick: Vec<usize> = ["layers.0.bias", "layers.1.bias", "layers.2.bias"]
        .iter()
        .map(|n| index(&m, n))
        .collect();
    let e = basis(&m, &x, &labels, Some(&pick), 32);
    assert!(compare("mlp-s", &m, &s, &e) < 1e-10);
    assert_eq!(s.activation_trace, 0.0);
}

#[test]
fn cnn_s_chosen_tensors() {
    let (x, labels) = data(2, 8);
    let m = model(Arch::parse("cnn-s").unwrap(), 9);
    let s = structural(&m, &x, &labels, true);
    let pick: Vec<usize> = [
        "conv1.weight",
        "conv1.bias",
        "conv2.bias",
        "fc1.bias",
        "fc2.bias",
    ]
    .iter()
    .map(|n| index(&m, n))
    .collect();
    let e = basis(&m, &x, &labels, Some(&pick), 32);
    assert!(compare("cnn-s", &m, &s, &e) < 1e-10);
}

/// Hessian diagonal entries `e_jᵀ H e_j` at `(tensor, element)` coordinates, by one
/// forward-over-reverse pass with one unit direction per coordinate.
fn diagonal_entries(
    m: &Model<f64>,
    x: &Tensor<f64>,
    labels: &[usize],
    coords: &[(usize, usize)],
) -> Vec<f64> {
    let params = m.params_cloned();
    let dirs: Vec<Vec<Tensor<f64>>> = coords
        .iter()
        .map(|&(t, e)| {
            params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut z = Tensor::zeros(p.shape());
                    if i == t {
                        z.data_mut()[e] = 1.0;
                    }
                    z
                })
                .collect()
        })
        .collect();
    let ev = m.evaluate(x, labels, &dirs, BnUse::Eval, true).unwrap();
    coords
        .iter()
        .enumerate()
        .map(|(k, &(t, e))| ev.hvps[k][t].data()[e])
        .collect()
}

/// Structural traces with and without the diagonal (the convolutions' Gram route) agree,
/// and the diagonal matches single-coordinate HVPs deep in the network.
fn check_deep(
    name: &str,
    m: &Model<f64>,
    x: &Tensor<f64>,
    labels: &[usize],
    coords: &[(&str, usize)],
) {
    let with = structural(m, x, labels, true);
    let without = structural(m, x, labels, false);
    for (a, b) in with.blocks.iter().zip(&without.blocks) {
        let err = (a.trace - b.trace).abs() / a.trace.abs().max(1e-300);
        assert!(
            err < 1e-12,
            "{name}: tensor {} direct {} Gram {}",
            a.index,
            a.trace,
            b.trace
        );
    }
    let coords: Vec<(usize, usize)> = coords.iter().map(|&(n, e)| (index(m, n), e)).collect();
    let want = diagonal_entries(m, x, labels, &coords);
    for (&(t, e), w) in coords.iter().zip(want) {
        let got = with.blocks[t].diagonal.as_ref().unwrap()[e];
        let err = (got - w).abs() / w.abs().max(1e-300);
        eprintln!(
            "{name}: H[{}[{e}]] structural {got:.15e} HVP {w:.15e} rel {err:.1e}",
            m.param_names()[t]
        );
        assert!(err < 1e-10);
    }
}

#[test]
fn resnet20_and_resnet18_chosen_tensors_with_batchnorm_eval() {
    let m = model(Arch::parse("resnet20").unwrap(), 11);
    let (x, labels) = data(2, 12);
    let s = structural(&m, &x, &labels, false);
    let pick: Vec<usize> = [
        "bn1.weight",
        "bn1.bias",
        "layer2.0.shortcut.1.weight",
        "layer3.2.bn2.bias",
        "linear.bias",
    ]
    .iter()
    .map(|n| index(&m, n))
    .collect();
    let e = basis(&m, &x, &labels, Some(&pick), 32);
    assert!(compare("resnet20", &m, &s, &e) < 1e-10);
    let deep = [
        ("conv1.weight", 7),
        ("layer1.0.conv2.weight", 100),
        ("layer2.0.shortcut.0.weight", 33),
        ("layer3.2.conv2.weight", 30_000),
        ("layer3.1.bn1.weight", 5),
        ("linear.weight", 321),
    ];
    check_deep("resnet20", &m, &x, &labels, &deep);

    let m = model(Arch::parse("resnet18").unwrap(), 13);
    let (x, labels) = data(1, 14);
    let s = structural(&m, &x, &labels, false);
    let e = basis(&m, &x, &labels, Some(&[index(&m, "linear.bias")]), 2);
    assert!(compare("resnet18", &m, &s, &e) < 1e-10);
    assert_eq!(s.dim, 11_173_962);
    let deep = [
        ("layer1.0.conv1.weight", 9),
        ("layer4.1.conv2.weight", 1_000_000),
    ];
    check_deep("resnet18", &m, &x, &labels, &deep);
}

#[test]
fn batchnorm_train_mode_is_refused_with_the_layer_named() {
    let m = model(Arch::parse("resnet20").unwrap(), 15);
    let sup = structural_support(
        m.net(),
        &m.params_cloned(),
        &m.norm_stats(BnUse::Train),
        &StructuralOptions::default(),
    )
    .unwrap();
    let reason = sup.refusal.expect("refused");
    eprintln!("{reason}");
    assert!(
        reason.contains("'bn1'") && reason.contains("train mode"),
        "{reason}"
    );
    let ok = structural_support(
        m.net(),
        &m.params_cloned(),
        &m.norm_stats(BnUse::Eval),
        &StructuralOptions::default(),
    )
    .unwrap();
    assert!(ok.applies());
}
