//! Bring your own network: a custom CNN defined in a few lines with the network builder,
//! trained for a few steps with RS (Algorithm 1 of the paper), then its exact Hessian trace
//! by structure (BatchNorm on running statistics), on a synthetic, learnable task.
//!
//! `cargo run --release -p flatmin-models --example custom_cnn_rs`

use flatmin_engine::curvature::{structural_trace, StructuralOptions};
use flatmin_engine::net::{Activation, ConvOptions, Net};
use flatmin_engine::Tensor;
use flatmin_models::{BnUse, Model};
use flatmin_optim::{Optimizer, Rs, RsConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// conv(3→16) → BN → ReLU → max-pool → conv(16→32, stride 2) → BN → ReLU → pool → linear →
/// GELU → linear. (A smooth activation on conv feature maps would make the structural trace
/// refuse: every unit is a curvature source; basis HVPs or Hutchinson measure those.)
fn my_cnn() -> flatmin_engine::Result<Net> {
    let mut net = Net::new(&[3, 32, 32]);
    let same = ConvOptions {
        padding: 1,
        bias: false,
        ..ConvOptions::default()
    };
    let mut h = net.conv2d("features.0", net.input(), 16, 3, same)?;
    h = net.batch_norm2d("features.1", h)?;
    h = net.relu(h)?;
    h = net.max_pool2d(h, 2, 2)?;
    h = net.conv2d("features.4", h, 32, 3, ConvOptions { stride: 2, ..same })?;
    h = net.batch_norm2d("features.5", h)?;
    h = net.relu(h)?;
    h = net.adaptive_avg_pool2d(h)?;
    h = net.flatten(h)?;
    h = net.linear("classifier.0", h, 32, true)?;
    h = net.activation(h, Activation::Gelu)?;
    net.linear("classifier.2", h, 10, true)?;
    Ok(net)
}

/// A batch whose class shifts one colour channel.
fn batch(rng: &mut StdRng, n: usize) -> (Tensor<f32>, Vec<usize>) {
    let labels: Vec<usize> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    let mut x = Tensor::<f32>::randn(&[n, 3, 32, 32], rng);
    for (i, &c) in labels.iter().enumerate() {
        let plane = &mut x.data_mut()[i * 3072 + (c % 3) * 1024..][..1024];
        plane.iter_mut().for_each(|v| *v += 0.3 * c as f32);
    }
    (x, labels)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = Model::<f32>::new(my_cnn()?, 0);
    println!(
        "{} parameters: {:?}",
        model.num_params(),
        model.param_names()
    );
    let mut rs = Rs::new(RsConfig::paper(0.05, 0.05, f64::INFINITY, 1))?;
    let mut rng = StdRng::seed_from_u64(2);
    let mut params = model.params_cloned();
    for step in 0..20 {
        let (x, labels) = batch(&mut rng, 32);
        let mut stats = Vec::new();
        let mut oracle = |p: &[Tensor<f32>]| {
            let refs: Vec<&Tensor<f32>> = p.iter().collect();
            let e = model
                .evaluate_at(&refs, &x, &labels, &[], BnUse::Train, true)
                .map_err(|e| flatmin_optim::OptimError::Oracle(e.to_string()))?;
            if stats.is_empty() {
                stats = e.bn_stats; // the first evaluation of a step is at the iterate
            }
            Ok((e.loss, e.grads))
        };
        let info = rs.step(&mut params, &mut oracle, 0.05)?;
        model.update_running_stats(&stats);
        if step % 5 == 0 {
            println!(
                "step {step:2}: loss {:.4}, |grad| {:.3}",
                info.loss, info.grad_norm
            );
        }
    }
    model.set_params(params)?;
    let m64 = model.cast::<f64>();
    let (x, labels) = batch(&mut rng, 64);
    let tr = structural_trace(
        m64.net(),
        &m64.params_cloned(),
        &m64.norm_stats(BnUse::Eval),
        &x.cast(),
        &labels,
        &StructuralOptions::default(),
    )?;
    println!(
        "exact trace tr(H) = {:.6e}, tr(H)/d = {:.6e} (d = {}), loss {:.4}",
        tr.trace, tr.normalized_trace, tr.dim, tr.loss
    );
    Ok(())
}
