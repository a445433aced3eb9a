//! A declared network: layers over parameter indices, recordable on a tape.
//!
//! The structural trace needs what the tape's ops keep to themselves (a convolution's stride
//! and padding, whether a BatchNorm uses batch or running statistics, which elementwise
//! function a node applies), and it needs to know that the network lies in the class where
//! the identity of `docs/curvature.md` holds. A [`Net`] states both. [`Net::record`] puts the
//! very same network on a tape with the engine's ops, so the structural trace and every
//! Hessian-vector-product method measure one and the same function.

use crate::error::{EngineError, Result};
use crate::ops::{BnMode, Unary};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};

/// A node of a [`Net`] (its position; nodes are stored in the order they were added, so a
/// node's inputs always come before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// Position of the node in its net (0 is the input).
    pub fn index(self) -> usize {
        self.0
    }
}

/// The statistics a BatchNorm layer normalizes with.
#[derive(Clone, Debug, PartialEq)]
pub enum NormStats<T> {
    /// Batch statistics (train mode). They couple the samples of a batch: the structural
    /// trace refuses such a network.
    Batch,
    /// Fixed running statistics (eval mode): an affine map per channel.
    Running {
        /// Running mean per channel.
        mean: Vec<T>,
        /// Running variance per channel.
        var: Vec<T>,
    },
}

/// One layer of a [`Net`]. Parameters are indices into the parameter list the net is used
/// with (PyTorch layouts, as the tape's ops take them).
#[derive(Clone, Debug, PartialEq)]
pub enum Layer<T> {
    /// The data, `[N, ...]` (node 0, added by [`Net::new`]).
    Input,
    /// `x Wᵀ + b` on `[N, in]` with `W: [out, in]`, `b: [out]`.
    Linear {
        /// Index of the weight.
        weight: usize,
        /// Index of the bias, if any.
        bias: Option<usize>,
    },
    /// 2-D convolution of `[N, C_in, H, W]` with `W: [C_out, C_in, kh, kw]`, `b: [C_out]`.
    Conv2d {
        /// Index of the weight.
        weight: usize,
        /// Index of the bias, if any.
        bias: Option<usize>,
        /// Stride (both directions).
        stride: usize,
        /// Zero padding (both directions).
        pad: usize,
    },
    /// Batch normalization of `[N, C, H, W]` with scale γ and shift β (`[C]` each).
    BatchNorm2d {
        /// Index of γ.
        gamma: usize,
        /// Index of β.
        beta: usize,
        /// Batch (train) or running (eval) statistics.
        stats: NormStats<T>,
        /// Added to the variance.
        eps: f64,
    },
    /// An elementwise function (ReLU, or a smooth activation such as tanh or GELU).
    Activation(Unary<T>),
    /// Max pooling, square window, no padding.
    MaxPool2d {
        /// Window edge.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling, square window, no padding.
    AvgPool2d {
        /// Window edge.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// `[N, C, H, W] -> [N, C]` by averaging each plane.
    GlobalAvgPool,
    /// `[N, ...] -> [N, prod(...)]`.
    Flatten,
    /// Sum of two nodes of the same shape (a residual connection).
    Add,
}

impl<T> Layer<T> {
    /// Short name of the layer kind (used in default node names and messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Input => "input",
            Layer::Linear { .. } => "linear",
            Layer::Conv2d { .. } => "conv2d",
            Layer::BatchNorm2d { .. } => "batch_norm2d",
            Layer::Activation(_) => "activation",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::AvgPool2d { .. } => "avg_pool2d",
            Layer::GlobalAvgPool => "global_avg_pool",
            Layer::Flatten => "flatten",
            Layer::Add => "add",
        }
    }

    /// The parameter indices the layer uses.
    pub fn params(&self) -> Vec<usize> {
        match self {
            Layer::Linear { weight, bias } | Layer::Conv2d { weight, bias, .. } => {
                let mut v = vec![*weight];
                v.extend(*bias);
                v
            }
            Layer::BatchNorm2d { gamma, beta, .. } => vec![*gamma, *beta],
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct NetNode<T> {
    pub layer: Layer<T>,
    pub inputs: Vec<usize>,
    pub name: String,
}

/// A feed-forward network as a graph of [`Layer`]s ending in logits `[N, C]`, for the
/// structural trace ([`super::structural_trace`]) and, through [`Net::record`], for every
/// tape-based method. The last node added is the output.
///
/// The builder methods never fail; [`Net::record`] and the structural trace validate the
/// graph (inputs from this net, parameter indices in range, shapes).
///
/// ```
/// use flatmin_engine::curvature::Net;
/// use flatmin_engine::Unary;
/// // logits = W2 tanh(W1 x + b1) + b2, parameters [W1, b1, W2, b2].
/// let mut net = Net::<f64>::new();
/// let h = net.linear(net.input(), 0, Some(1));
/// let a = net.activation(h, Unary::Tanh);
/// net.linear(a, 2, Some(3));
/// assert_eq!(net.len(), 4);
/// ```
#[derive(Clone, Debug)]
pub struct Net<T> {
    pub(crate) nodes: Vec<NetNode<T>>,
}

impl<T: Scalar> Default for Net<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Scalar> Net<T> {
    /// A net holding only its input node.
    pub fn new() -> Self {
        Net {
            nodes: vec![NetNode {
                layer: Layer::Input,
                inputs: Vec::new(),
                name: "input".into(),
            }],
        }
    }

    /// The input node.
    pub fn input(&self) -> NodeId {
        NodeId(0)
    }

    /// The output node (the last one added).
    pub fn output(&self) -> NodeId {
        NodeId(self.nodes.len() - 1)
    }

    /// Number of nodes, the input included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the net holds only its input.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The layer of `node` (`None` for a node of another net).
    pub fn layer(&self, node: NodeId) -> Option<&Layer<T>> {
        self.nodes.get(node.0).map(|n| &n.layer)
    }

    /// The name of `node`: set by [`Net::set_name`], else `kind#index`.
    pub fn name(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(node.0).map(|n| n.name.as_str())
    }

    /// Names `node` (shown in messages, e.g. `layer1.0.bn1`).
    pub fn set_name(&mut self, node: NodeId, name: impl Into<String>) {
        if let Some(n) = self.nodes.get_mut(node.0) {
            n.name = name.into();
        }
    }

    /// Adds a layer reading `inputs` and returns its node.
    pub fn push(&mut self, layer: Layer<T>, inputs: &[NodeId]) -> NodeId {
        let id = self.nodes.len();
        let name = format!("{}#{id}", layer.kind());
        self.nodes.push(NetNode {
            layer,
            inputs: inputs.iter().map(|i| i.0).collect(),
            name,
        });
        NodeId(id)
    }

    /// `x Wᵀ + b` (weight and bias are parameter indices).
    pub fn linear(&mut self, x: NodeId, weight: usize, bias: Option<usize>) -> NodeId {
        self.push(Layer::Linear { weight, bias }, &[x])
    }

    /// 2-D convolution (weight and bias are parameter indices).
    pub fn conv2d(
        &mut self,
        x: NodeId,
        weight: usize,
        bias: Option<usize>,
        stride: usize,
        pad: usize,
    ) -> NodeId {
        self.push(
            Layer::Conv2d {
                weight,
                bias,
                stride,
                pad,
            },
            &[x],
        )
    }

    /// Batch normalization (γ and β are parameter indices).
    pub fn batch_norm2d(
        &mut self,
        x: NodeId,
        gamma: usize,
        beta: usize,
        stats: NormStats<T>,
        eps: f64,
    ) -> NodeId {
        self.push(
            Layer::BatchNorm2d {
                gamma,
                beta,
                stats,
                eps,
            },
            &[x],
        )
    }

    /// An elementwise function.
    pub fn activation(&mut self, x: NodeId, f: Unary<T>) -> NodeId {
        self.push(Layer::Activation(f), &[x])
    }

    /// ReLU.
    pub fn relu(&mut self, x: NodeId) -> NodeId {
        self.activation(x, Unary::Relu)
    }

    /// Max pooling.
    pub fn max_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> NodeId {
        self.push(Layer::MaxPool2d { kernel, stride }, &[x])
    }

    /// Average pooling.
    pub fn avg_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> NodeId {
        self.push(Layer::AvgPool2d { kernel, stride }, &[x])
    }

    /// Global average pooling `[N, C, H, W] -> [N, C]`.
    pub fn global_avg_pool(&mut self, x: NodeId) -> NodeId {
        self.push(Layer::GlobalAvgPool, &[x])
    }

    /// Flattens all dimensions after the first.
    pub fn flatten(&mut self, x: NodeId) -> NodeId {
        self.push(Layer::Flatten, &[x])
    }

    /// `a + b` (same shapes).
    pub fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.push(Layer::Add, &[a, b])
    }

    /// Checks that every node reads earlier nodes of this net, with the right arity.
    pub(crate) fn validate_graph(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            let arity = match node.layer {
                Layer::Input => 0,
                Layer::Add => 2,
                _ => 1,
            };
            let bad = |detail: String| EngineError::Shape { op: "net", detail };
            if i > 0 && matches!(node.layer, Layer::Input) {
                return Err(bad(format!("node {i} ('{}') is a second input", node.name)));
            }
            if node.inputs.len() != arity {
                return Err(bad(format!(
                    "node '{}' takes {arity} input(s), got {}",
                    node.name,
                    node.inputs.len()
                )));
            }
            if let Some(&j) = node.inputs.iter().find(|&&j| j >= i) {
                return Err(bad(format!(
                    "node '{}' reads node {j}, which is not an earlier node of this net",
                    node.name
                )));
            }
        }
        Ok(())
    }

    /// Records the network on `tape` from the data `x` and the parameter variables `params`
    /// (indexed as the layers name them); returns one variable per node, the logits last.
    pub fn record(&self, tape: &mut Tape<T>, params: &[Var], x: Var) -> Result<Vec<Var>> {
        self.validate_graph()?;
        let mut vars: Vec<Var> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let p = |i: usize| {
                params.get(i).copied().ok_or_else(|| EngineError::Shape {
                    op: "net",
                    detail: format!(
                        "layer '{}' uses parameter {i}, but {} parameters were given",
                        node.name,
                        params.len()
                    ),
                })
            };
            let input = |k: usize| vars[node.inputs[k]];
            let v = match &node.layer {
                Layer::Input => x,
                Layer::Linear { weight, bias } => {
                    let b = bias.map(p).transpose()?;
                    tape.linear(input(0), p(*weight)?, b)?
                }
                Layer::Conv2d {
                    weight,
                    bias,
                    stride,
                    pad,
                } => {
                    let b = bias.map(p).transpose()?;
                    tape.conv2d(input(0), p(*weight)?, b, *stride, *pad)?
                }
                Layer::BatchNorm2d {
                    gamma,
                    beta,
                    stats,
                    eps,
                } => {
                    let mode = match stats {
                        NormStats::Batch => BnMode::Train,
                        NormStats::Running { mean, var } => BnMode::Eval { mean, var },
                    };
                    tape.batch_norm2d(input(0), p(*gamma)?, p(*beta)?, mode, *eps)?
                        .0
                }
                Layer::Activation(f) => tape.unary(input(0), *f)?,
                Layer::MaxPool2d { kernel, stride } => {
                    tape.max_pool2d(input(0), *kernel, *stride)?
                }
                Layer::AvgPool2d { kernel, stride } => {
                    tape.avg_pool2d(input(0), *kernel, *stride)?
                }
                Layer::GlobalAvgPool => tape.global_avg_pool(input(0))?,
                Layer::Flatten => tape.flatten(input(0))?,
                Layer::Add => tape.add(input(0), input(1))?,
            };
            vars.push(v);
        }
        Ok(vars)
    }

    /// Records the network and returns its logits.
    pub fn logits(&self, tape: &mut Tape<T>, params: &[Var], x: Var) -> Result<Var> {
        let vars = self.record(tape, params, x)?;
        Ok(*vars.last().expect("a net has at least its input"))
    }

    /// Records the network and the mean cross-entropy of its logits against `labels`.
    pub fn loss(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        labels: &[usize],
    ) -> Result<Var> {
        let z = self.logits(tape, params, x)?;
        tape.cross_entropy(z, labels)
    }
}
