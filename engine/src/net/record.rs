//! Recording a [`Net`] on a tape with the engine's ops.

use super::{Activation, Layer, Net, Node, NormStats};
use crate::error::{EngineError, Result};
use crate::ops::{BatchStats, BnMode, Loss, MaxPoolAfter};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// A net recorded on a tape.
#[derive(Clone, Debug)]
pub struct Recorded<T> {
    /// One variable per node, the input first and the output (logits) last. Nodes that
    /// [`Net::record`] records as one op share that op's variable (the last node's value);
    /// [`Net::record_each_node`] gives every node its own value.
    pub vars: Vec<Var>,
    /// With batch statistics: every BatchNorm layer's statistics, in node order.
    pub batch_stats: Vec<BatchStats<T>>,
}

impl<T> Recorded<T> {
    /// The output variable.
    pub fn output(&self) -> Var {
        *self.vars.last().expect("a net has at least its input")
    }
}

/// The state of a recording in progress: one variable per node recorded so far, the batch
/// statistics gathered, the next BatchNorm layer's index, which nodes take the ReLU that reads
/// them as an epilogue ([`Net::relu_epilogues`]) and which convolutions their ReLU and max
/// pooling ([`Net::pool_fusions`]).
pub(super) struct Recording<T> {
    pub(super) vars: Vec<Var>,
    pub(super) batch_stats: Vec<BatchStats<T>>,
    pub(super) next_bn: usize,
    relu_epilogue: Vec<bool>,
    pool_fusion: Vec<Option<usize>>,
    fused_away: Vec<bool>,
}

impl<T> Recording<T> {
    /// An empty recording of `net`, with the fusions or (`fuse` false) every node as its own op.
    pub(super) fn new(net: &Net, fuse: bool) -> Self {
        let (relu_epilogue, pool_fusion) = match fuse {
            true => {
                let readers = net.sole_readers();
                (net.relu_epilogues(&readers), net.pool_fusions(&readers))
            }
            false => (vec![false; net.len()], vec![None; net.len()]),
        };
        let mut fused_away = vec![false; net.len()];
        for (conv, pool) in pool_fusion.iter().enumerate() {
            // The pooling node and, up to the convolution, the ReLU before it.
            let mut j = *pool;
            while let Some(k) = j.filter(|&k| k != conv) {
                fused_away[k] = true;
                j = Some(net.nodes()[k].inputs[0].0);
            }
        }
        Recording {
            vars: Vec::with_capacity(net.len()),
            batch_stats: Vec::new(),
            next_bn: 0,
            relu_epilogue,
            pool_fusion,
            fused_away,
        }
    }
}

impl Net {
    /// Records the forward pass of `x: [N, ...input_shape]` on `tape`, with `params` the
    /// tape variables of the trainable parameters (in [`Net::params`] order) and `norm`
    /// the statistics of the BatchNorm layers. Where a node's only reader continues it, the
    /// two or three are one op with the same values and derivatives: a BatchNorm or an add
    /// and its ReLU ([`Tape::batch_norm2d_relu`], [`Tape::add_relu`]), a convolution, its
    /// max pooling and any ReLU between them ([`Tape::conv2d_max_pool`]); the nodes of one op
    /// share its variable in [`Recorded::vars`].
    pub fn record<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
    ) -> Result<Recorded<T>> {
        self.record_with(tape, params, x, norm, true)
    }

    /// [`Net::record`] with every node recorded as its own op, so that every entry of
    /// [`Recorded::vars`] holds its own node's value (for code that reads intermediate
    /// values, e.g. the structural curvature).
    pub fn record_each_node<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
    ) -> Result<Recorded<T>> {
        self.record_with(tape, params, x, norm, false)
    }

    fn record_with<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
        fuse: bool,
    ) -> Result<Recorded<T>> {
        self.check_inputs(tape.value(x).shape(), params.len(), norm)?;
        let mut rec = Recording::new(self, fuse);
        for node in self.nodes() {
            let v = self.record_node(tape, node, params, x, norm, &mut rec)?;
            rec.vars.push(v);
        }
        Ok(Recorded {
            vars: rec.vars,
            batch_stats: rec.batch_stats,
        })
    }

    /// Checks a recording's input shape, parameter count and running statistics.
    pub(super) fn check_inputs<T>(
        &self,
        xs: &[usize],
        params: usize,
        norm: &NormStats<'_, T>,
    ) -> Result<()> {
        let bad = |detail: String| EngineError::Shape { op: "net", detail };
        if params != self.param_tensors() {
            return Err(bad(format!(
                "{params} parameter variables for {} parameter tensors",
                self.param_tensors()
            )));
        }
        if xs.len() != self.input_shape().len() + 1 || xs[1..] != *self.input_shape() {
            return Err(bad(format!(
                "input {xs:?}, want [N, {}]",
                dims(self.input_shape())
            )));
        }
        let bns = self.batch_norms().len();
        if let NormStats::Running(stats) = norm {
            if stats.len() != bns {
                return Err(bad(format!(
                    "{} running statistics for {bns} BatchNorm layers",
                    stats.len()
                )));
            }
        }
        Ok(())
    }

    /// Records one node with the engine's op for its layer, its inputs being the variables
    /// recorded so far in `rec`; a BatchNorm layer takes the next statistics.
    pub(super) fn record_node<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        node: &Node,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
        rec: &mut Recording<T>,
    ) -> Result<Var> {
        let p = |k: usize| params[node.first_param + k];
        let input = |k: usize| rec.vars[node.inputs[k].0];
        let at = rec.vars.len();
        let with_relu = rec.relu_epilogue[at];
        if rec.fused_away[at] {
            return Ok(input(0));
        }
        Ok(match &node.layer {
            Layer::Input => x,
            Layer::Linear { bias, .. } => tape.linear(input(0), p(0), bias.then(|| p(1)))?,
            Layer::Conv2d {
                stride,
                padding,
                bias,
                ..
            } => {
                let b = bias.then(|| p(1));
                match rec.pool_fusion[at].map(|k| &self.nodes()[k]) {
                    Some(pool) => {
                        let &Layer::MaxPool2d { kernel, stride: s } = &pool.layer else {
                            unreachable!("pool fusions end at a max pooling")
                        };
                        let after = MaxPoolAfter {
                            relu: pool.inputs[0].0 != at,
                            kernel,
                            stride: s,
                        };
                        tape.conv2d_max_pool(input(0), p(0), b, *stride, *padding, after)?
                    }
                    None => tape.conv2d(input(0), p(0), b, *stride, *padding)?,
                }
            }
            Layer::BatchNorm2d { eps, .. } => {
                let mode = match norm {
                    NormStats::Batch => BnMode::Train,
                    NormStats::Running(s) => BnMode::Eval {
                        mean: s[rec.next_bn].mean,
                        var: s[rec.next_bn].var,
                    },
                };
                rec.next_bn += 1;
                let bn = match with_relu {
                    true => Tape::batch_norm2d_relu,
                    false => Tape::batch_norm2d,
                };
                let (y, stats) = bn(tape, input(0), p(0), p(1), mode, *eps)?;
                rec.batch_stats.extend(stats);
                y
            }
            Layer::Activation(_) if rec.relu_epilogue[node.inputs[0].0] => input(0),
            Layer::Activation(f) => tape.unary(input(0), f.unary())?,
            Layer::MaxPool2d { kernel, stride } => tape.max_pool2d(input(0), *kernel, *stride)?,
            Layer::AvgPool2d { kernel, stride } => tape.avg_pool2d(input(0), *kernel, *stride)?,
            Layer::AdaptiveAvgPool2d => {
                let pooled = tape.global_avg_pool(input(0))?;
                let n = tape.value(pooled).shape()[0];
                tape.reshape(pooled, &[n, node.shape[0], 1, 1])?
            }
            Layer::Flatten => tape.flatten(input(0))?,
            Layer::Identity => input(0),
            Layer::Add if with_relu => tape.add_relu(input(0), input(1))?,
            Layer::Add => tape.add(input(0), input(1))?,
        })
    }

    /// For each node, the one node that reads it, when exactly one does and it is not the
    /// net's output (whose value is wanted).
    pub(super) fn sole_readers(&self) -> Vec<Option<usize>> {
        let mut count = vec![0usize; self.len()];
        let mut reader = vec![None; self.len()];
        for (j, node) in self.nodes().iter().enumerate() {
            for &i in &node.inputs {
                count[i.0] += 1;
                reader[i.0] = Some(j);
            }
        }
        let output = self.output().0;
        (0..self.len())
            .map(|i| reader[i].filter(|_| count[i] == 1 && i != output))
            .collect()
    }

    /// Per node: true for a BatchNorm or an add whose only reader is a ReLU, recorded as one
    /// op with it ([`Tape::batch_norm2d_relu`], [`Tape::add_relu`]; the ReLU node then takes
    /// the same variable).
    fn relu_epilogues(&self, readers: &[Option<usize>]) -> Vec<bool> {
        let relu = |j: usize| matches!(self.nodes()[j].layer, Layer::Activation(Activation::Relu));
        self.nodes()
            .iter()
            .zip(readers)
            .map(|(node, r)| {
                matches!(node.layer, Layer::BatchNorm2d { .. } | Layer::Add) && r.is_some_and(relu)
            })
            .collect()
    }

    /// Per node: for a convolution whose only reader is a max pooling, or a ReLU whose only
    /// reader is a max pooling, that pooling node (they are recorded as one op).
    fn pool_fusions(&self, readers: &[Option<usize>]) -> Vec<Option<usize>> {
        let layer = |j: usize| &self.nodes()[j].layer;
        let max_pool = |j: &usize| matches!(layer(*j), Layer::MaxPool2d { .. });
        self.nodes()
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let next = readers[i].filter(|_| matches!(node.layer, Layer::Conv2d { .. }))?;
                match layer(next) {
                    Layer::Activation(Activation::Relu) => readers[next].filter(max_pool),
                    _ => Some(next).filter(max_pool),
                }
            })
            .collect()
    }

    /// Records the net and the objective `kind` of its logits against `labels`.
    pub fn loss<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
        labels: &[usize],
        kind: Loss,
    ) -> Result<Var> {
        let rec = self.record(tape, params, x, norm)?;
        tape.loss(kind, rec.output(), labels)
    }
}

fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
