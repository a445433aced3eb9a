//! Benchmark workloads shared by the criterion benches and `flatmin bench`: a preset model,
//! a random CIFAR-shaped batch, and random directions, all seeded.
#![warn(missing_docs)]

use flatmin_engine::curvature::{
    exact_trace, hutchinson, structural_trace, Hessian, HutchinsonOptions, HvpConfig,
    StructuralOptions,
};
use flatmin_engine::kernels::gemm::{gemm_par, MatRef};
use flatmin_engine::{EngineError, Scalar, Tape, Tensor, Var};
use flatmin_models::{BnUse, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The loss of a workload on a tape, boxed.
type LossFn<'a, T> = dyn Fn(&mut Tape<T>, &[Var]) -> Result<Var, EngineError> + Send + Sync + 'a;

/// A model, a batch and K directions, ready to time.
pub struct Workload<T> {
    /// The model (PyTorch-default initialization, seed 0).
    pub model: Model<T>,
    /// Input batch `[N, ...the net's input shape]` (standard normal, like the reference
    /// scripts' `randn`; `[N, 3, 32, 32]` for the presets).
    pub x: Tensor<T>,
    /// Labels `i % classes` (the net's output width).
    pub labels: Vec<usize>,
    /// K random directions, one tensor per parameter each.
    pub dirs: Vec<Vec<Tensor<T>>>,
    /// The same directions stacked per parameter (`[K, ...parameter]`, as the PyTorch
    /// anchor `torch.stack`s them before timing its vmap).
    pub stacked: Vec<Tensor<T>>,
    /// BatchNorm mode: train for networks with BatchNorm (as the reference benchmarks).
    pub bn: BnUse,
}

impl<T: Scalar> Workload<T> {
    /// Builds the workload for `model` (a preset name or network file) at `batch` with `k`
    /// directions.
    pub fn new(model: &str, batch: usize, k: usize) -> flatmin_models::Result<Self> {
        let model = Model::<T>::named(model, 0)?;
        let mut rng = StdRng::seed_from_u64(0);
        let net = model.net();
        let mut shape = vec![batch];
        shape.extend_from_slice(net.input_shape());
        let x = Tensor::randn(&shape, &mut rng);
        let classes = net
            .node(net.output())
            .shape
            .iter()
            .product::<usize>()
            .max(1);
        let labels = (0..batch).map(|i| i % classes).collect();
        let dirs: Vec<Vec<Tensor<T>>> = (0..k)
            .map(|_| {
                model
                    .params()
                    .iter()
                    .map(|p| Tensor::randn(p.shape(), &mut rng))
                    .collect()
            })
            .collect();
        let stacked = model.stack_directions(&dirs)?;
        let bn = if model.net().has_batch_norm() {
            BnUse::Train
        } else {
            BnUse::Eval
        };
        Ok(Workload {
            model,
            x,
            labels,
            dirs,
            stacked,
            bn,
        })
    }

    /// Loss and gradient; returns the loss.
    pub fn grad(&self) -> T {
        self.model
            .evaluate(&self.x, &self.labels, &[], self.bn, true)
            .expect("valid workload")
            .loss
    }

    /// One HVP along the first direction; returns it, one tensor per parameter. Nothing is
    /// reduced inside the timed call (the PyTorch anchor times the product alone).
    pub fn hvp(&self) -> Vec<Tensor<T>> {
        self.model
            .evaluate(&self.x, &self.labels, &self.dirs[..1], self.bn, true)
            .expect("valid workload")
            .hvps
            .swap_remove(0)
    }

    /// HVPs along all K directions in one batched pass, from the stacked directions; returns
    /// them stacked per parameter (`[K, ...parameter]`, as the anchor's vmap does).
    pub fn hvp_batched(&self) -> Vec<Tensor<T>> {
        self.model
            .evaluate_stacked(&self.x, &self.labels, self.stacked.clone(), self.bn)
            .expect("valid workload")
            .1
    }
}

impl<T: Scalar> Workload<T> {
    /// The exact Hessian trace of the batch's mean cross-entropy by structure (BatchNorm on
    /// running statistics, as the structural method requires); returns it.
    pub fn trace_structural(&self) -> f64 {
        let opts = StructuralOptions {
            chunk_size: self.x.shape()[0],
            ..StructuralOptions::default()
        };
        structural_trace(
            self.model.net(),
            &self.model.params_cloned(),
            &self.model.norm_stats(BnUse::Eval),
            &self.x,
            &self.labels,
            &opts,
        )
        .expect("structural trace applies to the presets")
        .trace
    }

    /// The exact Hessian trace by basis HVPs (`d` HVPs, `k` per pass), BatchNorm as
    /// [`Workload::bn`]; returns it.
    pub fn trace_basis(&self, k: usize) -> f64 {
        self.with_hessian(k, |h| exact_trace(h).expect("valid workload").trace)
    }

    /// A Hutchinson estimate with exactly `probes` Rademacher probes, `k` per pass (seed 0),
    /// BatchNorm as [`Workload::bn`]; returns it.
    pub fn trace_hutchinson(&self, probes: usize, k: usize) -> f64 {
        let opts = HutchinsonOptions {
            min_probes: probes,
            max_probes: probes,
            rel_tol: 0.0,
            ..HutchinsonOptions::default()
        };
        self.with_hessian(k, |h| {
            hutchinson(h, &opts).expect("valid workload").estimate
        })
    }

    /// Runs `f` on the Hessian operator of the batch's loss, `k` directions per pass and as
    /// many passes at once as the measurements run ([`flatmin_models::measure::hvp_config`]).
    fn with_hessian<R>(
        &self,
        k: usize,
        f: impl FnOnce(&Hessian<'_, T, flatmin_engine::curvature::SingleBatch<Box<LossFn<'_, T>>>>) -> R,
    ) -> R {
        let loss = |tape: &mut Tape<T>, vars: &[Var]| {
            let xv = tape.constant(self.x.clone());
            let (z, _) =
                self.model
                    .forward(tape, vars, xv, self.bn)
                    .map_err(|e| EngineError::Shape {
                        op: "forward",
                        detail: e.to_string(),
                    })?;
            tape.cross_entropy(z, &self.labels)
        };
        let loss: Box<LossFn<'_, T>> = Box::new(loss);
        let params = self.model.params_cloned();
        let mut h =
            Hessian::from_fn(&params, loss, HvpConfig::with_directions(k)).expect("valid workload");
        // As the measurements batch them: `k` per pass, passes at once as memory allows.
        let config = flatmin_models::measure::hvp_config(&h, Some(k)).expect("valid workload");
        h.set_config(config).expect("valid workload");
        f(&h)
    }
}

/// Multiply-accumulates of each linear or conv layer of `net` for a batch of `n`, in
/// forward order (from the network description's per-sample counts).
pub fn layer_macs(net: &flatmin_models::Net, n: usize) -> Vec<f64> {
    net.macs()
        .into_iter()
        .filter(|&m| m > 0)
        .map(|m| (m as f64) * n as f64)
        .collect()
}

/// GEMM floating-point operations of one gradient: forward, weight gradients, and input
/// gradients of every layer but the first (whose input is data).
pub fn grad_flops(macs: &[f64]) -> f64 {
    let total: f64 = macs.iter().sum();
    2.0 * (3.0 * total - macs.first().copied().unwrap_or(0.0))
}

/// GEMM floating-point operations of `k` HVP directions on top of one gradient
/// (forward-over-reverse: per direction, the first layer costs 2 products, every other 6).
pub fn hvp_flops(macs: &[f64], k: usize) -> f64 {
    let total: f64 = macs.iter().sum();
    let first = macs.first().copied().unwrap_or(0.0);
    grad_flops(macs) + 2.0 * k as f64 * (6.0 * total - 4.0 * first)
}

/// Which operands of a benchmarked product are stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLayout {
    /// `C = A B`, both row-major.
    Nn,
    /// `C = A Bᵀ` with `B` stored `n x k` (a linear layer's forward, `X Wᵀ`).
    Nt,
    /// `C = Aᵀ B` with `A` stored `k x m` (a linear layer's weight gradient, `dYᵀ X`).
    Tn,
}

/// SGEMM/DGEMM operands of an `m x k` by `k x n` product and the product, through the
/// engine's parallel GEMM.
pub struct GemmWorkload<T> {
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    shape: (usize, usize, usize),
    layout: GemmLayout,
}

impl<T: Scalar> GemmWorkload<T> {
    /// Random square `n x n` operands.
    pub fn new(n: usize) -> Self {
        Self::shaped((n, n, n), GemmLayout::Nn)
    }

    /// Random operands of an `m x k` by `k x n` product stored as `layout` says.
    pub fn shaped((m, k, n): (usize, usize, usize), layout: GemmLayout) -> Self {
        let mut rng = StdRng::seed_from_u64(1);
        GemmWorkload {
            a: Tensor::<T>::randn(&[m * k], &mut rng).into_vec(),
            b: Tensor::<T>::randn(&[k * n], &mut rng).into_vec(),
            c: vec![T::zero(); m * n],
            shape: (m, k, n),
            layout,
        }
    }

    /// Runs the product once.
    pub fn run(&mut self) {
        let (m, k, n) = self.shape;
        let a = match self.layout {
            GemmLayout::Tn => MatRef::new(&self.a, k, m).t(),
            _ => MatRef::new(&self.a, m, k),
        };
        let b = match self.layout {
            GemmLayout::Nt => MatRef::new(&self.b, n, k).t(),
            _ => MatRef::new(&self.b, k, n),
        };
        gemm_par(T::one(), a, b, T::zero(), &mut self.c);
    }

    /// Floating-point operations of one product (2 m k n).
    pub fn flops(&self) -> f64 {
        let (m, k, n) = self.shape;
        2.0 * m as f64 * k as f64 * n as f64
    }
}
