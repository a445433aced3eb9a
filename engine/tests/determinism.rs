//! Same inputs give bit-identical values, gradients and HVPs with 1, 2 and 3 threads, and
//! (for the ops without a convolution or GEMM) on every instruction-set path.

use flatmin_engine::curvature::hvp;
use flatmin_engine::{BnMode, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn run_in_pool(
    threads: usize,
    params: &[Tensor<f32>],
    dirs: &[Vec<Tensor<f32>>],
    x: &Tensor<f32>,
) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let labels: Vec<usize> = (0..x.shape()[0]).map(|i| i % 10).collect();
        let r = hvp(params, dirs, |t, v| {
            let xv = t.constant(x.clone());
            let h = t.conv2d(xv, v[0], Some(v[1]), 1, 1)?;
            let (h, _) = t.batch_norm2d(h, v[2], v[3], BnMode::Train, 1e-5)?;
            let h = t.relu(h)?;
            let h = t.max_pool2d(h, 2, 2)?;
            let h2 = t.conv2d(h, v[4], None, 2, 1)?;
            let h2 = t.gelu(h2)?;
            let h2 = t.global_avg_pool(h2)?;
            let f = t.flatten(h)?;
            let z1 = t.linear(f, v[5], Some(v[6]))?;
            let z2 = t.matmul(h2, v[7])?;
            let z = t.add(z1, z2)?;
            t.cross_entropy(z, &labels)
        })
        .unwrap();
        let mut out = vec![vec![r.loss]];
        out.extend(r.grad.iter().map(|g| g.data().to_vec()));
        for per_dir in &r.hvp {
            out.extend(per_dir.iter().map(|h| h.data().to_vec()));
        }
        out
    })
}

#[test]
fn one_and_two_threads_agree_bitwise() {
    let mut rng = StdRng::seed_from_u64(7);
    let shapes: Vec<Vec<usize>> = vec![
        vec![16, 3, 3, 3],
        vec![16],
        vec![16],
        vec![16],
        vec![8, 16, 3, 3],
        vec![10, 16 * 8 * 8],
        vec![10],
        vec![8, 10],
    ];
    let params: Vec<Tensor<f32>> = shapes.iter().map(|s| Tensor::randn(s, &mut rng)).collect();
    let dirs: Vec<Vec<Tensor<f32>>> = (0..3)
        .map(|_| shapes.iter().map(|s| Tensor::randn(s, &mut rng)).collect())
        .collect();
    let x = Tensor::randn(&[37, 3, 16, 16], &mut rng);
    let a = run_in_pool(1, &params, &dirs, &x);
    let b = run_in_pool(2, &params, &dirs, &x);
    let c = run_in_pool(3, &params, &dirs, &x);
    assert_eq!(a.len(), b.len());
    for (i, ((a, b), c)) in a.iter().zip(&b).zip(&c).enumerate() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(a),
            bits(b),
            "output {i} differs between 1 and 2 threads"
        );
        assert_eq!(
            bits(a),
            bits(c),
            "output {i} differs between 1 and 3 threads"
        );
    }
}

/// Loss, gradient and HVP bits of a graph of BatchNorm, ReLU, tanh, residual add, product and
/// pooling (and BatchNorm and the add with their ReLU epilogues) only (the ops whose loops run through `kernels::cpu::vectorized`, no convolution
/// or GEMM), as one FNV-1a digest.
fn elementwise_digest() -> u64 {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: Vec<Vec<usize>> = vec![vec![20, 10, 12, 12], vec![10], vec![10]];
    let params: Vec<Tensor<f32>> = shapes.iter().map(|s| Tensor::randn(s, &mut rng)).collect();
    let dirs: Vec<Vec<Tensor<f32>>> = (0..2)
        .map(|_| shapes.iter().map(|s| Tensor::randn(s, &mut rng)).collect())
        .collect();
    let labels: Vec<usize> = (0..20).map(|i| i % 10).collect();
    let r = hvp(&params, &dirs, |t, v| {
        let (h, _) = t.batch_norm2d(v[0], v[1], v[2], BnMode::Train, 1e-5)?;
        let h = t.relu(h)?;
        let (f, _) = t.batch_norm2d_relu(v[0], v[1], v[2], BnMode::Train, 1e-5)?;
        let h = t.add_relu(h, f)?;
        let h = t.add(h, v[0])?;
        let g = t.tanh(h)?;
        let h = t.mul(h, g)?;
        let p = t.global_avg_pool(h)?;
        t.cross_entropy(p, &labels)
    })
    .unwrap();
    let mut bits = vec![r.loss.to_bits()];
    for t in r.grad.iter().chain(r.hvp.iter().flatten()) {
        bits.extend(t.data().iter().map(|x| x.to_bits()));
    }
    bits.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The elementwise, BatchNorm and reduction loops give the same bits on every instruction
/// set path (this process's widest, and `FLATMIN_ISA=avx2` and `portable` in child
/// processes): the vectorized builds keep each loop's operations and their order.
#[test]
fn elementwise_ops_agree_bitwise_across_instruction_sets() {
    let here = elementwise_digest();
    if std::env::var_os("FLATMIN_ISA").is_some() {
        println!("DIGEST {here:016x}"); // the child: report and stop
        return;
    }
    for isa in ["avx2", "portable"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "elementwise_ops_agree_bitwise_across_instruction_sets",
                "--exact",
                "--nocapture",
            ])
            .env("FLATMIN_ISA", isa)
            .output()
            .expect("rerun the test in a child process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child with FLATMIN_ISA={isa}:\n{stdout}"
        );
        let want = format!("DIGEST {here:016x}");
        assert!(
            stdout.contains(&want),
            "FLATMIN_ISA={isa} gives other bits than this process ({want}):\n{stdout}"
        );
    }
}
