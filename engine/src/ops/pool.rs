//! Pooling over NCHW planes: max_pool2d, avg_pool2d, global_avg_pool (no padding).
//!
//! Max pooling, with the argmax index chosen at the value (ties: first in window order):
//! - value: y = x[arg];  JVP: ẏ = ẋ[arg];  VJP: x̄[arg] += ȳ;  tangent of VJP: x̄˙[arg] += ȳ˙
//!   (piecewise linear: no second-order term).
//!
//! Average pooling is linear (y = P x): JVP ẏ = P ẋ, VJP x̄ = Pᵀ ȳ, tangent of VJP x̄˙ = Pᵀ ȳ˙.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::par::par_build;
use crate::kernels::pool::{
    avg_plane, avg_plane_adjoint, max_plane, max_plane_adjoint, max_plane_values, PoolGeom,
};
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;

pub(crate) struct MaxPool2d {
    x: usize,
    g: PoolGeom,
    /// In-plane argmax per output element (value planes only).
    arg: Vec<u32>,
}

pub(crate) struct AvgPool2d {
    x: usize,
    g: PoolGeom,
}

/// A pooling window over one plane, as an inference epilogue applies it (see
/// `conv::Epilogue`): the values of [`Tape::max_pool2d`] and [`Tape::avg_pool2d`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum PlanePool {
    /// Max pooling.
    Max(PoolGeom),
    /// Average pooling.
    Avg(PoolGeom),
}

impl PlanePool {
    /// The pooling of `kind` with a `kernel x kernel` window and `stride` over `[N, C, H, W]`
    /// values of shape `s`, or the shape error the op itself would give.
    pub(crate) fn new(max: bool, s: &[usize], kernel: usize, stride: usize) -> Result<Self> {
        Ok(if max {
            PlanePool::Max(max_pool_geom(s, kernel, stride)?)
        } else {
            PlanePool::Avg(geom("avg_pool2d", s, kernel, kernel, stride)?)
        })
    }

    /// Output height and width.
    pub(crate) fn out_hw(self) -> (usize, usize) {
        let (PlanePool::Max(g) | PlanePool::Avg(g)) = self;
        (g.ho(), g.wo())
    }

    /// Pools the plane `x` into `y`; `arg` is scratch for max pooling's argmax.
    pub(crate) fn apply<T: Scalar>(self, x: &[T], y: &mut [T], arg: &mut Vec<u32>) {
        match self {
            PlanePool::Max(g) => max_plane_values(&g, x, y, arg),
            PlanePool::Avg(g) => avg_plane(&g, x, y),
        }
    }
}

/// The window of a `kernel x kernel` max pooling with `stride` over `[N, C, H, W]` values of
/// shape `s`, or the shape error [`Tape::max_pool2d`] gives.
pub(super) fn max_pool_geom(s: &[usize], kernel: usize, stride: usize) -> Result<PoolGeom> {
    geom("max_pool2d", s, kernel, kernel, stride)
}

fn geom(op: &'static str, s: &[usize], kh: usize, kw: usize, stride: usize) -> Result<PoolGeom> {
    if s.len() != 4 {
        return Err(EngineError::Shape {
            op,
            detail: format!("need [N, C, H, W], got {s:?}"),
        });
    }
    if kh == 0 || kw == 0 || stride == 0 || kh > s[2] || kw > s[3] {
        return Err(EngineError::Shape {
            op,
            detail: format!("window {kh}x{kw} stride {stride} does not fit input {s:?}"),
        });
    }
    Ok(PoolGeom {
        h: s[2],
        w: s[3],
        kh,
        kw,
        stride,
    })
}

/// Applies a linear per-plane map `f(plane, src_plane, dst_plane)` to every plane of `src`;
/// `f` must write every element of its destination plane (no zero fill of the whole buffer
/// first: a map that accumulates clears its plane while the plane is in cache).
pub(super) fn map_planes<T: Scalar>(
    src: &[T],
    in_len: usize,
    out_len: usize,
    f: impl Fn(usize, &[T], &mut [T]) + Sync + Send,
) -> Vec<T> {
    let planes = src.len() / in_len;
    par_build(
        planes * out_len,
        out_len,
        || (),
        #[inline(always)]
        |_, p, o| f(p, &src[p * in_len..(p + 1) * in_len], o),
    )
}

fn out_shape(s: &[usize], g: &PoolGeom) -> Vec<usize> {
    vec![s[0], s[1], g.ho(), g.wo()]
}

impl<T: Scalar> Tape<T> {
    /// Max pooling with a `kernel x kernel` window and the given stride (PyTorch's
    /// `F.max_pool2d(x, kernel, stride)`, no padding).
    pub fn max_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        self.check_var(x)?;
        let xv = self.value(x);
        let g = geom("max_pool2d", xv.shape(), kernel, kernel, stride)?;
        let oshape = out_shape(xv.shape(), &g);
        let (il, ol) = (g.h * g.w, g.out_len());
        let planes = xv.numel() / il;
        let mut y = Tensor::zeros(&oshape);
        let mut arg = vec![0u32; planes * ol];
        let xs = xv.data();
        y.data_mut()
            .par_chunks_mut(ol)
            .zip(arg.par_chunks_mut(ol))
            .enumerate()
            .for_each(|(p, (yo, ao))| max_plane(&g, &xs[p * il..(p + 1) * il], yo, ao));
        let k = self.directions();
        let tangent = self.tangent(x).map(|t| {
            let d = map_planes(t.data(), il, ol, |p, src, dst| {
                let a = &arg[(p % planes) * ol..(p % planes + 1) * ol];
                for (o, &i) in dst.iter_mut().zip(a) {
                    *o = src[i as usize];
                }
            });
            Tensor::from_vec(&tangent_shape(k, &oshape), d).expect("pool tangent")
        });
        Ok(self.push(
            Op::MaxPool2d(MaxPool2d { x: x.0, g, arg }),
            y,
            tangent,
            false,
        ))
    }

    /// Average pooling with a `kernel x kernel` window and the given stride (no padding).
    pub fn avg_pool2d(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        self.check_var(x)?;
        let g = geom("avg_pool2d", self.value(x).shape(), kernel, kernel, stride)?;
        self.avg_pool(x, g)
    }

    /// Global average pooling: `[N, C, H, W] -> [N, C]`.
    pub fn global_avg_pool(&mut self, x: Var) -> Result<Var> {
        self.check_var(x)?;
        let s = self.value(x).shape().to_vec();
        let g = geom(
            "global_avg_pool",
            &s,
            s.get(2).copied().unwrap_or(0),
            s.get(3).copied().unwrap_or(0),
            1,
        )?;
        let pooled = self.avg_pool(x, g)?;
        self.reshape(pooled, &[s[0], s[1]])
    }

    fn avg_pool(&mut self, x: Var, g: PoolGeom) -> Result<Var> {
        let xv = self.value(x);
        let oshape = out_shape(xv.shape(), &g);
        let (il, ol) = (g.h * g.w, g.out_len());
        let y = map_planes(xv.data(), il, ol, |_, s, d| avg_plane(&g, s, d));
        let y = Tensor::from_vec(&oshape, y)?;
        let k = self.directions();
        let tangent = self.tangent(x).map(|t| {
            let d = map_planes(t.data(), il, ol, |_, s, d| avg_plane(&g, s, d));
            Tensor::from_vec(&tangent_shape(k, &oshape), d).expect("pool tangent")
        });
        Ok(self.push(Op::AvgPool2d(AvgPool2d { x: x.0, g }), y, tangent, false))
    }
}

impl<T: Scalar> Rule<T> for MaxPool2d {
    fn inputs(&self) -> Vec<usize> {
        vec![self.x]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let shape = tape.node(self.x).value.shape();
        let (il, ol) = (self.g.h * self.g.w, self.g.out_len());
        let planes = self.arg.len() / ol;
        let scatter = |src: &[T]| {
            map_planes(src, ol, il, |p, s, d| {
                let a = &self.arg[(p % planes) * ol..(p % planes + 1) * ol];
                max_plane_adjoint(&self.g, a, s, None, d, (0, self.g.w));
            })
        };
        let g = Tensor::from_vec(shape, scatter(gy.data())).expect("pool grad");
        let k = tape.directions();
        let dot = gdot.map(|d| {
            Tensor::from_vec(&tangent_shape(k, shape), scatter(d.data())).expect("pool dot")
        });
        sink.add(self.x, g, dot);
    }
}

impl<T: Scalar> Rule<T> for AvgPool2d {
    fn inputs(&self) -> Vec<usize> {
        vec![self.x]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let shape = tape.node(self.x).value.shape();
        let (il, ol) = (self.g.h * self.g.w, self.g.out_len());
        let g = self.g;
        let adj = |src: &[T]| {
            map_planes(src, ol, il, |_, s, d| {
                d.fill(T::zero());
                avg_plane_adjoint(&g, s, d)
            })
        };
        let gx = Tensor::from_vec(shape, adj(gy.data())).expect("pool grad");
        let k = tape.directions();
        let dot = gdot
            .map(|d| Tensor::from_vec(&tangent_shape(k, shape), adj(d.data())).expect("pool dot"));
        sink.add(self.x, gx, dot);
    }
}
