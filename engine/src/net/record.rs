//! Recording a [`Net`] on a tape with the engine's ops.

use super::{Activation, Layer, Net, NormStats};
use crate::error::{EngineError, Result};
use crate::ops::{BatchStats, BnMode, Loss};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// A net recorded on a tape.
#[derive(Clone, Debug)]
pub struct Recorded<T> {
    /// One variable per node, the input first and the output (logits) last. A BatchNorm or
    /// residual add whose only consumer is a ReLU is recorded as one op with it, and both nodes
    /// get its variable, the ReLU's output (ReLU's derivative is the same read off either value).
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
        let bad = |detail: String| EngineError::Shape { op: "net", detail };
        if params.len() != self.param_tensors() {
            return Err(bad(format!(
                "{} parameter variables for {} parameter tensors",
                params.len(),
                self.param_tensors()
            )));
        }
        let xs = tape.value(x).shape();
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
        let mut vars: Vec<Var> = Vec::with_capacity(self.len());
        let mut batch_stats = Vec::new();
        let mut next_bn = 0;
        let fused = relu_epilogues(self);
        for node in self.nodes() {
            let p = |k: usize| params[node.first_param + k];
            let input = |k: usize| vars[node.inputs[k].0];
            let v = match &node.layer {
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
                            mean: s[next_bn].mean,
                            var: s[next_bn].var,
                        },
                    };
                    next_bn += 1;
                    let bn = match fused[vars.len()] {
                        true => Tape::batch_norm2d_relu,
                        false => Tape::batch_norm2d,
                    };
                    let (y, stats) = bn(tape, input(0), p(0), p(1), mode, *eps)?;
                    batch_stats.extend(stats);
                    y
                }
                Layer::Activation(_) if fused[node.inputs[0].0] => input(0),
                Layer::Activation(f) => tape.unary(input(0), f.unary())?,
                Layer::MaxPool2d { kernel, stride } => {
                    tape.max_pool2d(input(0), *kernel, *stride)?
                }
                Layer::AvgPool2d { kernel, stride } => {
                    tape.avg_pool2d(input(0), *kernel, *stride)?
                }
                Layer::AdaptiveAvgPool2d => {
                    let pooled = tape.global_avg_pool(input(0))?;
                    let n = tape.value(pooled).shape()[0];
                    tape.reshape(pooled, &[n, node.shape[0], 1, 1])?
                }
                Layer::Flatten => tape.flatten(input(0))?,
                Layer::Identity => input(0),
                Layer::Add if fused[vars.len()] => tape.add_relu(input(0), input(1))?,
                Layer::Add => tape.add(input(0), input(1))?,
            };
            vars.push(v);
        }
        Ok(Recorded { vars, batch_stats })
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

/// Per node: true for a BatchNorm or an add whose only consumer is a ReLU, recorded as one op
/// with it ([`Tape::batch_norm2d_relu`], [`Tape::add_relu`]).
fn relu_epilogues(net: &Net) -> Vec<bool> {
    // Per node: how many inputs of later nodes read it, and whether the last reader is a ReLU.
    let mut readers = vec![(0usize, false); net.len()];
    for node in net.nodes() {
        let relu = matches!(node.layer, Layer::Activation(Activation::Relu));
        for i in &node.inputs {
            readers[i.0] = (readers[i.0].0 + 1, relu);
        }
    }
    net.nodes()
        .iter()
        .zip(readers)
        .map(|(node, r)| {
            matches!(node.layer, Layer::BatchNorm2d { .. } | Layer::Add) && r == (1, true)
        })
        .collect()
}
