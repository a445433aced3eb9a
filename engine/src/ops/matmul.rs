//! Matrix products: `matmul` (y = A B) and `linear` (y = X Wᵀ + b, PyTorch layout).
//!
//! For y = A B' + 1 cᵀ with B' = B or Bᵀ (bilinear in (A, B), affine in c):
//! - value: y = A B' + c
//! - JVP: ẏ = Ȧ B' + A Ḃ' + ċ          (Ȧ for all K directions is one GEMM)
//! - VJP: Ā = Ȳ B'ᵀ, B̄' = Aᵀ Ȳ, c̄ = Σ_rows Ȳ
//! - tangent of VJP: Ā˙ = Ȳ˙ B'ᵀ + Ȳ Ḃ'ᵀ, B̄'˙ = Ȧᵀ Ȳ + Aᵀ Ȳ˙, c̄˙ = Σ_rows Ȳ˙

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::gemm::{gemm_par, gemm_par_group, MatRef, Part, Shared};
use crate::kernels::par::par_build;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use std::borrow::Cow;
use std::sync::Mutex;

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

/// Two buffers (`len.0` and `len.1` elements) written whole by `write`, as [`written`]
/// (`write` runs inside the first one's build, which skips it when `len.0 == 0`: the second
/// must then be empty too).
fn written2<T: Scalar>(
    len: (usize, usize),
    write: impl Fn(&mut [T], &mut [T]) + Sync + Send,
) -> (Vec<T>, Vec<T>) {
    assert!(
        len.0 > 0 || len.1 == 0,
        "written2: a non-empty second buffer needs a first"
    );
    let second = Mutex::new(Vec::new());
    let first = written(len.0, |x| {
        let x = Mutex::new(x);
        let y = written(len.1, |y| {
            write(&mut x.lock().unwrap_or_else(|e| e.into_inner()), y)
        });
        *second.lock().unwrap_or_else(|e| e.into_inner()) = y;
    });
    (
        first,
        second.into_inner().unwrap_or_else(|e| e.into_inner()),
    )
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
    /// y = A B' + c (`bias` the values of c) and, unless the tangents `[Ȧ, Ḃ, ċ]` are all
    /// zero, ẏ = Ȧ B' + A Ḃ' + ċ for all `k` directions.
    fn forward<T: Scalar>(
        &self,
        av: &[T],
        bv: &[T],
        bias: Option<&[T]>,
        tangents: [Option<&Tensor<T>>; 3],
        k: usize,
    ) -> (Tensor<T>, Option<Tensor<T>>) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let [at, bt, ct] = tangents;
        let (mut y, td) = match bt.filter(|_| self.trans_b) {
            Some(bt) => self.forward_shared_x(av, bv, at, bt, k),
            None => {
                let a = MatRef::new(av, m, kd);
                let y = written(m * n, |y| {
                    gemm_par(T::one(), a, self.bview(bv), T::zero(), y)
                });
                let td = (at.is_some() || bt.is_some())
                    .then(|| written(k * m * n, |td| self.tangent_products(av, bv, at, bt, k, td)));
                (y, td)
            }
        };
        if let Some(c) = bias {
            add_rows(&mut y, c);
        }
        let mut td = td.or_else(|| ct.map(|_| vec![T::zero(); k * m * n]));
        if let (Some(ct), Some(td)) = (ct, td.as_mut()) {
            for (kk, out) in td.chunks_mut(m * n).enumerate() {
                add_rows(out, &ct.data()[kk * n..(kk + 1) * n]);
            }
        }
        let y = Tensor::from_vec(&[m, n], y).expect("product shape");
        (
            y,
            td.map(|t| Tensor::from_vec(&[k, m, n], t).expect("tangent shape")),
        )
    }

    /// y = X Wᵀ and ẏ = X Ẇᵀ (+ Ẋ Wᵀ) of a linear layer with a weight tangent: X [W; Ẇ_1..Ẇ_K]ᵀ
    /// is one product sharing X ([`gemm_par_group`]); the tangent part is written in place
    /// for one direction, else sample-major (`[m, K, n]`) and reordered.
    fn forward_shared_x<T: Scalar>(
        &self,
        xv: &[T],
        wv: &[T],
        xt: Option<&Tensor<T>>,
        wt: &Tensor<T>,
        k: usize,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let x = MatRef::new(xv, m, kd);
        let wts = MatRef::new(wt.data(), k * n, kd).t();
        let (y, xw) = written2((m * n, k * m * n), |y, xw| {
            let mut parts = [
                Part::new(self.bview(wv), T::zero(), y),
                Part::new(wts, T::zero(), xw),
            ];
            gemm_par_group(T::one(), x, Shared::Left, &mut parts);
        });
        let xtm = xt.map(|xt| MatRef::new(xt.data(), k * m, kd));
        if k == 1 {
            let mut td = xw;
            if let Some(xtm) = xtm {
                gemm_par(T::one(), xtm, self.bview(wv), T::one(), &mut td);
            }
            return (y, Some(td));
        }
        let td = written(k * m * n, |td| {
            if let Some(xtm) = xtm {
                gemm_par(T::one(), xtm, self.bview(wv), T::zero(), td);
            }
            add_direction_major(td, &xw, k, m, n, xtm.is_some());
        });
        (y, Some(td))
    }

    /// Writes Ȧ B' + A Ḃ' (the terms that are present, at least one) into `td` (`[K, m, n]`);
    /// a linear layer's `A Ḃ'` goes through [`Product::forward_shared_x`] instead.
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
        let (bl, beta) = (kd * n, if at.is_some() { T::one() } else { T::zero() });
        for (kk, out) in td.chunks_mut(m * n).enumerate() {
            let bk = self.bview(&bt.data()[kk * bl..(kk + 1) * bl]);
            gemm_par(T::one(), a, bk, beta, out);
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
        let k = self.directions();
        let ct = bias.and_then(|c| self.tangent(c));
        let tangents = [self.tangent(a), self.tangent(b), ct];
        let cv = bias.map(|c| self.value(c).data());
        let (y, tangent) = p.forward(av, bv, cv, tangents, k);
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
            let (ga, dot) = self.grad_a(bv, bt, g, gdot, k);
            let ga = Tensor::from_vec(&[m, kd], ga).expect("gradient shape");
            let dot = dot
                .map(|d| Tensor::from_vec(&tangent_shape(k, &[m, kd]), d).expect("tangent shape"));
            sink.add(self.a, ga, dot);
        }
        if tape.needs_grad(self.b) {
            let (gb, dot) = self.grad_b_all(MatRef::new(av, m, kd), at, g, gdot, k);
            let gb = Tensor::from_vec(nb.value.shape(), gb).expect("gradient shape");
            let dot = dot.map(|d| {
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
    /// Ā = Ȳ B'ᵀ and, when `gdot` or `bt` is present, Ā˙_k = Ȳ˙_k B'ᵀ + Ȳ Ḃ'_kᵀ: Ȳ and all
    /// the Ȳ˙_k stacked along rows are one product sharing B'ᵀ ([`gemm_par_group`]).
    fn grad_a<T: Scalar>(
        &self,
        bv: &[T],
        bt: Option<&Tensor<T>>,
        g: MatRef<T>,
        gdot: Option<&Tensor<T>>,
        k: usize,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let bmt = self.bview(bv).t();
        if gdot.is_none() && bt.is_none() {
            let ga = written(m * kd, |ga| gemm_par(T::one(), g, bmt, T::zero(), ga));
            return (ga, None);
        }
        let bl = bv.len();
        let (ga, d) = written2((m * kd, k * m * kd), |ga, d| {
            let gdm = gdot.map(|gd| MatRef::new(gd.data(), k * m, n));
            match gdm {
                Some(gdm) => gemm_par_group(
                    T::one(),
                    bmt,
                    Shared::Right,
                    &mut [Part::new(g, T::zero(), ga), Part::new(gdm, T::zero(), d)],
                ),
                None => gemm_par(T::one(), g, bmt, T::zero(), ga),
            }
            if let Some(bt) = bt {
                let beta = if gdm.is_some() { T::one() } else { T::zero() };
                for (kk, out) in d.chunks_mut(m * kd).enumerate() {
                    let btk = self.bview(&bt.data()[kk * bl..(kk + 1) * bl]);
                    gemm_par(T::one(), g, btk.t(), beta, out);
                }
            }
        });
        (ga, Some(d))
    }

    /// B̄' (in B's layout) and, when `gdot` or `at` is present, its tangents: for a linear
    /// layer with Ȳ˙, [Ȳ Ȳ˙_1..Ȳ˙_K]ᵀ A is one product sharing A ([`gemm_par_group`]) whose
    /// output is W̄ followed by the K direction-major tangents.
    fn grad_b_all<T: Scalar>(
        &self,
        a: MatRef<T>,
        at: Option<&Tensor<T>>,
        g: MatRef<T>,
        gdot: Option<&Tensor<T>>,
        k: usize,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (m, kd, n) = (self.m, self.kd, self.n);
        let Some(gd) = gdot.filter(|_| self.trans_b) else {
            let gb = written(kd * n, |gb| self.grad_b(a, g, T::zero(), gb));
            let dot =
                (gdot.is_some() || at.is_some()).then(|| self.grad_b_tangent(a, at, g, gdot, k));
            return (gb, dot);
        };
        let gd_sm = sample_major(gd.data(), k, m, n);
        let gdm = MatRef::new(&gd_sm, m, k * n);
        let (gb, d) = written2((kd * n, k * kd * n), |gb, d| {
            gemm_par_group(
                T::one(),
                a,
                Shared::Right,
                &mut [
                    Part::new(g.t(), T::zero(), gb),
                    Part::new(gdm.t(), T::zero(), d),
                ],
            );
            if let Some(at) = at {
                self.grad_b_tangent_at(at, g, k, true, d);
            }
        });
        (gb, Some(d))
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

    /// Writes Aᵀ Ȳ˙_k for all k into `d` (`[K, kd, n]`) for a `matmul` (a linear layer's
    /// goes through [`Product::grad_b_all`]).
    fn grad_b_tangent_gdot<T: Scalar>(&self, a: MatRef<T>, gd: &Tensor<T>, k: usize, d: &mut [T]) {
        debug_assert!(!self.trans_b, "linear layers share A in grad_b_all");
        let (m, kd, n) = (self.m, self.kd, self.n);
        let gd_sm = sample_major(gd.data(), k, m, n);
        let gdm = MatRef::new(&gd_sm, m, k * n);
        // Aᵀ × [m, K·n] → [kd, K, n].
        product_direction_major(d, (k, kd, n), false, |beta, out| {
            gemm_par(T::one(), a.t(), gdm, beta, out)
        });
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
        let beta = if accumulate { T::one() } else { T::zero() };
        if self.trans_b && n <= kd {
            // Ȳᵀ Ȧ_k → [n, kd] for each k: one product per direction sharing Ȳᵀ, each written
            // in place in `d`. Every part packs Ȳᵀ (`n x m`) again, which costs less than the
            // sample-major copy of Ȧ (`m x kd` per direction) when `n ≤ kd`; the sums are the
            // same (tiny-tanh basis trace: 8% less time on one thread).
            let mut parts: Vec<Part<T>> = d
                .chunks_mut(n * kd)
                .zip(at.data().chunks(m * kd))
                .map(|(out, a_k)| Part::new(MatRef::new(a_k, m, kd), beta, out))
                .collect();
            gemm_par_group(T::one(), g.t(), Shared::Left, &mut parts);
            return;
        }
        let at_sm = sample_major(at.data(), k, m, kd);
        let atm = MatRef::new(&at_sm, m, k * kd);
        if self.trans_b {
            // Ȳᵀ × [m, K·kd] → [n, K, kd].
            product_direction_major(d, (k, n, kd), accumulate, |beta, out| {
                gemm_par(T::one(), g.t(), atm, beta, out)
            });
        } else {
            // [K·kd, m] × Ȳ → [K, kd, n] directly.
            gemm_par(T::one(), atm.t(), g, beta, d);
        }
    }
}
