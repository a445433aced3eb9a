//! Architectures: the presets of `reference_models.md` and custom MLPs.

use crate::error::{ModelError, Result};
use flatmin_engine::Unary;

/// Elementwise activation of an MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Parses `relu`, `tanh`, `gelu`, `softplus` or `sigmoid`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            "gelu" => Activation::Gelu,
            "softplus" => Activation::Softplus,
            "sigmoid" => Activation::Sigmoid,
            _ => return None,
        })
    }

    /// The name as parsed.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Gelu => "gelu",
            Activation::Softplus => "softplus",
            Activation::Sigmoid => "sigmoid",
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

/// A network architecture (CIFAR-10 input `[N, 3, 32, 32]`, 10 logits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Fully connected layers `widths[0] -> ... -> widths[last]` with `act` between them,
    /// after an optional `input_pool x input_pool` average pooling of the image.
    Mlp {
        /// Layer widths, input first.
        widths: Vec<usize>,
        /// Hidden activation.
        act: Activation,
        /// Average-pooling factor applied to the input image (1: none).
        input_pool: usize,
    },
    /// cnn-s: two 3x3 conv + ReLU + 2x2 max-pool stages, then two linear layers.
    Cnn,
    /// CIFAR ResNet of BasicBlocks with BatchNorm.
    ResNet {
        /// Blocks per stage.
        blocks: Vec<usize>,
        /// Channels per stage.
        widths: Vec<usize>,
    },
}

/// Most trainable parameters a model may have (2^32, 16 GiB as f32): custom MLP specs beyond
/// it are refused by [`Arch::parse`], so no tensor size computation can overflow and no
/// command starts allocating an absurd model.
pub const MAX_PARAMS: usize = 1 << 32;

/// Parameters of an MLP with these widths (weights and biases), `None` on overflow.
fn mlp_params(widths: &[usize]) -> Option<usize> {
    widths.windows(2).try_fold(0usize, |acc, w| {
        w[0].checked_mul(w[1])?.checked_add(w[1])?.checked_add(acc)
    })
}

/// Names of the built-in presets.
pub const PRESETS: [&str; 5] = ["tiny-tanh", "mlp-s", "cnn-s", "resnet20", "resnet18"];

impl Arch {
    /// A preset (`tiny-tanh`, `mlp-s`, `cnn-s`, `resnet20`, `resnet18`) or a custom MLP
    /// `mlp:W0,W1,...,WL:ACT[:poolP]` (W0 must be 3·(32/P)²; WL must be 10).
    pub fn parse(name: &str) -> Result<Self> {
        let unknown = || ModelError::UnknownModel(name.to_string());
        Ok(match name {
            "tiny-tanh" => Arch::Mlp {
                widths: vec![192, 32, 10],
                act: Activation::Tanh,
                input_pool: 4,
            },
            "mlp-s" => Arch::Mlp {
                widths: vec![3072, 256, 256, 10],
                act: Activation::Relu,
                input_pool: 1,
            },
            "cnn-s" => Arch::Cnn,
            "resnet20" => Arch::ResNet {
                blocks: vec![3, 3, 3],
                widths: vec![16, 32, 64],
            },
            "resnet18" => Arch::ResNet {
                blocks: vec![2, 2, 2, 2],
                widths: vec![64, 128, 256, 512],
            },
            custom => {
                let mut parts = custom.split(':');
                if parts.next() != Some("mlp") {
                    return Err(unknown());
                }
                let widths: Vec<usize> = parts
                    .next()
                    .ok_or_else(unknown)?
                    .split(',')
                    .map(|w| w.trim().parse::<usize>().map_err(|_| unknown()))
                    .collect::<Result<_>>()?;
                let act = parts
                    .next()
                    .and_then(Activation::parse)
                    .ok_or_else(unknown)?;
                let input_pool = match parts.next() {
                    None => 1,
                    Some(p) => p
                        .strip_prefix("pool")
                        .and_then(|p| p.parse::<usize>().ok())
                        .filter(|&p| p > 0 && 32 % p == 0)
                        .ok_or_else(unknown)?,
                };
                if parts.next().is_some()
                    || widths.len() < 2
                    || widths.contains(&0)
                    || widths[0] != 3 * (32 / input_pool) * (32 / input_pool)
                    || *widths.last().expect("non-empty") != 10
                {
                    return Err(unknown());
                }
                match mlp_params(&widths) {
                    Some(n) if n <= MAX_PARAMS => {}
                    n => {
                        return Err(ModelError::TooLarge {
                            name: name.to_string(),
                            params: n.map_or("more than 2^64".into(), |n| n.to_string()),
                            max: MAX_PARAMS,
                        })
                    }
                }
                Arch::Mlp {
                    widths,
                    act,
                    input_pool,
                }
            }
        })
    }

    /// Trainable parameters of the network, counted from its layout without allocating
    /// anything (what [`crate::Model::num_params`] gives once the model is built).
    pub fn num_params(&self) -> usize {
        crate::model::layout_params(self)
    }

    /// True when the network has BatchNorm layers.
    pub fn has_batch_norm(&self) -> bool {
        matches!(self, Arch::ResNet { .. })
    }
}
