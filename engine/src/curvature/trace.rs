//! Exact Hessian trace and diagonal by Hessian-vector products against unit vectors.

use super::operator::{to_f64, BatchLoss, Hessian, ParamLayout};
use super::{invalid, CurvatureResult};
use crate::scalar::Scalar;
use crate::tensor::Tensor;

/// Exact trace and diagonal of one parameter tensor's Hessian block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockTrace {
    /// Position of the tensor in the parameter list.
    pub index: usize,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Trace of its diagonal block of the Hessian.
    pub trace: f64,
    /// `trace` divided by the tensor's number of elements (0 for an empty tensor).
    pub normalized_trace: f64,
    /// The block's Hessian diagonal, row-major like the tensor.
    pub diagonal: Vec<f64>,
}

/// Exact Hessian trace over the measured parameter tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct ExactTrace {
    /// Sum of the diagonal over the measured tensors.
    pub trace: f64,
    /// Number of scalars measured (`d` when all tensors are).
    pub dim: usize,
    /// `trace / dim` (0 when `dim` is 0).
    pub normalized_trace: f64,
    /// One entry per measured tensor, in parameter order.
    pub blocks: Vec<BlockTrace>,
    /// Hessian-vector products spent (= `dim`).
    pub hvps: usize,
    /// Forward-over-reverse passes run (`ceil(dim / K)` per batch).
    pub passes: usize,
}

/// Exact trace, diagonal and per-tensor traces of the Hessian, from `H e_j` for every unit
/// vector `e_j`, `K` per pass. Bit-identical for any thread count.
///
/// Cost: `d` HVPs in `ceil(d / K)` passes per batch.
pub fn exact_trace<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
) -> CurvatureResult<ExactTrace> {
    let all: Vec<usize> = (0..h.layout().num_tensors()).collect();
    exact_trace_of(h, &all)
}

/// [`exact_trace`] restricted to the parameter tensors `tensors` (indices into the parameter
/// list, each at most once): their diagonals and traces, and the sum of those traces.
///
/// Cost: one HVP per scalar of the chosen tensors, `K` per pass.
pub fn exact_trace_of<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    tensors: &[usize],
) -> CurvatureResult<ExactTrace> {
    let layout = h.layout();
    check_tensor_list(layout, tensors)?;
    // coords[j] = (tensor, index inside it) of the j-th measured scalar.
    let coords: Vec<(usize, usize)> = tensors
        .iter()
        .flat_map(|&i| (0..layout.range(i).len()).map(move |e| (i, e)))
        .collect();
    let mut diag = vec![0.0; coords.len()];
    let start = (h.hvps(), h.passes());
    h.map_passes(
        coords.len(),
        |r| basis_tangents(layout, &coords[r]),
        |r, b, hv| {
            let w = h.weights()[b];
            Ok(coords[r]
                .iter()
                .enumerate()
                .map(|(kk, &(i, e))| {
                    let n = layout.range(i).len();
                    w * to_f64(hv[i].data()[kk * n + e])
                })
                .collect::<Vec<f64>>())
        },
        |r, _b, vals| {
            for (a, v) in diag[r].iter_mut().zip(vals) {
                *a += v;
            }
        },
    )?;
    let blocks = blocks_of(layout, tensors, &diag);
    let trace: f64 = blocks.iter().map(|b| b.trace).sum();
    let dim = coords.len();
    Ok(ExactTrace {
        trace,
        dim,
        normalized_trace: if dim == 0 { 0.0 } else { trace / dim as f64 },
        blocks,
        hvps: h.hvps() - start.0,
        passes: h.passes() - start.1,
    })
}

/// Refuses tensor indices out of range or repeated.
fn check_tensor_list(layout: &ParamLayout, tensors: &[usize]) -> CurvatureResult<()> {
    let mut seen = vec![false; layout.num_tensors()];
    for &i in tensors {
        if i >= layout.num_tensors() || seen[i] {
            return invalid(
                "tensors",
                format!(
                    "index {i} is out of range or repeated ({} tensors)",
                    layout.num_tensors()
                ),
            );
        }
        seen[i] = true;
    }
    Ok(())
}

/// One pass's tangents: direction `kk` is the unit vector of the scalar `coords[kk]`.
fn basis_tangents<T: Scalar>(layout: &ParamLayout, coords: &[(usize, usize)]) -> Vec<Tensor<T>> {
    let k = coords.len();
    let mut tangents: Vec<Tensor<T>> = (0..layout.num_tensors())
        .map(|i| {
            let mut shape = vec![k];
            shape.extend_from_slice(layout.shape(i));
            Tensor::zeros(&shape)
        })
        .collect();
    for (kk, &(i, e)) in coords.iter().enumerate() {
        let n = layout.range(i).len();
        tangents[i].data_mut()[kk * n + e] = T::one();
    }
    tangents
}

/// The per-tensor blocks of a measured diagonal (`diag` holds `tensors`' scalars in order).
fn blocks_of(layout: &ParamLayout, tensors: &[usize], diag: &[f64]) -> Vec<BlockTrace> {
    let mut blocks = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for &i in tensors {
        let n = layout.range(i).len();
        let diagonal = diag[offset..offset + n].to_vec();
        offset += n;
        let trace: f64 = diagonal.iter().sum();
        blocks.push(BlockTrace {
            index: i,
            shape: layout.shape(i).to_vec(),
            trace,
            normalized_trace: if n == 0 { 0.0 } else { trace / n as f64 },
            diagonal,
        });
    }
    blocks
}
