//! The Hessian of a loss averaged over batches, as a linear operator on flat vectors.

use super::{invalid, CurvatureError, CurvatureResult};
use crate::error::Result;
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The loss of a model on each batch of a dataset.
///
/// The dataset-level loss is the weighted mean `Σ_b w_b L_b / Σ_b w_b`, so its Hessian is
/// the same weighted mean of the per-batch Hessians. When each `L_b` is a mean over the
/// samples of batch `b`, the right weight is the batch's sample count; equal-sized batches
/// can keep the default weight of 1.
pub trait BatchLoss<T: Scalar>: Sync {
    /// Number of batches (at least 1).
    fn num_batches(&self) -> usize;

    /// Weight of batch `b` in the dataset-level mean (finite, positive). Default: 1.
    fn batch_weight(&self, b: usize) -> f64 {
        let _ = b;
        1.0
    }

    /// Records the scalar loss of batch `b` on `tape`, from the parameter variables `params`
    /// (in the order of the parameter tensors), and returns it.
    fn record(&self, b: usize, tape: &mut Tape<T>, params: &[Var]) -> Result<Var>;
}

impl<T: Scalar, L: BatchLoss<T> + ?Sized> BatchLoss<T> for &L {
    fn num_batches(&self) -> usize {
        (**self).num_batches()
    }
    fn batch_weight(&self, b: usize) -> f64 {
        (**self).batch_weight(b)
    }
    fn record(&self, b: usize, tape: &mut Tape<T>, params: &[Var]) -> Result<Var> {
        (**self).record(b, tape, params)
    }
}

/// A loss on one batch (the whole data), from a closure `(tape, params) -> loss`.
#[derive(Clone, Debug)]
pub struct SingleBatch<F>(pub F);

impl<T: Scalar, F> BatchLoss<T> for SingleBatch<F>
where
    F: Fn(&mut Tape<T>, &[Var]) -> Result<Var> + Sync,
{
    fn num_batches(&self) -> usize {
        1
    }
    fn record(&self, _b: usize, tape: &mut Tape<T>, params: &[Var]) -> Result<Var> {
        (self.0)(tape, params)
    }
}

/// A loss over several batches, from a closure `(batch, tape, params) -> loss` and one weight
/// per batch (its sample count when each batch loss is a mean over its samples).
#[derive(Clone, Debug)]
pub struct Batches<F> {
    weights: Vec<f64>,
    f: F,
}

impl<F> Batches<F> {
    /// Batches with the given weights (one per batch).
    pub fn new(weights: Vec<f64>, f: F) -> Self {
        Batches { weights, f }
    }

    /// `n` batches of equal weight.
    pub fn equal(n: usize, f: F) -> Self {
        Batches {
            weights: vec![1.0; n],
            f,
        }
    }
}

impl<T: Scalar, F> BatchLoss<T> for Batches<F>
where
    F: Fn(usize, &mut Tape<T>, &[Var]) -> Result<Var> + Sync,
{
    fn num_batches(&self) -> usize {
        self.weights.len()
    }
    fn batch_weight(&self, b: usize) -> f64 {
        self.weights[b]
    }
    fn record(&self, b: usize, tape: &mut Tape<T>, params: &[Var]) -> Result<Var> {
        (self.f)(b, tape, params)
    }
}

/// How Hessian-vector products are batched into passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvpConfig {
    /// Directions carried by one forward-over-reverse pass (`K`, at least 1). Memory grows
    /// about linearly in `K` (every recorded value carries `K` tangents); the time per
    /// direction falls with `K` because the tangent products become wide GEMMs.
    pub directions_per_pass: usize,
    /// Passes run at the same time (at least 1). Each holds its own tape, so memory
    /// multiplies; it pays for small models, whose single pass cannot keep all cores busy.
    /// Results do not depend on it.
    pub concurrent_passes: usize,
}

impl Default for HvpConfig {
    fn default() -> Self {
        HvpConfig {
            directions_per_pass: 32,
            concurrent_passes: 1,
        }
    }
}

impl HvpConfig {
    /// `K` directions per pass, one pass at a time.
    pub fn with_directions(k: usize) -> Self {
        HvpConfig {
            directions_per_pass: k,
            concurrent_passes: 1,
        }
    }

    fn validate(&self) -> CurvatureResult<()> {
        if self.directions_per_pass == 0 {
            return invalid("directions_per_pass", "must be at least 1, got 0");
        }
        if self.concurrent_passes == 0 {
            return invalid("concurrent_passes", "must be at least 1, got 0");
        }
        Ok(())
    }
}

/// Where each parameter tensor lives in a flat vector of all trainable scalars
/// (concatenated in the order of the parameter list, each tensor row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    dim: usize,
}

impl ParamLayout {
    /// The layout of `params`.
    pub fn new<T: Scalar>(params: &[Tensor<T>]) -> Self {
        let mut offsets = Vec::with_capacity(params.len() + 1);
        let mut dim = 0;
        for p in params {
            offsets.push(dim);
            dim += p.numel();
        }
        offsets.push(dim);
        ParamLayout {
            shapes: params.iter().map(|p| p.shape().to_vec()).collect(),
            offsets,
            dim,
        }
    }

    /// Number of trainable scalars `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of parameter tensors.
    pub fn num_tensors(&self) -> usize {
        self.shapes.len()
    }

    /// Shape of tensor `i`.
    pub fn shape(&self, i: usize) -> &[usize] {
        &self.shapes[i]
    }

    /// The flat index range of tensor `i`.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// The tensor holding flat index `j`, and `j`'s index inside it (`None` if `j >= d`).
    pub fn locate(&self, j: usize) -> Option<(usize, usize)> {
        if j >= self.dim {
            return None;
        }
        // The last tensor whose offset is <= j (empty tensors share offsets).
        let i = self.offsets[..self.shapes.len()].partition_point(|&o| o <= j) - 1;
        Some((i, j - self.offsets[i]))
    }

    /// Concatenates tensors of this layout into one flat f64 vector.
    pub fn flatten<T: Scalar>(&self, tensors: &[Tensor<T>]) -> CurvatureResult<Vec<f64>> {
        self.check_tensors(tensors)?;
        let mut out = Vec::with_capacity(self.dim);
        for t in tensors {
            out.extend(t.data().iter().map(|&x| to_f64(x)));
        }
        Ok(out)
    }

    /// Splits a flat vector of length `d` into tensors of this layout.
    pub fn unflatten<T: Scalar>(&self, flat: &[f64]) -> CurvatureResult<Vec<Tensor<T>>> {
        if flat.len() != self.dim {
            return invalid(
                "flat vector",
                format!("length {} does not match d = {}", flat.len(), self.dim),
            );
        }
        (0..self.shapes.len())
            .map(|i| {
                let data = flat[self.range(i)].iter().map(|&x| from_f64(x)).collect();
                Ok(Tensor::from_vec(&self.shapes[i], data)?)
            })
            .collect()
    }

    fn check_tensors<T: Scalar>(&self, tensors: &[Tensor<T>]) -> CurvatureResult<()> {
        let ok = tensors.len() == self.shapes.len()
            && tensors
                .iter()
                .zip(&self.shapes)
                .all(|(t, s)| t.shape() == s.as_slice());
        if !ok {
            let got: Vec<&[usize]> = tensors.iter().map(|t| t.shape()).collect();
            return invalid(
                "tensors",
                format!("shapes {got:?} do not match the layout {:?}", self.shapes),
            );
        }
        Ok(())
    }
}

pub(crate) fn to_f64<T: Scalar>(x: T) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

pub(crate) fn from_f64<T: Scalar>(x: f64) -> T {
    T::from_f64(x).unwrap_or_else(T::nan)
}

/// Work done so far by a [`Hessian`], handed to its progress callback after each group of
/// passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Forward-over-reverse passes run (one batch each).
    pub passes: usize,
    /// Dataset-level Hessian-vector products completed (all batches done).
    pub hvps: usize,
}

type ProgressFn<'a> = Box<dyn Fn(Progress) + Send + Sync + 'a>;

/// The Hessian of a [`BatchLoss`] at fixed parameters, as a linear operator on flat vectors
/// (see [`ParamLayout`]). Every product is the batch-weighted mean of per-batch products.
///
/// It counts the Hessian-vector products and passes it runs ([`Hessian::hvps`],
/// [`Hessian::passes`]). Results are bit-identical for any number of threads and any
/// [`HvpConfig::concurrent_passes`]; changing [`HvpConfig::directions_per_pass`] may change
/// the last bits (the GEMM shapes change).
pub struct Hessian<'a, T: Scalar, L> {
    params: &'a [Tensor<T>],
    loss: L,
    layout: ParamLayout,
    weights: Vec<f64>,
    config: HvpConfig,
    hvps: AtomicUsize,
    passes: AtomicUsize,
    progress: Option<ProgressFn<'a>>,
}

impl<'a, T: Scalar, F> Hessian<'a, T, SingleBatch<F>>
where
    F: Fn(&mut Tape<T>, &[Var]) -> Result<Var> + Sync,
{
    /// The Hessian of one loss closure `(tape, params) -> loss` at `params`.
    pub fn from_fn(params: &'a [Tensor<T>], f: F, config: HvpConfig) -> CurvatureResult<Self> {
        Hessian::new(params, SingleBatch(f), config)
    }
}

impl<'a, T: Scalar, F> Hessian<'a, T, Batches<F>>
where
    F: Fn(usize, &mut Tape<T>, &[Var]) -> Result<Var> + Sync,
{
    /// The Hessian of the weighted mean of per-batch losses `(batch, tape, params) -> loss`,
    /// one weight per batch (its sample count when each batch loss is a mean).
    pub fn from_batches(
        params: &'a [Tensor<T>],
        weights: Vec<f64>,
        f: F,
        config: HvpConfig,
    ) -> CurvatureResult<Self> {
        Hessian::new(params, Batches::new(weights, f), config)
    }
}

impl<'a, T: Scalar, L: BatchLoss<T>> Hessian<'a, T, L> {
    /// The Hessian of `loss` at `params`. Fails on an empty parameter list, no batches, or a
    /// batch weight that is not finite and positive.
    pub fn new(params: &'a [Tensor<T>], loss: L, config: HvpConfig) -> CurvatureResult<Self> {
        config.validate()?;
        if params.is_empty() {
            return invalid("params", "no parameter tensors");
        }
        let nb = loss.num_batches();
        if nb == 0 {
            return invalid("batches", "the loss has no batches");
        }
        let raw: Vec<f64> = (0..nb).map(|b| loss.batch_weight(b)).collect();
        if let Some((b, w)) = raw
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w > 0.0))
        {
            return invalid(
                "batch weight",
                format!("batch {b} has weight {w}; need finite and > 0"),
            );
        }
        let total: f64 = raw.iter().sum();
        let weights = raw.iter().map(|w| w / total).collect();
        Ok(Hessian {
            params,
            loss,
            layout: ParamLayout::new(params),
            weights,
            config,
            hvps: AtomicUsize::new(0),
            passes: AtomicUsize::new(0),
            progress: None,
        })
    }

    /// Calls `f` with the work done so far after each group of passes (for progress bars).
    pub fn with_progress(mut self, f: impl Fn(Progress) + Send + Sync + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Where each parameter tensor lives in the flat vectors this operator acts on.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Number of trainable scalars `d`.
    pub fn dim(&self) -> usize {
        self.layout.dim
    }

    /// The parameters the Hessian is taken at.
    pub fn params(&self) -> &[Tensor<T>] {
        self.params
    }

    /// The batching configuration.
    pub fn config(&self) -> &HvpConfig {
        &self.config
    }

    /// Changes the batching configuration (results change at most in the last bits).
    pub fn set_config(&mut self, config: HvpConfig) -> CurvatureResult<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Number of batches.
    pub fn num_batches(&self) -> usize {
        self.weights.len()
    }

    /// Normalized batch weights (summing to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Dataset-level Hessian-vector products computed so far.
    pub fn hvps(&self) -> usize {
        self.hvps.load(Ordering::Relaxed)
    }

    /// Forward-over-reverse passes (one batch each) run so far.
    pub fn passes(&self) -> usize {
        self.passes.load(Ordering::Relaxed)
    }

    /// A number of directions per pass that keeps one pass's tangent storage within about
    /// `bytes`, clamped to `1..=256`, by [`Hessian::bytes_per_direction`]; it divides `bytes`
    /// among the concurrent passes.
    ///
    /// Cost: one forward recording of batch 0 without tangents (no backward pass).
    pub fn directions_for_budget(&self, bytes: usize) -> CurvatureResult<usize> {
        let share = bytes / self.config.concurrent_passes.max(1);
        Ok((share / self.bytes_per_direction()?).clamp(1, 256))
    }

    /// The tangent memory one direction takes in a pass, in bytes (at least 1): one tangent of
    /// every recorded value that depends on the parameters in the forward pass and one in the
    /// backward pass, plus the input and output tangents (the estimate behind
    /// [`Hessian::directions_for_budget`]).
    ///
    /// Cost: one forward recording of batch 0 without tangents (no backward pass).
    pub fn bytes_per_direction(&self) -> CurvatureResult<usize> {
        let mut tape = Tape::<T>::new(0);
        let vars = self
            .params
            .iter()
            .map(|p| tape.param(p.clone(), None))
            .collect::<Result<Vec<_>>>()?;
        self.loss.record(0, &mut tape, &vars)?;
        // Constants (the images, the labels) carry no tangent and no adjoint.
        let recorded: usize = (0..tape.len())
            .filter(|&i| tape.needs_grad(i))
            .map(|i| tape.value(Var(i)).numel())
            .sum::<usize>();
        let per_dir = std::mem::size_of::<T>() * (2 * recorded + 2 * self.layout.dim)
            + std::mem::size_of::<f64>() * 2 * self.layout.dim;
        Ok(per_dir.max(1))
    }

    /// Dataset-level loss and flat gradient.
    ///
    /// Cost: one gradient pass per batch (no HVPs).
    pub fn loss_and_grad(&self) -> CurvatureResult<(f64, Vec<f64>)> {
        let mut loss = 0.0;
        let mut grad = vec![0.0; self.layout.dim];
        for (b, &w) in self.weights.iter().enumerate() {
            let mut tape = Tape::<T>::new(0);
            let vars = self
                .params
                .iter()
                .map(|p| tape.param(p.clone(), None))
                .collect::<Result<Vec<_>>>()?;
            let out = self.loss.record(b, &mut tape, &vars)?;
            let mut grads = tape.backward(out)?;
            let value = tape.value(out).item().map(to_f64).unwrap_or(f64::NAN);
            loss += w * value;
            for (i, &v) in vars.iter().enumerate() {
                if let Some(g) = grads.take_grad(v) {
                    for (a, &x) in grad[self.layout.range(i)].iter_mut().zip(g.data()) {
                        *a += w * to_f64(x);
                    }
                }
            }
            self.passes.fetch_add(1, Ordering::Relaxed);
        }
        Ok((loss, grad))
    }

    /// `H v` for every flat vector in `vs` (each of length `d`).
    ///
    /// Cost: `vs.len()` HVPs, in `ceil(vs.len() / K)` passes per batch.
    pub fn apply(&self, vs: &[Vec<f64>]) -> CurvatureResult<Vec<Vec<f64>>> {
        let d = self.layout.dim;
        if let Some((i, v)) = vs.iter().enumerate().find(|(_, v)| v.len() != d) {
            return invalid(
                "vector",
                format!("vector {i} has length {}, expected d = {d}", v.len()),
            );
        }
        let mut out = vec![vec![0.0; d]; vs.len()];
        self.map_passes(
            vs.len(),
            |r| self.tangents_from(&vs[r]),
            |r, b, hv| {
                let w = self.weights[b];
                Ok((0..r.len())
                    .map(|kk| self.flat_direction(hv, kk, w))
                    .collect::<Vec<_>>())
            },
            |r, _b, cols| {
                for (acc, col) in out[r].iter_mut().zip(cols) {
                    for (a, x) in acc.iter_mut().zip(col) {
                        *a += x;
                    }
                }
            },
        )?;
        Ok(out)
    }

    /// Tangent tensors `[k, ...shape]`, one per parameter, from flat f64 directions.
    pub(crate) fn tangents_from(&self, vs: &[Vec<f64>]) -> Vec<Tensor<T>> {
        let k = vs.len();
        (0..self.layout.num_tensors())
            .map(|i| {
                let range = self.layout.range(i);
                let mut data = Vec::with_capacity(k * range.len());
                for v in vs {
                    data.extend(v[range.clone()].iter().map(|&x| from_f64::<T>(x)));
                }
                let mut shape = vec![k];
                shape.extend_from_slice(self.layout.shape(i));
                Tensor::from_vec(&shape, data).expect("tangent size follows the layout")
            })
            .collect()
    }

    /// Direction `kk` of per-parameter HVP tensors as one flat f64 vector, times `w`.
    fn flat_direction(&self, hv: &[Tensor<T>], kk: usize, w: f64) -> Vec<f64> {
        let mut col = Vec::with_capacity(self.layout.dim);
        for (i, h) in hv.iter().enumerate() {
            let n = self.layout.range(i).len();
            col.extend(
                h.data()[kk * n..(kk + 1) * n]
                    .iter()
                    .map(|&x| w * to_f64(x)),
            );
        }
        col
    }

    /// One forward-over-reverse pass on batch `b` with the given tangents; returns `H_b v`
    /// per parameter, `[k, ...shape]`.
    fn pass(&self, b: usize, tangents: Vec<Tensor<T>>) -> CurvatureResult<Vec<Tensor<T>>> {
        let k = tangents.first().map(|t| t.shape()[0]).unwrap_or(0);
        let mut tape = Tape::<T>::new(k);
        let vars = self
            .params
            .iter()
            .zip(tangents)
            .map(|(p, t)| tape.param(p.clone(), Some(t)))
            .collect::<Result<Vec<_>>>()?;
        let out = self.loss.record(b, &mut tape, &vars)?;
        let mut grads = tape.backward(out)?;
        let hv: Vec<Tensor<T>> = vars
            .iter()
            .map(|&v| grads.take_hvp(v).unwrap_or_else(|| grads.hvp(&tape, v)))
            .collect();
        if !hv.iter().all(|h| h.all_finite()) {
            return Err(CurvatureError::NonFinite { batch: b });
        }
        Ok(hv)
    }

    /// Runs `n_dirs` directions through every batch, `K` per pass: `build(range)` makes the
    /// tangents of a chunk of directions, `extract(range, batch, hvp)` turns one pass's
    /// result into `R` (possibly in parallel), and `fold(range, batch, r)` consumes the
    /// results in a fixed order (chunk-major, batch-minor), whatever the parallelism.
    pub(crate) fn map_passes<R: Send>(
        &self,
        n_dirs: usize,
        build: impl Fn(Range<usize>) -> Vec<Tensor<T>> + Sync,
        extract: impl Fn(Range<usize>, usize, &[Tensor<T>]) -> CurvatureResult<R> + Sync,
        mut fold: impl FnMut(Range<usize>, usize, R),
    ) -> CurvatureResult<()> {
        let k = self.config.directions_per_pass;
        let nb = self.weights.len();
        let units: Vec<(Range<usize>, usize)> = (0..n_dirs)
            .step_by(k)
            .flat_map(|s| (0..nb).map(move |b| (s..(s + k).min(n_dirs), b)))
            .collect();
        let run = |(r, b): &(Range<usize>, usize)| -> CurvatureResult<R> {
            let hv = self.pass(*b, build(r.clone()))?;
            extract(r.clone(), *b, &hv)
        };
        for group in units.chunks(self.config.concurrent_passes) {
            let results: Vec<CurvatureResult<R>> = if group.len() == 1 {
                vec![run(&group[0])]
            } else {
                group.par_iter().map(run).collect()
            };
            for ((r, b), res) in group.iter().zip(results) {
                let value = res?;
                self.passes.fetch_add(1, Ordering::Relaxed);
                if *b + 1 == nb {
                    self.hvps.fetch_add(r.len(), Ordering::Relaxed);
                }
                fold(r.clone(), *b, value);
            }
            if let Some(p) = &self.progress {
                p(Progress {
                    passes: self.passes(),
                    hvps: self.hvps(),
                });
            }
        }
        Ok(())
    }
}
