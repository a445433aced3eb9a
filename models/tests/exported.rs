//! Networks exported from PyTorch (`tools/export_torch.py`) against PyTorch float64: every
//! folder of `fixtures/nets/` (written by `tools/make_net_fixtures.py`, whose docstring gives
//! the layout) holds a network file, its `state_dict` and the references. Logits, loss,
//! gradients and HVPs in BatchNorm train and eval mode, and the exact trace by structure in
//! eval mode, must agree to 1e-8 relative. Point `FLATMIN_NET_FIXTURES` at another folder of
//! such cases to check other networks and weights.

use flatmin_engine::curvature::{structural_trace, StructuralOptions};
use flatmin_engine::Tensor;
use flatmin_models::io::{read_safetensors, RawData, RawTensor};
use flatmin_models::{BnUse, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-8;

fn cases_dir() -> PathBuf {
    std::env::var_os("FLATMIN_NET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nets"))
}

struct Case {
    name: String,
    model: Model<f64>,
    tensors: HashMap<String, RawTensor>,
}

impl Case {
    fn load(dir: &Path) -> Case {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let net = dir.join("network.json");
        let mut model =
            Model::<f64>::named(net.to_str().unwrap(), 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        model
            .load(&dir.join("weights.safetensors"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tensors = read_safetensors(&dir.join("case.safetensors"))
            .unwrap()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Case {
            name,
            model,
            tensors,
        }
    }

    fn values(&self, key: &str) -> Vec<f64> {
        let t = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no '{key}' in case.safetensors", self.name));
        match &t.data {
            RawData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            other => other.to_f64().expect("float data"),
        }
    }

    fn tensor(&self, key: &str) -> Tensor<f64> {
        let shape = self.tensors[key].shape.clone();
        Tensor::from_vec(&shape, self.values(key)).unwrap()
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// `max |a - b| / max |b|`, asserted below [`TOL`].
fn check(what: &str, got: &[f64], want: &[f64]) -> f64 {
    check_scaled(what, got, want, 0.0)
}

/// `max |a - b| / max(max |b|, floor)`, asserted below [`TOL`]. The floor is the largest
/// entry of the whole vector a block belongs to (gradient, HVP): a block that is zero in
/// exact arithmetic (a conv bias before train-mode BatchNorm) holds rounding noise only.
fn check_scaled(what: &str, got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = max_abs(want).max(floor).max(1e-300);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(err <= TOL, "{what}: relative error {err:.2e}");
    err
}

fn all_cases() -> Vec<Case> {
    let dir = cases_dir();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("network.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "{}: no case folders", dir.display());
    dirs.iter().map(|d| Case::load(d)).collect()
}

#[test]
fn logits_loss_gradients_and_hvps_match_pytorch_in_both_batchnorm_modes() {
    let cases = all_cases();
    if std::env::var_os("FLATMIN_NET_FIXTURES").is_none() {
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["gelu_mlp", "small_resnet", "vgg_bn"]);
    }
    for case in &cases {
        let x = case.tensor("x");
        let labels: Vec<usize> = case.values("y").iter().map(|&l| l as usize).collect();
        let names = case.model.param_names();
        let v: Vec<Tensor<f64>> = names
            .iter()
            .map(|n| case.tensor(&format!("v.{n}")))
            .collect();
        for (mode, bn) in [("train", BnUse::Train), ("eval", BnUse::Eval)] {
            let e = case
                .model
                .evaluate(&x, &labels, std::slice::from_ref(&v), bn, true)
                .unwrap();
            let tag = |what: &str| format!("{} {mode} {what}", case.name);
            let mut worst = check(
                &tag("logits"),
                e.logits.data(),
                &case.values(&format!("{mode}.logits")),
            );
            worst = worst.max(check(
                &tag("loss"),
                &[e.loss],
                &case.values(&format!("{mode}.loss")),
            ));
            let grads: Vec<Vec<f64>> = names
                .iter()
                .map(|n| case.values(&format!("{mode}.grad.{n}")))
                .collect();
            let hvps: Vec<Vec<f64>> = names
                .iter()
                .map(|n| case.values(&format!("{mode}.hvp.{n}")))
                .collect();
            let g_max = grads.iter().fold(0.0f64, |m, g| m.max(max_abs(g)));
            let h_max = hvps.iter().fold(0.0f64, |m, h| m.max(max_abs(h)));
            for (i, n) in names.iter().enumerate() {
                let what = tag(&format!("grad {n}"));
                let err = check_scaled(&what, e.grads[i].data(), &grads[i], g_max);
                worst = worst.max(err);
                let what = tag(&format!("hvp {n}"));
                let err = check_scaled(&what, e.hvps[0][i].data(), &hvps[i], h_max);
                worst = worst.max(err);
            }
            eprintln!("{}: worst relative error {worst:.2e}", tag("all"));
        }
    }
}

#[test]
fn the_structural_exact_trace_matches_pytorch_in_eval_mode() {
    for case in all_cases() {
        let x = case.tensor("x");
        let labels: Vec<usize> = case.values("y").iter().map(|&l| l as usize).collect();
        let m = &case.model;
        let tr = structural_trace(
            m.net(),
            &m.params_cloned(),
            &m.norm_stats(BnUse::Eval),
            &x,
            &labels,
            &StructuralOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = case.values("eval.trace")[0];
        let err = check(&format!("{} trace", case.name), &[tr.trace], &[want]);
        eprintln!(
            "{}: structural trace {:.15e}, PyTorch {want:.15e}, relative error {err:.1e}, d = {}",
            case.name, tr.trace, tr.dim
        );
        for (block, name) in tr.blocks.iter().zip(m.param_names()) {
            let want = case.values(&format!("eval.trace.{name}"))[0];
            let err = (block.trace - want).abs() / want.abs().max(1e-12 * tr.trace.abs());
            assert!(
                err <= TOL,
                "{} block {name}: {} vs {want}",
                case.name,
                block.trace
            );
        }
    }
}
