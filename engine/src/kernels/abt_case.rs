//! Test operands of `C += Σ_s A_s B_sᵀ` with the rows of `B_s` read through an offset table,
//! the product that [`super::rowdot`] and [`super::outer`] both compute: one set of cases and
//! one exact reference for the two kernels' tests.

use crate::scalar::Scalar;
use rand::{rngs::StdRng, Rng};

/// One product's operands: `segs` blocks of `m` rows of `A` (`lda`, `a_seg` apart) and of a
/// buffer `B` read through `offsets` (`b_seg` apart), with a non-zero `C`.
pub(crate) struct Case {
    /// `(m, n, k, segs)`.
    pub dims: (usize, usize, usize, usize),
    pub lda: usize,
    pub a_seg: usize,
    pub b_seg: usize,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub offsets: Vec<usize>,
    pub c0: Vec<f64>,
}

impl Case {
    /// Random operands, rows of `A` with a little padding and random offsets into `B`.
    pub fn random(rng: &mut StdRng, (m, n, k, segs): (usize, usize, usize, usize)) -> Case {
        let (lda, a_seg) = (k + 2, m * (k + 2) + 5);
        let b_seg = k + 3 * n + 1;
        let mut draw =
            |len: usize| -> Vec<f64> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (a, b, c0) = (draw(segs * a_seg), draw(segs * b_seg), draw(m * n));
        let offsets = (0..n).map(|_| rng.gen_range(0..=3 * n)).collect();
        Case {
            dims: (m, n, k, segs),
            lda,
            a_seg,
            b_seg,
            a,
            b,
            offsets,
            c0,
        }
    }

    /// A convolution's weight gradient: `A` the output gradient at the padded pitch
    /// (`k = (h - 1)·(w + 2) + w`), `B` padded `c_in x (h + 2) x (w + 2)` images read at the
    /// offsets of the 3x3 taps.
    pub fn conv(rng: &mut StdRng, (c_out, c_in, h, segs): (usize, usize, usize, usize)) -> Case {
        let wp = h + 2;
        let k = (h - 1) * wp + h;
        let plane = wp * wp;
        let offsets: Vec<usize> = (0..c_in * 9)
            .map(|e| (e / 9) * plane + (e % 9 / 3) * wp + e % 3)
            .collect();
        let mut case = Case::random(rng, (c_out, c_in * 9, k, segs));
        (case.lda, case.a_seg, case.b_seg) = (k, c_out * k, c_in * plane + 2);
        case.a.truncate(segs * case.a_seg);
        case.b = (0..segs * case.b_seg)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        case.offsets = offsets;
        case
    }

    /// `A`, `B` and `C0` converted to `T`.
    pub fn operands<T: Scalar>(&self) -> (Vec<T>, Vec<T>, Vec<T>) {
        (cast(&self.a), cast(&self.b), cast(&self.c0))
    }

    /// The term `a·b` of element `(i, j)` at segment `s`, position `q`.
    pub fn term<T: Scalar>(
        &self,
        (a, b): (&[T], &[T]),
        (i, j): (usize, usize),
        s: usize,
        q: usize,
    ) -> (T, T) {
        (
            a[s * self.a_seg + i * self.lda + q],
            b[s * self.b_seg + self.offsets[j] + q],
        )
    }

    /// `C0 + Σ_s A_s B_sᵀ` in f64 with plain sums (the exact product to rounding).
    pub fn exact(&self) -> Vec<f64> {
        let (m, n, k, segs) = self.dims;
        (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let sum: f64 = (0..segs)
                    .flat_map(|s| (0..k).map(move |q| (s, q)))
                    .map(|(s, q)| {
                        let (x, y) = self.term((&self.a, &self.b), (i, j), s, q);
                        x * y
                    })
                    .sum();
                self.c0[e] + sum
            })
            .collect()
    }
}

/// `v` converted to `T`.
fn cast<T: Scalar>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::c(x)).collect()
}
