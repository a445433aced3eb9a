//! Recording a [`Net`] on a tape with the engine's ops.

use super::{Activation, Layer, Net, Node, NormStats};
use crate::error::{EngineError, Result};
use crate::ops::{BatchStats, BnMode, Loss};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// A net recorded on a tape.
#[derive(Clone, Debug)]
pub struct Recorded<T> {
    /// One variable per node, the input first and the output (logits) last.
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
/// statistics gathered, the next BatchNorm layer's index, and which nodes take the ReLU that
/// reads them as an epilogue ([`Net::relu_epilogues`]).
pub(super) struct Recording<T> {
    pub(super) vars: Vec<Var>,
    pub(super) batch_stats: Vec<BatchStats<T>>,
    pub(super) next_bn: usize,
    relu_epilogue: Vec<bool>,
}

impl<T> Recording<T> {
    /// An empty recording of `net`.
    pub(super) fn new(net: &Net) -> Self {
        Recording {
            vars: Vec::with_capacity(net.len()),
            batch_stats: Vec::new(),
            next_bn: 0,
            relu_epilogue: net.relu_epilogues(),
        }
    }
}

impl Net {
    /// Records the forward pass of `x: [N, ...input_shape]` on `tape`, with `params` the
    /// tape variables of the trainable parameters (in [`Net::params`] order) and `norm`
    /// the statistics of the BatchNorm layers.
    pub fn record<T: Scalar>(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        norm: &NormStats<'_, T>,
    ) -> Result<Recorded<T>> {
        self.check_inputs(tape.value(x).shape(), params.len(), norm)?;
        let mut rec = Recording::new(self);
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
        let with_relu = rec.relu_epilogue[rec.vars.len()];
        Ok(match &node.layer {
            Layer::Input => x,
            Layer::Linear { bias, .. } => tape.linear(input(0), p(0), bias.then(|| p(1)))?,
            Layer::Conv2d {
                stride,
                padding,
                bias,
                ..
            } => tape.conv2d(input(0), p(0), bias.then(|| p(1)), *stride, *padding)?,
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
    fn relu_epilogues(&self) -> Vec<bool> {
        let relu = |j: usize| matches!(self.nodes()[j].layer, Layer::Activation(Activation::Relu));
        self.nodes()
            .iter()
            .zip(self.sole_readers())
            .map(|(node, r)| {
                matches!(node.layer, Layer::BatchNorm2d { .. } | Layer::Add) && r.is_some_and(relu)
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
