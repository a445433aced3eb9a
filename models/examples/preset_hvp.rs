//! Loss, gradient and Hessian-vector product of a preset on a random batch, with timings.
//!
//! `cargo run --release -p flatmin-models --example preset_hvp -- cnn-s 128 [K]`

use flatmin_engine::Tensor;
use flatmin_models::{BnUse, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    flatmin_engine::runtime::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("mlp-s");
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let k: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let model = Model::<f32>::named(name, 0)?;
    let mut rng = StdRng::seed_from_u64(0);
    let x = Tensor::<f32>::randn(&[batch, 3, 32, 32], &mut rng);
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let dirs: Vec<Vec<Tensor<f32>>> = (0..k)
        .map(|_| {
            model
                .params()
                .iter()
                .map(|p| Tensor::randn(p.shape(), &mut rng))
                .collect()
        })
        .collect();
    let bn = if model.net().has_batch_norm() {
        BnUse::Train
    } else {
        BnUse::Eval
    };
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut ts: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        ts[2]
    };
    let mut loss = 0.0;
    let grad_ms = time(&mut || loss = model.evaluate(&x, &labels, &[], bn, true).unwrap().loss);
    let mut vhv = 0.0;
    let hvp_ms = time(&mut || {
        let e = model.evaluate(&x, &labels, &dirs, bn, true).unwrap();
        vhv = e.hvps[0]
            .iter()
            .zip(&dirs[0])
            .map(|(h, v)| h.dot(v))
            .sum::<f64>();
    });
    println!(
        "{name} batch {batch}: loss {loss:.4}, grad {grad_ms:.1} ms, hvp(K={k}) {hvp_ms:.1} ms = {:.2}x grad ({:.2}x per direction), v1.Hv1 {vhv:.4e}",
        hvp_ms / grad_ms,
        hvp_ms / grad_ms / k as f64
    );
    Ok(())
}
