//! Per-sample output shapes of the layers, with the reason when an input does not fit.

use super::Layer;

/// Output size of a window sliding over `len` (after `pad` zeros each side); `None` when
/// the window does not fit.
fn slide(len: usize, kernel: usize, stride: usize, pad: usize) -> Option<usize> {
    let padded = len.checked_add(pad.checked_mul(2)?)?;
    (kernel > 0 && stride > 0 && padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

fn image<'a>(kind: &str, x: &'a [usize]) -> Result<&'a [usize], String> {
    if x.len() == 3 {
        Ok(x)
    } else {
        Err(format!("{kind} needs a [C, H, W] input, got {x:?}"))
    }
}

fn window(
    kind: &str,
    x: &[usize],
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Result<(usize, usize), String> {
    let (h, w) = (x[1], x[2]);
    if kernel == 0 || stride == 0 {
        return Err(format!(
            "{kind}: kernel {kernel} and stride {stride} must be at least 1"
        ));
    }
    match (slide(h, kernel, stride, pad), slide(w, kernel, stride, pad)) {
        (Some(oh), Some(ow)) => Ok((oh, ow)),
        _ => Err(format!(
            "{kind}: a {kernel}x{kernel} window (padding {pad}) does not fit the {h}x{w} input"
        )),
    }
}

/// The output shape of `layer` on inputs of these per-sample shapes (arity already checked).
pub(super) fn output_shape(layer: &Layer, inputs: &[&[usize]]) -> Result<Vec<usize>, String> {
    let kind = layer.kind();
    match *layer {
        Layer::Input => Err("a net has one input".into()),
        Layer::Linear {
            in_features,
            out_features,
            ..
        } => match inputs[0] {
            [f] if *f == in_features && out_features > 0 => Ok(vec![out_features]),
            [f] if *f == in_features => Err("Linear: out_features must be at least 1".into()),
            x => Err(format!(
                "Linear with in_features {in_features} gets input {x:?} (a Flatten before it?)"
            )),
        },
        Layer::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            ..
        } => {
            let x = image(kind, inputs[0])?;
            if x[0] != in_channels {
                return Err(format!(
                    "Conv2d with in_channels {in_channels} gets {} channels ({x:?})",
                    x[0]
                ));
            }
            if out_channels == 0 {
                return Err("Conv2d: out_channels must be at least 1".into());
            }
            let (oh, ow) = window(kind, x, kernel, stride, padding)?;
            Ok(vec![out_channels, oh, ow])
        }
        Layer::BatchNorm2d {
            features,
            eps,
            momentum,
        } => {
            let x = image(kind, inputs[0])?;
            if x[0] != features {
                return Err(format!(
                    "BatchNorm2d with num_features {features} gets {} channels ({x:?})",
                    x[0]
                ));
            }
            if !(eps.is_finite() && eps > 0.0) {
                return Err(format!("BatchNorm2d: eps must be positive, got {eps}"));
            }
            if let Some(m) = momentum {
                if !(0.0..=1.0).contains(&m) {
                    return Err(format!("BatchNorm2d: momentum must be in [0, 1], got {m}"));
                }
            }
            Ok(x.to_vec())
        }
        Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
            let x = image(kind, inputs[0])?;
            let (oh, ow) = window(kind, x, kernel, stride, 0)?;
            Ok(vec![x[0], oh, ow])
        }
        Layer::AdaptiveAvgPool2d => {
            let x = image(kind, inputs[0])?;
            Ok(vec![x[0], 1, 1])
        }
        Layer::Flatten => inputs[0]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .map(|n| vec![n])
            .ok_or_else(|| format!("Flatten: {:?} has too many elements", inputs[0])),
        Layer::Activation(_) | Layer::Identity => Ok(inputs[0].to_vec()),
        Layer::Add => {
            if inputs[0] != inputs[1] {
                return Err(format!(
                    "Add needs equal shapes, got {:?} and {:?}",
                    inputs[0], inputs[1]
                ));
            }
            Ok(inputs[0].to_vec())
        }
    }
}
