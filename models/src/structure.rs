//! A model's network as a declared [`Net`], for the exact structural Hessian trace
//! ([`flatmin_engine::curvature::structural_trace`]).
//!
//! The net mirrors [`Model::forward`] op for op (same ops, same order, parameters in the
//! model's parameter order), so its logits are bit-identical to the forward pass and its
//! trace is the trace of the very loss the Hessian-vector-product methods see.

use crate::arch::Arch;
use crate::model::{BnUse, EntryKind, EntryValue, Model, BN_EPS};
use flatmin_engine::curvature::{Net, NodeId, NormStats};
use flatmin_engine::Scalar;

/// Walks parameters and BatchNorm statistics in registration order, as the forward pass does.
struct Builder<'a, T> {
    net: Net<T>,
    names: Vec<&'a str>,
    next_param: usize,
    /// Running (mean, var) per BatchNorm layer, in layer order.
    stats: Vec<(Vec<T>, Vec<T>)>,
    next_bn: usize,
    bn: BnUse,
}

impl<T: Scalar> Builder<'_, T> {
    fn param(&mut self) -> usize {
        self.next_param += 1;
        self.next_param - 1
    }

    /// Names `node` after the parameter `p` without its last component (`conv1.weight` →
    /// `conv1`).
    fn name_after(&mut self, node: NodeId, p: usize) {
        let full = self.names.get(p).copied().unwrap_or("");
        let layer = full.rsplit_once('.').map_or(full, |(l, _)| l);
        self.net.set_name(node, layer.to_string());
    }

    fn linear(&mut self, x: NodeId) -> NodeId {
        let (w, b) = (self.param(), self.param());
        let y = self.net.linear(x, w, Some(b));
        self.name_after(y, w);
        y
    }

    fn conv(&mut self, x: NodeId, stride: usize, pad: usize, bias: bool) -> NodeId {
        let w = self.param();
        let b = bias.then(|| self.param());
        let y = self.net.conv2d(x, w, b, stride, pad);
        self.name_after(y, w);
        y
    }

    fn bn(&mut self, x: NodeId) -> NodeId {
        let (g, b) = (self.param(), self.param());
        let stats = match self.bn {
            BnUse::Train => NormStats::Batch,
            BnUse::Eval => {
                let (mean, var) = self.stats.get(self.next_bn).cloned().unwrap_or_default();
                NormStats::Running { mean, var }
            }
        };
        self.next_bn += 1;
        let y = self.net.batch_norm2d(x, g, b, stats, BN_EPS);
        self.name_after(y, g);
        y
    }
}

impl<T: Scalar> Model<T> {
    /// The network as a [`Net`] over the trainable parameters (in [`Model::params`] order),
    /// with BatchNorm on running statistics (`BnUse::Eval`) or batch statistics
    /// (`BnUse::Train`, which the structural trace refuses). Layer nodes are named after
    /// their parameters (`layer1.0.bn1`).
    pub fn structure(&self, bn: BnUse) -> Net<T> {
        let mut stats = Vec::new();
        let mut mean: Option<Vec<T>> = None;
        for e in self.entries() {
            if let EntryValue::Float(t) = &e.value {
                match e.kind {
                    EntryKind::RunningMean => mean = Some(t.data().to_vec()),
                    EntryKind::RunningVar => {
                        stats.push((mean.take().unwrap_or_default(), t.data().to_vec()));
                    }
                    _ => {}
                }
            }
        }
        let mut b = Builder {
            net: Net::new(),
            names: self.param_names(),
            next_param: 0,
            stats,
            next_bn: 0,
            bn,
        };
        let x = b.net.input();
        match self.arch() {
            Arch::Mlp {
                widths,
                act,
                input_pool,
            } => {
                let mut h = x;
                if *input_pool > 1 {
                    h = b.net.avg_pool2d(h, *input_pool, *input_pool);
                }
                h = b.net.flatten(h);
                let layers = widths.len() - 1;
                for i in 0..layers {
                    h = b.linear(h);
                    if i + 1 < layers {
                        h = b.net.activation(h, act.unary());
                    }
                }
            }
            Arch::Cnn => {
                // pooling before ReLU, as in the forward pass (`Model::forward`)
                let mut h = b.conv(x, 1, 1, true);
                h = b.net.max_pool2d(h, 2, 2);
                h = b.net.relu(h);
                h = b.conv(h, 1, 1, true);
                h = b.net.max_pool2d(h, 2, 2);
                h = b.net.relu(h);
                h = b.net.flatten(h);
                h = b.linear(h);
                h = b.net.relu(h);
                b.linear(h);
            }
            Arch::ResNet { blocks, widths } => {
                let mut h = b.conv(x, 1, 1, false);
                h = b.bn(h);
                h = b.net.relu(h);
                let mut cin = widths[0];
                for (i, (&nb, &w)) in blocks.iter().zip(widths).enumerate() {
                    for j in 0..nb {
                        let stride = if i > 0 && j == 0 { 2 } else { 1 };
                        let mut o = b.conv(h, stride, 1, false);
                        o = b.bn(o);
                        o = b.net.relu(o);
                        o = b.conv(o, 1, 1, false);
                        o = b.bn(o);
                        let short = if stride != 1 || cin != w {
                            let s = b.conv(h, stride, 0, false);
                            b.bn(s)
                        } else {
                            h
                        };
                        o = b.net.add(o, short);
                        h = b.net.relu(o);
                        cin = w;
                    }
                }
                h = b.net.global_avg_pool(h);
                b.linear(h);
            }
        }
        b.net
    }
}
