//! Fixed-chunk parallel helpers. Each task's loop runs through [`vectorized`], so the
//! per-element closures handed in are built for the widest vectors the machine has.

use super::cpu::vectorized;
use rayon::prelude::*;

/// Elements per task for elementwise loops (fixed, independent of the thread count).
pub const ELEMWISE_CHUNK: usize = 1 << 14;

/// Applies `f(offset, chunk)` to fixed-size chunks of `out` in parallel.
pub fn par_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if out.len() <= ELEMWISE_CHUNK {
        vectorized(
            #[inline(always)]
            || f(0, out),
        );
        return;
    }
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .enumerate()
        .for_each(|(i, c)| {
            vectorized(
                #[inline(always)]
                || f(i * ELEMWISE_CHUNK, c),
            )
        });
}

/// `out[i] = f(i)` for every index, in parallel fixed chunks.
pub fn par_fill<T: Send>(out: &mut [T], f: impl Fn(usize) -> T + Sync + Send) {
    par_chunks(
        out,
        #[inline(always)]
        |off, c| {
            for (j, o) in c.iter_mut().enumerate() {
                *o = f(off + j);
            }
        },
    );
}

/// `f(x_i)` for every element of `x`, as a new vector written once in parallel fixed chunks
/// (no zero fill first: activation-sized buffers are not written twice).
pub fn par_map<T: Copy + Send + Sync>(x: &[T], f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    par_map2(
        x,
        x,
        #[inline(always)]
        |a, _| f(a),
    )
}

/// `f(x_i, y_i)` for every pair of elements of the equal-length `x` and `y`, as [`par_map`].
pub fn par_map2<T: Copy + Send + Sync>(
    x: &[T],
    y: &[T],
    f: impl Fn(T, T) -> T + Sync + Send,
) -> Vec<T> {
    assert_eq!(x.len(), y.len(), "par_map2 operands differ in length");
    let n = x.len();
    let mut out: Vec<T> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n <= ELEMWISE_CHUNK {
        vectorized(
            #[inline(always)]
            || map2_into(spare, x, y, &f),
        );
    } else {
        spare
            .par_chunks_mut(ELEMWISE_CHUNK)
            .enumerate()
            .for_each(|(i, c)| {
                let off = i * ELEMWISE_CHUNK;
                vectorized(
                    #[inline(always)]
                    || map2_into(c, &x[off..], &y[off..], &f),
                )
            });
    }
    // SAFETY: the chunks cover 0..n and `map2_into` writes every element of its chunk (the zipped
    // operands are at least as long as the chunk, checked by the assert above).
    unsafe { out.set_len(n) };
    out
}

/// `out[i] = f(x_i, y_i)` for the first `out.len()` elements (the loop of [`par_map2`]).
#[inline(always)]
fn map2_into<T: Copy>(
    out: &mut [std::mem::MaybeUninit<T>],
    x: &[T],
    y: &[T],
    f: &impl Fn(T, T) -> T,
) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        o.write(f(a, b));
    }
}

/// A vector of `n` elements written only by `fill(index, block)` over the fixed blocks of
/// `block` elements (the last one shorter), in parallel, with `init` making each task's
/// scratch: no zero fill first, for buffers that are overwritten whole. `fill` must write
/// every element of its block; debug builds fill the buffer with NaN first, so that an
/// element left unwritten shows up in the tests (which compare every value).
pub fn par_build<T, S>(
    n: usize,
    block: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) -> Vec<T>
where
    T: crate::scalar::Scalar,
{
    let mut out: Vec<T> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if cfg!(debug_assertions) {
        spare.iter_mut().for_each(|v| {
            v.write(T::nan());
        });
    }
    // SAFETY: the capacity holds `n` elements; they are only written (every one, by the
    // contract of `fill`) before the length is set, and `T` is a plain float.
    let all = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<T>(), n) };
    all.par_chunks_mut(block.max(1))
        .enumerate()
        .for_each_init(init, |s, (i, c)| {
            vectorized(
                #[inline(always)]
                || fill(s, i, c),
            )
        });
    // SAFETY: every element was written above.
    unsafe { out.set_len(n) };
    out
}

/// `f(i)` for every index `i < n`, as a new vector written once in the fixed chunks of
/// [`par_fill`] (no zero fill first).
pub fn par_from_fn<T: crate::scalar::Scalar>(
    n: usize,
    f: impl Fn(usize) -> T + Sync + Send,
) -> Vec<T> {
    par_build(
        n,
        ELEMWISE_CHUNK,
        || (),
        #[inline(always)]
        |_, b, c| {
            for (j, o) in c.iter_mut().enumerate() {
                *o = f(b * ELEMWISE_CHUNK + j);
            }
        },
    )
}

/// A raw pointer that may cross threads; used only to hand out provably disjoint regions.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: users only write disjoint regions from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `off` elements further on.
    ///
    /// # Safety
    /// `off` must stay within the allocation.
    pub unsafe fn at(&self, off: usize) -> SendPtr<T> {
        SendPtr(self.0.add(off))
    }

    /// Mutable slice `[off, off + len)` of the underlying buffer.
    ///
    /// # Safety
    /// The range must be in bounds and not accessed by anyone else while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Splits `n` items into at most `max_chunks` contiguous ranges of near-equal size
/// (a function of `n` and `max_chunks` only).
pub fn fixed_ranges(n: usize, max_chunks: usize) -> Vec<std::ops::Range<usize>> {
    let chunks = max_chunks.clamp(1, n.max(1));
    let size = n.div_ceil(chunks).max(1);
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block is handed out once, with its index, and the vector has the asked length.
    #[test]
    fn par_build_covers_every_block() {
        for (n, block) in [(0, 4), (1, 4), (12, 4), (13, 4), (1000, 7)] {
            let v: Vec<f64> = par_build(
                n,
                block,
                || (),
                |_, i, c| {
                    for (j, o) in c.iter_mut().enumerate() {
                        *o = (i * block + j) as f64;
                    }
                },
            );
            assert_eq!(v, (0..n).map(|i| i as f64).collect::<Vec<_>>());
        }
    }

    /// Every element is written, across chunk boundaries and in a short tail.
    #[test]
    fn par_map2_writes_every_element() {
        for n in [0, 1, ELEMWISE_CHUNK, 3 * ELEMWISE_CHUNK + 17] {
            let x: Vec<f64> = (0..n).map(|i| i as f64).collect();
            let y: Vec<f64> = (0..n).map(|i| 0.5 * i as f64).collect();
            let z = par_map2(&x, &y, |a, b| a - b);
            assert_eq!(z.len(), n);
            assert!(z.iter().enumerate().all(|(i, &v)| v == 0.5 * i as f64));
            assert_eq!(
                par_map(&x, |a| a + 1.0),
                (0..n).map(|i| i as f64 + 1.0).collect::<Vec<_>>()
            );
        }
    }
}
