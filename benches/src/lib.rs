//! Benchmark workloads shared by the criterion benches and `flatmin bench`: a preset model,
//! a random CIFAR-shaped batch, and random directions, all seeded.
#![warn(missing_docs)]

use flatmin_engine::kernels::gemm::{gemm_par, MatRef};
use flatmin_engine::{Scalar, Tensor};
use flatmin_models::{BnUse, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A model, a batch and K directions, ready to time.
pub struct Workload<T> {
    /// The model (PyTorch-default initialization, seed 0).
    pub model: Model<T>,
    /// Input batch `[N, 3, 32, 32]` (standard normal, like the reference scripts' `randn`).
    pub x: Tensor<T>,
    /// Labels `i % 10`.
    pub labels: Vec<usize>,
    /// K random directions, one tensor per parameter each.
    pub dirs: Vec<Vec<Tensor<T>>>,
    /// BatchNorm mode: train for networks with BatchNorm (as the reference benchmarks).
    pub bn: BnUse,
}

impl<T: Scalar> Workload<T> {
    /// Builds the workload for `model` (a preset name) at `batch` with `k` directions.
    pub fn new(model: &str, batch: usize, k: usize) -> flatmin_models::Result<Self> {
        let model = Model::<T>::named(model, 0)?;
        let mut rng = StdRng::seed_from_u64(0);
        let x = Tensor::randn(&[batch, 3, 32, 32], &mut rng);
        let labels = (0..batch).map(|i| i % 10).collect();
        let dirs = (0..k)
            .map(|_| model.params().iter().map(|p| Tensor::randn(p.shape(), &mut rng)).collect())
            .collect();
        let bn = if model.arch().has_batch_norm() { BnUse::Train } else { BnUse::Eval };
        Ok(Workload { model, x, labels, dirs, bn })
    }

    /// Loss and gradient; returns the loss.
    pub fn grad(&self) -> T {
        self.model.evaluate(&self.x, &self.labels, &[], self.bn, true).expect("valid workload").loss
    }

    /// One HVP along the first direction; returns v·Hv.
    pub fn hvp(&self) -> f64 {
        let e = self.model.evaluate(&self.x, &self.labels, &self.dirs[..1], self.bn, true).expect("valid workload");
        e.hvps[0].iter().zip(&self.dirs[0]).map(|(h, v)| h.dot(v)).sum()
    }

    /// HVPs along all K directions in one batched pass; returns Σ_k v_k·Hv_k.
    pub fn hvp_batched(&self) -> f64 {
        let e = self.model.evaluate(&self.x, &self.labels, &self.dirs, self.bn, true).expect("valid workload");
        e.hvps
            .iter()
            .zip(&self.dirs)
            .map(|(h, d)| h.iter().zip(d).map(|(a, b)| a.dot(b)).sum::<f64>())
            .sum()
    }
}

/// Square SGEMM/DGEMM operands of size `n` and the product, through the engine's parallel GEMM.
pub struct GemmWorkload<T> {
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    n: usize,
}

impl<T: Scalar> GemmWorkload<T> {
    /// Random `n x n` operands.
    pub fn new(n: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(1);
        GemmWorkload {
            a: Tensor::<T>::randn(&[n, n], &mut rng).into_vec(),
            b: Tensor::<T>::randn(&[n, n], &mut rng).into_vec(),
            c: vec![T::zero(); n * n],
            n,
        }
    }

    /// Runs `C = A B` once.
    pub fn run(&mut self) {
        let n = self.n;
        gemm_par(T::one(), MatRef::new(&self.a, n, n), MatRef::new(&self.b, n, n), T::zero(), &mut self.c);
    }

    /// Floating-point operations of one product (2 n³).
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }
}
