//! The gradient of a "same" stride-1 convolution (`2 pad + 1 = kernel`) in one pass over the
//! samples, when no tangents are in play. Each sample's output gradient `Ȳ_n` is written once
//! into a zero-padded buffer (`[c_out, h + 2 pad, w + 2 pad]`), and that one buffer serves both
//! products:
//! - `X̄_n = W̃ ⊛ Ȳ_n`, the input gradient as a convolution of `Ȳ_n` with the flipped weight
//!   (the transposed convolution has the same padding and so the same layout), read from the
//!   compact `Ȳ_n` in place where it exists and the kernel takes compact taps, else from the
//!   padded buffer;
//! - `W̄ = Σ_n Ȳ_n cols(X_n)ᵀ`: read from `pad` rows and columns in, with the padded image's row
//!   stride, the buffer is `Ȳ_n` at the padded row pitch, zeros in the gaps, as the weight
//!   gradient's kernel wants it;
//! - `b̄ = Σ_n Σ_p Ȳ_n`.
//!
//! Instead of the separate passes (`Ȳ` read and padded for `X̄`, read and spread to the padded
//! pitch again for `W̄`), `Ȳ_n` is read once; and where it comes from a pooled op's adjoint
//! (`conv_pool`), it is scattered straight into the buffer, so the full-size `Ȳ` never exists.
//! The products, their operands and the order of every sum are those of `conv`'s separate
//! input, weight and bias gradients, so the results are theirs, bit for bit.

use super::conv::{
    compact_sample, implicit, packed_weight, product_of_padded, Conv2d, SampleTaps, MAX_GROUPS,
    PARTIAL_BUDGET,
};
use crate::kernels::conv::{
    compact_plane, compact_rows, flip_weight, implicit_cols, implicit_offsets, pad_chw,
    padded_chw_len, transposed_geom, zeroed_scratch, ConvGeom,
};
use crate::kernels::nopack::PackedA;
use crate::kernels::par::{fixed_ranges, SendPtr};
use crate::kernels::reduce::sum;
use crate::kernels::rowdot;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Where the streamed pass reads each sample's output gradient `Ȳ_n` (`[c_out, ho, wo]`) from.
pub(super) trait OutputGrad<T>: Sync {
    /// Writes every element of sample `i`'s `Ȳ` into the interior of `padded`, the padded
    /// layout of the transposed convolution `gt` (its border is zero and must stay zero).
    fn write_padded(&self, gt: &ConvGeom, i: usize, padded: &mut [T]);

    /// Sample `i`'s `Ȳ` as a compact CHW block, where one exists (the input gradient's
    /// product then reads it in place, [`SampleTaps::Compact`]).
    fn compact(&self, _gt: &ConvGeom, _i: usize) -> Option<&[T]> {
        None
    }
}

/// `Ȳ` as a full-size `[n, c_out, ho, wo]` buffer.
pub(super) struct DenseGrad<'a, T>(pub(super) &'a [T]);

impl<T: Scalar> OutputGrad<T> for DenseGrad<'_, T> {
    fn write_padded(&self, gt: &ConvGeom, i: usize, padded: &mut [T]) {
        pad_chw(gt, self.sample(gt, i), padded);
    }

    fn compact(&self, gt: &ConvGeom, i: usize) -> Option<&[T]> {
        Some(self.sample(gt, i))
    }
}

impl<T> DenseGrad<'_, T> {
    /// Sample `i`'s block of `Ȳ` (`gt`'s input: `[c_out, ho, wo]` of the forward convolution).
    fn sample(&self, gt: &ConvGeom, i: usize) -> &[T] {
        let len = gt.in_len();
        &self.0[i * len..(i + 1) * len]
    }
}

/// Which of a convolution's gradients a streamed pass forms.
#[derive(Clone, Copy)]
struct Wanted {
    x: bool,
    w: bool,
    b: bool,
}

/// One group of samples' share: its weight-gradient partial sum and its samples' per-channel
/// output-gradient sums (`[samples, c_out]`).
struct GroupOut<T> {
    w: Vec<T>,
    b: Vec<T>,
}

/// Per-task scratch: padded inputs and output gradients of a segment of samples, the input
/// gradient's product at the padded pitch, and one output plane.
struct Buffers<T> {
    x: Vec<T>,
    y: Vec<T>,
    tmp: Vec<T>,
    plane: Vec<T>,
}

impl Conv2d {
    /// True when [`Conv2d::grads_streamed`] applies to this convolution on this machine (with
    /// `want_x`, also for the input gradient).
    pub(super) fn streams<T: Scalar>(&self, want_x: bool) -> bool {
        let g = self.g;
        let same = g.stride == 1 && g.kh == g.kw && 2 * g.pad + 1 == g.kh;
        let x_ok = !want_x || transposed_geom(&g).is_some_and(|gt| implicit::<T>(&gt));
        same && x_ok && rowdot::accepts_type::<T>()
    }

    /// Deposits the gradients of the input, weight and bias (those the tape needs) into `sink`
    /// from the output gradient `src`, in one pass over the samples (see the module doc);
    /// [`Conv2d::streams`] must hold.
    pub(super) fn grads_streamed<T: Scalar>(
        &self,
        tape: &Tape<T>,
        src: &impl OutputGrad<T>,
        sink: &mut Sink<T>,
    ) {
        let (g, n) = (self.g, self.n);
        let want = Wanted {
            x: tape.needs_grad(self.x),
            w: tape.needs_grad(self.w),
            b: self.b.is_some_and(|b| tape.needs_grad(b)),
        };
        let (xv, wv, _) = self.values(tape);
        let wl = wv.len();
        let mut gx = vec![T::zero(); if want.x { n * g.in_len() } else { 0 }];
        let gxp = SendPtr(gx.as_mut_ptr());
        let groups = (PARTIAL_BUDGET / wl.max(1)).clamp(1, MAX_GROUPS);
        let wf = want.x.then(|| {
            let gt = transposed_geom(&g).expect("a same convolution has a transposed geometry");
            let w = packed_weight(&gt, gt.patch(), &flip_weight(&g, wv));
            (w, SampleTaps::of::<T>(&gt))
        });
        let parts: Vec<GroupOut<T>> = fixed_ranges(n, groups)
            .par_iter()
            .map(|r| self.stream_group(r.clone(), want, xv, wf.as_ref(), src, gxp))
            .collect();
        if want.x {
            let gx = Tensor::from_vec(tape.node(self.x).value.shape(), gx).expect("conv dx");
            sink.add(self.x, gx, None);
        }
        if want.w {
            let mut gw = parts[0].w.clone();
            for p in &parts[1..] {
                gw.iter_mut().zip(&p.w).for_each(|(a, &b)| *a = *a + b);
            }
            let gw = Tensor::from_vec(tape.node(self.w).value.shape(), gw).expect("conv dw");
            sink.add(self.w, gw, None);
        }
        if let Some(b) = self.b.filter(|_| want.b) {
            let mut gb = vec![T::zero(); g.c_out];
            for sums in parts.iter().flat_map(|p| p.b.chunks(g.c_out)) {
                gb.iter_mut().zip(sums).for_each(|(a, &s)| *a = *a + s);
            }
            sink.add(b, Tensor::from_vec(&[g.c_out], gb).expect("conv db"), None);
        }
    }

    /// The streamed pass over the samples `r`: their input gradients written through `gx`
    /// (sample `i` at `i · in_len`), and their [`GroupOut`].
    fn stream_group<T: Scalar>(
        &self,
        r: std::ops::Range<usize>,
        want: Wanted,
        xv: &[T],
        wf: Option<&(PackedA<T>, SampleTaps)>,
        src: &impl OutputGrad<T>,
        gx: SendPtr<T>,
    ) -> GroupOut<T> {
        let g = self.g;
        let gt = transposed_geom(&g).expect("a same convolution has a transposed geometry");
        let (il, nc) = (g.in_len(), implicit_cols(&g));
        let (hp, wp) = (gt.h + 2 * gt.pad, gt.w + 2 * gt.pad);
        let (plen, ylen) = (padded_chw_len(&g), padded_chw_len(&gt));
        let offs = implicit_offsets(&g);
        let offs_t = if want.x {
            implicit_offsets(&gt)
        } else {
            Vec::new()
        };
        // Samples per weight-gradient call, as the separate weight gradient takes them.
        let seg = (2048 / nc).clamp(1, 8);
        let mut out = GroupOut {
            w: vec![T::zero(); if want.w { g.c_out * g.patch() } else { 0 }],
            b: Vec::with_capacity(if want.b { r.len() * g.c_out } else { 0 }),
        };
        let mut buf = Buffers {
            x: Vec::new(),
            y: Vec::new(),
            tmp: Vec::new(),
            plane: Vec::new(),
        };
        zeroed_scratch(&mut buf.x, seg * plen);
        zeroed_scratch(&mut buf.y, seg * ylen);
        let samples: Vec<usize> = r.collect();
        for batch in samples.chunks(seg) {
            for (s, &i) in batch.iter().enumerate() {
                let py = &mut buf.y[s * ylen..(s + 1) * ylen];
                src.write_padded(&gt, i, py);
                if let Some((wf, taps)) = wf {
                    // SAFETY: sample `i` belongs to this group only.
                    let dst = unsafe { gx.slice(i * il, il) };
                    match (taps, src.compact(&gt, i)) {
                        (SampleTaps::Compact(taps), Some(gy)) => {
                            compact_sample(&gt, taps, &[(wf, gy)], dst, None)
                        }
                        _ => {
                            buf.tmp.resize(gt.c_out * implicit_cols(&gt), T::zero());
                            product_of_padded(&gt, &offs_t, wf, py, T::zero(), &mut buf.tmp);
                            compact_rows(&gt, &buf.tmp, implicit_cols(&gt), dst, None);
                        }
                    }
                }
                if want.b {
                    buf.plane.resize(g.positions(), T::zero());
                    for co in 0..g.c_out {
                        let row0 = co * hp * wp + gt.pad * wp + gt.pad;
                        compact_plane(&g, &py[row0..], &mut buf.plane, None);
                        out.b.push(sum(&buf.plane));
                    }
                }
                if want.w {
                    pad_chw(&g, &xv[i * il..(i + 1) * il], &mut buf.x[s * plen..]);
                }
            }
            if want.w {
                self.weight_product(&buf, batch.len(), &offs, &mut out.w);
            }
        }
        out
    }

    /// `acc += Σ_s Ȳ_s rows(X_s)` over the `segs` samples in `buf` (padded `Ȳ` read from the
    /// first output position with the padded image's row stride).
    fn weight_product<T: Scalar>(
        &self,
        buf: &Buffers<T>,
        segs: usize,
        offs: &[usize],
        acc: &mut [T],
    ) {
        let g = self.g;
        let gt = transposed_geom(&g).expect("a same convolution has a transposed geometry");
        let (hp, wp) = (gt.h + 2 * gt.pad, gt.w + 2 * gt.pad);
        let (nc, plen, ylen) = (implicit_cols(&g), padded_chw_len(&g), padded_chw_len(&gt));
        let first = gt.pad * wp + gt.pad;
        assert!(buf.y.len() >= segs * ylen && buf.x.len() >= segs * plen);
        assert!(first + (g.c_out - 1) * hp * wp + nc <= ylen && acc.len() >= g.c_out * g.patch());
        // SAFETY: row `co` of segment `s` of A is `nc` elements from `first + co·hp·wp` in the
        // segment's padded Ȳ (inside it, checked above); every offset plus `nc` stays inside
        // each padded image (`implicit_offsets`); `acc` is a c_out x patch block.
        let ran = unsafe {
            rowdot::try_gemm_abt_rows(
                (g.c_out, nc, segs),
                (buf.y.as_ptr().add(first), hp * wp, ylen),
                (buf.x.as_ptr(), offs, plen),
                (acc.as_mut_ptr(), g.patch()),
            )
        };
        assert!(ran, "streamed weight gradient declined by the kernel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{isa, Isa};

    /// "Same" stride-1 convolutions stream where the packing-free kernels run (AVX2+FMA or
    /// AVX-512), in f32 and f64; other geometries and other machines take the separate passes.
    #[test]
    fn same_convolutions_stream_with_the_vector_kernels() {
        let conv = |k: usize, stride: usize, pad: usize| Conv2d {
            x: 0,
            w: 1,
            b: None,
            g: ConvGeom {
                c_in: 3,
                h: 12,
                w: 12,
                c_out: 16,
                kh: k,
                kw: k,
                stride,
                pad,
            },
            n: 2,
        };
        let vector = isa() >= Isa::Avx2;
        for (k, pad) in [(3, 1), (5, 2), (1, 0)] {
            assert_eq!(conv(k, 1, pad).streams::<f32>(true), vector, "{k}x{k}");
            assert_eq!(conv(k, 1, pad).streams::<f64>(false), vector, "{k}x{k} f64");
        }
        assert!(!conv(3, 1, 0).streams::<f32>(true), "valid padding");
        assert!(!conv(3, 2, 1).streams::<f32>(true), "stride 2");
    }
}
