//! The per-sample backward pass of the structural trace.
//!
//! For one sample, every column (a vector at the logits, or a unit vector at a smooth
//! activation's input) is carried backward through the net as one row of a dense matrix per
//! node; all columns of a sample go through each layer together, so the products are GEMMs.
//! At a parameterized layer, each column's per-sample gradient is formed (or, for a
//! convolution, its squared norm is taken from Gram matrices when that is cheaper) and its
//! squared norm, times the column's weight, is added to the layer's sums.
//!
//! Columns, in the order they are created:
//! - row 0, only when the net has curvature sources: the ordinary per-sample adjoint
//!   `p − e_y` (weight 0). At a smooth activation `a = φ(u)` it is `g = ∂ℓ_n/∂a`, which
//!   gives the weights `g φ''(u)` of the sources;
//! - one row per class `c`: `s_c = √p_c (e_c − p)` (weight 1, the GGN part);
//! - at the input `u` of each smooth activation, one unit row per element of `u` with a
//!   non-zero weight `g φ''(u)` (the activation part), injected once all of `u`'s consumers
//!   have deposited their adjoints.
//!
//! A matrix may have fewer rows than there are columns (columns created elsewhere that do
//! not reach the node); rows are padded with zeros when matrices meet.

use crate::kernels::conv::{col2im_add, im2col, ConvGeom};
use crate::kernels::gemm::{gemm, MatRef};
use crate::kernels::pool::{avg_plane_adjoint, max_plane, PoolGeom};
use crate::net::{Layer, Net, RunningStats};
use crate::ops::Loss;
use crate::scalar::Scalar;
use crate::tensor::{numel, Tensor};

/// Most elements of one block of per-sample convolution gradients formed at once.
const GRAD_BLOCK: usize = 1 << 22;

/// What the pass knows about a net before seeing data.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Per-sample shape of every node.
    pub shapes: Vec<Vec<usize>>,
    /// The node's value depends on a parameter (its adjoint is needed).
    pub needs: Vec<bool>,
    /// Activation node whose input receives curvature sources.
    pub sources: Vec<bool>,
    /// True when some node has sources (row 0 then carries the ordinary adjoint).
    pub any_sources: bool,
    /// Number of classes (the output's per-sample size).
    pub classes: usize,
    /// The loss on the logits.
    pub loss: Loss,
}

/// Per-sample sums of one pass.
#[derive(Clone, Debug)]
pub(crate) struct SampleOut {
    /// Σ over class columns of the squared per-sample gradient norm, per parameter tensor.
    pub ggn: Vec<f64>,
    /// Σ over source columns of weight × squared gradient norm, per parameter tensor.
    pub src: Vec<f64>,
    /// Loss of the sample.
    pub loss: f64,
    /// Source columns created for this sample.
    pub sources: usize,
}

/// A dense `rows x width` matrix, one row per column of the pass.
struct Cols<T> {
    rows: usize,
    width: usize,
    data: Vec<T>,
}

impl<T: Scalar> Cols<T> {
    fn zeros(rows: usize, width: usize) -> Self {
        Cols {
            rows,
            width,
            data: vec![T::zero(); rows * width],
        }
    }

    fn row(&self, k: usize) -> &[T] {
        &self.data[k * self.width..(k + 1) * self.width]
    }

    fn row_mut(&mut self, k: usize) -> &mut [T] {
        &mut self.data[k * self.width..(k + 1) * self.width]
    }

    /// Pads with zero rows up to `rows`.
    fn grow(&mut self, rows: usize) {
        if rows > self.rows {
            self.data.resize(rows * self.width, T::zero());
            self.rows = rows;
        }
    }

    fn mat(&self) -> MatRef<'_, T> {
        MatRef::new(&self.data, self.rows, self.width)
    }
}

#[inline]
fn f<T: Scalar>(x: T) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// Squared Euclidean norm, accumulated in f64.
fn sq<T: Scalar>(v: &[T]) -> f64 {
    v.iter().map(|&x| f(x) * f(x)).sum()
}

/// The column weights of one pass and the sums they feed.
struct Acc<'a> {
    /// Weight of each column in the GGN sum (1 for class columns).
    wg: Vec<f64>,
    /// Weight of each column in the activation sum (`g φ''` for source columns).
    ws: Vec<f64>,
    ggn: Vec<f64>,
    src: Vec<f64>,
    diag: Option<&'a mut [Vec<f64>]>,
}

impl Acc<'_> {
    /// Adds the squared norms `norms[k]` of the per-sample gradients of tensor `t`.
    fn add(&mut self, t: usize, norms: impl Iterator<Item = f64>) {
        for (k, v) in norms.enumerate() {
            self.ggn[t] += self.wg[k] * v;
            self.src[t] += self.ws[k] * v;
        }
    }

    /// Combined weight of column `k`.
    fn w(&self, k: usize) -> f64 {
        self.wg[k] + self.ws[k]
    }
}

/// Runs the pass for sample `n` of a chunk whose node values are `values` (`[Nc, ...]`
/// each). With `diag`, adds weight × squared per-sample gradient elementwise into it (one
/// vector per parameter tensor; the caller divides by the sample count).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample_pass<T: Scalar>(
    net: &Net,
    plan: &Plan,
    params: &[Tensor<T>],
    running: &[Option<RunningStats<'_, T>>],
    values: &[&[T]],
    n: usize,
    label: usize,
    diag: Option<&mut [Vec<f64>]>,
) -> SampleOut {
    let nodes = net.nodes();
    let sample = |i: usize| -> &[T] {
        let len = numel(&plan.shapes[i]);
        &values[i][n * len..(n + 1) * len]
    };
    let out = nodes.len() - 1;
    let classes = plan.classes;

    // The loss head in f64: loss, gradient and Hessian factor in the logits.
    let z: Vec<f64> = sample(out).iter().map(|&v| f(v)).collect();
    let head = plan.loss.sample_head(&z, label);
    let loss = head.loss;

    let nt = params.len();
    let mut acc = Acc {
        wg: Vec::new(),
        ws: Vec::new(),
        ggn: vec![0.0; nt],
        src: vec![0.0; nt],
        diag,
    };
    if !plan.needs[out] {
        return SampleOut {
            ggn: acc.ggn,
            src: acc.src,
            loss,
            sources: 0,
        };
    }
    let first = usize::from(plan.any_sources);
    let mut top = Cols::<T>::zeros(first + classes, classes);
    if plan.any_sources {
        for (v, &g) in top.row_mut(0).iter_mut().zip(&head.grad) {
            *v = T::c(g);
        }
        acc.wg.push(0.0);
        acc.ws.push(0.0);
    }
    for (c, sc) in head.factor.iter().enumerate() {
        for (v, &s) in top.row_mut(first + c).iter_mut().zip(sc) {
            *v = T::c(s);
        }
        acc.wg.push(1.0);
        acc.ws.push(0.0);
    }

    let mut adj: Vec<Option<Cols<T>>> = (0..nodes.len()).map(|_| None).collect();
    let mut pending: Vec<Vec<(usize, f64)>> = vec![Vec::new(); nodes.len()];
    adj[out] = Some(top);
    let mut sources = 0;

    for i in (0..nodes.len()).rev() {
        let Some(mut d) = adj[i].take() else {
            continue;
        };
        // Curvature sources at this node: unit columns, one per element with a weight.
        let inject = std::mem::take(&mut pending[i]);
        if !inject.is_empty() {
            let base = acc.wg.len();
            d.grow(base + inject.len());
            for (j, &(unit, w)) in inject.iter().enumerate() {
                d.row_mut(base + j)[unit] = T::one();
                acc.wg.push(0.0);
                acc.ws.push(w);
            }
            sources += inject.len();
        }
        let node = &nodes[i];
        let needs_in = |k: usize| plan.needs[node.inputs[k].index()];
        let weight = node.first_param;
        let bias_at = |has: bool| has.then_some(weight + 1);
        match &node.layer {
            Layer::Input => {}
            Layer::Linear { bias, .. } => {
                let input = node.inputs[0].index();
                let x = sample(input);
                let din = linear(
                    &d,
                    x,
                    &params[weight],
                    weight,
                    bias_at(*bias),
                    needs_in(0),
                    &mut acc,
                );
                if let Some(din) = din {
                    deposit(&mut adj, input, din);
                }
            }
            Layer::Conv2d {
                bias,
                stride,
                padding,
                ..
            } => {
                let input = node.inputs[0].index();
                let xs = &plan.shapes[input];
                let ws = params[weight].shape();
                let g = ConvGeom {
                    c_in: xs[0],
                    h: xs[1],
                    w: xs[2],
                    c_out: ws[0],
                    kh: ws[2],
                    kw: ws[3],
                    stride: *stride,
                    pad: *padding,
                };
                let conv = ConvStep {
                    g,
                    w: params[weight].data(),
                    weight,
                    bias: bias_at(*bias),
                };
                let din = conv.run(&d, sample(input), needs_in(0), &mut acc);
                if let Some(din) = din {
                    deposit(&mut adj, input, din);
                }
            }
            Layer::BatchNorm2d { eps, .. } => {
                let Some(RunningStats { mean, var }) = running[i] else {
                    unreachable!("the plan refuses batch statistics");
                };
                let input = node.inputs[0].index();
                let xs = &plan.shapes[input];
                let bn = BnStep {
                    c: xs[0],
                    hw: xs[1] * xs[2],
                    mean,
                    var,
                    eps: *eps,
                    gamma_v: params[weight].data(),
                    gamma: weight,
                    beta: weight + 1,
                };
                let din = bn.run(&d, sample(input), needs_in(0), &mut acc);
                if let Some(din) = din {
                    deposit(&mut adj, input, din);
                }
            }
            Layer::Activation(act) => {
                let func = act.unary::<T>();
                let input = node.inputs[0].index();
                let u = sample(input);
                if plan.sources[i] {
                    let g = d.row(0);
                    for (j, (&gj, &uj)) in g.iter().zip(u).enumerate() {
                        let w = f(gj) * f(func.d2(uj));
                        if w != 0.0 {
                            pending[input].push((j, w));
                        }
                    }
                }
                if needs_in(0) {
                    let d1: Vec<T> = u.iter().map(|&x| func.d1(x)).collect();
                    for k in 0..d.rows {
                        for (v, &s) in d.row_mut(k).iter_mut().zip(&d1) {
                            *v = *v * s;
                        }
                    }
                    deposit(&mut adj, input, d);
                }
            }
            Layer::MaxPool2d { kernel, stride } => {
                let input = node.inputs[0].index();
                if needs_in(0) {
                    let xs = &plan.shapes[input];
                    let g = PoolGeom {
                        h: xs[1],
                        w: xs[2],
                        kh: *kernel,
                        kw: *kernel,
                        stride: *stride,
                    };
                    let din = max_pool(&d, sample(input), xs[0], &g);
                    deposit(&mut adj, input, din);
                }
            }
            Layer::AvgPool2d { kernel, stride } => {
                let input = node.inputs[0].index();
                if needs_in(0) {
                    let xs = &plan.shapes[input];
                    let g = PoolGeom {
                        h: xs[1],
                        w: xs[2],
                        kh: *kernel,
                        kw: *kernel,
                        stride: *stride,
                    };
                    let (il, ol) = (g.h * g.w, g.out_len());
                    let mut din = Cols::zeros(d.rows, xs[0] * il);
                    for k in 0..d.rows {
                        let (src, dst) = (d.row(k), din.row_mut(k));
                        for ch in 0..xs[0] {
                            avg_plane_adjoint(
                                &g,
                                &src[ch * ol..(ch + 1) * ol],
                                &mut dst[ch * il..(ch + 1) * il],
                            );
                        }
                    }
                    deposit(&mut adj, input, din);
                }
            }
            Layer::AdaptiveAvgPool2d => {
                let input = node.inputs[0].index();
                if needs_in(0) {
                    let xs = &plan.shapes[input];
                    let hw = xs[1] * xs[2];
                    let inv = T::one() / T::from_usize_lossy(hw);
                    let mut din = Cols::zeros(d.rows, xs[0] * hw);
                    for k in 0..d.rows {
                        let src = d.row(k).to_vec();
                        for (ch, plane) in din.row_mut(k).chunks_mut(hw).enumerate() {
                            plane.fill(src[ch] * inv);
                        }
                    }
                    deposit(&mut adj, input, din);
                }
            }
            Layer::Flatten | Layer::Identity => {
                if needs_in(0) {
                    deposit(&mut adj, node.inputs[0].index(), d);
                }
            }
            Layer::Add => {
                let (a, b) = (node.inputs[0].index(), node.inputs[1].index());
                match (plan.needs[a], plan.needs[b]) {
                    (true, true) => {
                        let copy = Cols {
                            rows: d.rows,
                            width: d.width,
                            data: d.data.clone(),
                        };
                        deposit(&mut adj, a, copy);
                        deposit(&mut adj, b, d);
                    }
                    (true, false) => deposit(&mut adj, a, d),
                    (false, true) => deposit(&mut adj, b, d),
                    (false, false) => {}
                }
            }
        }
    }
    SampleOut {
        ggn: acc.ggn,
        src: acc.src,
        loss,
        sources,
    }
}

/// Adds `d` into node `j`'s adjoint (padding the shorter one with zero rows).
fn deposit<T: Scalar>(adj: &mut [Option<Cols<T>>], j: usize, d: Cols<T>) {
    match &mut adj[j] {
        None => adj[j] = Some(d),
        Some(a) => {
            a.grow(d.rows);
            for (x, &y) in a.data.iter_mut().zip(&d.data) {
                *x = *x + y;
            }
        }
    }
}

/// Linear layer `y = W x + b` for one sample: per-column gradient `δ xᵀ` has squared norm
/// `‖δ‖² ‖x‖²` (and `‖δ‖²` for the bias). Returns `D W` when the input needs an adjoint.
fn linear<T: Scalar>(
    d: &Cols<T>,
    x: &[T],
    w: &Tensor<T>,
    weight: usize,
    bias: Option<usize>,
    need_input: bool,
    acc: &mut Acc<'_>,
) -> Option<Cols<T>> {
    let (out, inn) = (w.shape()[0], w.shape()[1]);
    let xx = sq(x);
    let norms: Vec<f64> = (0..d.rows).map(|k| sq(d.row(k))).collect();
    acc.add(weight, norms.iter().map(|t| t * xx));
    if let Some(b) = bias {
        acc.add(b, norms.iter().copied());
    }
    if acc.diag.is_some() {
        let mut a = vec![0.0; out];
        for k in 0..d.rows {
            let wk = acc.w(k);
            if wk != 0.0 {
                for (ao, &v) in a.iter_mut().zip(d.row(k)) {
                    *ao += wk * f(v) * f(v);
                }
            }
        }
        let x2: Vec<f64> = x.iter().map(|&v| f(v) * f(v)).collect();
        let diag = acc.diag.as_deref_mut().expect("checked above");
        for (o, &ao) in a.iter().enumerate() {
            for (dst, &xi) in diag[weight][o * inn..(o + 1) * inn].iter_mut().zip(&x2) {
                *dst += ao * xi;
            }
        }
        if let Some(b) = bias {
            for (dst, &ao) in diag[b].iter_mut().zip(&a) {
                *dst += ao;
            }
        }
    }
    need_input.then(|| {
        let mut din = Cols::zeros(d.rows, inn);
        gemm(
            T::one(),
            d.mat(),
            MatRef::new(w.data(), out, inn),
            T::zero(),
            &mut din.data,
        );
        din
    })
}

/// One convolution layer of the pass.
struct ConvStep<'a, T> {
    g: ConvGeom,
    w: &'a [T],
    weight: usize,
    bias: Option<usize>,
}

impl<T: Scalar> ConvStep<'_, T> {
    /// Per-column gradients `G_k = D_k cols(x)ᵀ` (`C_out x patch`); their squared norms go
    /// to the weight's sums, either from `G_k` itself or, when cheaper and no diagonal is
    /// wanted, as `⟨D_kᵀ D_k, cols(x)ᵀ cols(x)⟩` over output positions.
    fn run(&self, d: &Cols<T>, x: &[T], need_input: bool, acc: &mut Acc<'_>) -> Option<Cols<T>> {
        let g = &self.g;
        let (co, pl, patch) = (g.c_out, g.positions(), g.patch());
        let r = d.rows;
        let mut cols = vec![T::zero(); patch * pl];
        im2col(g, x, &mut cols, pl, 0);
        let cm = MatRef::new(&cols, patch, pl);
        let dk = |k: usize| MatRef::new(&d.data[k * co * pl..(k + 1) * co * pl], co, pl);

        let direct = (r * co * pl * patch) as f64;
        let gram = (pl * pl) as f64 * (patch + r * co) as f64;
        let mut norms = vec![0.0; r];
        if acc.diag.is_none() && gram < direct {
            let mut xg = vec![T::zero(); pl * pl];
            gemm(T::one(), cm.t(), cm, T::zero(), &mut xg);
            let mut dg = vec![T::zero(); pl * pl];
            for (k, nk) in norms.iter_mut().enumerate() {
                gemm(T::one(), dk(k).t(), dk(k), T::zero(), &mut dg);
                *nk = dg.iter().zip(&xg).map(|(&a, &b)| f(a) * f(b)).sum();
            }
        } else {
            let wl = co * patch;
            let per = (GRAD_BLOCK / wl.max(1)).clamp(1, r.max(1));
            let mut gbuf = vec![T::zero(); per * wl];
            for k0 in (0..r).step_by(per) {
                let kb = per.min(r - k0);
                let dm = MatRef::new(&d.data[k0 * co * pl..(k0 + kb) * co * pl], kb * co, pl);
                gemm(T::one(), dm, cm.t(), T::zero(), &mut gbuf[..kb * wl]);
                for j in 0..kb {
                    let gk = &gbuf[j * wl..(j + 1) * wl];
                    norms[k0 + j] = sq(gk);
                    let wk = acc.w(k0 + j);
                    if let Some(diag) = acc.diag.as_deref_mut() {
                        if wk != 0.0 {
                            for (dst, &v) in diag[self.weight].iter_mut().zip(gk) {
                                *dst += wk * f(v) * f(v);
                            }
                        }
                    }
                }
            }
        }
        acc.add(self.weight, norms.into_iter());

        if let Some(b) = self.bias {
            let mut bnorms = vec![0.0; r];
            for (k, bn) in bnorms.iter_mut().enumerate() {
                let row = d.row(k);
                let wk = acc.w(k);
                for ch in 0..co {
                    let s: f64 = row[ch * pl..(ch + 1) * pl].iter().map(|&v| f(v)).sum();
                    *bn += s * s;
                    if let Some(diag) = acc.diag.as_deref_mut() {
                        diag[b][ch] += wk * s * s;
                    }
                }
            }
            acc.add(b, bnorms.into_iter());
        }

        need_input.then(|| {
            let wt = MatRef::new(self.w, co, patch).t();
            let mut din = Cols::zeros(r, g.in_len());
            let mut tmp = vec![T::zero(); patch * pl];
            for k in 0..r {
                gemm(T::one(), wt, dk(k), T::zero(), &mut tmp);
                col2im_add(g, &tmp, pl, 0, din.row_mut(k));
            }
            din
        })
    }
}

/// One BatchNorm layer in eval mode: `y = γ x̂ + β` with `x̂ = (x − μ) s` fixed per sample.
struct BnStep<'a, T> {
    c: usize,
    hw: usize,
    mean: &'a [T],
    var: &'a [T],
    eps: f64,
    gamma_v: &'a [T],
    gamma: usize,
    beta: usize,
}

impl<T: Scalar> BnStep<'_, T> {
    /// Per-column gradients `Σ_p δ x̂` (γ) and `Σ_p δ` (β) per channel; returns `γ s D`.
    fn run(&self, d: &Cols<T>, x: &[T], need_input: bool, acc: &mut Acc<'_>) -> Option<Cols<T>> {
        let (c, hw) = (self.c, self.hw);
        let eps = T::c(self.eps);
        let s: Vec<T> = self
            .var
            .iter()
            .map(|&v| T::one() / (v + eps).sqrt())
            .collect();
        let xhat: Vec<f64> = x
            .chunks(hw)
            .enumerate()
            .flat_map(|(ch, plane)| {
                let (mu, sc) = (self.mean[ch], s[ch]);
                plane.iter().map(move |&v| f((v - mu) * sc))
            })
            .collect();
        let mut gn = vec![0.0; d.rows];
        let mut bn = vec![0.0; d.rows];
        for k in 0..d.rows {
            let row = d.row(k);
            let wk = acc.w(k);
            for ch in 0..c {
                let plane = &row[ch * hw..(ch + 1) * hw];
                let xh = &xhat[ch * hw..(ch + 1) * hw];
                let a: f64 = plane.iter().zip(xh).map(|(&v, &xv)| f(v) * xv).sum();
                let b: f64 = plane.iter().map(|&v| f(v)).sum();
                gn[k] += a * a;
                bn[k] += b * b;
                if let Some(diag) = acc.diag.as_deref_mut() {
                    diag[self.gamma][ch] += wk * a * a;
                    diag[self.beta][ch] += wk * b * b;
                }
            }
        }
        acc.add(self.gamma, gn.into_iter());
        acc.add(self.beta, bn.into_iter());
        need_input.then(|| {
            let mut din = Cols::zeros(d.rows, c * hw);
            for k in 0..d.rows {
                let src = d.row(k);
                let dst = &mut din.data[k * c * hw..(k + 1) * c * hw];
                for ch in 0..c {
                    let sc = self.gamma_v[ch] * s[ch];
                    for (o, &v) in dst[ch * hw..(ch + 1) * hw]
                        .iter_mut()
                        .zip(&src[ch * hw..(ch + 1) * hw])
                    {
                        *o = sc * v;
                    }
                }
            }
            din
        })
    }
}

/// Max pooling's adjoint for one sample: each output's adjoint goes to its window's argmax
/// (the same kernel and tie rule as the tape's op).
fn max_pool<T: Scalar>(d: &Cols<T>, x: &[T], channels: usize, g: &PoolGeom) -> Cols<T> {
    let (il, ol) = (g.h * g.w, g.out_len());
    let mut arg = vec![0u32; channels * ol];
    let mut y = vec![T::zero(); ol];
    for ch in 0..channels {
        max_plane(
            g,
            &x[ch * il..(ch + 1) * il],
            &mut y,
            &mut arg[ch * ol..(ch + 1) * ol],
        );
    }
    let mut din = Cols::zeros(d.rows, channels * il);
    for k in 0..d.rows {
        let src = d.row(k);
        let dst = &mut din.data[k * channels * il..(k + 1) * channels * il];
        for ch in 0..channels {
            for o in 0..ol {
                let idx = ch * il + arg[ch * ol + o] as usize;
                dst[idx] = dst[idx] + src[ch * ol + o];
            }
        }
    }
    din
}
