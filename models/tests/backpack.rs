//! The structural exact trace and diagonal against BackPACK's DiagHessian (the exact Hessian
//! diagonal of sequential PyTorch nets), on tiny-tanh and cnn-s: fixtures made by
//! `tools/make_fixtures.py` (cases `backpack-*`) from the generated weights and images that
//! `common` regenerates bit for bit. Both sides in float64.

mod common;

use common::*;
use flatmin_engine::curvature::{structural_trace, StructuralOptions};
use flatmin_models::BnUse;

/// Largest error of `got` against the stored reference, relative to the reference's largest
/// magnitude.
fn worst(reference: &Stored, got: &[f64]) -> f64 {
    let scale = reference.max_abs().max(1e-300);
    reference
        .values()
        .iter()
        .zip(reference.pick(got))
        .map(|(r, g)| (r - g).abs() / scale)
        .fold(0.0, f64::max)
}

fn check(case: &str, preset: &str) {
    let fx = Fixture::open(&format!("{case}.safetensors"));
    assert_eq!(fx.meta("model"), preset);
    assert!(fx.meta("method").contains("DiagHessian"));
    let seed: u64 = fx.meta("seed").parse().unwrap();
    let n: usize = fx.meta("batch").parse().unwrap();
    let model = generated_model(preset, seed);
    let (x, labels) = make_batch(seed, n);
    let stored_labels: Vec<usize> = fx
        .i64s("input.labels")
        .iter()
        .map(|&l| l as usize)
        .collect();
    assert_eq!(labels, stored_labels, "{case}: regenerated labels");
    let opts = StructuralOptions {
        diagonal: true,
        ..StructuralOptions::default()
    };
    let r = structural_trace(
        model.net(),
        &model.params_cloned(),
        &model.norm_stats(BnUse::Eval),
        &x,
        &labels,
        &opts,
    )
    .unwrap();
    let loss = fx.stored("loss").values()[0];
    assert!(
        (r.loss - loss).abs() < 1e-12 * loss.abs(),
        "{case}: loss {} vs {loss}",
        r.loss
    );
    let want = fx.stored("trace").values()[0];
    let rel = (r.trace - want).abs() / want.abs();
    eprintln!(
        "{case}: structural trace {:.15e}, BackPACK {want:.15e}, relative error {rel:.1e}",
        r.trace
    );
    assert!(rel < 1e-9, "{case}: total trace");
    let names = model.param_names();
    assert_eq!(fx.meta("params"), names.join(","));
    for (name, b) in names.iter().zip(&r.blocks) {
        let t = fx.stored(&format!("trace.{name}")).values()[0];
        let rel_t = (b.trace - t).abs() / t.abs().max(1e-300);
        let diag = b.diagonal.as_ref().expect("diagonal asked for");
        let err = worst(&fx.stored(&format!("diag.{name}")), diag);
        eprintln!("  {name}: trace rel {rel_t:.1e}, diagonal worst {err:.1e}");
        assert!(rel_t < 1e-9, "{case} {name}: {} vs {t}", b.trace);
        assert!(err < 1e-9, "{case} {name}: diagonal");
    }
}

#[test]
fn tiny_tanh_matches_backpack_diag_hessian() {
    check("backpack-tiny-tanh", "tiny-tanh");
}

#[test]
fn cnn_s_matches_backpack_diag_hessian() {
    check("backpack-cnn-s", "cnn-s");
}
