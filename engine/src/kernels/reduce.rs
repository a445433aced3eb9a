//! Sums and dot products in a fixed order with [`LANES`] independent partial sums: the
//! compiler can keep them in vector registers (a plain left fold is one long dependency
//! chain), and the order depends only on the length, so results are bit-identical for any
//! thread count. Each runs through [`vectorized`], so it is built for the widest vectors
//! the machine has (the same operations in the same order: the same bits on every path).

use super::cpu::vectorized;

/// Independent partial sums per reduction.
pub const LANES: usize = 8;

/// Adds the partial sums pairwise: `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))`.
/// The partial sums pass through `black_box` first: seen together with the loop that
/// accumulates them, this pairwise tree steers LLVM's SLP vectorizer into shuffling the
/// accumulators one element at a time; cut off from it, the loop keeps each partial-sum
/// array in one vector register. The sums and their order are unchanged.
#[inline]
fn combine<T: crate::Scalar>(a: [T; LANES]) -> T {
    let a = std::hint::black_box(a);
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `Σ_i f(x_i, y_i)` over equal-length slices: element `i` goes to partial sum `i % LANES`
/// (the tail after the last full group of [`LANES`] is added after combining).
#[inline(always)]
fn sum_zip<T: crate::Scalar>(x: &[T], y: &[T], f: impl Fn(T, T) -> T) -> T {
    assert_eq!(x.len(), y.len(), "reduction operands differ in length");
    let mut acc = [T::zero(); LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] = acc[l] + f(a[l], b[l]);
        }
    }
    xr.iter()
        .zip(yr)
        .fold(combine(acc), |s, (&a, &b)| s + f(a, b))
}

/// `(Σ_i w'_i, Σ_i (x_i − mu) w'_i)` in one pass with the weights `w'_i = f(w_i, u_i)`
/// computed on the fly: bit for bit [`sum`] and [`dot_centered`] of the materialized weights
/// (the same partial sums in the same order), without writing them.
pub fn sum_and_dot_centered_by<T: crate::Scalar>(
    x: &[T],
    mu: T,
    w: &[T],
    u: &[T],
    f: impl Fn(T, T) -> T,
) -> (T, T) {
    vectorized(
        #[inline(always)]
        || sum_and_dot_centered_body(x, mu, w, u, f),
    )
}

/// The loop of [`sum_and_dot_centered_by`]: weight `i` is `f(w_i, u_i)`.
#[inline(always)]
fn sum_and_dot_centered_body<T: crate::Scalar>(
    x: &[T],
    mu: T,
    w: &[T],
    u: &[T],
    f: impl Fn(T, T) -> T,
) -> (T, T) {
    assert!(
        x.len() == w.len() && x.len() == u.len(),
        "reduction operands differ in length"
    );
    let (mut s, mut d) = ([T::zero(); LANES], [T::zero(); LANES]);
    let (xc, wc, uc) = (
        x.chunks_exact(LANES),
        w.chunks_exact(LANES),
        u.chunks_exact(LANES),
    );
    let (xr, wr, ur) = (xc.remainder(), wc.remainder(), uc.remainder());
    for ((a, b), c) in xc.zip(wc).zip(uc) {
        for l in 0..LANES {
            let wl = f(b[l], c[l]);
            s[l] = s[l] + wl;
            d[l] = d[l] + (a[l] - mu) * wl;
        }
    }
    xr.iter()
        .zip(wr)
        .zip(ur)
        .fold((combine(s), combine(d)), |(s, d), ((&a, &b), &c)| {
            let wl = f(b, c);
            (s + wl, d + (a - mu) * wl)
        })
}

/// `Σ_i x_i`.
pub fn sum<T: crate::Scalar>(x: &[T]) -> T {
    vectorized(
        #[inline(always)]
        || sum_zip(x, x, |a, _| a),
    )
}

/// `Σ_i x_i y_i`.
pub fn dot<T: crate::Scalar>(x: &[T], y: &[T]) -> T {
    vectorized(
        #[inline(always)]
        || sum_zip(x, y, |a, b| a * b),
    )
}

/// `Σ_i (x_i − mu) w_i`.
pub fn dot_centered<T: crate::Scalar>(x: &[T], mu: T, w: &[T]) -> T {
    vectorized(
        #[inline(always)]
        || sum_zip(x, w, |a, b| (a - mu) * b),
    )
}

/// `Σ_i (x_i − mu)²`.
pub fn sum_sq_centered<T: crate::Scalar>(x: &[T], mu: T) -> T {
    vectorized(
        #[inline(always)]
        || sum_zip(x, x, |a, _| (a - mu) * (a - mu)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_with_exact_sums() {
        for n in [0usize, 1, 7, 8, 9, 63, 64, 1000] {
            let x: Vec<f64> = (0..n).map(|i| (i % 13) as f64 - 6.0).collect();
            let y: Vec<f64> = (0..n).map(|i| (i % 5) as f64 - 2.0).collect();
            let s: f64 = x.iter().sum();
            assert_eq!(sum(&x), s);
            assert_eq!(
                dot(&x, &y),
                x.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>()
            );
            assert_eq!(
                dot_centered(&x, 1.0, &y),
                x.iter().zip(&y).map(|(a, b)| (a - 1.0) * b).sum::<f64>()
            );
            assert_eq!(
                sum_and_dot_centered_by(&x, 1.0, &y, &y, |b, _| b),
                (sum(&y), dot_centered(&x, 1.0, &y))
            );
            let weights: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a * b.max(0.0)).collect();
            assert_eq!(
                sum_and_dot_centered_by(&x, 1.0, &x, &y, |a, b| a * b.max(0.0)),
                (sum(&weights), dot_centered(&x, 1.0, &weights))
            );
            assert_eq!(
                sum_sq_centered(&x, 2.0),
                x.iter().map(|a| (a - 2.0) * (a - 2.0)).sum::<f64>()
            );
        }
    }
}
