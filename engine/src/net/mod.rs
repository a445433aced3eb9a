//! One network description: a graph of PyTorch-like layers with PyTorch `state_dict` names.
//!
//! A [`Net`] is the single source of truth about a network. From it come the parameter and
//! buffer layout with its names ([`Net::state`]), the forward pass recorded on a tape (value,
//! gradient and Hessian-vector products, [`Net::record`]), the structural exact trace
//! ([`crate::curvature::structural_trace`] reads the same `Net`) and the per-sample shapes
//! and multiply-adds of every layer, for memory and cost estimates.
//!
//! Layers are added in execution order; each is checked as it is added (shapes, names), so a
//! `Net` that exists holds together. Errors name the layer.
//!
//! ```
//! use flatmin_engine::net::{Activation, ConvOptions, Net};
//! // conv(3→8) → BN → ReLU → global average pool → flatten → linear(8→10)
//! let mut net = Net::new(&[3, 32, 32]);
//! let x = net.input();
//! let h = net.conv2d("conv1", x, 8, 3, ConvOptions { padding: 1, bias: false, ..Default::default() }).unwrap();
//! let h = net.batch_norm2d("bn1", h).unwrap();
//! let h = net.activation(h, Activation::Relu).unwrap();
//! let h = net.adaptive_avg_pool2d(h).unwrap();
//! let h = net.flatten(h).unwrap();
//! net.linear("fc", h, 10, true).unwrap();
//! assert_eq!(net.output_shape(), &[10]);
//! let names: Vec<_> = net.state().into_iter().map(|s| s.name).collect();
//! assert_eq!(names[0], "conv1.weight");
//! assert_eq!(names[3], "bn1.running_mean");
//! assert_eq!(net.num_params(), 8 * 3 * 9 + 8 + 8 + 8 * 10 + 10);
//! ```

mod infer;
mod record;
mod shape;

pub use record::Recorded;

use crate::error::{EngineError, Result};
use crate::ops::Unary;

/// BatchNorm's default momentum (PyTorch's).
pub const BN_MOMENTUM: f64 = 0.1;
/// BatchNorm's default epsilon (PyTorch's).
pub const BN_EPS: f64 = 1e-5;

/// A node of a [`Net`]: its position (node 0 is the input; a node's inputs come before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub(crate) usize);

impl NodeId {
    /// Position of the node in its net.
    pub fn index(self) -> usize {
        self.0
    }

    /// The node at position `i` (checked against the net when used).
    pub fn from_index(i: usize) -> Self {
        NodeId(i)
    }
}

/// An elementwise activation layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// ReLU.
    Relu,
    /// tanh.
    Tanh,
    /// Exact (erf) GELU.
    Gelu,
    /// Softplus (beta 1, threshold 20).
    Softplus,
    /// Logistic sigmoid.
    Sigmoid,
}

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 5] = [
        Activation::Relu,
        Activation::Tanh,
        Activation::Gelu,
        Activation::Softplus,
        Activation::Sigmoid,
    ];

    /// Parses the lower-case name (`relu`, `tanh`, `gelu`, `softplus`, `sigmoid`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Gelu => "gelu",
            Activation::Softplus => "softplus",
            Activation::Sigmoid => "sigmoid",
        }
    }

    /// The PyTorch module class (`ReLU`, `Tanh`, `GELU`, `Softplus`, `Sigmoid`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Activation::Relu => "ReLU",
            Activation::Tanh => "Tanh",
            Activation::Gelu => "GELU",
            Activation::Softplus => "Softplus",
            Activation::Sigmoid => "Sigmoid",
        }
    }

    /// The engine's elementwise function.
    pub fn unary<T>(self) -> Unary<T> {
        match self {
            Activation::Relu => Unary::Relu,
            Activation::Tanh => Unary::Tanh,
            Activation::Gelu => Unary::Gelu,
            Activation::Softplus => Unary::Softplus,
            Activation::Sigmoid => Unary::Sigmoid,
        }
    }
}

/// One layer: its kind and hyperparameters (square kernels, symmetric zero padding).
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// The data (node 0 only).
    Input,
    /// `x Wᵀ + b`, `W: [out_features, in_features]`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
        /// With a bias `[out_features]`.
        bias: bool,
    },
    /// 2-D convolution, `W: [out_channels, in_channels, kernel, kernel]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel edge.
        kernel: usize,
        /// Stride (both directions).
        stride: usize,
        /// Zero padding (both directions).
        padding: usize,
        /// With a bias `[out_channels]`.
        bias: bool,
    },
    /// Batch normalization over channels, with scale, shift and running statistics.
    BatchNorm2d {
        /// Channels.
        features: usize,
        /// Added to the variance.
        eps: f64,
        /// Weight of a new batch in the running statistics; `None`: cumulative average.
        momentum: Option<f64>,
    },
    /// An elementwise activation.
    Activation(Activation),
    /// Max pooling (square window, no padding).
    MaxPool2d {
        /// Window edge.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling (square window, no padding).
    AvgPool2d {
        /// Window edge.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Adaptive average pooling to `1 x 1`: `[C, H, W] -> [C, 1, 1]`.
    AdaptiveAvgPool2d,
    /// Flattens everything after the batch axis.
    Flatten,
    /// Passes its input on.
    Identity,
    /// Sum of two nodes of the same shape (a residual connection).
    Add,
}

impl Layer {
    /// The PyTorch class name of the layer (`Add` for a residual sum, `Input` for the data).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Input => "Input",
            Layer::Linear { .. } => "Linear",
            Layer::Conv2d { .. } => "Conv2d",
            Layer::BatchNorm2d { .. } => "BatchNorm2d",
            Layer::Activation(a) => a.torch_name(),
            Layer::MaxPool2d { .. } => "MaxPool2d",
            Layer::AvgPool2d { .. } => "AvgPool2d",
            Layer::AdaptiveAvgPool2d => "AdaptiveAvgPool2d",
            Layer::Flatten => "Flatten",
            Layer::Identity => "Identity",
            Layer::Add => "Add",
        }
    }

    /// Number of inputs the layer reads.
    pub fn arity(&self) -> usize {
        match self {
            Layer::Input => 0,
            Layer::Add => 2,
            _ => 1,
        }
    }

    /// The layer's state entries (suffix, shape, kind) in `state_dict` order.
    fn state(&self) -> Vec<(&'static str, Vec<usize>, StateKind)> {
        match *self {
            Layer::Linear {
                in_features,
                out_features,
                bias,
            } => weight_bias(vec![out_features, in_features], in_features, bias),
            Layer::Conv2d {
                in_channels,
                out_channels,
                kernel,
                bias,
                ..
            } => {
                let fan_in = in_channels * kernel * kernel;
                let shape = vec![out_channels, in_channels, kernel, kernel];
                weight_bias(shape, fan_in, bias)
            }
            Layer::BatchNorm2d { features, .. } => vec![
                ("weight", vec![features], StateKind::BnWeight),
                ("bias", vec![features], StateKind::BnBias),
                ("running_mean", vec![features], StateKind::RunningMean),
                ("running_var", vec![features], StateKind::RunningVar),
                ("num_batches_tracked", vec![], StateKind::Count),
            ],
            _ => Vec::new(),
        }
    }

    /// Number of trainable parameter tensors of the layer.
    pub fn param_count(&self) -> usize {
        self.state().iter().filter(|s| s.2.trainable()).count()
    }
}

fn weight_bias(
    shape: Vec<usize>,
    fan_in: usize,
    bias: bool,
) -> Vec<(&'static str, Vec<usize>, StateKind)> {
    let out = shape[0];
    let mut v = vec![("weight", shape, StateKind::Weight { fan_in })];
    if bias {
        v.push(("bias", vec![out], StateKind::Bias { fan_in }));
    }
    v
}

/// What a state entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// A Linear or Conv weight (PyTorch default init: kaiming-uniform, a = √5).
    Weight {
        /// Fan-in of the layer.
        fan_in: usize,
    },
    /// A Linear or Conv bias (uniform ±1/√fan_in).
    Bias {
        /// Fan-in of the layer.
        fan_in: usize,
    },
    /// BatchNorm scale γ (init 1).
    BnWeight,
    /// BatchNorm shift β (init 0).
    BnBias,
    /// BatchNorm running mean (buffer, init 0).
    RunningMean,
    /// BatchNorm running variance (buffer, init 1).
    RunningVar,
    /// BatchNorm `num_batches_tracked` (int64 buffer).
    Count,
}

impl StateKind {
    /// True for trainable parameters.
    pub fn trainable(self) -> bool {
        matches!(
            self,
            StateKind::Weight { .. }
                | StateKind::Bias { .. }
                | StateKind::BnWeight
                | StateKind::BnBias
        )
    }
}

/// One named tensor of a net's state (a parameter or a buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct StateSpec {
    /// PyTorch `state_dict` key (`layer1.0.conv1.weight`).
    pub name: String,
    /// Shape (`[]` for `num_batches_tracked`).
    pub shape: Vec<usize>,
    /// What it is.
    pub kind: StateKind,
    /// The layer it belongs to.
    pub node: NodeId,
}

/// A node: a named layer reading earlier nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Unique name; for a layer with parameters, the `state_dict` prefix of its tensors.
    pub name: String,
    /// The layer.
    pub layer: Layer,
    /// The nodes it reads.
    pub inputs: Vec<NodeId>,
    /// Per-sample output shape.
    pub shape: Vec<usize>,
    /// Index of its first trainable parameter tensor (its tensors are consecutive).
    pub first_param: usize,
}

impl Node {
    /// Indices of the node's trainable parameter tensors (weight then bias; γ then β).
    pub fn params(&self) -> std::ops::Range<usize> {
        self.first_param..self.first_param + self.layer.param_count()
    }
}

/// How the convolutions built by [`Net::conv2d`] differ from PyTorch's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvOptions {
    /// Stride (default 1).
    pub stride: usize,
    /// Zero padding (default 0).
    pub padding: usize,
    /// With a bias (default true).
    pub bias: bool,
}

impl Default for ConvOptions {
    fn default() -> Self {
        ConvOptions {
            stride: 1,
            padding: 0,
            bias: true,
        }
    }
}

/// The statistics BatchNorm layers normalize with when a net is run.
#[derive(Clone, Debug, PartialEq)]
pub enum NormStats<'a, T> {
    /// Batch statistics (train mode); they couple the samples of a batch.
    Batch,
    /// Fixed running statistics (eval mode), one entry per BatchNorm layer in node order.
    Running(Vec<RunningStats<'a, T>>),
}

/// A BatchNorm layer's running statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunningStats<'a, T> {
    /// Running mean per channel.
    pub mean: &'a [T],
    /// Running variance per channel.
    pub var: &'a [T],
}

/// A feed-forward network as a graph of named [`Layer`]s; the last node is the output.
#[derive(Clone, Debug, PartialEq)]
pub struct Net {
    nodes: Vec<Node>,
    params: usize,
}

impl Net {
    /// An empty net on samples of shape `input` (e.g. `[3, 32, 32]`).
    pub fn new(input: &[usize]) -> Self {
        Net {
            nodes: vec![Node {
                name: "input".into(),
                layer: Layer::Input,
                inputs: Vec::new(),
                shape: input.to_vec(),
                first_param: 0,
            }],
            params: 0,
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

    /// Per-sample shape of the input.
    pub fn input_shape(&self) -> &[usize] {
        &self.nodes[0].shape
    }

    /// Per-sample shape of the output.
    pub fn output_shape(&self) -> &[usize] {
        &self.nodes[self.nodes.len() - 1].shape
    }

    /// The nodes, input first, in execution order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    /// The node called `name`.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name).map(NodeId)
    }

    /// Number of nodes, the input included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the net holds only its input.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Number of trainable parameter tensors.
    pub fn param_tensors(&self) -> usize {
        self.params
    }

    /// Every state entry (parameters and buffers) in `state_dict` order.
    pub fn state(&self) -> Vec<StateSpec> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for (suffix, shape, kind) in node.layer.state() {
                out.push(StateSpec {
                    name: format!("{}.{suffix}", node.name),
                    shape,
                    kind,
                    node: NodeId(i),
                });
            }
        }
        out
    }

    /// The trainable parameters, in parameter order.
    pub fn params(&self) -> Vec<StateSpec> {
        self.state()
            .into_iter()
            .filter(|s| s.kind.trainable())
            .collect()
    }

    /// Number of trainable scalars (saturating at `usize::MAX`).
    pub fn num_params(&self) -> usize {
        self.params().iter().fold(0usize, |acc, s| {
            acc.saturating_add(s.shape.iter().fold(1usize, |a, &b| a.saturating_mul(b)))
        })
    }

    /// The BatchNorm nodes in order.
    pub fn batch_norms(&self) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].layer, Layer::BatchNorm2d { .. }))
            .map(NodeId)
            .collect()
    }

    /// True when the net has BatchNorm layers.
    pub fn has_batch_norm(&self) -> bool {
        !self.batch_norms().is_empty()
    }

    /// Multiply-adds of one sample's forward pass through each node.
    pub fn macs(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                let out: u64 = n.shape.iter().map(|&d| d as u64).product();
                match n.layer {
                    Layer::Linear { in_features, .. } => out * in_features as u64,
                    Layer::Conv2d {
                        in_channels,
                        kernel,
                        ..
                    } => out * (in_channels * kernel * kernel) as u64,
                    _ => 0,
                }
            })
            .collect()
    }

    /// Adds `layer` reading `inputs` under `name`, after checking that the name is new, the
    /// inputs are earlier nodes and the shapes fit. Errors name the layer.
    pub fn push(&mut self, name: &str, layer: Layer, inputs: &[NodeId]) -> Result<NodeId> {
        let err = |detail: String| EngineError::Net {
            layer: name.to_string(),
            detail,
        };
        if matches!(layer, Layer::Input) {
            return Err(err("a net has one input, node 0".into()));
        }
        if name.is_empty() {
            return Err(err("the name is empty".into()));
        }
        if self.find(name).is_some() {
            return Err(err("the name is already used by an earlier layer".into()));
        }
        if inputs.len() != layer.arity() {
            return Err(err(format!(
                "{} takes {} input(s), got {}",
                layer.kind(),
                layer.arity(),
                inputs.len()
            )));
        }
        if let Some(bad) = inputs.iter().find(|i| i.0 >= self.nodes.len()) {
            return Err(err(format!(
                "reads node {}, which is not in the net",
                bad.0
            )));
        }
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|i| self.nodes[i.0].shape.as_slice())
            .collect();
        let shape = shape::output_shape(&layer, &shapes).map_err(err)?;
        let first_param = self.params;
        self.params += layer.param_count();
        self.nodes.push(Node {
            name: name.to_string(),
            layer,
            inputs: inputs.to_vec(),
            shape,
            first_param,
        });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// A name for an unnamed layer: `kind` and the node's position (`relu3`).
    fn auto_name(&self, kind: &str) -> String {
        format!("{kind}{}", self.nodes.len())
    }

    /// The leading size of `x`'s per-sample shape, which must have `rank` axes.
    fn leading(&self, x: NodeId, name: &str, kind: &str, rank: usize) -> Result<usize> {
        let err = |detail: String| EngineError::Net {
            layer: name.to_string(),
            detail,
        };
        let node = self
            .nodes
            .get(x.0)
            .ok_or_else(|| err(format!("reads node {}, which is not in the net", x.0)))?;
        if node.shape.len() != rank {
            let want = if rank == 1 { "[features]" } else { "[C, H, W]" };
            return Err(err(format!(
                "{kind} needs a {want} input, got {:?} from '{}'",
                node.shape, node.name
            )));
        }
        Ok(node.shape[0])
    }

    /// A Linear layer `name` reading `x` (its features from `x`'s shape).
    pub fn linear(
        &mut self,
        name: &str,
        x: NodeId,
        out_features: usize,
        bias: bool,
    ) -> Result<NodeId> {
        let in_features = self.leading(x, name, "Linear", 1)?;
        let layer = Layer::Linear {
            in_features,
            out_features,
            bias,
        };
        self.push(name, layer, &[x])
    }

    /// A Conv2d layer `name` reading `x` (its input channels from `x`'s shape).
    pub fn conv2d(
        &mut self,
        name: &str,
        x: NodeId,
        out_channels: usize,
        kernel: usize,
        opts: ConvOptions,
    ) -> Result<NodeId> {
        let in_channels = self.leading(x, name, "Conv2d", 3)?;
        let layer = Layer::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride: opts.stride,
            padding: opts.padding,
            bias: opts.bias,
        };
        self.push(name, layer, &[x])
    }

    /// A BatchNorm2d layer `name` reading `x`, with PyTorch's defaults (eps 1e-5,
    /// momentum 0.1).
    pub fn batch_norm2d(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        let features = self.leading(x, name, "BatchNorm2d", 3)?;
        let layer = Layer::BatchNorm2d {
            features,
            eps: BN_EPS,
            momentum: Some(BN_MOMENTUM),
        };
        self.push(name, layer, &[x])
    }

    /// Adds a parameterless layer under an automatic name.
    fn unnamed(&mut self, layer: Layer, inputs: &[NodeId]) -> Result<NodeId> {
        let name = self.auto_name(&layer.kind().to_lowercase());
        self.push(&name, layer, inputs)
    }

    /// An activation.
    pub fn activation(&mut self, x: NodeId, f: Activation) -> Result<NodeId> {
        self.unnamed(Layer::Activation(f), &[x])
    }

    /// ReLU.
    pub fn relu(&mut self, x: NodeId) -> Result<NodeId> {
        self.activation(x, Activation::Relu)
    }

    /// Max pooling.
    pub fn max_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> Result<NodeId> {
        self.unnamed(Layer::MaxPool2d { kernel, stride }, &[x])
    }

    /// Average pooling.
    pub fn avg_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> Result<NodeId> {
        self.unnamed(Layer::AvgPool2d { kernel, stride }, &[x])
    }

    /// Adaptive average pooling to `1 x 1`.
    pub fn adaptive_avg_pool2d(&mut self, x: NodeId) -> Result<NodeId> {
        self.unnamed(Layer::AdaptiveAvgPool2d, &[x])
    }

    /// Flattens everything after the batch axis.
    pub fn flatten(&mut self, x: NodeId) -> Result<NodeId> {
        self.unnamed(Layer::Flatten, &[x])
    }

    /// `a + b` (same shapes).
    pub fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.unnamed(Layer::Add, &[a, b])
    }
}
