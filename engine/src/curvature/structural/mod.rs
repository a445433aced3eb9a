//! Exact Hessian trace, per-tensor traces and diagonal by the network's structure, without
//! `d` Hessian-vector products (`docs/curvature.md`).
//!
//! For a network of linear and convolution layers, residual additions, ReLU, max / average /
//! global pooling, BatchNorm with running statistics and elementwise smooth activations,
//! with mean softmax cross-entropy over `N` samples (or another [`crate::Loss`], through its
//! per-sample head: gradient `g_n` and Hessian factor `s_{n,c}` in the logits),
//!
//! ```text
//! tr(H) = (1/N) Σ_n [ Σ_c ‖J_nᵀ s_{n,c}‖²  +  Σ_u g_{n,u} φ''(u_n) ‖∇_θ u_n‖² ]
//! ```
//!
//! with `s_{n,c} = √p_{n,c} (e_c − p_n)`: the trace of the generalized Gauss-Newton matrix
//! plus one signed curvature source per smooth-activation unit and sample. Both terms are
//! sums of squared per-sample gradient norms, which a per-sample backward pass over the
//! network's description ([`crate::net::Net`], the one the forward pass is recorded from)
//! forms layer by layer. The same sums, kept per parameter element, give the
//! exact diagonal.
//!
//! It does not apply when samples are coupled (BatchNorm on batch statistics); it is refused, with the reason, when the smooth activations have more
//! units per sample than [`StructuralOptions::max_sources_per_sample`] (each costs a backward
//! pass). See [`structural_support`].
//!
//! Cost: one forward pass, then per sample one backward pass of `C` (classes) columns, plus
//! the source columns, each formed at every parameterized layer; no Hessian-vector product.

mod pass;

use super::{invalid, CurvatureResult};
use crate::kernels::par::fixed_ranges;
use crate::net::{Layer, Net, Node, NormStats, RunningStats};
use crate::ops::Loss;
use crate::scalar::Scalar;
use crate::tape::Tape;
use crate::tensor::Tensor;
use pass::{sample_pass, Plan, SampleOut};
use rayon::prelude::*;

/// Element budget of the per-group diagonal accumulators (`groups × d`).
const DIAG_BUDGET: usize = 1 << 25;
/// Most groups of samples a diagonal is accumulated in.
const MAX_DIAG_GROUPS: usize = 32;

/// Options of the structural trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructuralOptions {
    /// Also return the exact Hessian diagonal (memory: a few copies of `d` f64 values; the
    /// convolution layers then always form their per-sample gradients).
    pub diagonal: bool,
    /// Refuse nets with more smooth-activation units per sample than this (each unit is one
    /// more column of the backward pass).
    pub max_sources_per_sample: usize,
    /// Samples per forward recording (bounds the memory for stored activations; results do
    /// not depend on it beyond rounding in the forward pass).
    pub chunk_size: usize,
    /// The loss whose Hessian is traced (cross-entropy by default).
    pub loss: Loss,
}

impl Default for StructuralOptions {
    fn default() -> Self {
        StructuralOptions {
            diagonal: false,
            max_sources_per_sample: 4096,
            chunk_size: 256,
            loss: Loss::CrossEntropy,
        }
    }
}

/// Whether the structural trace applies to a net, and what it will cost per sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructuralSupport {
    /// Why it does not apply (`None`: it applies).
    pub refusal: Option<String>,
    /// Number of classes (GGN columns per sample).
    pub classes: usize,
    /// Smooth-activation units per sample (at most this many source columns per sample).
    pub sources_per_sample: usize,
}

impl StructuralSupport {
    /// True when the structural trace applies.
    pub fn applies(&self) -> bool {
        self.refusal.is_none()
    }
}

/// Exact trace of one parameter tensor's Hessian block, by structure.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuralBlock {
    /// Position of the tensor in the parameter list.
    pub index: usize,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Trace of its diagonal block of the Hessian (`ggn_trace + activation_trace`).
    pub trace: f64,
    /// The generalized Gauss-Newton part.
    pub ggn_trace: f64,
    /// The smooth-activation part (0 for piecewise-linear nets).
    pub activation_trace: f64,
    /// `trace` divided by the tensor's number of elements (0 for an empty tensor).
    pub normalized_trace: f64,
    /// The block's Hessian diagonal, row-major like the tensor (when asked for).
    pub diagonal: Option<Vec<f64>>,
}

/// Exact Hessian trace by structure.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuralTrace {
    /// `tr(H)`.
    pub trace: f64,
    /// Number of trainable scalars `d`.
    pub dim: usize,
    /// `trace / d` (0 when `d` is 0).
    pub normalized_trace: f64,
    /// Trace of the generalized Gauss-Newton matrix.
    pub ggn_trace: f64,
    /// The smooth-activation curvature part, `trace − ggn_trace`.
    pub activation_trace: f64,
    /// One entry per parameter tensor, in parameter order.
    pub blocks: Vec<StructuralBlock>,
    /// Samples the loss averages over.
    pub samples: usize,
    /// Mean cross-entropy over the samples.
    pub loss: f64,
    /// Class columns per sample.
    pub class_columns: usize,
    /// Source columns over all samples (units with a non-zero weight `g φ''`).
    pub source_columns: usize,
}

/// Checks that the net has a layer, `params` match its parameter specs and running
/// statistics (if any) match its BatchNorm layers.
fn check_inputs<T: Scalar>(
    net: &Net,
    params: &[Tensor<T>],
    norm: &NormStats<'_, T>,
) -> CurvatureResult<()> {
    if net.nodes().len() < 2 {
        return invalid("net", "has no layer after its input");
    }
    let specs = net.params();
    if params.len() != specs.len() {
        return invalid(
            "params",
            format!("{} tensors for the net's {}", params.len(), specs.len()),
        );
    }
    if let Some((spec, p)) = specs.iter().zip(params).find(|(s, p)| s.shape != p.shape()) {
        return invalid(
            "params",
            format!(
                "'{}' has shape {:?}, want {:?}",
                spec.name,
                p.shape(),
                spec.shape
            ),
        );
    }
    let bns = net.batch_norms();
    if let NormStats::Running(stats) = norm {
        let bad = bns.iter().zip(stats).find(|(id, s)| {
            let c = net.node(**id).shape[0];
            s.mean.len() != c || s.var.len() != c
        });
        if stats.len() != bns.len() || bad.is_some() {
            return invalid(
                "norm",
                format!(
                    "running statistics do not match the net's {} BatchNorm layers",
                    bns.len()
                ),
            );
        }
    }
    Ok(())
}

/// Which nodes the output depends on.
fn reaching_output(nodes: &[Node]) -> Vec<bool> {
    let len = nodes.len();
    let mut reach = vec![false; len];
    reach[len - 1] = true;
    for i in (0..len).rev() {
        if reach[i] {
            for j in &nodes[i].inputs {
                reach[j.index()] = true;
            }
        }
    }
    reach
}

/// Which nodes depend on a parameter (have parameters themselves or downstream of one).
fn after_params(nodes: &[Node]) -> Vec<bool> {
    let mut needs = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        needs[i] = node.layer.param_count() > 0 || node.inputs.iter().any(|j| needs[j.index()]);
    }
    needs
}

/// The refusal for the first reachable `Add` that broadcasts, if any.
fn broadcast_refusal(nodes: &[Node], reach: &[bool], shapes: &[Vec<usize>]) -> Option<String> {
    nodes.iter().enumerate().find_map(|(i, node)| {
        let Layer::Add = node.layer else {
            return None;
        };
        let (a, b) = (node.inputs[0].index(), node.inputs[1].index());
        (reach[i] && shapes[a] != shapes[b]).then(|| {
            format!(
                "'{}' adds shapes {:?} and {:?} by broadcasting, which the per-sample pass does not follow",
                node.name, shapes[a], shapes[b]
            )
        })
    })
}

/// The curvature sources (reachable smooth activations downstream of a parameter) and
/// their units per sample, or the refusal when there are more than `max` units.
fn curvature_sources<T: Scalar>(
    nodes: &[Node],
    reach: &[bool],
    needs: &[bool],
    shapes: &[Vec<usize>],
    max: usize,
) -> Result<(Vec<bool>, usize), String> {
    let mut sources = vec![false; nodes.len()];
    let mut count = 0usize;
    let mut biggest: Option<(usize, usize)> = None;
    for (i, node) in nodes.iter().enumerate() {
        if let Layer::Activation(func) = node.layer {
            let u = node.inputs[0].index();
            if reach[i] && needs[u] && func.unary::<T>().has_curvature() {
                sources[i] = true;
                let units = shapes[u].iter().product::<usize>();
                count += units;
                if biggest.is_none_or(|(_, b)| units > b) {
                    biggest = Some((i, units));
                }
            }
        }
    }
    if count > max {
        let (i, units) = biggest.expect("count > 0");
        return Err(format!(
            "its smooth activations have {count} units per sample, each a curvature source costing one more backward column (limit {max}); the largest is '{}' on {:?} ({units} units), e.g. a smooth activation inside convolution layers",
            nodes[i].name, shapes[nodes[i].inputs[0].index()]
        ));
    }
    Ok((sources, count))
}

/// Static analysis of a net: `Err` for malformed input, `Ok(Err(reason))` for a refusal.
fn analyze<T: Scalar>(
    net: &Net,
    params: &[Tensor<T>],
    norm: &NormStats<'_, T>,
    opts: &StructuralOptions,
) -> CurvatureResult<Result<Plan, String>> {
    check_inputs(net, params, norm)?;
    let nodes = net.nodes();
    let len = nodes.len();
    let reach = reaching_output(nodes);
    let bns = net.batch_norms();
    if let (NormStats::Batch, Some(id)) = (norm, bns.iter().find(|id| reach[id.index()])) {
        return Ok(Err(format!(
            "BatchNorm layer '{}' uses batch statistics (train mode): they couple the samples of a batch and make the layer non-affine in its input; use eval mode (running statistics), basis HVPs or an estimator",
            net.node(*id).name
        )));
    }
    let shapes: Vec<Vec<usize>> = nodes.iter().map(|n| n.shape.clone()).collect();
    let out_shape = &shapes[len - 1];
    if out_shape.len() != 1 || out_shape[0] == 0 {
        return invalid(
            "net",
            format!("the output must be logits [N, C], got per-sample shape {out_shape:?}"),
        );
    }
    let needs = after_params(nodes);
    if let Some(reason) = broadcast_refusal(nodes, &reach, &shapes) {
        return Ok(Err(reason));
    }
    let (sources, count) =
        match curvature_sources::<T>(nodes, &reach, &needs, &shapes, opts.max_sources_per_sample) {
            Ok(found) => found,
            Err(reason) => return Ok(Err(reason)),
        };
    Ok(Ok(Plan {
        classes: out_shape[0],
        loss: opts.loss,
        shapes,
        needs,
        any_sources: count > 0,
        sources,
    }))
}

/// Whether the structural trace applies to `net` with `params` and BatchNorm statistics
/// `norm`, and its per-sample size. Errors are malformed input (parameters or statistics
/// that do not match the net); a network outside the supported class comes back as
/// [`StructuralSupport::refusal`]. Costs no pass over data.
pub fn structural_support<T: Scalar>(
    net: &Net,
    params: &[Tensor<T>],
    norm: &NormStats<'_, T>,
    opts: &StructuralOptions,
) -> CurvatureResult<StructuralSupport> {
    Ok(match analyze(net, params, norm, opts)? {
        Ok(plan) => StructuralSupport {
            refusal: None,
            classes: plan.classes,
            sources_per_sample: plan
                .sources
                .iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(|(i, _)| {
                    plan.shapes[net.nodes()[i].inputs[0].index()]
                        .iter()
                        .product::<usize>()
                })
                .sum(),
        },
        Err(reason) => StructuralSupport {
            refusal: Some(reason),
            classes: 0,
            sources_per_sample: 0,
        },
    })
}

/// The structural trace over a dataset given batch by batch: the loss is the mean
/// cross-entropy over all samples added (batches weighted by their sizes, as
/// [`super::Batches`] with sample-count weights). Per-tensor traces do not depend on how the
/// samples are split into batches or chunks beyond rounding in the forward pass, nor on the
/// number of threads (they are summed in sample order).
pub struct StructuralAccumulator<'a, T> {
    net: &'a Net,
    params: &'a [Tensor<T>],
    running: Vec<Option<RunningStats<'a, T>>>,
    sample_shape: Vec<usize>,
    opts: StructuralOptions,
    plan: Plan,
    samples: usize,
    ggn: Vec<f64>,
    src: Vec<f64>,
    diag: Option<Vec<Vec<f64>>>,
    loss: f64,
    sources: usize,
}

impl<'a, T: Scalar> StructuralAccumulator<'a, T> {
    /// Prepares the trace of `net` at `params` with BatchNorm statistics `norm` (running
    /// statistics: batch statistics are refused); refuses (an `Invalid` error naming the
    /// reason) a net outside the supported class.
    pub fn new(
        net: &'a Net,
        params: &'a [Tensor<T>],
        norm: &NormStats<'a, T>,
        opts: &StructuralOptions,
    ) -> CurvatureResult<Self> {
        if opts.chunk_size == 0 {
            return invalid("chunk_size", "must be at least 1, got 0");
        }
        let plan = match analyze(net, params, norm, opts)? {
            Ok(plan) => plan,
            Err(reason) => return invalid("structural trace", format!("does not apply: {reason}")),
        };
        let nt = params.len();
        let mut running = vec![None; net.len()];
        if let NormStats::Running(stats) = norm {
            for (id, s) in net.batch_norms().into_iter().zip(stats) {
                running[id.index()] = Some(*s);
            }
        }
        Ok(StructuralAccumulator {
            net,
            params,
            running,
            sample_shape: net.input_shape().to_vec(),
            opts: opts.clone(),
            plan,
            samples: 0,
            ggn: vec![0.0; nt],
            src: vec![0.0; nt],
            diag: opts
                .diagonal
                .then(|| params.iter().map(|p| vec![0.0; p.numel()]).collect()),
            loss: 0.0,
            sources: 0,
        })
    }

    /// Samples added so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds the samples `x` (`[N, ...sample_shape]`) with their labels.
    ///
    /// Cost: one forward pass and one per-sample backward pass per sample.
    pub fn add_batch(&mut self, x: &Tensor<T>, labels: &[usize]) -> CurvatureResult<()> {
        let xs = x.shape();
        if xs.len() != self.sample_shape.len() + 1 || xs[1..] != self.sample_shape[..] {
            return invalid(
                "x",
                format!("shape {xs:?}, want [N, {:?}...]", self.sample_shape),
            );
        }
        let n = xs[0];
        if labels.len() != n {
            return invalid("labels", format!("{} labels for {n} samples", labels.len()));
        }
        let classes = self.plan.classes;
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
            return invalid(
                "labels",
                format!("label {l} of sample {i} is not below {classes}"),
            );
        }
        let per = x.numel() / n.max(1);
        for start in (0..n).step_by(self.opts.chunk_size) {
            let end = (start + self.opts.chunk_size).min(n);
            let mut shape = vec![end - start];
            shape.extend_from_slice(&self.sample_shape);
            let xc = Tensor::from_vec(&shape, x.data()[start * per..end * per].to_vec())?;
            self.add_chunk(&xc, &labels[start..end])?;
        }
        Ok(())
    }

    fn add_chunk(&mut self, x: &Tensor<T>, labels: &[usize]) -> CurvatureResult<()> {
        let nc = labels.len();
        let mut tape = Tape::<T>::new(0);
        let pv: Vec<_> = self
            .params
            .iter()
            .map(|p| tape.constant(p.clone()))
            .collect();
        let xv = tape.constant(x.clone());
        let running: Vec<RunningStats<'_, T>> = self.running.iter().flatten().copied().collect();
        let rec = self
            .net
            .record_each_node(&mut tape, &pv, xv, &NormStats::Running(running))?;
        let values: Vec<&[T]> = rec.vars.iter().map(|&v| tape.value(v).data()).collect();
        let (net, plan, params) = (self.net, &self.plan, self.params);
        let running = &self.running;
        let run = |i: usize, diag: Option<&mut [Vec<f64>]>| {
            sample_pass(net, plan, params, running, &values, i, labels[i], diag)
        };
        let outs: Vec<SampleOut> = match &mut self.diag {
            None => (0..nc).into_par_iter().map(|i| run(i, None)).collect(),
            Some(total) => {
                let d: usize = params.iter().map(|p| p.numel()).sum();
                let groups = (DIAG_BUDGET / d.max(1)).clamp(1, MAX_DIAG_GROUPS);
                let parts: Vec<(Vec<SampleOut>, Vec<Vec<f64>>)> = fixed_ranges(nc, groups)
                    .into_par_iter()
                    .map(|r| {
                        let mut dg: Vec<Vec<f64>> =
                            params.iter().map(|p| vec![0.0; p.numel()]).collect();
                        let outs = r.map(|i| run(i, Some(&mut dg))).collect();
                        (outs, dg)
                    })
                    .collect();
                let mut outs = Vec::with_capacity(nc);
                for (o, dg) in parts {
                    outs.extend(o);
                    for (t, g) in total.iter_mut().zip(&dg) {
                        for (a, &b) in t.iter_mut().zip(g) {
                            *a += b;
                        }
                    }
                }
                outs
            }
        };
        for o in outs {
            for (a, b) in self.ggn.iter_mut().zip(&o.ggn) {
                *a += b;
            }
            for (a, b) in self.src.iter_mut().zip(&o.src) {
                *a += b;
            }
            self.loss += o.loss;
            self.sources += o.sources;
        }
        self.samples += nc;
        Ok(())
    }

    /// The trace of the Hessian of the mean loss over every sample added.
    pub fn finish(self) -> CurvatureResult<StructuralTrace> {
        if self.samples == 0 {
            return invalid("samples", "no sample was added");
        }
        let inv = 1.0 / self.samples as f64;
        let mut blocks = Vec::with_capacity(self.params.len());
        let mut diags = self.diag.map(|d| d.into_iter());
        for (i, p) in self.params.iter().enumerate() {
            let (ggn, act) = (self.ggn[i] * inv, self.src[i] * inv);
            let trace = ggn + act;
            let numel = p.numel();
            let diagonal = diags
                .as_mut()
                .and_then(|d| d.next())
                .map(|v| v.into_iter().map(|x| x * inv).collect());
            blocks.push(StructuralBlock {
                index: i,
                shape: p.shape().to_vec(),
                trace,
                ggn_trace: ggn,
                activation_trace: act,
                normalized_trace: if numel == 0 {
                    0.0
                } else {
                    trace / numel as f64
                },
                diagonal,
            });
        }
        let trace: f64 = blocks.iter().map(|b| b.trace).sum();
        if !trace.is_finite() {
            return invalid("structural trace", format!("came out non-finite ({trace})"));
        }
        let dim: usize = self.params.iter().map(|p| p.numel()).sum();
        Ok(StructuralTrace {
            trace,
            dim,
            normalized_trace: if dim == 0 { 0.0 } else { trace / dim as f64 },
            ggn_trace: blocks.iter().map(|b| b.ggn_trace).sum(),
            activation_trace: blocks.iter().map(|b| b.activation_trace).sum(),
            blocks,
            samples: self.samples,
            loss: self.loss * inv,
            class_columns: self.plan.classes,
            source_columns: self.sources,
        })
    }
}

/// Exact trace (per-tensor traces, optionally the diagonal) of the Hessian of the mean
/// cross-entropy of `net`'s logits on `x` (`[N, ...]`) against `labels`, at `params`, by
/// structure. Refuses (an `Invalid` error with the reason) a net outside the supported class;
/// see [`structural_support`].
///
/// Cost: one forward pass and `N` per-sample backward passes of `C` columns plus the
/// curvature sources; no Hessian-vector product.
pub fn structural_trace<T: Scalar>(
    net: &Net,
    params: &[Tensor<T>],
    norm: &NormStats<'_, T>,
    x: &Tensor<T>,
    labels: &[usize],
    opts: &StructuralOptions,
) -> CurvatureResult<StructuralTrace> {
    let mut acc = StructuralAccumulator::new(net, params, norm, opts)?;
    acc.add_batch(x, labels)?;
    acc.finish()
}
