//! Matrix products through `matrixmultiply`, with strides so transposes cost nothing.

use super::par::SendPtr;
use crate::scalar::Scalar;
use rayon::prelude::*;

/// A read-only strided matrix view.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Scalar> MatRef<'a, T> {
    /// A row-major `rows x cols` matrix occupying the start of `data`.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A general strided view; panics if the view does not fit in `data` (a programming error).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            assert!(last < data.len(), "matrix view out of bounds");
        }
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose (a view; no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Sub-view of rows `r0..r0+nr`.
    fn row_block(self, r0: usize, nr: usize) -> Self {
        MatRef {
            data: &self.data[r0 * self.rs..],
            rows: nr,
            ..self
        }
    }

    /// Sub-view of columns `c0..c0+nc`.
    fn col_block(self, c0: usize, nc: usize) -> Self {
        MatRef {
            data: &self.data[c0 * self.cs..],
            cols: nc,
            ..self
        }
    }
}

/// `c = alpha * a * b + beta * c`, with `c` row-major `a.rows x b.cols`, single-threaded.
/// With `beta == 0`, the old contents of `c` are ignored.
pub fn gemm<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: &mut [T]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    gemm_into(alpha, a, b, beta, SendPtr(c.as_mut_ptr()), n);
}

/// Writes `alpha*a*b + beta*C` into the row-major block at `c` with row stride `ldc`.
fn gemm_into<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: SendPtr<T>, ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the views were bounds-checked when built; the caller guarantees c covers
    // m rows of ldc elements (n <= ldc) and that no one else touches that block.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.0,
            ldc as isize,
            1,
        );
    }
}

/// Below this many multiply-adds a product runs on one thread.
const PAR_MIN_WORK: usize = 1 << 18;
/// Target output block edge for parallel products.
const PAR_BLOCK: usize = 64;

/// Like [`gemm`], splitting the output into fixed blocks of rows or columns run in parallel.
/// The inner dimension is never split, so the result is bit-identical to [`gemm`].
pub fn gemm_par<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: &mut [T]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    if m * n * k.max(1) < PAR_MIN_WORK || (m < 2 * PAR_BLOCK && n < 2 * PAR_BLOCK) {
        return gemm(alpha, a, b, beta, c);
    }
    let ptr = SendPtr(c.as_mut_ptr());
    if m >= n {
        let blocks = m.div_ceil(PAR_BLOCK);
        (0..blocks).into_par_iter().for_each(|i| {
            let r0 = i * PAR_BLOCK;
            let nr = PAR_BLOCK.min(m - r0);
            // SAFETY: row blocks are disjoint.
            let cp = unsafe { ptr.at(r0 * n) };
            gemm_into(alpha, a.row_block(r0, nr), b, beta, cp, n);
        });
    } else {
        let blocks = n.div_ceil(PAR_BLOCK);
        (0..blocks).into_par_iter().for_each(|j| {
            let c0 = j * PAR_BLOCK;
            let nc = PAR_BLOCK.min(n - c0);
            // SAFETY: column blocks are disjoint.
            let cp = unsafe { ptr.at(c0) };
            gemm_into(alpha, a, b.col_block(c0, nc), beta, cp, n);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn gemm_par_matches_naive_and_serial_bits() {
        for &(m, k, n) in &[(3, 5, 7), (300, 70, 20), (20, 70, 300), (257, 129, 190)] {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
            let b: Vec<f64> = (0..k * n)
                .map(|i| ((i * 104_729) % 11) as f64 - 5.0)
                .collect();
            let want = naive(&a, &b, m, k, n);
            let mut c1 = vec![f64::NAN; m * n];
            gemm(
                1.0,
                MatRef::new(&a, m, k),
                MatRef::new(&b, k, n),
                0.0,
                &mut c1,
            );
            let mut c2 = vec![f64::NAN; m * n];
            gemm_par(
                1.0,
                MatRef::new(&a, m, k),
                MatRef::new(&b, k, n),
                0.0,
                &mut c2,
            );
            assert_eq!(c1, want);
            assert_eq!(c2, want);
            // transposed views
            let at: Vec<f64> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let mut c3 = vec![0.0; m * n];
            gemm_par(
                1.0,
                MatRef::new(&at, k, m).t(),
                MatRef::new(&b, k, n),
                0.0,
                &mut c3,
            );
            assert_eq!(c3, want);
        }
    }
}
