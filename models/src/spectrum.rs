//! The Hessian spectrum of a model's mean cross-entropy over a set of batches, as library
//! calls: the extreme eigenvalues by Lanczos ([`eigenvalues`]) and the spectral density by
//! stochastic Lanczos quadrature ([`density`]). `flatmin eigen`, `flatmin density` and the
//! Python package call these.
//!
//! As in [`crate::measure`], batch `b` weighs `|b| / N` and the BatchNorm mode ([`BnUse`]) is
//! part of the measured function.
//!
//! ```
//! use flatmin_models::spectrum::{eigenvalues, EigenOptions};
//! use flatmin_engine::curvature::LanczosOptions;
//! use flatmin_models::Model;
//! use flatmin_engine::Tensor;
//! let model = Model::<f64>::named("tiny-tanh", 0).unwrap();
//! let batches = vec![(Tensor::zeros(&[4, 3, 32, 32]), vec![0, 1, 2, 3])];
//! let lanczos = LanczosOptions { k: 2, max_iters: 30, ..LanczosOptions::default() };
//! let opts = EigenOptions { lanczos, ..EigenOptions::default() };
//! let r = eigenvalues(&model, &batches, &opts).unwrap();
//! assert!(r.lanczos.eigenvalues[0] >= r.lanczos.eigenvalues[1]);
//! ```

use crate::error::{ModelError, Result};
use crate::measure::{self, MeasureError};
use crate::model::{BnUse, Model};
use flatmin_engine::curvature::{
    lanczos, slq, BatchLoss, Hessian, LanczosOptions, LanczosResult, SlqOptions, SlqResult,
};
use flatmin_engine::{Scalar, Tensor};

/// A callback told the number of HVPs done so far.
pub type HvpProgressFn = Box<dyn Fn(usize) + Send + Sync>;

/// What [`eigenvalues`] computes and how: the engine's Lanczos options and the BatchNorm
/// mode of the measured loss.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EigenOptions {
    /// Eigenvalues wanted, iterations (at least `k`), tolerance, end of the spectrum, seed,
    /// and whether to return the eigenvectors (flat, in parameter order).
    pub lanczos: LanczosOptions,
    /// BatchNorm normalization of the measured loss.
    pub bn: BnUse,
}

/// Result of [`eigenvalues`].
#[derive(Clone, Debug, PartialEq)]
pub struct EigenReport {
    /// Eigenvalues, residuals, iterations, convergence and (when asked) eigenvectors.
    pub lanczos: LanczosResult,
    /// HVP passes over the whole data.
    pub passes: usize,
    /// HVP directions per pass.
    pub directions: usize,
}

/// What [`density`] computes and how: the engine's SLQ options, the BatchNorm mode of the
/// measured loss, and the HVP directions per pass.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DensityOptions {
    /// Probes, Lanczos steps per probe, seed, reorthogonalization.
    pub slq: SlqOptions,
    /// BatchNorm normalization of the measured loss.
    pub bn: BnUse,
    /// HVP directions per pass (`None`: as many as fit, as in [`measure::hessian`]).
    pub directions: Option<usize>,
}

/// Result of [`density`].
#[derive(Clone, Debug, PartialEq)]
pub struct DensityReport {
    /// The probes' quadratures, the trace estimate and its standard error.
    pub slq: SlqResult,
    /// HVP directions per pass.
    pub directions: usize,
}

/// The `k` extreme Hessian eigenvalues (Lanczos with full reorthogonalization) of `model`'s
/// mean cross-entropy over `batches`, at its current parameters.
pub fn eigenvalues<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &EigenOptions,
) -> Result<EigenReport> {
    eigenvalues_with_progress(model, batches, opts, None)
}

/// [`eigenvalues`], telling `progress` the HVPs done.
pub fn eigenvalues_with_progress<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &EigenOptions,
    progress: Option<HvpProgressFn>,
) -> Result<EigenReport> {
    let (d, l) = (model.num_params(), &opts.lanczos);
    if l.k == 0 || l.k > d {
        return invalid(
            "k",
            format!("must be between 1 and the {d} parameters, got {}", l.k),
        );
    }
    if l.max_iters < l.k {
        return invalid(
            "steps",
            format!(
                "{} Lanczos steps cannot give {} eigenvalues; take at least {}",
                l.max_iters, l.k, l.k
            ),
        );
    }
    let params = model.params_cloned();
    // Lanczos is sequential: one direction per pass.
    let (h, k) = measure::hessian(model, &params, batches, opts.bn, Some(1))?;
    let h = with_progress(h, progress);
    let r = lanczos(&h, l).map_err(measure::curv("lanczos"))?;
    Ok(EigenReport {
        passes: h.passes(),
        lanczos: r,
        directions: k,
    })
}

/// The Hessian's spectral density by stochastic Lanczos quadrature, refused before any work
/// when the probes' Lanczos bases would not fit in the memory available.
pub fn density<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &DensityOptions,
) -> Result<DensityReport> {
    density_with_progress(model, batches, opts, None)
}

/// [`density`], telling `progress` the HVPs done.
pub fn density_with_progress<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &DensityOptions,
    progress: Option<HvpProgressFn>,
) -> Result<DensityReport> {
    let sl = &opts.slq;
    if sl.probes == 0 || sl.steps == 0 {
        return invalid(
            "probes / steps",
            format!("need at least 1 each, got {} and {}", sl.probes, sl.steps),
        );
    }
    // With full reorthogonalization every probe keeps its Lanczos basis.
    let d = model.num_params();
    let kept = if sl.reorthogonalize {
        sl.steps.min(d) + 2
    } else {
        3
    };
    let need = sl.probes as f64 * kept as f64 * d as f64 * 8.0;
    if let Some(avail) = available_memory() {
        if need > avail {
            return invalid(
                "probes / steps",
                format!(
                    "{} x {}: the Lanczos bases need about {:.1} GiB ({d} parameters each), but only {:.1} GiB are available (MemAvailable); lower the probes or the steps",
                    sl.probes,
                    sl.steps,
                    need / GIB,
                    avail / GIB
                ),
            );
        }
    }
    let params = model.params_cloned();
    let (h, k) = measure::hessian(model, &params, batches, opts.bn, opts.directions)?;
    let h = with_progress(h, progress);
    let r = slq(&h, sl).map_err(measure::curv("slq"))?;
    Ok(DensityReport {
        slq: r,
        directions: k,
    })
}

const GIB: f64 = (1u64 << 30) as f64;

fn with_progress<'a, T: Scalar, L: BatchLoss<T>>(
    h: Hessian<'a, T, L>,
    progress: Option<HvpProgressFn>,
) -> Hessian<'a, T, L> {
    match progress {
        Some(f) => h.with_progress(move |p| f(p.hvps)),
        None => h,
    }
}

fn invalid<R>(what: &'static str, detail: String) -> Result<R> {
    Err(ModelError::Measure(MeasureError::Invalid { what, detail }))
}

/// Bytes of memory available to this process: `MemAvailable` of `/proc/meminfo`, capped by
/// the cgroup v2 limit (`memory.max - memory.current`) when there is one; `None` where
/// neither can be read.
pub fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kib * 1024.0;
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(max), Some(cur)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        avail = avail.min((max - cur).max(0.0));
    }
    Some(avail)
}
