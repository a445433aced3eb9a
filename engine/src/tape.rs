//! The arena tape: nodes in a `Vec`, ids are indices, backward is a plain reverse loop.
//!
//! Every value may carry `K` tangent directions (forward mode, stored `[K, ...shape]`).
//! The backward pass propagates adjoints and, alongside, the tangents of the adjoints
//! (forward-over-reverse). For a leaf parameter θ with tangent `v`, the adjoint is ∇L and
//! its tangent is `H v`. Adjoints and their tangents live in per-pass stores, not on nodes.

use crate::error::{EngineError, Result};
use crate::ops::Op;
use crate::scalar::Scalar;
use crate::tensor::Tensor;

/// A handle to a value recorded on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    /// Position of the value on its tape.
    pub fn index(self) -> usize {
        self.0
    }
}

pub(crate) struct Node<T> {
    pub op: Op<T>,
    pub value: Tensor<T>,
    pub tangent: Option<Tensor<T>>,
    pub requires_grad: bool,
}

/// A recording of one computation, ready to be differentiated once or many times.
pub struct Tape<T> {
    k: usize,
    nodes: Vec<Node<T>>,
}

impl<T: Scalar> Tape<T> {
    /// A tape whose values carry `k` tangent directions (`k = 0`: gradients only).
    pub fn new(k: usize) -> Self {
        Tape {
            k,
            nodes: Vec::new(),
        }
    }

    /// Number of tangent directions carried by each value.
    pub fn directions(&self) -> usize {
        self.k
    }

    /// Number of recorded values.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when nothing is recorded yet.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Scalars held by the recorded values and their tangents: the tape's share of memory,
    /// in elements (memory estimates multiply it by the element size).
    pub fn value_elements(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.value.numel() + n.tangent.as_ref().map_or(0, |t| t.numel()))
            .sum()
    }

    /// A differentiable input (a parameter). `tangent`, if given, is `[K, ...shape]`:
    /// the directions along which Hessian-vector products are taken.
    pub fn param(&mut self, value: Tensor<T>, tangent: Option<Tensor<T>>) -> Result<Var> {
        if let Some(t) = &tangent {
            self.check_tangent(&value, t)?;
        }
        let tangent = if self.k == 0 { None } else { tangent };
        Ok(self.push(Op::Leaf, value, tangent, true))
    }

    /// A constant input (data, labels as floats, targets): no gradient, no tangent.
    pub fn constant(&mut self, value: Tensor<T>) -> Var {
        self.push(Op::Leaf, value, None, false)
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> &Tensor<T> {
        &self.nodes[v.0].value
    }

    /// The tangents `[K, ...shape]` of `v`, or `None` when they are all zero.
    pub fn tangent(&self, v: Var) -> Option<&Tensor<T>> {
        self.nodes[v.0].tangent.as_ref()
    }

    pub(crate) fn check_var(&self, v: Var) -> Result<()> {
        if v.0 < self.nodes.len() {
            Ok(())
        } else {
            Err(EngineError::UnknownVar(v.0))
        }
    }

    fn check_tangent(&self, value: &Tensor<T>, t: &Tensor<T>) -> Result<()> {
        let mut want = vec![self.k];
        want.extend_from_slice(value.shape());
        if t.shape() != want.as_slice() {
            return Err(EngineError::Tangent {
                k: self.k,
                value: value.shape().to_vec(),
                got: t.shape().to_vec(),
            });
        }
        Ok(())
    }

    pub(crate) fn node(&self, v: usize) -> &Node<T> {
        &self.nodes[v]
    }

    pub(crate) fn needs_grad(&self, v: usize) -> bool {
        self.nodes[v].requires_grad
    }

    /// Records an op result. `requires_grad` is derived from the op's inputs.
    pub(crate) fn push(
        &mut self,
        op: Op<T>,
        value: Tensor<T>,
        tangent: Option<Tensor<T>>,
        leaf_grad: bool,
    ) -> Var {
        let requires_grad = match &op {
            Op::Leaf => leaf_grad,
            other => other.inputs().iter().any(|&i| self.nodes[i].requires_grad),
        };
        debug_assert!(
            tangent
                .as_ref()
                .is_none_or(|t| t.numel() == self.k * value.numel()),
            "tangent size"
        );
        self.nodes.push(Node {
            op,
            value,
            tangent,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// Reverse pass from the scalar `output`: gradients of `output` with respect to every
    /// parameter, and (when the tape carries directions) their tangents, i.e. `H v_k`.
    pub fn backward(&self, output: Var) -> Result<Grads<T>> {
        self.check_var(output)?;
        let out = &self.nodes[output.0];
        if out.value.numel() != 1 {
            return Err(EngineError::NotScalar(out.value.shape().to_vec()));
        }
        let n = output.0 + 1;
        let mut store = AdjointStore {
            adj: (0..n).map(|_| None).collect(),
            dot: (0..n).map(|_| None).collect(),
        };
        store.adj[output.0] = Some(Tensor::full(out.value.shape(), T::one()));
        let mut grads = Grads {
            k: self.k,
            grad: (0..self.nodes.len()).map(|_| None).collect(),
            hvp: (0..self.nodes.len()).map(|_| None).collect(),
        };
        for i in (0..n).rev() {
            let Some(gy) = store.adj[i].take() else {
                continue;
            };
            let gdot = store.dot[i].take();
            let node = &self.nodes[i];
            if let Op::Leaf = node.op {
                grads.grad[i] = Some(gy);
                grads.hvp[i] = gdot;
                continue;
            }
            let mut sink = Sink {
                tape: self,
                store: &mut store,
            };
            node.op.backward(self, i, &gy, gdot.as_ref(), &mut sink);
        }
        Ok(grads)
    }
}

struct AdjointStore<T> {
    adj: Vec<Option<Tensor<T>>>,
    dot: Vec<Option<Tensor<T>>>,
}

/// Where an op's backward rule deposits the adjoints (and adjoint tangents) of its inputs.
pub(crate) struct Sink<'a, T> {
    tape: &'a Tape<T>,
    store: &'a mut AdjointStore<T>,
}

impl<T: Scalar> Sink<'_, T> {
    /// Adds an adjoint contribution (and optionally its tangent `[K, ...]`) for input `id`.
    pub fn add(&mut self, id: usize, grad: Tensor<T>, dot: Option<Tensor<T>>) {
        if !self.tape.needs_grad(id) {
            return;
        }
        accumulate(&mut self.store.adj[id], grad);
        if let Some(d) = dot {
            accumulate(&mut self.store.dot[id], d);
        }
    }
}

fn accumulate<T: Scalar>(slot: &mut Option<Tensor<T>>, t: Tensor<T>) {
    match slot {
        None => *slot = Some(t),
        Some(acc) => {
            let mut t = t;
            if !acc.is_unique() && t.is_unique() {
                // Add into the buffer nobody else holds, instead of copying the shared one
                // first (the residual add hands the same adjoint to both of its inputs);
                // elementwise addition commutes, so the sums are the same.
                std::mem::swap(acc, &mut t);
            }
            let src = t.data();
            crate::kernels::par::par_chunks(
                acc.data_mut(),
                #[inline(always)]
                |off, c| {
                    for (j, a) in c.iter_mut().enumerate() {
                        *a = *a + src[off + j];
                    }
                },
            );
        }
    }
}

/// The result of [`Tape::backward`]: gradients and Hessian-vector products per parameter.
pub struct Grads<T> {
    k: usize,
    grad: Vec<Option<Tensor<T>>>,
    hvp: Vec<Option<Tensor<T>>>,
}

impl<T: Scalar> Grads<T> {
    /// The gradient with respect to `v` (zeros if the output does not depend on it).
    pub fn grad(&self, tape: &Tape<T>, v: Var) -> Tensor<T> {
        self.grad
            .get(v.0)
            .and_then(|g| g.clone())
            .unwrap_or_else(|| Tensor::zeros(tape.value(v).shape()))
    }

    /// `H v_k` for every direction `k`, shape `[K, ...shape of v]` (zeros where the
    /// output's gradient does not depend on the directions).
    pub fn hvp(&self, tape: &Tape<T>, v: Var) -> Tensor<T> {
        self.hvp
            .get(v.0)
            .and_then(|g| g.clone())
            .unwrap_or_else(|| {
                let mut s = vec![self.k];
                s.extend_from_slice(tape.value(v).shape());
                Tensor::zeros(&s)
            })
    }

    /// Moves the gradient of `v` out (avoids a copy), `None` if it was zero or already taken.
    pub fn take_grad(&mut self, v: Var) -> Option<Tensor<T>> {
        self.grad.get_mut(v.0).and_then(|g| g.take())
    }

    /// Moves the Hessian-vector products of `v` out, `None` if zero or already taken.
    pub fn take_hvp(&mut self, v: Var) -> Option<Tensor<T>> {
        self.hvp.get_mut(v.0).and_then(|g| g.take())
    }
}
