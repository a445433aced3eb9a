//! 2-D convolution (NCHW input, `[C_out, C_in, kh, kw]` weight, optional bias, stride, zero
//! padding). On AVX-512 and AVX2+FMA machines convolutions run as implicit products that read
//! the column matrix straight out of a zero-padded copy of each sample (no lowering): for
//! stride 1 the padded image, for stride `s > 1` its `s x s` phase planes
//! `P_ab[y][x] = Xpad[s y + a][s x + b]` (see `kernels::conv::Phases`), in which every tap is
//! again a contiguous run, so the value, its tangent and the weight gradient use the same
//! kernels with another layout and offset list. With AVX-512, a "same" stride-1 convolution
//! (`k x k`, `k = 2 pad + 1`: every 3x3 of cnn-s and resnet20) makes no padded copy for its
//! value, tangent and input gradient: the kernel reads the compact sample with the padding's
//! lanes masked off (`nopack::CompactTaps`) and writes the compact output, the same bits with
//! neither the copy nor the compaction, and without the padded pitch's wasted columns (10%
//! fewer at 16x16, 18% at 8x8). The input gradient is a convolution of Ȳ
//! with the flipped weight: for stride 1 one product, for stride `s` one stride-1 product per
//! phase of X̄ with the taps of that phase (`ki % s == a`, `kj % s == b`), written back
//! interleaved. The shapes the kernels decline (more than 64 output rows, fewer than 16
//! columns, a non-square strided kernel) and other machines are lowered to im2col + GEMM. The
//! formulas below are written with the column matrix cols(X) either way.
//!
//! Convolution Y = W ⊛ X + b is bilinear in (W, X) and affine in b:
//! - value: Y_n = W cols(X_n) + b
//! - JVP: Ẏ_n = Ẇ cols(X_n) + W cols(Ẋ_n) + ḃ
//! - VJP: X̄_n = col2im(Wᵀ Ȳ_n), W̄ = Σ_n Ȳ_n cols(X_n)ᵀ, b̄ = Σ_{n,p} Ȳ_n
//! - tangent of VJP: X̄˙_n = col2im(Ẇᵀ Ȳ_n + Wᵀ Ȳ˙_n),
//!   W̄˙ = Σ_n Ȳ˙_n cols(X_n)ᵀ + Ȳ_n cols(Ẋ_n)ᵀ, b̄˙ = Σ_{n,p} Ȳ˙_n
//!
//! Samples run in parallel; the weight-gradient sum over samples uses fixed chunks reduced in
//! order, so results do not depend on the thread count.

use super::activation::{apply_in_place, Unary};
use super::conv_stream::DenseGrad;
use super::pool::PlanePool;
use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::conv::{
    col2im_add, compact_rows, copy_plane, expand_rows, flip_phase, flip_weight, im2col, im2row,
    implicit_cols, implicit_offsets, khwc_to_ckhw, pad_chw, pad_hwc, padded_chw_len,
    padded_hwc_len, phase_taps, phase_transposed_geom, tap_offsets, transposed_geom, write_phase,
    zeroed_scratch, ConvGeom, Phases,
};
use crate::kernels::cpu::vectorized;
use crate::kernels::gemm::{gemm, MatRef};
use crate::kernels::nopack::{self, CompactTaps, PackedA};
use crate::kernels::par::{fixed_ranges, par_build, SendPtr};
use crate::kernels::pool::max_plane;
use crate::kernels::rowdot;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;

pub(crate) struct Conv2d {
    pub(super) x: usize,
    pub(super) w: usize,
    pub(super) b: Option<usize>,
    pub(super) g: ConvGeom,
    pub(super) n: usize,
}

/// Element budget for the per-group partial weight gradients.
pub(super) const PARTIAL_BUDGET: usize = 1 << 25;
/// Most groups a weight-gradient reduction is split into.
pub(super) const MAX_GROUPS: usize = 16;
/// Target number of GEMM columns (samples x positions) per chunk, so that packing is amortized.
const TARGET_COLS: usize = 512;

/// A run of consecutive samples lowered together: their column matrices sit side by side in
/// one `patch x (len * positions)` matrix, so one GEMM serves them all.
#[derive(Clone, Copy)]
struct Chunk {
    start: usize,
    len: usize,
}

/// Splits the batch into chunks of a size that depends only on the shapes.
fn chunks(g: &ConvGeom, n: usize) -> Vec<Chunk> {
    let len = (TARGET_COLS / g.positions()).clamp(1, n.max(1));
    (0..n)
        .step_by(len)
        .map(|start| Chunk {
            start,
            len: len.min(n - start),
        })
        .collect()
}

/// Column matrix (`patch x len·P`) of samples `ch` of the `[*, C_in, H, W]` buffer `x`,
/// whose sample `s` starts at `base + s * in_len`.
fn lower<T: Scalar>(g: &ConvGeom, x: &[T], base: usize, ch: Chunk, buf: &mut Vec<T>) {
    let (il, pl) = (g.in_len(), g.positions());
    let ld = ch.len * pl;
    buf.resize(g.patch() * ld, T::zero());
    for j in 0..ch.len {
        let off = base + (ch.start + j) * il;
        im2col(g, &x[off..off + il], buf, ld, j * pl);
    }
}

/// Row matrix (`len·P x patch`, see [`im2row`]) of samples `ch` of the `[*, C_in, H, W]`
/// buffer `x`, whose sample `s` starts at `base + s * in_len`; `padded` is scratch.
fn lower_rows<T: Scalar>(
    g: &ConvGeom,
    x: &[T],
    base: usize,
    ch: Chunk,
    padded: &mut Vec<T>,
    rows: &mut Vec<T>,
) {
    let (il, block) = (g.in_len(), g.positions() * g.patch());
    padded.resize(padded_hwc_len(g), T::zero());
    rows.resize(ch.len * block, T::zero());
    for j in 0..ch.len {
        let off = base + (ch.start + j) * il;
        pad_hwc(g, &x[off..off + il], padded);
        im2row(g, padded, &mut rows[j * block..(j + 1) * block]);
    }
}

/// Gathers samples `ch` of a `[*, C_out, P]` buffer (sample `s` at `base + s * out_len`) into
/// a `C_out x len·P` matrix.
fn gather<T: Scalar>(g: &ConvGeom, src: &[T], base: usize, ch: Chunk, buf: &mut Vec<T>) {
    let pl = g.positions();
    let ld = ch.len * pl;
    buf.resize(g.c_out * ld, T::zero());
    for j in 0..ch.len {
        let off = base + (ch.start + j) * g.out_len();
        for co in 0..g.c_out {
            buf[co * ld + j * pl..co * ld + (j + 1) * pl]
                .copy_from_slice(&src[off + co * pl..off + (co + 1) * pl]);
        }
    }
}

/// Scatters a `C_out x len·P` matrix to samples `ch` of the output at `dst` (sample `s` at
/// `base + s * out_len`), adding `bias[c]` per channel when given.
fn scatter<T: Scalar>(
    g: &ConvGeom,
    m: &[T],
    ch: Chunk,
    dst: SendPtr<T>,
    base: usize,
    bias: Option<&[T]>,
) {
    let pl = g.positions();
    let ld = ch.len * pl;
    for j in 0..ch.len {
        let off = base + (ch.start + j) * g.out_len();
        // SAFETY: each chunk owns its samples' output blocks.
        let out = unsafe { dst.slice(off, g.out_len()) };
        for co in 0..g.c_out {
            let b = bias.map_or(T::zero(), |b| b[co]);
            for (o, &v) in out[co * pl..(co + 1) * pl]
                .iter_mut()
                .zip(&m[co * ld + j * pl..])
            {
                *o = v + b;
            }
        }
    }
}

/// Writes `Σ_t A_t cols_t (+ bias)` for the samples of chunk `ch` into the `[*, C_out, P]`
/// output at `dst` (sample `s` at `base + s * out_len`), each `A_t` a `C_out x patch` matrix and
/// `cols_t` a column matrix from [`lower`]. With few output channels the products go straight
/// into each sample's output block (the packing-free kernel gains nothing from longer
/// products); otherwise one product per term covers the chunk in `tmp` and is scattered.
fn emit<T: Scalar>(
    g: &ConvGeom,
    ch: Chunk,
    terms: &[(MatRef<T>, &[T])],
    tmp: &mut Vec<T>,
    dst: SendPtr<T>,
    base: usize,
    bias: Option<&[T]>,
) {
    let (pl, patch, ol) = (g.positions(), g.patch(), g.out_len());
    let ld = ch.len * pl;
    if g.c_out > nopack::MAX_ROWS {
        tmp.resize(g.c_out * ld, T::zero());
        for (t, &(a, cols)) in terms.iter().enumerate() {
            let beta = if t == 0 { T::zero() } else { T::one() };
            gemm(T::one(), a, MatRef::new(cols, patch, ld), beta, tmp);
        }
        if terms.is_empty() {
            tmp.fill(T::zero());
        }
        scatter(g, tmp, ch, dst, base, bias);
        return;
    }
    for j in 0..ch.len {
        // SAFETY: each chunk owns its samples' output blocks.
        let out = unsafe { dst.slice(base + (ch.start + j) * ol, ol) };
        for (t, &(a, cols)) in terms.iter().enumerate() {
            let beta = if t == 0 { T::zero() } else { T::one() };
            let b = MatRef::strided(&cols[j * pl..], patch, pl, ld, 1);
            gemm(T::one(), a, b, beta, out);
        }
        if terms.is_empty() {
            out.fill(T::zero());
        }
        if let Some(bias) = bias {
            for (row, &bc) in out.chunks_exact_mut(pl).zip(bias) {
                row.iter_mut().for_each(|v| *v = *v + bc);
            }
        }
    }
}

/// Scratch buffers of one implicit-product task: the padded input, the product at the
/// padded row pitch, and (for an inference epilogue) one output plane and its pooling argmax.
struct Scratch<T> {
    padded: Vec<T>,
    tmp: Vec<T>,
    plane: Vec<T>,
    arg: Vec<u32>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            padded: Vec::new(),
            tmp: Vec::new(),
            plane: Vec::new(),
            arg: Vec::new(),
        }
    }
}

/// True when the convolution `g` runs as an implicit product on this machine: the
/// packing-free kernel reads the rows of the column matrix straight out of the padded image
/// (its phase planes for a stride above 1, see [`Phases`]; no im2col copy, no col2im
/// scatter). Depends only on the shape and the CPU.
pub(super) fn implicit<T: Scalar>(g: &ConvGeom) -> bool {
    nopack::accepts_type::<T>(g.c_out, implicit_cols(g))
}

/// How a convolution's value, tangent or weight gradient is computed: as implicit products
/// out of the padded input, or through the lowered (im2col / im2row) matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Implicit products ([`nopack`] for values, [`rowdot`] for weight gradients).
    Implicit,
    /// Lowered matrices and the general GEMM.
    Lowered,
}

impl Path {
    /// The path of the value and tangent of `g` on this machine.
    fn value<T: Scalar>(g: &ConvGeom) -> Path {
        if implicit::<T>(g) {
            Path::Implicit
        } else {
            Path::Lowered
        }
    }

    /// The path of the weight gradient of `g` on this machine: implicit where [`rowdot`]
    /// runs, except for strided kernels larger than 1x1. There the per-sample products are
    /// short (resnet20's 3x3 stride-2 layers: 71 and 271 columns), the kernel's lane
    /// reductions dominate, and one large packed GEMM over the im2row matrix was as fast or
    /// faster (f32, 1 thread, batch 128: 2.9-3.1 against 1.9-2.1 ms for 32->64 on 16x16,
    /// 3.0-3.3 against 3.0-3.2 ms for 16->32 on 32x32), while the 1x1 stride-2 shortcuts gain
    /// (0.54-0.56 against 1.48-1.67 ms for 16->32 on 32x32).
    fn weight<T: Scalar>(g: &ConvGeom) -> Path {
        if rowdot::accepts_type::<T>() && (g.stride == 1 || g.kh * g.kw == 1) {
            Path::Implicit
        } else {
            Path::Lowered
        }
    }
}

/// How the implicit products of one convolution read each sample.
pub(super) enum SampleTaps {
    /// Straight from the compact sample, the padding masked off ("same" stride-1
    /// convolutions: no padded copy, and the product is already the compact output).
    Compact(CompactTaps),
    /// Out of the sample's zero-padded copy (phase planes for a stride above 1), at these
    /// row offsets ([`implicit_offsets`]), the product compacted afterwards.
    Padded(Vec<usize>),
}

impl SampleTaps {
    /// The way `g`'s products read their samples on this machine ([`implicit`] must hold):
    /// compact wherever that pays ([`nopack::compact_taps_pay`]). Depends only on the shape and
    /// the CPU; both ways give the same bits.
    pub(super) fn of<T: Scalar>(g: &ConvGeom) -> Self {
        let compact =
            (g.stride == 1 && g.kh == g.kw && nopack::compact_taps_pay::<T>(g.c_out, g.h * g.w))
                .then(|| CompactTaps::new(g.c_in, g.h, g.w, g.kh, g.pad))
                .flatten();
        match compact {
            Some(taps) => SampleTaps::Compact(taps),
            None => SampleTaps::Padded(implicit_offsets(g)),
        }
    }
}

/// Writes `Σ_t A_t ⊛ x_t (+ bias)` for one sample into `out` (`[c_out, ho, wo]`, every
/// element written), each `A_t` a row-major `c_out x g.patch()` weight packed by
/// [`packed_weight`] and `x_t` a CHW sample; `taps` from [`SampleTaps::of`] for `g`.
fn implicit_sample<T: Scalar>(
    g: &ConvGeom,
    taps: &SampleTaps,
    terms: &[(&PackedA<T>, &[T])],
    s: &mut Scratch<T>,
    out: &mut [T],
    bias: Option<&[T]>,
) {
    let offs = match taps {
        SampleTaps::Padded(offs) => offs,
        SampleTaps::Compact(taps) => return compact_sample(g, taps, terms, out, bias),
    };
    let n = implicit_product(g, offs, terms, s);
    compact_rows(g, &s.tmp, n, out, bias);
}

/// [`implicit_sample`] over compact taps: each term's product straight into `out`, then the
/// bias (the same sums in the same order as over the padded copy, so the same bits).
pub(super) fn compact_sample<T: Scalar>(
    g: &ConvGeom,
    taps: &CompactTaps,
    terms: &[(&PackedA<T>, &[T])],
    out: &mut [T],
    bias: Option<&[T]>,
) {
    let positions = taps.positions();
    assert!(out.len() >= g.c_out * positions, "compact conv output");
    for (t, &(a, x)) in terms.iter().enumerate() {
        assert!(
            x.len() >= g.in_len() && a.rows() == g.c_out,
            "compact conv operands"
        );
        let beta = if t == 0 { T::zero() } else { T::one() };
        // SAFETY: `x` covers the sample's c_in·h·w elements and `out` c_out rows of
        // `positions` (checked above); the kernel checks `a` against the taps.
        let ran = unsafe {
            nopack::try_gemm_compact_packed(
                T::one(),
                a,
                taps,
                x.as_ptr(),
                beta,
                (out.as_mut_ptr(), positions),
            )
        };
        assert!(ran, "compact convolution declined by the kernel");
    }
    if terms.is_empty() {
        out.fill(T::zero());
    }
    if let Some(bias) = bias {
        vectorized(
            #[inline(always)]
            || {
                for (plane, &b) in out.chunks_exact_mut(positions).zip(bias) {
                    plane.iter_mut().for_each(|v| *v = *v + b);
                }
            },
        );
    }
}

/// `A ⊛ x` for one sample into `s.tmp`, read through `taps`: returns the length of each
/// output channel's row there and the pitch of its output rows (`wo` when compact).
fn sample_product<T: Scalar>(
    g: &ConvGeom,
    taps: &SampleTaps,
    a: &PackedA<T>,
    x: &[T],
    s: &mut Scratch<T>,
) -> (usize, usize) {
    match taps {
        SampleTaps::Compact(taps) => {
            s.tmp.resize(g.c_out * taps.positions(), T::zero());
            compact_sample(g, taps, &[(a, x)], &mut s.tmp, None);
            (taps.positions(), g.wo())
        }
        SampleTaps::Padded(offs) => (implicit_product(g, offs, &[(a, x)], s), Phases::of(g).wq),
    }
}

/// `Σ_t A_t ⊛ x_t` for one sample into `s.tmp` at the padded row pitch (`c_out` rows of the
/// returned length; see [`implicit_sample`] for the arguments).
fn implicit_product<T: Scalar>(
    g: &ConvGeom,
    offs: &[usize],
    terms: &[(&PackedA<T>, &[T])],
    s: &mut Scratch<T>,
) -> usize {
    let n = implicit_cols(g);
    s.tmp.resize(g.c_out * n, T::zero());
    zeroed_scratch(&mut s.padded, padded_chw_len(g));
    for (t, &(a, x)) in terms.iter().enumerate() {
        pad_chw(g, x, &mut s.padded);
        let beta = if t == 0 { T::zero() } else { T::one() };
        product_of_padded(g, offs, a, &s.padded, beta, &mut s.tmp);
    }
    if terms.is_empty() {
        s.tmp.fill(T::zero());
    }
    n
}

/// The weight `w` (`c_out x taps`, row-major) of an implicit product over `g` ([`implicit`]
/// must hold), packed once for every sample's product.
pub(super) fn packed_weight<T: Scalar>(g: &ConvGeom, taps: usize, w: &[T]) -> PackedA<T> {
    PackedA::new(g.c_out, taps, w).expect("an implicit convolution has the packing-free kernel")
}

/// `tmp = A ⊛ x + beta tmp` for one sample already in its zero-padded layout (`padded`,
/// [`padded_chw_len`] long), `tmp` at the padded row pitch ([`implicit_cols`] columns per row
/// of `c_out`), `A` the packed `c_out x offs.len()` weight; [`implicit`] must hold for `g`.
pub(super) fn product_of_padded<T: Scalar>(
    g: &ConvGeom,
    offs: &[usize],
    a: &PackedA<T>,
    padded: &[T],
    beta: T,
    tmp: &mut [T],
) {
    let n = implicit_cols(g);
    assert_eq!(a.rows(), g.c_out, "implicit conv weight");
    assert!(padded.len() >= padded_chw_len(g) && tmp.len() >= g.c_out * n);
    // SAFETY: every row offset plus `n` stays inside the padded image (`tap_offsets`), `tmp`
    // holds c_out rows of `n` (checked above); the kernel checks `a` against `offs`.
    let ran = unsafe {
        nopack::try_gemm_rows_packed(
            n,
            T::one(),
            a,
            (padded.as_ptr(), offs),
            beta,
            (tmp.as_mut_ptr(), n),
        )
    };
    assert!(ran, "implicit convolution declined by the kernel");
}

/// What an inference pass applies to a convolution's output, plane by plane while the plane
/// is in cache: an activation, then a pooling window (each optional). The values are those
/// of the separate ops, bit for bit: the same bias add, the same activation, the same pooling.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<T> {
    /// The activation applied after the bias.
    pub act: Option<Unary<T>>,
    /// The pooling applied after the activation.
    pub pool: Option<PlanePool>,
}

/// `epi(W ⊛ X + b)` over `n` CHW samples (`[n, c_out, ho', wo']`, the pooled size when the
/// epilogue pools), or `None` when this convolution does not run as an implicit product here
/// (the caller then records the ops one by one). With `keep_arg` and a max-pooling epilogue
/// the second value holds each pooled element's argmax within its convolution output plane
/// (as [`super::pool`]'s max pooling keeps it); otherwise it is empty. Nothing else is kept.
pub(crate) fn conv_value_fused<T: Scalar>(
    g: &ConvGeom,
    n: usize,
    xv: &[T],
    wv: &[T],
    bias: Option<&[T]>,
    epi: Epilogue<T>,
    keep_arg: bool,
) -> Option<(Tensor<T>, Vec<u32>)> {
    if !implicit::<T>(g) {
        return None;
    }
    let taps = SampleTaps::of::<T>(g);
    let wp = packed_weight(g, g.patch(), wv);
    let (ho, wo) = epi.pool.map_or((g.ho(), g.wo()), |p| p.out_hw());
    let (il, plane_len) = (g.in_len(), ho * wo);
    let keep_arg = keep_arg && matches!(epi.pool, Some(PlanePool::Max(_)));
    let mut args = vec![0u32; if keep_arg { n * g.c_out * plane_len } else { 0 }];
    let args_out = SendPtr(args.as_mut_ptr());
    let y = per_sample(1, n, g.c_out * plane_len, |_, i, s, out| {
        let (ld, pitch) = sample_product(g, &taps, &wp, &xv[i * il..(i + 1) * il], s);
        s.plane.resize(g.positions(), T::zero());
        let (tmp, scratch, arg) = (&s.tmp, &mut s.plane, &mut s.arg);
        // SAFETY: sample `i` owns its block of the argmax buffer (empty without `keep_arg`).
        let mut kept = keep_arg.then(|| unsafe { args_out.slice(i * out.len(), out.len()) });
        vectorized(
            #[inline(always)]
            || {
                for (co, dst) in out.chunks_exact_mut(plane_len).enumerate() {
                    let plane = if epi.pool.is_some() {
                        &mut scratch[..]
                    } else {
                        &mut dst[..]
                    };
                    copy_plane(g.wo(), pitch, &tmp[co * ld..], plane, bias.map(|b| b[co]));
                    if let Some(f) = epi.act {
                        apply_in_place(f, plane);
                    }
                    match (epi.pool, kept.as_deref_mut()) {
                        (Some(PlanePool::Max(pg)), Some(k)) => {
                            max_plane(&pg, scratch, dst, &mut k[co * plane_len..][..plane_len])
                        }
                        (Some(p), _) => p.apply(scratch, dst, arg),
                        (None, _) => {}
                    }
                }
            },
        );
    });
    let y = Tensor::from_vec(&[n, g.c_out, ho, wo], y).expect("fused conv value");
    Some((y, args))
}

/// A `[dirs, n, block]` buffer whose block for direction `k` and sample `i` is written by
/// `f(k, i, scratch, block)` (every element), in parallel with per-task scratch.
fn per_sample<T: Scalar>(
    dirs: usize,
    n: usize,
    block: usize,
    f: impl Fn(usize, usize, &mut Scratch<T>, &mut [T]) + Sync + Send,
) -> Vec<T> {
    par_build(dirs * n * block, block, Scratch::default, |s, idx, out| {
        f(idx / n, idx % n, s, out)
    })
}

/// Per-channel sums over samples and positions of a `[N, C, P]` buffer, in a fixed order.
fn channel_sums<T: Scalar>(g: &[T], c: usize, positions: usize) -> Vec<T> {
    let mut s = vec![T::zero(); c];
    for sample in g.chunks(c * positions) {
        for (acc, row) in s.iter_mut().zip(sample.chunks(positions)) {
            *acc = *acc + crate::kernels::reduce::sum(row);
        }
    }
    s
}

/// The value `W ⊛ X + b` of a convolution over `n` samples, `[n, c_out, ho, wo]`, on `path`
/// (`Path::Implicit` only where [`implicit`] holds).
fn conv_value<T: Scalar>(
    path: Path,
    g: &ConvGeom,
    n: usize,
    xv: &[T],
    wv: &[T],
    bias: Option<&[T]>,
) -> Tensor<T> {
    let shape = [n, g.c_out, g.ho(), g.wo()];
    let il = g.in_len();
    if path == Path::Implicit {
        let taps = SampleTaps::of::<T>(g);
        let wp = packed_weight(g, g.patch(), wv);
        let y = per_sample(1, n, g.out_len(), |_, i, s, out| {
            implicit_sample(g, &taps, &[(&wp, &xv[i * il..(i + 1) * il])], s, out, bias);
        });
        return Tensor::from_vec(&shape, y).expect("conv value");
    }
    let mut y = Tensor::zeros(&shape);
    let wm = MatRef::new(wv, g.c_out, g.patch());
    let yp = SendPtr(y.data_mut().as_mut_ptr());
    chunks(g, n).par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(cols, tmp), &ch| {
            lower(g, xv, 0, ch, cols);
            emit(g, ch, &[(wm, &cols[..])], tmp, yp, 0, bias);
        },
    );
    y
}

/// The tangents (`[K, ...]`, `None` when zero) of a convolution's input, weight and bias.
struct Tangents<'a, T> {
    x: Option<&'a [T]>,
    w: Option<&'a [T]>,
    b: Option<&'a [T]>,
}

/// The tangent `Ẏ_k = Ẇ_k ⊛ X + W ⊛ Ẋ_k + ḃ_k` of a convolution, `[k, n, c_out, ho, wo]`,
/// on `path` (as [`conv_value`]).
fn conv_tangent<T: Scalar>(
    path: Path,
    g: &ConvGeom,
    n: usize,
    k: usize,
    xv: &[T],
    wv: &[T],
    t: Tangents<T>,
) -> Tensor<T> {
    let shape = [k, n, g.c_out, g.ho(), g.wo()];
    let (il, wl, in_all, out_all) = (g.in_len(), wv.len(), n * g.in_len(), n * g.out_len());
    let bias_k = |kk: usize| t.b.map(|b| &b[kk * g.c_out..(kk + 1) * g.c_out]);
    if path == Path::Implicit {
        let taps = SampleTaps::of::<T>(g);
        let pack = |w: &[T]| packed_weight(g, g.patch(), w);
        let wp = pack(wv);
        let wtp: Vec<PackedA<T>> =
            t.w.map_or_else(Vec::new, |wt| wt.chunks(wl).map(pack).collect());
        let d = per_sample(k, n, g.out_len(), |kk, i, s, out| {
            let mut terms = Vec::with_capacity(2);
            if let Some(w) = wtp.get(kk) {
                terms.push((w, &xv[i * il..(i + 1) * il]));
            }
            if let Some(xt) = t.x {
                terms.push((&wp, &xt[kk * in_all + i * il..][..il]));
            }
            implicit_sample(g, &taps, &terms, s, out, bias_k(kk));
        });
        return Tensor::from_vec(&shape, d).expect("conv tangent");
    }
    let mut out_t = Tensor::zeros(&shape);
    let wm = MatRef::new(wv, g.c_out, g.patch());
    let tp = SendPtr(out_t.data_mut().as_mut_ptr());
    chunks(g, n).par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(cols, dcols, tmp), &ch| {
            if t.w.is_some() {
                lower(g, xv, 0, ch, cols);
            }
            for kk in 0..k {
                let mut terms = Vec::with_capacity(2);
                if let Some(wt) = t.w {
                    let wk = MatRef::new(&wt[kk * wl..(kk + 1) * wl], g.c_out, g.patch());
                    terms.push((wk, &cols[..]));
                }
                if let Some(xt) = t.x {
                    lower(g, xt, kk * in_all, ch, dcols);
                    terms.push((wm, &dcols[..]));
                }
                emit(g, ch, &terms, tmp, tp, kk * out_all, bias_k(kk));
            }
        },
    );
    out_t
}

/// The geometry of a convolution of an input of shape `xs` with a weight of shape `ws` (and
/// a bias of shape `bs`), or the shape error that names the mismatch.
fn conv_geom(
    xs: &[usize],
    ws: &[usize],
    bs: Option<&[usize]>,
    stride: usize,
    pad: usize,
) -> Result<ConvGeom> {
    let bad = |detail: String| EngineError::Shape {
        op: "conv2d",
        detail,
    };
    if xs.len() != 4 || ws.len() != 4 {
        return Err(bad(format!(
            "need 4-D input and weight, got {xs:?} and {ws:?}"
        )));
    }
    if xs[1] != ws[1] {
        return Err(bad(format!("input channels {xs:?} vs weight {ws:?}")));
    }
    if stride == 0 || xs[2] + 2 * pad < ws[2] || xs[3] + 2 * pad < ws[3] {
        return Err(bad(format!(
            "kernel {ws:?} stride {stride} pad {pad} does not fit {xs:?}"
        )));
    }
    if let Some(bs) = bs {
        if bs != [ws[0]] {
            return Err(bad(format!("bias {bs:?}, want [{}]", ws[0])));
        }
    }
    Ok(ConvGeom {
        c_in: xs[1],
        h: xs[2],
        w: xs[3],
        c_out: ws[0],
        kh: ws[2],
        kw: ws[3],
        stride,
        pad,
    })
}

/// `epi(conv2d(x, w, b))` for inference (see [`Epilogue`]), or `None` when this convolution
/// does not run as an implicit product on this machine.
pub(crate) fn conv2d_fused<T: Scalar>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    b: Option<&Tensor<T>>,
    stride: usize,
    pad: usize,
    epi: Epilogue<T>,
) -> Result<Option<Tensor<T>>> {
    let g = conv_geom(x.shape(), w.shape(), b.map(|b| b.shape()), stride, pad)?;
    let bias = b.map(|b| b.data());
    Ok(conv_value_fused(&g, x.shape()[0], x.data(), w.data(), bias, epi, false).map(|(y, _)| y))
}

impl<T: Scalar> Tape<T> {
    /// 2-D convolution as PyTorch's `F.conv2d(x, w, b, stride, padding)` (square stride and
    /// padding, no dilation, no groups).
    pub fn conv2d(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        stride: usize,
        pad: usize,
    ) -> Result<Var> {
        let op = self.conv_op(x, w, b, stride, pad)?;
        let (xv, wv, bias) = op.values(self);
        let y = conv_value(Path::value::<T>(&op.g), &op.g, op.n, xv, wv, bias);
        let tangent = self.conv_output_tangent(&op);
        Ok(self.push(Op::Conv2d(op), y, tangent, false))
    }

    /// The checked op `conv2d(x, w, b, stride, pad)`, nothing computed yet.
    pub(super) fn conv_op(
        &self,
        x: Var,
        w: Var,
        b: Option<Var>,
        stride: usize,
        pad: usize,
    ) -> Result<Conv2d> {
        self.check_var(x)?;
        self.check_var(w)?;
        if let Some(b) = b {
            self.check_var(b)?;
        }
        let (xs, ws) = (self.value(x).shape(), self.value(w).shape());
        let g = conv_geom(xs, ws, b.map(|b| self.value(b).shape()), stride, pad)?;
        Ok(Conv2d {
            x: x.0,
            w: w.0,
            b: b.map(|b| b.0),
            g,
            n: xs[0],
        })
    }

    /// The tangent `[K, n, c_out, ho, wo]` of a convolution's output at its inputs' tangents,
    /// `None` when none has one.
    pub(super) fn conv_output_tangent(&self, op: &Conv2d) -> Option<Tensor<T>> {
        let tangent = |i: usize| self.node(i).tangent.as_ref().map(|t| t.data());
        let t = Tangents {
            x: tangent(op.x),
            w: tangent(op.w),
            b: op.b.and_then(tangent),
        };
        if t.x.is_none() && t.w.is_none() && t.b.is_none() {
            return None;
        }
        let (xv, wv, _) = op.values(self);
        let path = Path::value::<T>(&op.g);
        Some(conv_tangent(
            path,
            &op.g,
            op.n,
            self.directions(),
            xv,
            wv,
            t,
        ))
    }
}

impl Conv2d {
    /// The input, weight and bias values this op reads on `tape`.
    pub(super) fn values<'a, T: Scalar>(
        &self,
        tape: &'a Tape<T>,
    ) -> (&'a [T], &'a [T], Option<&'a [T]>) {
        let value = |i: usize| tape.node(i).value.data();
        (value(self.x), value(self.w), self.b.map(value))
    }

    /// The geometry and the batch size.
    pub(super) fn shape(&self) -> (ConvGeom, usize) {
        (self.g, self.n)
    }
}

/// The input gradient `X̄ = W̃ ⊛ Ȳ` of a stride-1 convolution as a convolution of the output
/// gradient (geometry `gt` from [`transposed_geom`], weight [`flip_weight`]), and with `wt`
/// or `gd` its tangents `X̄˙_k = W̃˙_k ⊛ Ȳ + W̃ ⊛ Ȳ˙_k`; every element written once, no
/// scatter. `gt` must pass [`implicit`].
fn input_grad_implicit<T: Scalar>(
    gt: &ConvGeom,
    n: usize,
    k: usize,
    wv: &[T],
    wt: Option<&[T]>,
    gyd: &[T],
    gd: Option<&[T]>,
) -> (Vec<T>, Option<Vec<T>>) {
    // The forward geometry, whose weight layout `wv` and `wt` are in.
    let fwd = ConvGeom {
        c_in: gt.c_out,
        c_out: gt.c_in,
        ..*gt
    };
    let (il, ol, wl) = (gt.in_len(), gt.out_len(), wv.len());
    let taps = SampleTaps::of::<T>(gt);
    let pack = |w: &[T]| packed_weight(gt, gt.patch(), &flip_weight(&fwd, w));
    let wf = pack(wv);
    let gx = per_sample(1, n, ol, |_, i, s, out| {
        implicit_sample(
            gt,
            &taps,
            &[(&wf, &gyd[i * il..(i + 1) * il])],
            s,
            out,
            None,
        );
    });
    let dot = (gd.is_some() || wt.is_some()).then(|| {
        let wtf: Vec<PackedA<T>> = wt.map_or_else(Vec::new, |wt| wt.chunks(wl).map(pack).collect());
        per_sample(k, n, ol, |kk, i, s, out| {
            let mut terms = Vec::with_capacity(2);
            if let Some(w) = wtf.get(kk) {
                terms.push((w, &gyd[i * il..(i + 1) * il]));
            }
            if let Some(gd) = gd {
                terms.push((&wf, &gd[(kk * n + i) * il..][..il]));
            }
            implicit_sample(gt, &taps, &terms, s, out, None);
        })
    });
    (gx, dot)
}

/// One phase of a strided convolution's input gradient (see [`phase_transposed_geom`]): its
/// `(a, b)`, the offsets of its taps in the padded output gradient, and its flipped weight
/// and the flipped weight tangents.
struct PhaseTaps<T> {
    ab: (usize, usize),
    offs: Vec<usize>,
    w: PackedA<T>,
    wt: Vec<PackedA<T>>,
}

impl<T: Scalar> PhaseTaps<T> {
    /// The phases of `g` that some tap reads (`gt` from [`phase_transposed_geom`]), with the
    /// weight `wv` and its `k` tangents `wt` when given.
    fn all(g: &ConvGeom, gt: &ConvGeom, wv: &[T], wt: Option<&[T]>, k: usize) -> Vec<Self> {
        let (p, kq, wl) = (Phases::of(g), gt.kh, wv.len());
        let phases = (0..p.rows).flat_map(|a| (0..p.cols).map(move |b| (a, b)));
        phases
            .map(|ab| {
                let (ka, kb) = (phase_taps(g.kh, p.s, ab.0), phase_taps(g.kw, p.s, ab.1));
                let offs = tap_offsets(gt, kq - ka, kq - kb);
                let pack = |w: &[T]| packed_weight(gt, offs.len(), &flip_phase(g, w, ab));
                let wt = wt.map_or_else(Vec::new, |wt| wt[..k * wl].chunks(wl).map(pack).collect());
                PhaseTaps {
                    ab,
                    w: pack(wv),
                    wt,
                    offs,
                }
            })
            .collect()
    }
}

/// Which weight a term of [`phase_sample`] multiplies.
#[derive(Clone, Copy)]
enum PhaseWeight {
    /// The flipped weight of the phase.
    Value,
    /// The flipped weight tangent of the phase in one direction.
    Tangent(usize),
}

/// One sample of a strided convolution's input gradient (or of its tangent), `out`
/// (`[c_in, h, w]`, every element written): `Σ_t W_t ⊛ Ȳ_t` for the terms `(W_t, Ȳ_t)`, one
/// implicit product over `gt` per phase, each written back into its phase of `out`.
fn phase_sample<T: Scalar>(
    g: &ConvGeom,
    gt: &ConvGeom,
    phases: &[PhaseTaps<T>],
    terms: &[(PhaseWeight, &[T])],
    s: &mut Scratch<T>,
    out: &mut [T],
) {
    out.fill(T::zero());
    for ph in phases {
        let t: Vec<(&PackedA<T>, &[T])> = terms
            .iter()
            .map(|&(w, y)| match w {
                PhaseWeight::Value => (&ph.w, y),
                PhaseWeight::Tangent(kk) => (&ph.wt[kk], y),
            })
            .collect();
        let ld = implicit_product(gt, &ph.offs, &t, s);
        write_phase(g, gt, ph.ab, &s.tmp, ld, out);
    }
}

/// What a convolution's weight gradient reads: the input and output gradient, and their
/// tangents for the `kd` directions of the gradient's tangent (0: none wanted).
struct WeightGradInputs<'a, T> {
    kd: usize,
    xv: &'a [T],
    xt: Option<&'a [T]>,
    gyd: &'a [T],
    gdot: Option<&'a [T]>,
}

impl Conv2d {
    /// [`Conv2d::weight_grad_on`] on this machine's path for this shape (`Path::weight`).
    fn weight_grad<T: Scalar>(&self, src: &WeightGradInputs<T>) -> Vec<T> {
        self.weight_grad_on(src, Path::weight::<T>(&self.g))
    }

    /// `W̄ = Σ_n Ȳ_n cols(X_n)ᵀ` and its `kd` tangents `W̄˙_k = Σ_n Ȳ˙_k cols(X_n)ᵀ +
    /// Ȳ_n cols(Ẋ_k)ᵀ`, `[1 + kd, c_out, c_in, kh, kw]`, summed in fixed groups reduced in
    /// order (independent of the thread count): on `path`, without lowering (where
    /// [`rowdot`] runs) or through the im2row matrix.
    fn weight_grad_on<T: Scalar>(&self, src: &WeightGradInputs<T>, path: Path) -> Vec<T> {
        let (g, n) = (self.g, self.n);
        let wl = g.c_out * g.patch();
        let groups = (PARTIAL_BUDGET / ((1 + src.kd) * wl).max(1)).clamp(1, MAX_GROUPS);
        let implicit_w = path == Path::Implicit;
        let partials: Vec<Vec<T>> = if implicit_w {
            let offs = implicit_offsets(&g);
            fixed_ranges(n, groups)
                .par_iter()
                .map(|r| self.weight_grad_implicit(src, &offs, r.clone()))
                .collect()
        } else {
            let parts = chunks(&g, n);
            fixed_ranges(parts.len(), groups)
                .par_iter()
                .map(|r| self.weight_grad_lowered(src, &parts[r.clone()]))
                .collect()
        };
        let mut summed = partials[0].clone();
        for p in &partials[1..] {
            for (a, &b) in summed.iter_mut().zip(p) {
                *a = *a + b;
            }
        }
        if implicit_w {
            return summed;
        }
        let mut total = vec![T::zero(); summed.len()];
        khwc_to_ckhw(&g, &summed, &mut total);
        total
    }

    /// The weight gradient (and its `kd` tangents, `[1 + kd, c_out, c_in, kh, kw]`) summed
    /// over `samples`, without lowering: each product reads the rows of the column matrix out
    /// of the padded image (phase planes for stride > 1; [`rowdot`]) against the output
    /// gradient laid out at the padded row pitch (the phase pitch).
    fn weight_grad_implicit<T: Scalar>(
        &self,
        src: &WeightGradInputs<T>,
        offs: &[usize],
        samples: std::ops::Range<usize>,
    ) -> Vec<T> {
        let (g, n) = (self.g, self.n);
        let (il, ol, wl, nc) = (
            g.in_len(),
            g.out_len(),
            g.c_out * g.patch(),
            implicit_cols(&g),
        );
        let mut acc = vec![T::zero(); (1 + src.kd) * wl];
        // Samples per kernel call: about 2048 columns, so the lanes are reduced rarely.
        let seg = (2048 / nc).clamp(1, 8);
        let (plen, ylen) = (padded_chw_len(&g), g.c_out * nc);
        let (mut padded, mut dpadded, mut ye, mut de) = (vec![], vec![], vec![], vec![]);
        zeroed_scratch(&mut padded, seg * plen);
        zeroed_scratch(&mut ye, seg * ylen);
        let product = |a: &[T], b: &[T], segs: usize, dst: &mut [T]| {
            // SAFETY: `a` holds `segs` blocks of c_out rows of `nc` (`ylen` apart), every
            // offset plus `nc` stays inside each padded image of `b` (`plen` apart;
            // `implicit_offsets`), `dst` is a c_out x patch block.
            let ran = unsafe {
                rowdot::try_gemm_abt_rows(
                    (g.c_out, nc, segs),
                    (a.as_ptr(), nc, ylen),
                    (b.as_ptr(), offs, plen),
                    (dst.as_mut_ptr(), g.patch()),
                )
            };
            assert!(ran, "implicit weight gradient declined by the kernel");
        };
        let samples: Vec<usize> = samples.collect();
        for batch in samples.chunks(seg) {
            for (s, &i) in batch.iter().enumerate() {
                pad_chw(&g, &src.xv[i * il..(i + 1) * il], &mut padded[s * plen..]);
                expand_rows(&g, &src.gyd[i * ol..(i + 1) * ol], &mut ye[s * ylen..]);
            }
            product(&ye, &padded, batch.len(), &mut acc[..wl]);
            for kk in 0..src.kd {
                let dst = &mut acc[(1 + kk) * wl..(2 + kk) * wl];
                if let Some(gd) = src.gdot {
                    zeroed_scratch(&mut de, seg * ylen);
                    for (s, &i) in batch.iter().enumerate() {
                        expand_rows(&g, &gd[(kk * n + i) * ol..][..ol], &mut de[s * ylen..]);
                    }
                    product(&de, &padded, batch.len(), dst);
                }
                if let Some(xt) = src.xt {
                    zeroed_scratch(&mut dpadded, seg * plen);
                    for (s, &i) in batch.iter().enumerate() {
                        pad_chw(&g, &xt[(kk * n + i) * il..][..il], &mut dpadded[s * plen..]);
                    }
                    product(&ye, &dpadded, batch.len(), dst);
                }
            }
        }
        acc
    }

    /// The weight gradient (and its `kd` tangents) summed over the chunks `parts`, with the
    /// patch in `(ki, kj, c)` order: `Σ Ȳ rows(X)` with rows(X) the im2row matrix (cols(X)ᵀ
    /// permuted so the GEMM packs contiguous runs); the path for machines without [`rowdot`].
    fn weight_grad_lowered<T: Scalar>(&self, src: &WeightGradInputs<T>, parts: &[Chunk]) -> Vec<T> {
        let (g, n) = (self.g, self.n);
        let (pl, patch, wl) = (g.positions(), g.patch(), g.c_out * g.patch());
        let (in_all, out_all) = (n * g.in_len(), n * g.out_len());
        let mut acc = vec![T::zero(); (1 + src.kd) * wl];
        let (mut rows, mut drows, mut gyc, mut gdc, mut padded) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &ch in parts {
            let cols_len = ch.len * pl;
            lower_rows(&g, src.xv, 0, ch, &mut padded, &mut rows);
            gather(&g, src.gyd, 0, ch, &mut gyc);
            let rm = MatRef::new(&rows[..], cols_len, patch);
            let gym = MatRef::new(&gyc[..], g.c_out, cols_len);
            gemm(T::one(), gym, rm, T::one(), &mut acc[..wl]);
            for kk in 0..src.kd {
                let dst = &mut acc[(1 + kk) * wl..(2 + kk) * wl];
                if let Some(gd) = src.gdot {
                    gather(&g, gd, kk * out_all, ch, &mut gdc);
                    let gdm = MatRef::new(&gdc[..], g.c_out, cols_len);
                    gemm(T::one(), gdm, rm, T::one(), dst);
                }
                if let Some(xt) = src.xt {
                    lower_rows(&g, xt, kk * in_all, ch, &mut padded, &mut drows);
                    let drm = MatRef::new(&drows[..], cols_len, patch);
                    gemm(T::one(), gym, drm, T::one(), dst);
                }
            }
        }
        acc
    }

    /// The input gradient (and with `want_dot` its tangents) of a convolution that
    /// [`input_grad_implicit`] does not take: through its phases
    /// ([`Conv2d::input_grad_phases`]) where the stride is above 1 and the phase products run
    /// on this machine, else through the lowered column matrix.
    fn input_grad_strided<T: Scalar>(
        &self,
        k: usize,
        wv: &[T],
        wt: Option<&[T]>,
        gyd: &[T],
        gdot: Option<&[T]>,
        want_dot: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        match phase_transposed_geom(&self.g).filter(implicit::<T>) {
            Some(gt) => self.input_grad_phases(&gt, k, wv, wt, gyd, gdot),
            None => self.input_grad_lowered(k, wv, wt, gyd, gdot, want_dot),
        }
    }

    /// The input gradient `X̄` of a strided convolution as one implicit product per phase of
    /// the padded input (see [`phase_transposed_geom`]): phase `(a, b)` is the stride-1 full
    /// correlation of Ȳ with the flipped taps `ki % s == a`, `kj % s == b`, written back
    /// interleaved ([`write_phase`]); inputs no tap reads get zero. With `wt` or `gd` also the
    /// tangents `X̄˙_k` (the same products of `Ẇ_k` with Ȳ and of W with Ȳ˙_k). `gt` must
    /// pass [`implicit`]; no scatter-add, every element written once.
    fn input_grad_phases<T: Scalar>(
        &self,
        gt: &ConvGeom,
        k: usize,
        wv: &[T],
        wt: Option<&[T]>,
        gyd: &[T],
        gd: Option<&[T]>,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (g, n) = (self.g, self.n);
        let (il, ol) = (g.in_len(), g.out_len());
        let phases = PhaseTaps::all(&g, gt, wv, wt, k);
        let gy = |i: usize| &gyd[i * ol..(i + 1) * ol];
        let gx = per_sample(1, n, il, |_, i, s, out| {
            phase_sample(&g, gt, &phases, &[(PhaseWeight::Value, gy(i))], s, out);
        });
        let dot = (gd.is_some() || wt.is_some()).then(|| {
            per_sample(k, n, il, |kk, i, s, out| {
                let mut terms = Vec::with_capacity(2);
                if wt.is_some() {
                    terms.push((PhaseWeight::Tangent(kk), gy(i)));
                }
                if let Some(gd) = gd {
                    terms.push((PhaseWeight::Value, &gd[(kk * n + i) * ol..][..ol]));
                }
                phase_sample(&g, gt, &phases, &terms, s, out);
            })
        });
        (gx, dot)
    }

    /// The input gradient `X̄ = col2im(Wᵀ Ȳ)` through the lowered column matrix, and with
    /// `want_dot` its tangents `X̄˙_k = col2im(Ẇ_kᵀ Ȳ + Wᵀ Ȳ˙_k)`: the path for the shapes and
    /// machines the implicit products do not take.
    fn input_grad_lowered<T: Scalar>(
        &self,
        k: usize,
        wv: &[T],
        wt: Option<&[T]>,
        gyd: &[T],
        gdot: Option<&[T]>,
        want_dot: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (g, n) = (self.g, self.n);
        let (il, pl, patch, wl) = (g.in_len(), g.positions(), g.patch(), wv.len());
        let (in_all, out_all) = (n * il, n * g.out_len());
        let wm = MatRef::new(wv, g.c_out, patch);
        let mut gx = vec![T::zero(); in_all];
        let mut dot = want_dot.then(|| vec![T::zero(); k * in_all]);
        let gxp = SendPtr(gx.as_mut_ptr());
        let dp = dot.as_mut().map(|d| SendPtr(d.as_mut_ptr()));
        chunks(&g, n).par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(gyc, gdc, tmp), &ch| {
                let cols_len = ch.len * pl;
                let col2im_chunk = |tmp: &[T], dst: SendPtr<T>, base: usize| {
                    for j in 0..ch.len {
                        // SAFETY: each chunk owns its samples' input-gradient blocks.
                        let out = unsafe { dst.slice(base + (ch.start + j) * il, il) };
                        col2im_add(&g, tmp, cols_len, j * pl, out);
                    }
                };
                gather(&g, gyd, 0, ch, gyc);
                let gym = MatRef::new(&gyc[..], g.c_out, cols_len);
                tmp.resize(patch * cols_len, T::zero());
                gemm(T::one(), wm.t(), gym, T::zero(), tmp);
                col2im_chunk(tmp, gxp, 0);
                let Some(dp) = dp else { return };
                for kk in 0..k {
                    let mut beta = T::zero();
                    if let Some(wt) = wt {
                        let wk = MatRef::new(&wt[kk * wl..(kk + 1) * wl], g.c_out, patch);
                        gemm(T::one(), wk.t(), gym, beta, tmp);
                        beta = T::one();
                    }
                    if let Some(gd) = gdot {
                        gather(&g, gd, kk * out_all, ch, gdc);
                        let gdm = MatRef::new(&gdc[..], g.c_out, cols_len);
                        gemm(T::one(), wm.t(), gdm, beta, tmp);
                    }
                    col2im_chunk(tmp, dp, kk * in_all);
                }
            },
        );
        (gx, dot)
    }
}

impl<T: Scalar> Rule<T> for Conv2d {
    fn inputs(&self) -> Vec<usize> {
        let mut v = vec![self.x, self.w];
        v.extend(self.b);
        v
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let g = self.g;
        let n = self.n;
        let k = tape.directions();
        let (pl, out_all) = (g.positions(), n * g.out_len());
        let (nx, nw) = (tape.node(self.x), tape.node(self.w));
        let (xv, wv) = (nx.value.data(), nw.value.data());
        let (xt, wt) = (nx.tangent.as_ref(), nw.tangent.as_ref());
        let wl = wv.len();
        let gyd = gy.data();
        let any_tangent = gdot.is_some() || xt.is_some() || wt.is_some();
        if !any_tangent && self.streams::<T>(tape.needs_grad(self.x)) {
            self.grads_streamed(tape, &DenseGrad(gyd), sink);
            return;
        }

        if tape.needs_grad(self.x) {
            let want_dot = gdot.is_some() || wt.is_some();
            let gd = gdot.map(|t| t.data());
            let (gx, dot) = match transposed_geom(&g).filter(implicit::<T>) {
                Some(gt) => input_grad_implicit(&gt, n, k, wv, wt.map(|t| t.data()), gyd, gd),
                None => self.input_grad_strided(k, wv, wt.map(|t| t.data()), gyd, gd, want_dot),
            };
            let shape = nx.value.shape();
            let gx = Tensor::from_vec(shape, gx).expect("conv dx");
            let dot = dot
                .map(|d| Tensor::from_vec(&tangent_shape(k, shape), d).expect("conv dx tangent"));
            sink.add(self.x, gx, dot);
        }

        if tape.needs_grad(self.w) {
            let want_dot = gdot.is_some() || xt.is_some();
            let src = WeightGradInputs {
                kd: if want_dot { k } else { 0 },
                xv,
                xt: xt.map(|t| t.data()),
                gyd,
                gdot: gdot.map(|t| t.data()),
            };
            let total = self.weight_grad(&src);
            let gw = Tensor::from_vec(nw.value.shape(), total[..wl].to_vec()).expect("conv dw");
            let dot = want_dot.then(|| {
                Tensor::from_vec(&tangent_shape(k, nw.value.shape()), total[wl..].to_vec())
                    .expect("conv dw tangent")
            });
            sink.add(self.w, gw, dot);
        }

        if let Some(b) = self.b.filter(|&b| tape.needs_grad(b)) {
            let gb = Tensor::from_vec(&[g.c_out], channel_sums(gyd, g.c_out, pl)).expect("conv db");
            let dot = gdot.map(|gd| {
                let v: Vec<T> = gd
                    .data()
                    .chunks(out_all)
                    .flat_map(|c| channel_sums(c, g.c_out, pl))
                    .collect();
                Tensor::from_vec(&[k, g.c_out], v).expect("conv db tangent")
            });
            sink.add(b, gb, dot);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The implicit products of strided convolutions (phase planes) against the lowered path.
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rand_vec<T: Scalar>(len: usize, rng: &mut StdRng) -> Vec<T> {
        (0..len).map(|_| T::c(rng.gen_range(-1.0..1.0))).collect()
    }

    /// Largest difference between `got` and `want`, relative to the largest `|want|`.
    fn rel_diff<T: Scalar>(got: &[T], want: &[T]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want
            .iter()
            .fold(0.0f64, |m, v| m.max(v.to_f64().unwrap().abs()));
        let diff = got.iter().zip(want).fold(0.0f64, |m, (a, b)| {
            m.max((a.to_f64().unwrap() - b.to_f64().unwrap()).abs())
        });
        diff / scale.max(1e-30)
    }

    /// `(n, c_in, h, w, c_out, k, stride, pad)` of one case.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Strides 2 and 3, kernels 1, 2, 3, 5, pads 0-2,
    /// odd and even sizes, 1 to 64 output channels, one and several samples (each large
    /// enough for the implicit products: 16 columns or more).
    const CASES: [Case; 15] = [
        (1, 3, 9, 9, 4, 3, 2, 1),
        (2, 4, 10, 11, 8, 3, 2, 1),
        (3, 2, 12, 12, 5, 1, 2, 0),
        (2, 3, 13, 12, 1, 5, 2, 2),
        (2, 2, 11, 10, 6, 2, 2, 0),
        (2, 3, 14, 13, 7, 3, 3, 1),
        (1, 2, 16, 15, 3, 5, 3, 2),
        (2, 2, 15, 16, 4, 2, 3, 1),
        (1, 2, 16, 16, 64, 3, 2, 1),
        (2, 16, 16, 16, 32, 3, 2, 1),
        (2, 16, 32, 32, 32, 1, 2, 0),
        (1, 3, 12, 12, 2, 1, 3, 2),
        (2, 2, 9, 9, 3, 3, 2, 0),
        (1, 2, 13, 14, 3, 2, 2, 2),
        // One input column, in the padding phase that no 1x1 tap reads.
        (2, 2, 40, 1, 3, 1, 2, 1),
    ];

    /// Value, tangent, input gradient and its tangent, weight gradient and its tangent of every
    /// case in [`CASES`], implicit (phase planes) against lowered, within `tol` of the largest
    /// element.
    fn strided_matches_lowered<T: Scalar>(tol: f64) {
        if !nopack::accepts_type::<T>(1, nopack::MIN_COLS) || !rowdot::accepts_type::<T>() {
            eprintln!("no packing-free kernels on this machine: nothing to compare");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        let k = 2;
        for (idx, &(n, c_in, h, w, c_out, kk, stride, pad)) in CASES.iter().enumerate() {
            let g = conv_geom(&[n, c_in, h, w], &[c_out, c_in, kk, kk], None, stride, pad).unwrap();
            let gt = phase_transposed_geom(&g).filter(implicit::<T>);
            assert!(
                implicit::<T>(&g) && gt.is_some(),
                "case {idx} {g:?} not implicit"
            );
            let (il, ol, wl) = (g.in_len(), g.out_len(), c_out * g.patch());
            let (xv, wv, bv) = (
                rand_vec::<T>(n * il, &mut rng),
                rand_vec::<T>(wl, &mut rng),
                rand_vec::<T>(c_out, &mut rng),
            );
            let (xt, wt, bt) = (
                rand_vec::<T>(k * n * il, &mut rng),
                rand_vec::<T>(k * wl, &mut rng),
                rand_vec::<T>(k * c_out, &mut rng),
            );
            let (gy, gd) = (
                rand_vec::<T>(n * ol, &mut rng),
                rand_vec::<T>(k * n * ol, &mut rng),
            );
            let check = |what: &str, got: &[T], want: &[T]| {
                let d = rel_diff(got, want);
                assert!(d <= tol, "case {idx} {g:?}: {what} differs by {d:.2e}");
            };
            let value = |p| conv_value(p, &g, n, &xv, &wv, Some(&bv));
            check(
                "value",
                value(Path::Implicit).data(),
                value(Path::Lowered).data(),
            );
            let tangent = |p| {
                let t = Tangents {
                    x: Some(&xt[..]),
                    w: Some(&wt[..]),
                    b: Some(&bt[..]),
                };
                conv_tangent(p, &g, n, k, &xv, &wv, t)
            };
            check(
                "tangent",
                tangent(Path::Implicit).data(),
                tangent(Path::Lowered).data(),
            );
            let op = Conv2d {
                x: 0,
                w: 1,
                b: None,
                g,
                n,
            };
            let (gx, gxd) = op.input_grad_phases(&gt.unwrap(), k, &wv, Some(&wt), &gy, Some(&gd));
            let (lx, lxd) = op.input_grad_lowered(k, &wv, Some(&wt), &gy, Some(&gd), true);
            check("input gradient", &gx, &lx);
            check("input gradient tangent", &gxd.unwrap(), &lxd.unwrap());
            let src = WeightGradInputs {
                kd: k,
                xv: &xv,
                xt: Some(&xt),
                gyd: &gy,
                gdot: Some(&gd),
            };
            let wg = |p| op.weight_grad_on(&src, p);
            check(
                "weight gradient and its tangent",
                &wg(Path::Implicit),
                &wg(Path::Lowered),
            );
        }
    }

    /// Non-square kernels with a stride: value and tangent run implicit (the input gradient
    /// and the weight gradient are lowered), against the lowered path.
    #[test]
    fn rectangular_strided_value_matches_lowered() {
        if !nopack::accepts_type::<f64>(1, nopack::MIN_COLS) {
            return;
        }
        let mut rng = StdRng::seed_from_u64(12);
        for (c_in, h, w, c_out, kh, kw, stride, pad) in [
            (3, 11, 12, 4, 3, 2, 2, 1),
            (2, 13, 10, 5, 1, 3, 2, 0),
            (2, 14, 15, 3, 5, 2, 3, 2),
        ] {
            let n = 2;
            let g = conv_geom(&[n, c_in, h, w], &[c_out, c_in, kh, kw], None, stride, pad).unwrap();
            assert!(
                implicit::<f64>(&g) && phase_transposed_geom(&g).is_none(),
                "{g:?}"
            );
            let (il, wl) = (g.in_len(), c_out * g.patch());
            let (xv, wv) = (rand_vec(n * il, &mut rng), rand_vec(wl, &mut rng));
            let (xt, wt) = (rand_vec(n * il, &mut rng), rand_vec(wl, &mut rng));
            let value = |p| conv_value::<f64>(p, &g, n, &xv, &wv, None);
            let d = rel_diff(value(Path::Implicit).data(), value(Path::Lowered).data());
            assert!(d <= 1e-12, "{g:?}: value differs by {d:.2e}");
            let tangent = |p| {
                let t = Tangents {
                    x: Some(&xt[..]),
                    w: Some(&wt[..]),
                    b: None,
                };
                conv_tangent::<f64>(p, &g, n, 1, &xv, &wv, t)
            };
            let d = rel_diff(
                tangent(Path::Implicit).data(),
                tangent(Path::Lowered).data(),
            );
            assert!(d <= 1e-12, "{g:?}: tangent differs by {d:.2e}");
        }
    }

    #[test]
    fn strided_implicit_matches_lowered_f64() {
        strided_matches_lowered::<f64>(1e-12);
    }

    #[test]
    fn strided_implicit_matches_lowered_f32() {
        strided_matches_lowered::<f32>(2e-5);
    }
}
