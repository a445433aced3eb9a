//! Architectures: the presets of `reference_models.md` and custom MLPs.

use crate::error::{ModelError, Result};
use flatmin_engine::net::{ConvOptions, Net, NodeId};

pub use flatmin_engine::net::Activation;

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

    /// Trainable parameters of the network, counted from its description without allocating
    /// anything (what [`crate::Model::num_params`] gives once the model is built).
    pub fn num_params(&self) -> usize {
        self.net().map_or(0, |n| n.num_params())
    }

    /// True when the network has BatchNorm layers.
    pub fn has_batch_norm(&self) -> bool {
        matches!(self, Arch::ResNet { .. })
    }

    /// The network description of the architecture, with the names and layouts of the
    /// PyTorch definitions in `reference_models.md` (an error for a hand-built `Arch` whose
    /// sizes do not fit together).
    pub fn net(&self) -> Result<Net> {
        let mut net = Net::new(&[3, 32, 32]);
        let x = net.input();
        match self {
            Arch::Mlp {
                widths,
                act,
                input_pool,
            } => mlp(&mut net, x, widths, *act, *input_pool)?,
            Arch::Cnn => cnn(&mut net, x)?,
            Arch::ResNet { blocks, widths } => resnet(&mut net, x, blocks, widths)?,
        };
        Ok(net)
    }
}

fn mlp(
    net: &mut Net,
    x: NodeId,
    widths: &[usize],
    act: Activation,
    input_pool: usize,
) -> Result<NodeId> {
    let mut h = x;
    if input_pool > 1 {
        h = net.avg_pool2d(h, input_pool, input_pool)?;
    }
    h = net.flatten(h)?;
    let layers = widths.len().saturating_sub(1);
    for (i, &w) in widths.iter().skip(1).enumerate() {
        h = net.linear(&format!("layers.{i}"), h, w, true)?;
        if i + 1 < layers {
            h = net.activation(h, act)?;
        }
    }
    Ok(h)
}

/// cnn-s. `max_pool2d(relu(z))` is computed as `relu(max_pool2d(z))`: ReLU is monotone, so
/// values, gradients and HVPs are the same (a window with no positive entry gets a zero
/// gradient either way), on a quarter of the elements.
fn cnn(net: &mut Net, x: NodeId) -> Result<NodeId> {
    let same = ConvOptions {
        padding: 1,
        ..ConvOptions::default()
    };
    let mut h = net.conv2d("conv1", x, 32, 3, same)?;
    h = net.max_pool2d(h, 2, 2)?;
    h = net.relu(h)?;
    h = net.conv2d("conv2", h, 64, 3, same)?;
    h = net.max_pool2d(h, 2, 2)?;
    h = net.relu(h)?;
    h = net.flatten(h)?;
    h = net.linear("fc1", h, 128, true)?;
    h = net.relu(h)?;
    Ok(net.linear("fc2", h, 10, true)?)
}

fn resnet(net: &mut Net, x: NodeId, blocks: &[usize], widths: &[usize]) -> Result<NodeId> {
    let conv = |stride: usize, padding: usize| ConvOptions {
        stride,
        padding,
        bias: false,
    };
    let first = *widths
        .first()
        .ok_or_else(|| flatmin_engine::EngineError::Net {
            layer: "conv1".into(),
            detail: "a ResNet needs at least one stage".into(),
        })?;
    let mut h = net.conv2d("conv1", x, first, 3, conv(1, 1))?;
    h = net.batch_norm2d("bn1", h)?;
    h = net.relu(h)?;
    for (i, (&nb, &w)) in blocks.iter().zip(widths).enumerate() {
        for j in 0..nb {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            let p = format!("layer{}.{j}", i + 1);
            let mut o = net.conv2d(&format!("{p}.conv1"), h, w, 3, conv(stride, 1))?;
            o = net.batch_norm2d(&format!("{p}.bn1"), o)?;
            o = net.relu(o)?;
            o = net.conv2d(&format!("{p}.conv2"), o, w, 3, conv(1, 1))?;
            o = net.batch_norm2d(&format!("{p}.bn2"), o)?;
            let short = if stride != 1 || net.node(h).shape[0] != w {
                let s = net.conv2d(&format!("{p}.shortcut.0"), h, w, 1, conv(stride, 0))?;
                net.batch_norm2d(&format!("{p}.shortcut.1"), s)?
            } else {
                h
            };
            o = net.add(o, short)?;
            h = net.relu(o)?;
        }
    }
    h = net.adaptive_avg_pool2d(h)?;
    h = net.flatten(h)?;
    Ok(net.linear("linear", h, 10, true)?)
}
