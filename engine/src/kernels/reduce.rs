//! Sums and dot products in a fixed order with independent partial sums: the compiler keeps
//! them in vector registers (a plain left fold is one long dependency chain), and the order
//! depends only on the length, so results are bit-identical for any thread count. Each runs
//! through [`vectorized`], so it is built for the widest vectors the machine has (the same
//! operations in the same order: the same bits on every path).
//!
//! The order, for `n` elements: element `i` goes to partial sum `i % WIDE` while whole groups
//! of [`WIDE`] remain; those [`WIDE`] sums fold to [`LANES`] ([`narrow`]); the whole groups
//! of [`LANES`] left go to partial sum `i % LANES`; the [`LANES`] sums combine pairwise
//! ([`combine`]), and the last `n % LANES` elements are added one by one.

use super::cpu::vectorized;

/// Independent partial sums over the groups of [`WIDE`] elements: enough independent chains
/// of additions to keep every adder busy (with [`LANES`] alone, a reduction is bound by the
/// latency of one vector addition per step).
pub const WIDE: usize = 64;

/// Independent partial sums over the groups of `LANES` elements after the last whole group
/// of [`WIDE`].
pub const LANES: usize = 8;

/// Folds [`WIDE`] partial sums to [`LANES`]: partial sum `l` becomes
/// `((w_l + w_{l+8}) + (w_{l+16} + w_{l+24})) + ((w_{l+32} + w_{l+40}) + (w_{l+48} + w_{l+56}))`.
/// The sums pass through `black_box` first, as in [`combine`].
#[inline]
fn narrow<T: crate::Scalar>(w: [T; WIDE]) -> [T; LANES] {
    let w = std::hint::black_box(w);
    std::array::from_fn(|l| {
        let p = |j: usize| w[l + LANES * j];
        ((p(0) + p(1)) + (p(2) + p(3))) + ((p(4) + p(5)) + (p(6) + p(7)))
    })
}

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

/// `K` sums at once, `Σ_i f(x_i, y_i, z_i)[j]` for `j < K`, over equal-length slices, each in
/// the order of the module header.
#[inline(always)]
fn sums<T: crate::Scalar, const K: usize>(
    x: &[T],
    y: &[T],
    z: &[T],
    f: impl Fn(T, T, T) -> [T; K],
) -> [T; K] {
    assert!(
        x.len() == y.len() && x.len() == z.len(),
        "reduction operands differ in length"
    );
    let mut wide = [[T::zero(); WIDE]; K];
    let [x, y, z] = add_groups([x, y, z], &f, &mut wide);
    let mut lanes = wide.map(narrow);
    let [x, y, z] = add_groups([x, y, z], &f, &mut lanes);
    let mut total = lanes.map(combine);
    for ((&a, &b), &c) in x.iter().zip(y).zip(z) {
        for (t, v) in total.iter_mut().zip(f(a, b, c)) {
            *t = *t + v;
        }
    }
    total
}

/// Adds `f` of the whole groups of `W` elements of `x, y, z` (equal lengths) into the partial
/// sums `acc` (element `i` of a group to partial sum `i`, group after group); gives the
/// elements after the last whole group.
#[inline(always)]
fn add_groups<'a, T: crate::Scalar, const W: usize, const K: usize>(
    [x, y, z]: [&'a [T]; 3],
    f: &impl Fn(T, T, T) -> [T; K],
    acc: &mut [[T; W]; K],
) -> [&'a [T]; 3] {
    let (xg, yg, zg) = (x.chunks_exact(W), y.chunks_exact(W), z.chunks_exact(W));
    let rest = [xg.remainder(), yg.remainder(), zg.remainder()];
    for ((a, b), c) in xg.zip(yg).zip(zg) {
        for l in 0..W {
            let v = f(a[l], b[l], c[l]);
            for (acc, v) in acc.iter_mut().zip(v) {
                acc[l] = acc[l] + v;
            }
        }
    }
    rest
}

/// `Σ_i f(x_i, y_i)` over equal-length slices, in the order of the module header.
#[inline(always)]
fn sum_zip<T: crate::Scalar>(x: &[T], y: &[T], f: impl Fn(T, T) -> T) -> T {
    let [s] = sums(x, y, y, |a, b, _| [f(a, b)]);
    s
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
    let [s, d] = vectorized(
        #[inline(always)]
        || {
            sums(x, w, u, |a, b, c| {
                let wl = f(b, c);
                [wl, (a - mu) * wl]
            })
        },
    );
    (s, d)
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

    /// The order of the module header, spelled out index by index.
    fn documented_sum(v: &[f64]) -> f64 {
        let n = v.len();
        let whole_wide = n / WIDE * WIDE;
        let whole_lanes = whole_wide + (n - whole_wide) / LANES * LANES;
        let mut wide = [0.0; WIDE];
        for i in 0..whole_wide {
            wide[i % WIDE] += v[i];
        }
        let mut lanes: [f64; LANES] = std::array::from_fn(|l| {
            let p = |j: usize| wide[l + LANES * j];
            ((p(0) + p(1)) + (p(2) + p(3))) + ((p(4) + p(5)) + (p(6) + p(7)))
        });
        for i in whole_wide..whole_lanes {
            lanes[i % LANES] += v[i];
        }
        let l = lanes;
        let combined = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        v[whole_lanes..].iter().fold(combined, |t, &e| t + e)
    }

    /// Every reduction takes its terms in the documented order, bit for bit, on lengths
    /// around both group sizes; values of mixed magnitude make another order show (checked:
    /// a left fold differs).
    #[test]
    fn follow_the_documented_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            unit * 10f64.powi((state % 7) as i32 - 3)
        };
        let mut some_order_differs = false;
        for n in [
            0usize, 1, 7, 8, 9, 63, 64, 65, 71, 72, 127, 128, 200, 1000, 1088,
        ] {
            let x: Vec<f64> = (0..n).map(|_| next()).collect();
            let y: Vec<f64> = (0..n).map(|_| next()).collect();
            let mu = 0.25;
            let prod: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a * b).collect();
            let centered: Vec<f64> = x.iter().zip(&y).map(|(a, b)| (a - mu) * b).collect();
            let squares: Vec<f64> = x.iter().map(|a| (a - mu) * (a - mu)).collect();
            assert_eq!(
                sum(&x).to_bits(),
                documented_sum(&x).to_bits(),
                "sum, n {n}"
            );
            assert_eq!(dot(&x, &y).to_bits(), documented_sum(&prod).to_bits());
            assert_eq!(
                dot_centered(&x, mu, &y).to_bits(),
                documented_sum(&centered).to_bits()
            );
            assert_eq!(
                sum_sq_centered(&x, mu).to_bits(),
                documented_sum(&squares).to_bits()
            );
            let (s, d) = sum_and_dot_centered_by(&x, mu, &y, &y, |w, _| w);
            assert_eq!(s.to_bits(), documented_sum(&y).to_bits());
            assert_eq!(d.to_bits(), documented_sum(&centered).to_bits());
            some_order_differs |= x.iter().sum::<f64>() != documented_sum(&x);
        }
        assert!(
            some_order_differs,
            "the values do not tell one order from another"
        );
    }

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
