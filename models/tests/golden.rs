//! Golden tests against PyTorch (float64): logits, loss, every parameter gradient and every
//! Hessian-vector product of every preset, in both BatchNorm modes, plus real float32
//! PyTorch checkpoints loaded into flatmin.
//!
//! The fixtures in `tests/fixtures/` come from `tools/make_fixtures.py` (see its docstring):
//! the weights, batch and direction are not stored but regenerated here from the same
//! counter-based generator (`common/mod.rs`), bit for bit. No Python or network is needed.
//!
//! Run with `cargo test -p flatmin-models --test golden -- --nocapture` to see the measured
//! errors. Bounds: float64, relative error (max |Δ| / max |ref| per tensor, plus the sum and
//! sum of squares of sampled tensors) <= 1e-8; float32, max |Δ| <= 2e-3 x the largest
//! reference magnitude among all tensors of the same kind (logits, loss, gradients, HVPs).

mod common;

use common::*;
use flatmin_engine::Tensor;
use flatmin_models::io::{read_safetensors, RawData};
use flatmin_models::{BnUse, EntryKind, EntryValue, Evaluation, Model};

const F64_TOL: f64 = 1e-8;
const F32_TOL: f64 = 2e-3;

fn f64s<T: flatmin_engine::Scalar>(t: &Tensor<T>) -> Vec<f64> {
    t.data().iter().map(|x| x.to_f64().unwrap()).collect()
}

/// The preset's state_dict order and shapes must be PyTorch's, as recorded in the fixture.
fn check_state_order(fx: &Fixture, model: &Model<f64>) {
    let want = fx.state_order();
    let got: Vec<(String, Vec<usize>)> = model
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    assert_eq!(
        got,
        want,
        "{}: flatmin's state differs from PyTorch's state_dict",
        fx.path.display()
    );
}

/// The batch regenerated here must be bit-identical to the one PyTorch used.
fn check_batch(fx: &Fixture, x: &Tensor<f64>, labels: &[usize]) {
    let stored = fx.stored("input.x");
    let picked = stored.pick(x.data());
    assert_eq!(
        stored.shape(),
        x.shape(),
        "{}: input shape",
        fx.path.display()
    );
    for (k, (a, r)) in picked.iter().zip(stored.values()).enumerate() {
        assert_eq!(
            a.to_bits(),
            r.to_bits(),
            "{}: input.x sample {k} differs: {a} vs {r}",
            fx.path.display()
        );
    }
    let want: Vec<usize> = fx
        .i64s("input.labels")
        .into_iter()
        .map(|l| l as usize)
        .collect();
    assert_eq!(labels, want, "{}: labels differ", fx.path.display());
}

/// The full set of reference outputs of one evaluation, by name, in comparison order.
fn outputs(
    fx: &Fixture,
    names: &[&str],
    derivatives: bool,
    logits: &str,
    loss: &str,
) -> Vec<(String, String, Stored)> {
    let mut out = vec![
        ("logits".to_string(), logits.to_string(), fx.stored(logits)),
        ("loss".to_string(), loss.to_string(), fx.stored(loss)),
    ];
    if derivatives {
        for kind in ["grad", "hvp"] {
            for n in names {
                let name = format!("{kind}.{n}");
                out.push((kind.to_string(), name.clone(), fx.stored(&name)));
            }
        }
    }
    out
}

/// The actual tensor (shape, values as f64) for a reference output.
fn actual<T: flatmin_engine::Scalar>(
    e: &Evaluation<T>,
    kind: &str,
    index: usize,
) -> (Vec<usize>, Vec<f64>) {
    match kind {
        "logits" => (e.logits.shape().to_vec(), f64s(&e.logits)),
        "loss" => (vec![1], vec![e.loss.to_f64().unwrap()]),
        "grad" => (e.grads[index].shape().to_vec(), f64s(&e.grads[index])),
        "hvp" => (e.hvps[0][index].shape().to_vec(), f64s(&e.hvps[0][index])),
        _ => unreachable!(),
    }
}

/// Float64 comparison: worst relative error per kind.
fn compare_f64(fx: &Fixture, refs: &[(String, String, Stored)], e: &Evaluation<f64>) -> Worst {
    let mut worst = Worst::default();
    let mut index = std::collections::HashMap::<String, usize>::new();
    for (kind, name, stored) in refs {
        let i = index.entry(kind.clone()).or_insert(0);
        let (shape, values) = actual(e, kind, *i);
        *i += 1;
        let what = format!("{} {name}", fx.path.display());
        worst.note(kind, rel_error(&what, stored, &shape, &values), name);
    }
    worst
}

/// Float32 comparison: per kind, max |Δ| / (largest reference magnitude of that kind).
fn compare_f32(fx: &Fixture, refs: &[(String, String, Stored)], e: &Evaluation<f32>) -> Worst {
    let mut scale = std::collections::HashMap::<String, f64>::new();
    for (kind, _, stored) in refs {
        let s = scale.entry(kind.clone()).or_insert(0.0);
        *s = s.max(stored.max_abs());
    }
    let mut worst = Worst::default();
    let mut index = std::collections::HashMap::<String, usize>::new();
    for (kind, name, stored) in refs {
        let i = index.entry(kind.clone()).or_insert(0);
        let (shape, values) = actual(e, kind, *i);
        *i += 1;
        let what = format!("{} {name} (f32)", fx.path.display());
        let s = scale[kind];
        let err = abs_error(&what, stored, &shape, &values);
        worst.note(kind, if s > 0.0 { err / s } else { err }, name);
    }
    worst
}

/// A copy of the model whose running statistics are far from the generated ones.
fn perturbed_running_stats(model: &Model<f64>) -> Model<f64> {
    let mut raw = model.to_raw();
    for (t, e) in raw.iter_mut().zip(model.entries()) {
        if let RawData::F64(v) = &mut t.data {
            match e.kind {
                EntryKind::RunningMean => v.iter_mut().for_each(|x| *x += 3.0),
                EntryKind::RunningVar => v.iter_mut().for_each(|x| *x *= 7.0),
                _ => {}
            }
        }
    }
    let mut m = model.clone();
    m.load_raw(std::path::Path::new("<perturbed>"), raw)
        .unwrap();
    m
}

fn same_bits(a: &Evaluation<f64>, b: &Evaluation<f64>) -> bool {
    let eq = |x: &Tensor<f64>, y: &Tensor<f64>| {
        x.data()
            .iter()
            .zip(y.data())
            .all(|(p, q)| p.to_bits() == q.to_bits())
    };
    eq(&a.logits, &b.logits)
        && a.loss.to_bits() == b.loss.to_bits()
        && a.grads.iter().zip(&b.grads).all(|(x, y)| eq(x, y))
        && a.hvps
            .iter()
            .flatten()
            .zip(b.hvps.iter().flatten())
            .all(|(x, y)| eq(x, y))
}

/// One golden case: `<case>.safetensors`, preset `preset`, BatchNorm mode `bn` (`"none"`,
/// `"train"` or `"eval"`), with or without gradient and HVP.
fn golden(case: &str, preset: &str, bn: &str, derivatives: bool) {
    let fx = Fixture::open(&format!("{case}.safetensors"));
    let p = fx.path.display().to_string();
    assert_eq!(fx.meta("model"), preset, "{p}");
    assert_eq!(fx.meta("bn_mode"), bn, "{p}");
    assert_eq!(
        fx.meta("derivatives"),
        if derivatives { "grad,hvp" } else { "none" },
        "{p}"
    );
    let seed = fx.seed();
    let n: usize = fx.meta("batch").parse().unwrap();

    // Generator, state layout, generated state and batch agree with the Python side.
    let want_bits: Vec<i64> = bits(seed, 0, 4).into_iter().map(|b| b as i64).collect();
    assert_eq!(
        fx.i64s("check.bits"),
        want_bits,
        "{p}: generator bits differ from Python's"
    );
    let loss_fn = flatmin_engine::Loss::parse(fx.meta_or("loss", "ce"))
        .unwrap_or_else(|| panic!("{p}: unknown loss {}", fx.meta("loss")));
    let model = generated_model(preset, seed).with_loss_fn(loss_fn);
    check_state_order(&fx, &model);
    assert_eq!(
        fx.meta("params"),
        model.param_names().join(","),
        "{p}: trainable parameters"
    );
    for e in model.entries() {
        if let EntryValue::Float(t) = &e.value {
            let want = fx.raw(&format!("init.{}", e.name)).data.to_f64().unwrap();
            let got = stats(t.data());
            let err = [
                (got[0] - want[0]).abs() / want[2],
                (got[1] - want[1]).abs() / want[1],
                (got[2] - want[2]).abs() / want[2],
            ];
            assert!(
                err.iter().all(|&x| x <= 1e-12),
                "{p}: generated {} differs from Python's: {got:?} vs {want:?}",
                e.name
            );
        }
    }
    let (x, labels) = make_batch(seed, n);
    check_batch(&fx, &x, &labels);

    let bn_use = if bn == "eval" {
        BnUse::Eval
    } else {
        BnUse::Train
    };
    let dirs = if derivatives {
        vec![direction(&model, seed)]
    } else {
        vec![]
    };
    let names = model.param_names();
    let refs = outputs(&fx, &names, derivatives, "logits", "loss");

    // float64
    let e = model
        .evaluate(&x, &labels, &dirs, bn_use, derivatives)
        .unwrap_or_else(|err| panic!("{p}: {err}"));
    if derivatives {
        assert_eq!(e.grads.len(), names.len(), "{p}");
        assert_eq!(e.hvps.len(), 1, "{p}");
    }
    let w64 = compare_f64(&fx, &refs, &e);

    // BatchNorm train mode: running statistics must not influence anything, and folding the
    // batch statistics into them must give PyTorch's running statistics after one forward.
    let mut stats_err = 0.0f64;
    if bn == "train" {
        let other = perturbed_running_stats(&model);
        let e2 = other
            .evaluate(&x, &labels, &dirs, bn_use, derivatives)
            .unwrap();
        assert!(
            same_bits(&e, &e2),
            "{p}: train-mode outputs depend on the running statistics"
        );
        let mut updated = model.clone();
        updated.update_running_stats(&e.bn_stats);
        for entry in updated.entries() {
            let name = format!("after.{}", entry.name);
            match (&entry.value, entry.kind) {
                (EntryValue::Float(t), EntryKind::RunningMean | EntryKind::RunningVar) => {
                    let err = rel_error(
                        &format!("{p} {name}"),
                        &fx.stored(&name),
                        t.shape(),
                        t.data(),
                    );
                    stats_err = stats_err.max(err);
                }
                (EntryValue::Count(c), _) => assert_eq!(vec![*c], fx.i64s(&name), "{p}: {name}"),
                _ => {}
            }
        }
    }

    // float32: the same inputs, cast.
    let m32 = model.cast::<f32>();
    let dirs32: Vec<Vec<Tensor<f32>>> = dirs
        .iter()
        .map(|d| d.iter().map(|t| t.cast()).collect())
        .collect();
    let e32 = m32
        .evaluate(&x.cast(), &labels, &dirs32, bn_use, derivatives)
        .unwrap_or_else(|err| panic!("{p} (f32): {err}"));
    let w32 = compare_f32(&fx, &refs, &e32);

    eprintln!("golden {case}: f64 rel {}", w64.summary());
    if bn == "train" {
        eprintln!("golden {case}: f64 running stats after update rel {stats_err:.2e}");
    }
    eprintln!("golden {case}: f32 abs/scale {}", w32.summary());
    assert!(
        w64.max() <= F64_TOL,
        "{p}: float64 error above {F64_TOL:e}: {}",
        w64.summary()
    );
    assert!(
        stats_err <= F64_TOL,
        "{p}: running statistics after update differ: {stats_err:e}"
    );
    assert!(
        w32.max() <= F32_TOL,
        "{p}: float32 error above {F32_TOL:e}: {}",
        w32.summary()
    );
}

/// A float32 state_dict saved by PyTorch loads into flatmin and gives PyTorch's float64
/// logits (computed from the same float32-rounded weights), in eval and train mode.
fn checkpoint(case: &str, preset: &str) {
    let ckpt = fixture_dir().join(format!("{case}.safetensors"));
    assert!(ckpt.is_file(), "checkpoint fixture {} is missing: regenerate it with `/work/venv/bin/python tools/make_fixtures.py`", ckpt.display());
    let fx = Fixture::open(&format!("{case}.expected.safetensors"));
    let p = ckpt.display().to_string();
    assert_eq!(fx.meta("model"), preset, "{p}");

    let raw = read_safetensors(&ckpt).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mut model = Model::<f64>::named(preset, 0).unwrap();
    model
        .load(&ckpt)
        .unwrap_or_else(|e| panic!("{p}: flatmin cannot load PyTorch's checkpoint: {e}"));
    check_state_order(&fx, &model);
    let has_bn = model.net().has_batch_norm();
    for entry in model.entries() {
        let t = raw.iter().find(|t| t.name == entry.name).unwrap();
        match (&entry.value, &t.data) {
            (EntryValue::Float(v), RawData::F32(w)) => {
                assert!(
                    v.data().iter().zip(w).all(|(a, &b)| *a == b as f64),
                    "{p}: {} not loaded exactly",
                    entry.name
                )
            }
            (EntryValue::Count(c), RawData::I64(w)) => {
                assert_eq!(*c, w[0], "{p}: {}", entry.name);
                assert!(
                    has_bn && *c == 2,
                    "{p}: {} should count the two train-mode forwards",
                    entry.name
                );
            }
            _ => panic!(
                "{p}: {} has an unexpected dtype for a PyTorch float32 checkpoint",
                entry.name
            ),
        }
        if entry.kind == EntryKind::RunningVar {
            let EntryValue::Float(v) = &entry.value else {
                unreachable!()
            };
            assert!(
                v.data().iter().any(|&s| s != 1.0),
                "{p}: running statistics are trivial"
            );
        }
    }

    let seed = fx.seed();
    let n: usize = fx.meta("batch").parse().unwrap();
    let (x, labels) = make_batch(seed, n);
    check_batch(&fx, &x, &labels);
    let m32 = model.cast::<f32>();
    let mut lines = Vec::new();
    let mut fail = Vec::new();
    for (mode, bn) in [("eval", BnUse::Eval), ("train", BnUse::Train)] {
        let refs = outputs(
            &fx,
            &[],
            false,
            &format!("logits.{mode}"),
            &format!("loss.{mode}"),
        );
        let e = model
            .evaluate(&x, &labels, &[], bn, false)
            .unwrap_or_else(|err| panic!("{p}: {err}"));
        let w64 = compare_f64(&fx, &refs, &e);
        let e32 = m32.evaluate(&x.cast(), &labels, &[], bn, false).unwrap();
        let w32 = compare_f32(&fx, &refs, &e32);
        lines.push(format!(
            "golden {case} ({mode}): f64 rel {} | f32 abs/scale {}",
            w64.summary(),
            w32.summary()
        ));
        if w64.max() > F64_TOL || w32.max() > F32_TOL {
            fail.push(format!(
                "{mode}: f64 {} | f32 {}",
                w64.summary(),
                w32.summary()
            ));
        }
    }
    for l in &lines {
        eprintln!("{l}");
    }
    assert!(
        fail.is_empty(),
        "{p}: errors above bounds (f64 {F64_TOL:e}, f32 {F32_TOL:e}): {}",
        fail.join("; ")
    );
}

#[test]
fn generator_is_stable() {
    // Pinned outputs: a change of the generator on either side shows up here first.
    // Values printed by tools/make_fixtures.py's bits(1, 0, 2), uniform(7, 3, (3,), -1, 1)
    // and make_batch(5, 4) labels.
    assert_eq!(
        bits(1, 0, 2),
        [0x4dde_6a93_2774_7019, 0x43c1_1d02_5efd_26e3]
    );
    assert_eq!(
        uniform(7, 3, 3, -1.0, 1.0),
        [
            0.12335294532839836,
            -0.3705668378394986,
            -0.5876959470362089
        ]
    );
    assert_eq!(make_batch(5, 4).1, [4, 0, 5, 0]);
    assert_eq!(sample_indices(4097)[..3], [0, 1, 2]);
    assert_eq!(*sample_indices(10_000).last().unwrap(), 9_999);
    let u = uniform(7, 3, 1000, -1.0, 1.0);
    assert!(u.iter().all(|&v| (-1.0..1.0).contains(&v)));
}

#[test]
fn golden_tiny_tanh() {
    golden("tiny-tanh", "tiny-tanh", "none", true);
}

#[test]
fn golden_mse_tiny_tanh_cnn_s_and_resnet20() {
    golden("tiny-tanh-mse", "tiny-tanh", "none", true);
    golden("cnn-s-mse", "cnn-s", "none", true);
    golden("resnet20-eval-mse", "resnet20", "eval", true);
}

#[test]
fn golden_mlp_s() {
    golden("mlp-s", "mlp-s", "none", true);
}

#[test]
fn golden_cnn_s() {
    golden("cnn-s", "cnn-s", "none", true);
}

#[test]
fn golden_resnet20_train() {
    golden("resnet20-train", "resnet20", "train", true);
}

#[test]
fn golden_resnet20_eval() {
    golden("resnet20-eval", "resnet20", "eval", true);
}

#[test]
fn golden_resnet18_train() {
    golden("resnet18-train", "resnet18", "train", true);
}

#[test]
fn golden_resnet18_eval() {
    golden("resnet18-eval", "resnet18", "eval", true);
}

#[test]
fn pytorch_checkpoint_tiny_tanh() {
    checkpoint("tiny-tanh-ckpt", "tiny-tanh");
}

#[test]
fn pytorch_checkpoint_resnet20() {
    checkpoint("resnet20-ckpt", "resnet20");
}

/// The golden comparisons again in a child process with `FLATMIN_ISA=avx2`: the AVX2+FMA
/// kernels (what a machine without AVX-512 runs) meet the same tolerances. On a machine
/// without AVX2 the child runs the portable path, which must pass as well.
#[test]
fn golden_on_the_avx2_path() {
    if std::env::var_os("FLATMIN_ISA").is_some() {
        return; // already the child (or a run that chose its path itself)
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["golden_", "--test-threads", "2"])
        .env("FLATMIN_ISA", "avx2")
        .output()
        .expect("rerun the golden tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "golden tests under FLATMIN_ISA=avx2 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("test golden_cnn_s ... ok"), "{stdout}");
}
