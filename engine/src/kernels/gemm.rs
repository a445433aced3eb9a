//! Matrix products, with strides so transposes cost nothing: the packed kernels of
//! [`super::packed`] (AVX-512 or AVX2+FMA, chosen at run time), the packing-free kernel of
//! [`super::nopack`] for few-row products, and `matrixmultiply` where neither applies.

use super::packed::{with_packed_lhs, PackedLhs, Strided};
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
///
/// Products with few rows and contiguous rows of `b` (the convolutions' lowered matrices) run
/// the packing-free kernel of [`super::nopack`]; the rest go through [`gemm_packed`]. The
/// choice depends only on the shapes, strides and machine.
pub fn gemm<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: &mut [T]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    // SAFETY: the views were bounds-checked when built (rows of b are contiguous when
    // b.cs == 1), c holds m rows of n elements and is a distinct, initialized buffer.
    if b.cs == 1
        && unsafe {
            super::nopack::try_gemm(
                m,
                k,
                n,
                alpha,
                (a.data.as_ptr(), a.rs, a.cs),
                (b.data.as_ptr(), b.rs),
                beta,
                (c.as_mut_ptr(), n),
            )
        }
    {
        return;
    }
    gemm_packed(alpha, a, b, beta, c);
}

/// [`gemm`] always through the packed kernels ([`super::packed`], or `matrixmultiply` on a
/// machine without AVX2+FMA): what every block of [`gemm_par`] runs.
pub fn gemm_packed<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: &mut [T]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions");
    assert!(c.len() >= m * n, "gemm output too small");
    gemm_into(alpha, a, b, beta, SendPtr(c.as_mut_ptr()), n, None);
}

/// The packed kernels' view of `x`.
fn strided<T>(x: MatRef<T>) -> Strided<T> {
    Strided {
        ptr: x.data.as_ptr(),
        rs: x.rs,
        cs: x.cs,
    }
}

/// Writes `alpha*a*b + beta*C` into the row-major block at `c` with row stride `ldc`; with
/// `packed`, that is `a` packed already.
fn gemm_into<T: Scalar>(
    alpha: T,
    a: MatRef<T>,
    b: MatRef<T>,
    beta: T,
    c: SendPtr<T>,
    ldc: usize,
    packed: Option<&PackedLhs<T>>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if let Some(packed) = packed {
        // SAFETY: as below; `packed` holds exactly `a` (the caller packed this view).
        unsafe { super::packed::gemm_packed_lhs(packed, n, alpha, strided(b), beta, (c.0, ldc)) };
        return;
    }
    // SAFETY: the views were bounds-checked when built; the caller guarantees c covers
    // m rows of ldc elements (n <= ldc) and that no one else touches that block.
    if unsafe { super::packed::try_gemm(m, k, n, alpha, strided(a), strided(b), beta, (c.0, ldc)) }
    {
        return;
    }
    // SAFETY: as above.
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
/// Smallest output block edge of a parallel product.
const PAR_BLOCK: usize = 64;
/// Blocks per worker thread. One: every further block repacks a whole operand, and with two
/// per thread on a 2-core Zen 5 the repacking and the uneven last tile cost more than the
/// balance gained (SGEMM 1024 and the mlp-s shapes measured faster with one; see
/// docs/performance.md, "SGEMM against the FMA peak").
const BLOCKS_PER_THREAD: usize = 1;

/// The grid `(row blocks, column blocks)` of a parallel product of shape `(m, k, n)` on
/// `threads` threads. Blocks are at least `PAR_BLOCK` wide; every further row block repacks
/// `b` (`k x n` elements) and every further column block repacks `a` (`m x k`). About
/// `BLOCKS_PER_THREAD` blocks per thread along the dimension whose repacking is cheaper; when
/// that leaves a thread without a block (small products on many threads), the cheapest grid
/// of row and column blocks that has enough.
fn split_grid((m, k, n): (usize, usize, usize), threads: usize) -> (usize, usize) {
    let want = BLOCKS_PER_THREAD * threads;
    let (max_rows, max_cols) = ((m / PAR_BLOCK).max(1), (n / PAR_BLOCK).max(1));
    let extra = |&(rb, cb): &(usize, usize)| (rb - 1) * k * n + (cb - 1) * m * k;
    let one_way = [(want.min(max_rows), 1), (1, want.min(max_cols))]
        .into_iter()
        .filter(|&(rb, cb)| rb * cb > 1)
        .min_by_key(extra)
        .unwrap_or((1, 1));
    if one_way.0 * one_way.1 >= threads.min(max_rows * max_cols) {
        return one_way;
    }
    let enough = want.min(max_rows * max_cols);
    (1..=max_rows)
        .map(|rb| (rb, enough.div_ceil(rb).min(max_cols)))
        .filter(|&(rb, cb)| rb * cb >= enough)
        .min_by_key(extra)
        .unwrap_or(one_way)
}

/// Like [`gemm_packed`], splitting the output into a grid of blocks run in parallel.
///
/// The inner dimension is never split and every output element is computed by the same
/// kernel sequence whatever block it falls in, so the result is bit-identical to
/// [`gemm_packed`] for any split and any thread count. Each block packs its own copy of the
/// operand it shares with the others (all of `b` for a row block, all of `a` for a column
/// block), so the split is chosen by how much it repacks (see `split_grid`).
pub fn gemm_par<T: Scalar>(alpha: T, a: MatRef<T>, b: MatRef<T>, beta: T, c: &mut [T]) {
    gemm_par_group(alpha, a, Shared::Left, &mut [Part::new(b, beta, c)]);
}

/// Which operand the products of a [`gemm_par_group`] share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shared {
    /// `c_i = a b_i`: the parts' columns side by side (`X [W; Ẇ]ᵀ`).
    Left,
    /// `c_i = a_i b`: the parts' rows stacked (`[Ȳ; Ȳ˙]ᵀ X`).
    Right,
}

/// One product of a [`gemm_par_group`]: its own operand, `beta`, and its row-major output.
pub struct Part<'a, 'c, T> {
    operand: MatRef<'a, T>,
    beta: T,
    out: &'c mut [T],
}

impl<'a, 'c, T: Scalar> Part<'a, 'c, T> {
    /// The product with operand `operand` (the one not shared), written as
    /// `c = alpha * product + beta * c` into `out` (`beta == 0`: `out` is not read).
    pub fn new(operand: MatRef<'a, T>, beta: T, out: &'c mut [T]) -> Self {
        Part { operand, beta, out }
    }
}

/// One output block of a group: its operands, `beta` and where it is written.
#[derive(Clone, Copy)]
struct Job<'a, T> {
    a: MatRef<'a, T>,
    b: MatRef<'a, T>,
    beta: T,
    c: SendPtr<T>,
    ldc: usize,
}

/// Several products that share one operand, as ONE product split into parallel blocks:
/// with [`Shared::Left`] `c_i = alpha a b_i + beta_i c_i` (the parts' columns side by side),
/// with [`Shared::Right`] `c_i = alpha a_i b + beta_i c_i` (their rows stacked). The grid of
/// the combined shape is chosen as in [`gemm_par`], and no block straddles two parts, so
/// each part is written in place. Where every block reads all of a shared left operand
/// (blocks split by columns only), it is packed once for all of them, each thread packing
/// some of its blocks ([`super::packed::PackedLhs`]); otherwise every block packs what it
/// reads. Results are bit-identical to [`gemm_packed`] of each part alone, for any thread
/// count.
pub fn gemm_par_group<T: Scalar>(alpha: T, shared: MatRef<T>, side: Shared, parts: &mut [Part<T>]) {
    let jobs: Vec<(Job<T>, usize)> = parts
        .iter_mut()
        .map(|p| {
            let (a, b) = match side {
                Shared::Left => (shared, p.operand),
                Shared::Right => (p.operand, shared),
            };
            assert_eq!(b.rows, a.cols, "gemm inner dimensions");
            assert!(p.out.len() >= a.rows * b.cols, "gemm output too small");
            let c = SendPtr(p.out.as_mut_ptr());
            let job = Job {
                a,
                b,
                beta: p.beta,
                c,
                ldc: b.cols,
            };
            (job, if side == Shared::Left { b.cols } else { a.rows })
        })
        .collect();
    let stacked: usize = jobs.iter().map(|j| j.1).sum();
    let (k, other) = match side {
        Shared::Left => (shared.cols, shared.rows),
        Shared::Right => (shared.rows, shared.cols),
    };
    let (m, n) = match side {
        Shared::Left => (other, stacked),
        Shared::Right => (stacked, other),
    };
    let (rb, cb) = grid((m, k, n), rayon::current_num_threads());
    let (rows, cols) = block_size((m, n), (rb, cb));
    let blocks: Vec<Job<T>> = jobs
        .iter()
        .flat_map(|&(job, _)| blocks_of(job, rows, cols))
        .collect();
    let run_all = |packed: Option<&PackedLhs<T>>| {
        let run = |j: &Job<T>| gemm_into(alpha, j.a, j.b, j.beta, j.c, j.ldc, packed);
        if blocks.len() < 2 || rb * cb < 2 {
            blocks.iter().for_each(run);
        } else {
            blocks.par_iter().for_each(run);
        }
    };
    // Where every block reads all of a shared left operand (blocks split by columns, or
    // several parts), it is packed once, by all threads, instead of once per block.
    if side == Shared::Left && rb == 1 && blocks.len() > 1 {
        // SAFETY: `shared` was bounds-checked when built.
        unsafe { with_packed_lhs(shared.rows, shared.cols, strided(shared), run_all) }
    } else {
        run_all(None)
    }
}

/// The output blocks (at most `rows x cols` each) of one product `job`.
fn blocks_of<T: Scalar>(job: Job<'_, T>, rows: usize, cols: usize) -> Vec<Job<'_, T>> {
    let (m, n) = (job.a.rows, job.b.cols);
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let (rows, cols) = (rows.max(1), cols.max(1));
    let mut out = Vec::with_capacity(m.div_ceil(rows) * n.div_ceil(cols));
    for r0 in (0..m).step_by(rows) {
        for c0 in (0..n).step_by(cols) {
            let (nr, nc) = (rows.min(m - r0), cols.min(n - c0));
            // SAFETY: the offset stays inside the part's output (checked by the caller);
            // the blocks are disjoint.
            let c = unsafe { job.c.at(r0 * job.ldc + c0) };
            out.push(Job {
                a: job.a.row_block(r0, nr),
                b: job.b.col_block(c0, nc),
                c,
                ..job
            });
        }
    }
    out
}

/// The most rows and columns of one output block when `(m, n)` is split into a grid of
/// `(rb, cb)` blocks: rounded up to whole tiles of the packed kernels
/// ([`super::packed::TILE_MULTIPLE`]), so that only the last block of a row or column has
/// edge tiles (which run a whole tile on a copy), not every block.
fn block_size((m, n): (usize, usize), (rb, cb): (usize, usize)) -> (usize, usize) {
    let (tile_rows, tile_cols) = super::packed::TILE_MULTIPLE;
    let edge = |len: usize, blocks: usize, tile: usize| match blocks {
        0 | 1 => len,
        _ => len.div_ceil(blocks).next_multiple_of(tile),
    };
    (edge(m, rb, tile_rows), edge(n, cb, tile_cols))
}

/// The parallel grid `(row blocks, column blocks)` of a product of shape `(m, k, n)`, or
/// `(1, 1)` where it runs on one thread (too small, or one thread).
fn grid((m, k, n): (usize, usize, usize), threads: usize) -> (usize, usize) {
    if threads < 2 || m * n * k.max(1) < PAR_MIN_WORK {
        return (1, 1);
    }
    if m < 2 * PAR_BLOCK && n < 2 * PAR_BLOCK {
        return (1, 1);
    }
    split_grid((m, k, n), threads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

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

    /// Random (non-integer) operands, plain and transposed, in pools of 1 to 4 threads: the
    /// parallel product equals the serial packed one bit for bit whatever the split.
    #[test]
    fn gemm_par_is_bit_identical_for_any_thread_count() {
        let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut next = || rng.gen_range(-0.5f32..0.5);
        for &(m, k, n) in &[
            (128, 3072, 256),
            (256, 128, 3072),
            (1000, 27, 130),
            (77, 300, 513),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut want = vec![0.0f32; m * n];
            gemm_packed(
                1.0,
                MatRef::new(&a, m, k),
                MatRef::new(&b, k, n),
                0.0,
                &mut want,
            );
            for threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (c1, c2) = pool.install(|| {
                    let mut c1 = vec![1.0f32; m * n];
                    gemm_par(
                        1.0,
                        MatRef::new(&a, m, k),
                        MatRef::new(&b, k, n),
                        0.0,
                        &mut c1,
                    );
                    let mut c2 = vec![1.0f32; m * n];
                    gemm_par(
                        1.0,
                        MatRef::new(&a, m, k),
                        MatRef::new(&bt, n, k).t(),
                        0.0,
                        &mut c2,
                    );
                    (c1, c2)
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&c1), bits(&want), "{m}x{k}x{n}, {threads} threads");
                assert_eq!(
                    bits(&c2),
                    bits(&want),
                    "{m}x{k}x{n} (b transposed), {threads} threads"
                );
            }
        }
    }

    /// Products sharing the left operand (columns side by side) or the right one (rows
    /// stacked), with parts of different sizes and betas, in pools of 1 to 4 threads: every
    /// part equals the serial packed product of that part alone, bit for bit.
    #[test]
    fn gemm_par_group_matches_each_part_alone_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut draw =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-0.5..0.5)).collect() };
        let (m, k) = (128, 700);
        let shared = draw(m * k);
        let widths = [256, 512, 10];
        let others: Vec<Vec<f32>> = widths.iter().map(|&w| draw(k * w)).collect();
        let old: Vec<Vec<f32>> = widths.iter().map(|&w| draw(m * w)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for side in [Shared::Left, Shared::Right] {
            // Left: shared [m, k] times [k, w_i]. Right: [w_i, k] (a transposed view) times shared [k, m].
            let sh = match side {
                Shared::Left => MatRef::new(&shared, m, k),
                Shared::Right => MatRef::new(&shared, m, k).t(),
            };
            let own = |i: usize| match side {
                Shared::Left => MatRef::new(&others[i], k, widths[i]),
                Shared::Right => MatRef::new(&others[i], k, widths[i]).t(),
            };
            let beta = |i: usize| if i == 1 { 0.5f32 } else { 0.0 };
            let want: Vec<Vec<f32>> = (0..widths.len())
                .map(|i| {
                    let mut c = old[i].clone();
                    let (a, b) = match side {
                        Shared::Left => (sh, own(i)),
                        Shared::Right => (own(i), sh),
                    };
                    gemm_packed(1.0, a, b, beta(i), &mut c);
                    c
                })
                .collect();
            for threads in 1..=4 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = old.clone();
                pool.install(|| {
                    let mut parts: Vec<Part<f32>> = got
                        .iter_mut()
                        .enumerate()
                        .map(|(i, c)| Part::new(own(i), beta(i), c))
                        .collect();
                    gemm_par_group(1.0, sh, side, &mut parts);
                });
                for i in 0..widths.len() {
                    assert_eq!(
                        bits(&got[i]),
                        bits(&want[i]),
                        "{side:?} part {i}, {threads} threads"
                    );
                }
            }
        }
    }

    /// One dimension where that gives every thread a block (the cheaper one to repack), a
    /// grid of both where it does not.
    #[test]
    fn split_grid_gives_every_thread_a_block_at_the_least_repacking() {
        assert_eq!(split_grid((128, 3072, 256), 2), (1, 2));
        assert_eq!(split_grid((1024, 1024, 1024), 2), (2, 1));
        assert_eq!(split_grid((256, 128, 3072), 2), (1, 2));
        assert_eq!(split_grid((128, 3072, 256), 4), (1, 4));
        assert_eq!(split_grid((128, 3072, 256), 16), (2, 4));
        assert_eq!(split_grid((1024, 1024, 1024), 16), (16, 1));
        assert_eq!(split_grid((100, 50, 40), 8), (1, 1));
    }

    /// Blocks end on whole tiles of every kernel; the grid keeps its number of blocks.
    #[test]
    fn block_size_rounds_to_whole_tiles() {
        assert_eq!(block_size((1024, 1024), (4, 1)), (264, 1024));
        assert_eq!(block_size((128, 3072), (2, 4)), (72, 768));
        assert_eq!(block_size((256, 3000), (1, 4)), (256, 768));
        for (m, rb) in [(1024, 4), (130, 2), (1000, 7), (128, 2)] {
            let (rows, _) = block_size((m, 1), (rb, 1));
            assert_eq!(m.div_ceil(rows), rb, "{m} rows in {rb} blocks");
        }
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
