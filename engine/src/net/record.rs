//! Recording a [`Net`] on a tape with the engine's ops.

use super::{Layer, Net, Node, NormStats};
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
/// statistics gathered, and the next BatchNorm layer's index.
pub(super) struct Recording<T> {
    pub(super) vars: Vec<Var>,
    pub(super) batch_stats: Vec<BatchStats<T>>,
    pub(super) next_bn: usize,
}

impl<T> Recording<T> {
    /// An empty recording of a net with `nodes` nodes.
    pub(super) fn new(nodes: usize) -> Self {
        Recording {
            vars: Vec::with_capacity(nodes),
            batch_stats: Vec::new(),
            next_bn: 0,
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
        let mut rec = Recording::new(self.len());
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
                let (y, stats) = tape.batch_norm2d(input(0), p(0), p(1), mode, *eps)?;
                rec.batch_stats.extend(stats);
                y
            }
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
            Layer::Add => tape.add(input(0), input(1))?,
        })
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
