//! Convolution → max pooling, with or without a ReLU between them, recorded as one op: the
//! convolution's (and the ReLU's) full-size outputs are never stored, only the pooled values
//! `Z` and each window's argmax.
//!
//! With `Y = W ⊛ X + b` and `S` the map that reads each window's argmax of `Y` (and, with the
//! ReLU, masks it by `relu'(Z)`: ReLU is positive exactly where its input is, so
//! `relu'(Z) = relu'(Y[arg])`), `Z = S(Y)`, and `S` is linear with a piecewise constant argmax
//! (no second-order term):
//! - value: `Y` plane by plane in cache, the ReLU and the window maxima there (`conv::Epilogue`)
//! - JVP: `Ż = S(Ẏ) = relu'(Z) Ẏ[arg]`, `Ẏ` the convolution's tangent
//! - VJP: `Ȳ = Sᵀ(Z̄)` (`Z̄` added at the argmax, then masked), then the convolution's VJP
//! - tangent of VJP: `Ȳ˙ = Sᵀ(Z̄˙)`, then the convolution's rule with `(Ȳ, Ȳ˙)`
//!
//! Each step is the one `conv2d`, `relu` and `max_pool2d` take recorded apart, so every value,
//! tangent, gradient and HVP is theirs, bit for bit. Where the convolution does not run as an
//! implicit product (see `conv`), the ops are recorded apart.

use super::activation::{relu_d1, Unary};
use super::conv::{conv_value_fused, Conv2d, Epilogue};
use super::conv_stream::OutputGrad;
use super::pool::{map_planes, max_pool_geom, PlanePool};
use super::{tangent_shape, Op, Rule};
use crate::error::Result;
use crate::kernels::conv::ConvGeom;
use crate::kernels::pool::{max_plane_adjoint, PoolGeom};
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;

/// The layers a convolution hands its output to in [`Tape::conv2d_max_pool`]: an optional
/// ReLU, then a `kernel x kernel` max pooling with `stride` (no padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolAfter {
    /// A ReLU between the convolution and the pooling.
    pub relu: bool,
    /// Pooling window size.
    pub kernel: usize,
    /// Pooling stride.
    pub stride: usize,
}

pub(crate) struct ConvMaxPool {
    conv: Conv2d,
    pool: PoolGeom,
    relu: bool,
    /// In-plane argmax of the convolution's output per pooled element.
    arg: Vec<u32>,
}

impl<T: Scalar> Tape<T> {
    /// `max_pool2d([relu](conv2d(x, w, b, stride, pad)), after.kernel, after.stride)` as one
    /// op (see the module doc): the values and derivatives of the separate ops, without their
    /// full-size intermediate values.
    pub fn conv2d_max_pool(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        stride: usize,
        pad: usize,
        after: MaxPoolAfter,
    ) -> Result<Var> {
        let conv = self.conv_op(x, w, b, stride, pad)?;
        let (g, n) = conv.shape();
        let pool = max_pool_geom(&[n, g.c_out, g.ho(), g.wo()], after.kernel, after.stride)?;
        let epi = Epilogue {
            act: after.relu.then_some(Unary::Relu),
            pool: Some(PlanePool::Max(pool)),
        };
        let (xv, wv, bias) = conv.values(self);
        let Some((z, arg)) = conv_value_fused(&g, n, xv, wv, bias, epi, true) else {
            let mut y = self.conv2d(x, w, b, stride, pad)?;
            if after.relu {
                y = self.relu(y)?;
            }
            return self.max_pool2d(y, after.kernel, after.stride);
        };
        let relu = after.relu;
        let op = ConvMaxPool {
            conv,
            pool,
            relu,
            arg,
        };
        let tangent = self.conv_output_tangent(&op.conv).map(|t| {
            let shape = tangent_shape(self.directions(), z.shape());
            Tensor::from_vec(&shape, op.select(t.data(), z.data())).expect("fused tangent")
        });
        Ok(self.push(Op::ConvMaxPool(op), z, tangent, false))
    }
}

impl ConvMaxPool {
    /// `S(src)`: per plane of the convolution's output (or of its tangents, `[K, ...]`), the
    /// argmax elements (with the ReLU masked by `relu'(Z)`, `z` the pooled values).
    fn select<T: Scalar>(&self, src: &[T], z: &[T]) -> Vec<T> {
        let (il, ol) = (self.pool.h * self.pool.w, self.pool.out_len());
        let planes = self.arg.len() / ol;
        map_planes(src, il, ol, |p, s, d| {
            let at = (p % planes) * ol..(p % planes + 1) * ol;
            for ((o, &i), &zv) in d.iter_mut().zip(&self.arg[at.clone()]).zip(&z[at]) {
                *o = match self.relu {
                    true => relu_d1(zv) * s[i as usize],
                    false => s[i as usize],
                };
            }
        })
    }

    /// `Sᵀ(src)`: per pooled plane (of `Z̄` or its tangents), the full-size plane of the
    /// convolution's output [`ConvMaxPool::spread_plane`] gives.
    fn spread<T: Scalar>(&self, src: &[T], z: &[T]) -> Vec<T> {
        let (il, ol) = (self.pool.h * self.pool.w, self.pool.out_len());
        let planes = self.arg.len() / ol;
        map_planes(src, ol, il, |p, s, d| {
            let at = (p % planes) * ol..(p % planes + 1) * ol;
            self.spread_plane(at, s, z, d, 0, self.pool.w);
        })
    }

    /// One plane of `Sᵀ(zbar)` into `plane` ([`max_plane_adjoint`]): `zbar` (a pooled plane,
    /// whose argmax and pooled values are at `at`) at each window's argmax, then, with the
    /// ReLU, masked by `relu'(Z)`. `plane` holds the convolution's output plane with `pad`
    /// zero rows and columns around it and row pitch `pitch` (no padding: the plain plane).
    fn spread_plane<T: Scalar>(
        &self,
        at: std::ops::Range<usize>,
        zbar: &[T],
        z: &[T],
        plane: &mut [T],
        pad: usize,
        pitch: usize,
    ) {
        let relu_at = self.relu.then(|| &z[at.clone()]);
        max_plane_adjoint(
            &self.pool,
            &self.arg[at],
            zbar,
            relu_at,
            plane,
            (pad, pitch),
        );
    }
}

/// `Ȳ = Sᵀ(Z̄)` sample by sample, for the streamed gradient: [`ConvMaxPool::spread`]'s
/// values, scattered straight into the padded layout.
struct PooledGrad<'a, T> {
    op: &'a ConvMaxPool,
    zbar: &'a [T],
    z: &'a [T],
}

impl<T: Scalar> OutputGrad<T> for PooledGrad<'_, T> {
    fn write_padded(&self, gt: &ConvGeom, i: usize, padded: &mut [T]) {
        let (ol, pad) = (self.op.pool.out_len(), gt.pad);
        let (hp, wp) = (gt.h + 2 * pad, gt.w + 2 * pad);
        for (co, plane) in padded.chunks_exact_mut(hp * wp).enumerate() {
            let at = (i * gt.c_in + co) * ol..(i * gt.c_in + co + 1) * ol;
            let zbar = &self.zbar[at.clone()];
            self.op.spread_plane(at, zbar, self.z, plane, pad, wp);
        }
    }
}

impl<T: Scalar> Rule<T> for ConvMaxPool {
    fn inputs(&self) -> Vec<usize> {
        Rule::<T>::inputs(&self.conv)
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let z = tape.node(out).value.data();
        let tangents = [self.conv.x, self.conv.w].map(|i| tape.node(i).tangent.is_some());
        let streams = self.conv.streams::<T>(tape.needs_grad(self.conv.x));
        if gdot.is_none() && tangents == [false; 2] && streams {
            let src = PooledGrad {
                op: self,
                zbar: gy.data(),
                z,
            };
            self.conv.grads_streamed(tape, &src, sink);
            return;
        }
        let (g, n) = self.conv.shape();
        let shape = [n, g.c_out, g.ho(), g.wo()];
        let gyc = Tensor::from_vec(&shape, self.spread(gy.data(), z)).expect("fused grad");
        let gdc = gdot.map(|d| {
            let shape = tangent_shape(tape.directions(), &shape);
            Tensor::from_vec(&shape, self.spread(d.data(), z)).expect("fused grad tangent")
        });
        self.conv.backward(tape, out, &gyc, gdc.as_ref(), sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{isa, Isa};

    /// The fused op is what gets recorded where the convolution runs as an implicit product
    /// (f32 and f64 with AVX2+FMA or AVX-512); elsewhere the separate ops are.
    #[test]
    fn records_one_op_where_the_convolution_is_implicit() {
        fn recorded_fused<T: Scalar>() -> bool {
            let mut tape = Tape::<T>::new(0);
            let x = tape.constant(Tensor::zeros(&[2, 3, 8, 8]));
            let w = tape.param(Tensor::zeros(&[4, 3, 3, 3]), None).unwrap();
            let after = MaxPoolAfter {
                relu: true,
                kernel: 2,
                stride: 2,
            };
            let z = tape.conv2d_max_pool(x, w, None, 1, 1, after).unwrap();
            assert_eq!(tape.value(z).shape(), [2, 4, 4, 4]);
            matches!(tape.node(z.0).op, Op::ConvMaxPool(_))
        }
        assert_eq!(recorded_fused::<f32>(), isa() >= Isa::Avx2);
        assert_eq!(recorded_fused::<f64>(), isa() >= Isa::Avx2);
    }
}
