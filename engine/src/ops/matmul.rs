//! Matrix products: `matmul` (y = A B) and `linear` (y = X Wᵀ + b, PyTorch layout).
//!
//! For y = A B' + 1 cᵀ with B' = B or Bᵀ (bilinear in (A, B), affine in c):
//! - value: y = A B' + c
//! - JVP: ẏ = Ȧ B' + A Ḃ' + ċ          (Ȧ for all K directions is one GEMM)
//! - VJP: Ā = Ȳ B'ᵀ, B̄' = Aᵀ Ȳ, c̄ = Σ_rows Ȳ
//! - tangent of VJP: Ā˙ = Ȳ˙ B'ᵀ + Ȳ Ḃ'ᵀ, B̄'˙ = Ȧᵀ Ȳ + Aᵀ Ȳ˙, c̄˙ = Σ_rows Ȳ˙

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::gemm::{gemm_par, MatRef};
use crate::kernels::par::par_build;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use std::borrow::Cow;

pub(crate) struct Product {
    a: usize,
    b: usize,
    bias: Option<usize>,
    /// B is stored `[n, kd]` and used transposed (a Linear weight).
    trans_b: bool,
    m: usize,
    kd: usize,
    n: usize,
}

impl Product {
    /// B' (`kd x n`) as a view of B's buffer.
    fn bview<'a, T: Scalar>(&self, data: &'a [T]) -> MatRef<'a, T> {
        if self.trans_b {
            MatRef::new(data, self.n, self.kd).t()
        } else {
            MatRef::new(data, self.kd, self.n)
        }
    }

    /// Writes (or with `beta = 1` adds) B̄ for `lhs` (`m x kd`) and `gy` (`m x n`) into `out`,
    /// in B's own layout.
    fn grad_b<T: Scalar>(&self, lhs: MatRef<T>, gy: MatRef<T>, beta: T, out: &mut [T]) {
        if self.trans_b {
            gemm_par(T::one(), gy.t(), lhs, beta, out);
        } else {
            gemm_par(T::one(), lhs.t(), gy, beta, out);
        }
    }
}

/// Adds each row of `bias` (`[n]`) to the rows of `y` (`[rows, n]`).
fn add_rows<T: Scalar>(y: &mut [T], bias: &[T]) {
    use rayon::prelude::*;
    y.par_chunks_mut(bias.len()).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = *v + b;
        }
    });
}

/// A buffer of `len` elements written whole by `write` (products with `beta = 0`, then
/// anything added onto them): no zero fill first ([`par_build`] with one block; NaN-filled in
/// debug builds, so an element left unwritten fails the tests).
fn written<T: Scalar>(len: usize, write: impl Fn(&mut [T]) + Sync + Send) -> Vec<T> {
    par_build(len, len, || (), |_, _, out| write(out))
}

/// `[K, rows, cols]` → `[rows, K, cols]` (direction-major to sample-major); with one
/// direction the two layouts are the same and `src` is used as it is.
fn sample_major<T: Scalar>(src: &[T], k: usize, rows: usize, cols: usize) -> Cow<'_, [T]> {
    if k == 1 {
        return Cow::Borrowed(src);
    }
    Cow::Owned(written(src.len(), |out| {
        for kk in 0..k {
            for r in 0..rows {
                let from = &src[(kk * rows + r) * cols..][..cols];
                out[(r * k + kk) * cols..][..cols].copy_from_slice(from);
            }
        }
    }))
}

/// `dst (= or +=) P` for a product `P` that `product(out)` writes sample-major
/// (`[rows, K, cols]`, with `beta = 0`) while `dst` is direction-major (`[K, rows, cols]`):
/// through a temporary and [`add_direction_major`], or, with one direction (the layouts are
/// the same), straight into `dst` with `beta = 1` when accumulating.
fn product_direction_major<T: Scalar>(
    dst: &mut [T],
    (k, rows, cols): (usize, usize, usize),
    accumulate: bool,
    product: impl Fn(T, &mut [T]) + Sync + Send,
) {
    if k == 1 {
        product(if accumulate { T::one() } else { T::zero() }, dst);
    } else {
        let tmp = written(dst.len(), |out| product(T::zero(), out));
        add_direction_major(dst, &tmp, k, rows, cols, accumulate);
    }
}

/// `dst[k][r][c] (+)= src[r][k][c]`: adds (or with `accumulate = false`, writes) a
/// sample-major `[rows, K, cols]` block into a direction-major `[K, rows, cols]` one.
fn add_direction_major<T: Scalar>(
    dst: &mut [T],
    src: &[T],
    k: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use rayon::prelude::*;
    dst.par_chunks_mut(rows * cols)
        .enumerate()
        .for_each(|(kk, block)| {
            for r in 0..rows {
                let from = &src[(r * k + kk) * cols..][..cols];
                let to = &mut block[r * cols..(r + 1) * cols];
                if accumulate {
                    for (t, &f) in to.iter_mut().zip(from) {
                        *t = *t + f;
                    }
                } else {
                    to.copy_from_slice(from);
                }
            }
        });
}

/// Column sums of `g` (`[rows, n]`), in row order.
fn col_sums<T: Scalar>(g: &[T], n: usize) -> Vec<T> {
    let mut s = vec![T::zero(); n];
    for row in g.chunks(n) {
        for (a, &b) in s.iter_mut().zip(row) {
            *a = *a + b;
        }
    }
    s
}

impl Product {
    /// y = A B' (+ 1 cᵀ with `bias` the values of c).
    fn value<T: Scalar>(&self, av: &[T], bv: &[T], bias: Option<&[T]>) -> Tensor<T> {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let a = MatRef::new(av, m, kd);
        let mut y = written(m * n, |y| {
            gemm_par(T::one(), a, self.bview(bv), T::zero(), y);
        });
        if let Some(c) = bias {
            add_rows(&mut y, c);
        }
        Tensor::from_vec(&[m, n], y).expect("product shape")
    }

    /// ẏ = Ȧ B' + A Ḃ' + ċ for all `k` directions, from the tangents `[Ȧ, Ḃ, ċ]`.
    fn tangent<T: Scalar>(
        &self,
        av: &[T],
        bv: &[T],
        tangents: [Option<&Tensor<T>>; 3],
        k: usize,
    ) -> Tensor<T> {
        let (m, n) = (self.m, self.n);
        let [at, bt, ct] = tangents;
        let mut td = if at.is_none() && bt.is_none() {
            vec![T::zero(); k * m * n]
        } else {
            written(k * m * n, |td| self.tangent_products(av, bv, at, bt, k, td))
        };
        if let Some(ct) = ct {
            for (kk, out) in td.chunks_mut(m * n).enumerate() {
                add_rows(out, &ct.data()[kk * n..(kk + 1) * n]);
            }
        }
        Tensor::from_vec(&[k, m, n], td).expect("tangent shape")
    }

    /// Writes Ȧ B' + A Ḃ' (the terms that are present, at least one) into `td` (`[K, m, n]`).
    fn tangent_products<T: Scalar>(
        &self,
        av: &[T],
        bv: &[T],
        at: Option<&Tensor<T>>,
        bt: Option<&Tensor<T>>,
        k: usize,
        td: &mut [T],
    ) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let a = MatRef::new(av, m, kd);
        if let Some(at) = at {
            let atm = MatRef::new(at.data(), k * m, kd);
            gemm_par(T::one(), atm, self.bview(bv), T::zero(), td);
        }
        let Some(bt) = bt else { return };
        if self.trans_b {
            // All K directions in one GEMM: A [m, kd] × [Ḃ_1; …; Ḃ_K]ᵀ → [m, K, n].
            let stacked = MatRef::new(bt.data(), k * n, kd).t();
            product_direction_major(td, (k, m, n), at.is_some(), |beta, out| {
                gemm_par(T::one(), a, stacked, beta, out)
            });
        } else {
            let (bl, beta) = (kd * n, if at.is_some() { T::one() } else { T::zero() });
            for (kk, out) in td.chunks_mut(m * n).enumerate() {
                let bk = self.bview(&bt.data()[kk * bl..(kk + 1) * bl]);
                gemm_par(T::one(), a, bk, beta, out);
            }
        }
    }
}

impl<T: Scalar> Tape<T> {
    /// Checks the operands of `a B'` (+ `bias`) and gives the op's record.
    fn product_op(&self, a: Var, b: Var, bias: Option<Var>, trans_b: bool) -> Result<Product> {
        let op_name = if trans_b { "linear" } else { "matmul" };
        self.check_var(a)?;
        self.check_var(b)?;
        let (sa, sb) = (self.value(a).shape(), self.value(b).shape());
        let bad = |detail: String| EngineError::Shape {
            op: op_name,
            detail,
        };
        if sa.len() != 2 || sb.len() != 2 {
            return Err(bad(format!("need 2-D operands, got {sa:?} and {sb:?}")));
        }
        let (m, kd) = (sa[0], sa[1]);
        let (kb, n) = if trans_b {
            (sb[1], sb[0])
        } else {
            (sb[0], sb[1])
        };
        if kb != kd {
            return Err(bad(format!("inner dimensions differ: {sa:?} and {sb:?}")));
        }
        if let Some(c) = bias {
            self.check_var(c)?;
            if self.value(c).shape() != [n] {
                return Err(bad(format!(
                    "bias shape {:?}, want [{n}]",
                    self.value(c).shape()
                )));
            }
        }
        Ok(Product {
            a: a.0,
            b: b.0,
            bias: bias.map(|c| c.0),
            trans_b,
            m,
            kd,
            n,
        })
    }

    /// Records y = A B' (+ 1 cᵀ), B' = Bᵀ when `trans_b`, with its tangent.
    fn product(&mut self, a: Var, b: Var, bias: Option<Var>, trans_b: bool) -> Result<Var> {
        let p = self.product_op(a, b, bias, trans_b)?;
        let (av, bv) = (self.value(a).data(), self.value(b).data());
        let y = p.value(av, bv, bias.map(|c| self.value(c).data()));
        let k = self.directions();
        let ct = bias.and_then(|c| self.tangent(c));
        let tangents = [self.tangent(a), self.tangent(b), ct];
        let tangent = if tangents.iter().all(Option::is_none) {
            None
        } else {
            Some(p.tangent(av, bv, tangents, k))
        };
        Ok(self.push(Op::Product(p), y, tangent, false))
    }

    /// Matrix product `a @ b` of `[m, k]` and `[k, n]`.
    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.product(a, b, None, false)
    }

    /// Affine layer `x Wᵀ + b` with `x: [n, in]`, `w: [out, in]`, `b: [out]` (PyTorch layout).
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        self.product(x, w, b, true)
    }
}

impl<T: Scalar> Rule<T> for Product {
    fn inputs(&self) -> Vec<usize> {
        let mut v = vec![self.a, self.b];
        v.extend(self.bias);
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
        let (m, kd, n) = (self.m, self.kd, self.n);
        let k = tape.directions();
        let (na, nb) = (tape.node(self.a), tape.node(self.b));
        let (av, bv) = (na.value.data(), nb.value.data());
        let (at, bt) = (na.tangent.as_ref(), nb.tangent.as_ref());
        let g = MatRef::new(gy.data(), m, n);
        if tape.needs_grad(self.a) {
            let ga = written(m * kd, |ga| {
                gemm_par(T::one(), g, self.bview(bv).t(), T::zero(), ga);
            });
            let ga = Tensor::from_vec(&[m, kd], ga).expect("gradient shape");
            let dot =
                (gdot.is_some() || bt.is_some()).then(|| self.grad_a_tangent(bv, bt, g, gdot, k));
            sink.add(self.a, ga, dot);
        }
        if tape.needs_grad(self.b) {
            let a = MatRef::new(av, m, kd);
            let gb = written(kd * n, |gb| self.grad_b(a, g, T::zero(), gb));
            let gb = Tensor::from_vec(nb.value.shape(), gb).expect("gradient shape");
            let dot = (gdot.is_some() || at.is_some()).then(|| {
                let d = self.grad_b_tangent(a, at, g, gdot, k);
                Tensor::from_vec(&tangent_shape(k, nb.value.shape()), d).expect("tangent shape")
            });
            sink.add(self.b, gb, dot);
        }
        if let Some(c) = self.bias.filter(|&c| tape.needs_grad(c)) {
            let gc = Tensor::from_vec(&[n], col_sums(gy.data(), n)).expect("bias shape");
            let dot = gdot.map(|gd| {
                let mut d = Vec::with_capacity(k * n);
                for kk in 0..k {
                    d.extend(col_sums(&gd.data()[kk * m * n..(kk + 1) * m * n], n));
                }
                Tensor::from_vec(&[k, n], d).expect("bias tangent shape")
            });
            sink.add(c, gc, dot);
        }
    }
}

impl Product {
    /// Ā˙_k = Ȳ˙_k B'ᵀ + Ȳ Ḃ'_kᵀ, from B's values `bv`, its tangent `bt`, Ȳ `g` and Ȳ˙ `gdot`
    /// (at least one of `bt` and `gdot` present).
    fn grad_a_tangent<T: Scalar>(
        &self,
        bv: &[T],
        bt: Option<&Tensor<T>>,
        g: MatRef<T>,
        gdot: Option<&Tensor<T>>,
        k: usize,
    ) -> Tensor<T> {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let bl = bv.len();
        let d = written(k * m * kd, |d| {
            if let Some(gd) = gdot {
                let gdm = MatRef::new(gd.data(), k * m, n);
                gemm_par(T::one(), gdm, self.bview(bv).t(), T::zero(), d);
            }
            if let Some(bt) = bt {
                let beta = if gdot.is_some() { T::one() } else { T::zero() };
                for (kk, out) in d.chunks_mut(m * kd).enumerate() {
                    let btk = self.bview(&bt.data()[kk * bl..(kk + 1) * bl]);
                    gemm_par(T::one(), g, btk.t(), beta, out);
                }
            }
        });
        Tensor::from_vec(&tangent_shape(k, &[m, kd]), d).expect("tangent shape")
    }

    /// B̄'˙_k = Aᵀ Ȳ˙_k + Ȧ_kᵀ Ȳ for all k at once, in B's layout (at least one of `at` and
    /// `gdot` present): the K directions are laid side by side (sample-major views of Ȳ˙
    /// and Ȧ, copies only for K > 1), so each term is one GEMM.
    fn grad_b_tangent<T: Scalar>(
        &self,
        a: MatRef<T>,
        at: Option<&Tensor<T>>,
        g: MatRef<T>,
        gdot: Option<&Tensor<T>>,
        k: usize,
    ) -> Vec<T> {
        written(k * self.kd * self.n, |d| {
            if let Some(gd) = gdot {
                self.grad_b_tangent_gdot(a, gd, k, d);
            }
            if let Some(at) = at {
                self.grad_b_tangent_at(at, g, k, gdot.is_some(), d);
            }
        })
    }

    /// Writes Aᵀ Ȳ˙_k for all k into `d` (`[K, ...B's shape]`).
    fn grad_b_tangent_gdot<T: Scalar>(&self, a: MatRef<T>, gd: &Tensor<T>, k: usize, d: &mut [T]) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let gd_sm = sample_major(gd.data(), k, m, n);
        let gdm = MatRef::new(&gd_sm, m, k * n);
        if self.trans_b {
            // [K·n, m] × A → [K, n, kd] directly.
            gemm_par(T::one(), gdm.t(), a, T::zero(), d);
        } else {
            // Aᵀ × [m, K·n] → [kd, K, n].
            product_direction_major(d, (k, kd, n), false, |beta, out| {
                gemm_par(T::one(), a.t(), gdm, beta, out)
            });
        }
    }

    /// Writes (`accumulate = false`) or adds Ȧ_kᵀ Ȳ for all k into `d` (`[K, ...B's shape]`).
    fn grad_b_tangent_at<T: Scalar>(
        &self,
        at: &Tensor<T>,
        g: MatRef<T>,
        k: usize,
        accumulate: bool,
        d: &mut [T],
    ) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let at_sm = sample_major(at.data(), k, m, kd);
        let atm = MatRef::new(&at_sm, m, k * kd);
        if self.trans_b {
            // Ȳᵀ × [m, K·kd] → [n, K, kd].
            product_direction_major(d, (k, n, kd), accumulate, |beta, out| {
                gemm_par(T::one(), g.t(), atm, beta, out)
            });
        } else {
            // [K·kd, m] × Ȳ → [K, kd, n] directly.
            let beta = if accumulate { T::one() } else { T::zero() };
            gemm_par(T::one(), atm.t(), g, beta, d);
        }
    }
}
