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
use crate::net::{Activation, Layer, Net, RunningStats};
use crate::ops::{Loss, SampleHead, Unary};
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

/// What one sample's pass reads: the net, its plan and parameters, and the chunk's node values.
struct Ctx<'a, T> {
    net: &'a Net,
    plan: &'a Plan,
    params: &'a [Tensor<T>],
    running: &'a [Option<RunningStats<'a, T>>],
    values: &'a [&'a [T]],
    n: usize,
}

impl<'a, T: Scalar> Ctx<'a, T> {
    /// Node `i`'s value for this sample.
    fn sample(&self, i: usize) -> &'a [T] {
        let len = numel(&self.plan.shapes[i]);
        &self.values[i][self.n * len..(self.n + 1) * len]
    }
}

/// What one sample's pass accumulates while it walks the net backward.
struct Walk<'d, T> {
    /// The columns' adjoint at each node, once some consumer has deposited it.
    adj: Vec<Option<Cols<T>>>,
    /// Source columns (element, weight) waiting at each node until its adjoint is complete.
    pending: Vec<Vec<(usize, f64)>>,
    acc: Acc<'d>,
    /// Source columns created so far.
    sources: usize,
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
    let ctx = Ctx {
        net,
        plan,
        params,
        running,
        values,
        n,
    };
    let nodes = net.nodes().len();
    let out = nodes - 1;
    // The loss head in f64: loss, gradient and Hessian factor in the logits.
    let z: Vec<f64> = ctx.sample(out).iter().map(|&v| f(v)).collect();
    let head = plan.loss.sample_head(&z, label);
    let mut walk = Walk {
        adj: (0..nodes).map(|_| None).collect(),
        pending: vec![Vec::new(); nodes],
        acc: Acc {
            wg: Vec::new(),
            ws: Vec::new(),
            ggn: vec![0.0; params.len()],
            src: vec![0.0; params.len()],
            diag,
        },
        sources: 0,
    };
    if plan.needs[out] {
        walk.adj[out] = Some(head_columns(plan, &head, &mut walk.acc));
        for i in (0..nodes).rev() {
            if let Some(d) = walk.adj[i].take() {
                let d = walk.inject_sources(i, d);
                walk.step(&ctx, i, d);
            }
        }
    }
    SampleOut {
        ggn: walk.acc.ggn,
        src: walk.acc.src,
        loss: head.loss,
        sources: walk.sources,
    }
}

/// The columns at the logits: the ordinary adjoint (row 0, weight 0, when the net has
/// sources) and one GGN column per class (weight 1).
fn head_columns<T: Scalar>(plan: &Plan, head: &SampleHead, acc: &mut Acc<'_>) -> Cols<T> {
    let classes = plan.classes;
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
    top
}

impl<T: Scalar> Walk<'_, T> {
    /// Appends node `i`'s waiting source columns to its adjoint `d`: one unit row per
    /// element, with its weight.
    fn inject_sources(&mut self, i: usize, mut d: Cols<T>) -> Cols<T> {
        let inject = std::mem::take(&mut self.pending[i]);
        if !inject.is_empty() {
            let base = self.acc.wg.len();
            d.grow(base + inject.len());
            for (j, &(unit, w)) in inject.iter().enumerate() {
                d.row_mut(base + j)[unit] = T::one();
                self.acc.wg.push(0.0);
                self.acc.ws.push(w);
            }
            self.sources += inject.len();
        }
        d
    }

    /// Takes node `i`'s complete adjoint `d` through its layer: adds the layer's per-sample
    /// gradient norms and deposits the input adjoints where they are needed.
    fn step(&mut self, ctx: &Ctx<'_, T>, i: usize, d: Cols<T>) {
        let node = &ctx.net.nodes()[i];
        let input = match node.layer {
            Layer::Input => return,
            Layer::Add => {
                return self.split(ctx, node.inputs[0].index(), node.inputs[1].index(), d)
            }
            _ => node.inputs[0].index(),
        };
        let need = ctx.plan.needs[input];
        let (x, xs) = (ctx.sample(input), &ctx.plan.shapes[input]);
        let weight = node.first_param;
        let bias_at = |has: bool| has.then_some(weight + 1);
        let acc = &mut self.acc;
        let din = match &node.layer {
            Layer::Input | Layer::Add => unreachable!("handled above"),
            Layer::Linear { bias, .. } => {
                let w = &ctx.params[weight];
                linear(&d, x, w, weight, bias_at(*bias), need, acc)
            }
            Layer::Conv2d {
                bias,
                stride,
                padding,
                ..
            } => {
                let ws = ctx.params[weight].shape();
                let conv = ConvStep {
                    g: ConvGeom {
                        c_in: xs[0],
                        h: xs[1],
                        w: xs[2],
                        c_out: ws[0],
                        kh: ws[2],
                        kw: ws[3],
                        stride: *stride,
                        pad: *padding,
                    },
                    w: ctx.params[weight].data(),
                    weight,
                    bias: bias_at(*bias),
                };
                conv.run(&d, x, need, acc)
            }
            Layer::BatchNorm2d { eps, .. } => {
                let Some(RunningStats { mean, var }) = ctx.running[i] else {
                    unreachable!("the plan refuses batch statistics");
                };
                let bn = BnStep {
                    c: xs[0],
                    hw: xs[1] * xs[2],
                    mean,
                    var,
                    eps: *eps,
                    gamma_v: ctx.params[weight].data(),
                    gamma: weight,
                    beta: weight + 1,
                };
                bn.run(&d, x, need, acc)
            }
            Layer::Activation(act) => {
                if ctx.plan.sources[i] {
                    self.pending[input].extend(source_weights(*act, d.row(0), x));
                }
                need.then(|| scale_columns(d, act.unary::<T>(), x))
            }
            Layer::MaxPool2d { kernel, stride } => {
                need.then(|| max_pool(&d, x, xs[0], &square_window(xs, *kernel, *stride)))
            }
            Layer::AvgPool2d { kernel, stride } => {
                need.then(|| avg_pool(&d, xs[0], &square_window(xs, *kernel, *stride)))
            }
            Layer::AdaptiveAvgPool2d => need.then(|| global_avg_pool(&d, xs)),
            Layer::Flatten | Layer::Identity => need.then_some(d),
        };
        if let Some(din) = din {
            deposit(&mut self.adj, input, din);
        }
    }

    /// A sum node's adjoint goes unchanged to both of its inputs (those that need one).
    fn split(&mut self, ctx: &Ctx<'_, T>, a: usize, b: usize, d: Cols<T>) {
        match (ctx.plan.needs[a], ctx.plan.needs[b]) {
            (true, true) => {
                let copy = Cols {
                    rows: d.rows,
                    width: d.width,
                    data: d.data.clone(),
                };
                deposit(&mut self.adj, a, copy);
                deposit(&mut self.adj, b, d);
            }
            (true, false) => deposit(&mut self.adj, a, d),
            (false, true) => deposit(&mut self.adj, b, d),
            (false, false) => {}
        }
    }
}

/// The source columns of a smooth activation `a = φ(u)`: element `j` of `u` with weight
/// `g_j φ''(u_j)`, where `g` is the ordinary adjoint at `a` (zero weights dropped).
fn source_weights<'a, T: Scalar>(
    act: Activation,
    g: &'a [T],
    u: &'a [T],
) -> impl Iterator<Item = (usize, f64)> + 'a {
    let func = act.unary::<T>();
    g.iter()
        .zip(u)
        .enumerate()
        .map(move |(j, (&gj, &uj))| (j, f(gj) * f(func.d2(uj))))
        .filter(|&(_, w)| w != 0.0)
}

/// An elementwise layer's adjoint: every column times `φ'(u)`.
fn scale_columns<T: Scalar>(mut d: Cols<T>, func: Unary<T>, u: &[T]) -> Cols<T> {
    let d1: Vec<T> = u.iter().map(|&x| func.d1(x)).collect();
    for k in 0..d.rows {
        for (v, &s) in d.row_mut(k).iter_mut().zip(&d1) {
            *v = *v * s;
        }
    }
    d
}

/// The window of a square pooling layer over a `[channels, h, w]` input.
fn square_window(xs: &[usize], kernel: usize, stride: usize) -> PoolGeom {
    PoolGeom {
        h: xs[1],
        w: xs[2],
        kh: kernel,
        kw: kernel,
        stride,
    }
}

/// Average pooling's adjoint for one sample (`[channels, h, w]` input).
fn avg_pool<T: Scalar>(d: &Cols<T>, channels: usize, g: &PoolGeom) -> Cols<T> {
    let (il, ol) = (g.h * g.w, g.out_len());
    let mut din = Cols::zeros(d.rows, channels * il);
    for k in 0..d.rows {
        let (src, dst) = (d.row(k), din.row_mut(k));
        for ch in 0..channels {
            avg_plane_adjoint(
                g,
                &src[ch * ol..(ch + 1) * ol],
                &mut dst[ch * il..(ch + 1) * il],
            );
        }
    }
    din
}

/// Global average pooling's adjoint for one sample: each channel's adjoint spread evenly
/// over its plane (`xs` = `[channels, h, w]`).
fn global_avg_pool<T: Scalar>(d: &Cols<T>, xs: &[usize]) -> Cols<T> {
    let hw = xs[1] * xs[2];
    let inv = T::one() / T::from_usize_lossy(hw);
    let mut din = Cols::zeros(d.rows, xs[0] * hw);
    for k in 0..d.rows {
        let src = d.row(k);
        for (ch, plane) in din.data[k * xs[0] * hw..(k + 1) * xs[0] * hw]
            .chunks_mut(hw)
            .enumerate()
        {
            plane.fill(src[ch] * inv);
        }
    }
    din
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
