//! A custom MLP trained by hand-written SGD in a few lines, on a synthetic, learnable task
//! (the class is encoded in the mean colour of the image).
//!
//! `cargo run --release -p flatmin-models --example custom_mlp_sgd`

use flatmin_engine::Tensor;
use flatmin_models::{BnUse, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = Model::<f32>::named("mlp:192,64,10:gelu:pool4", 0)?;
    let mut rng = StdRng::seed_from_u64(1);
    let (n, lr) = (64, 0.1f32);
    for step in 0..=100 {
        // A fresh batch: class c shifts channel c % 3 by a class-dependent amount.
        let labels: Vec<usize> = (0..n).map(|_| rng.gen_range(0..10)).collect();
        let mut x = Tensor::<f32>::randn(&[n, 3, 32, 32], &mut rng);
        for (i, &c) in labels.iter().enumerate() {
            let plane = &mut x.data_mut()[i * 3072 + (c % 3) * 1024..][..1024];
            plane.iter_mut().for_each(|v| *v += 0.3 * c as f32);
        }
        let eval = model.evaluate(&x, &labels, &[], BnUse::Eval, true)?;
        for (p, g) in model.params_mut().into_iter().zip(&eval.grads) {
            p.axpy(-lr, g); // θ ← θ − η ∇L
        }
        if step % 20 == 0 {
            println!("step {step:3}: loss {:.4}", eval.loss);
        }
    }
    Ok(())
}
