//! `flatmin hvp`: logits, loss, gradient and one exact Hessian-vector product `H v` of a
//! model on one CIFAR-10 batch file, written to a safetensors file.

use anyhow::{Context, Result};
use clap::Args;
use flatmin::train::{DType, LossFn};
use flatmin_datasets::{normalize_f64, read_batch_file};
use flatmin_engine::{Scalar, Tensor};
use flatmin_models::io::{write_safetensors, RawTensor};
use flatmin_models::model::float_raw;
use flatmin_models::BnUse;
use std::path::{Path, PathBuf};

/// Arguments of `flatmin hvp`.
#[derive(Debug, Args)]
pub struct HvpArgs {
    /// Model preset (tiny-tanh, mlp-s, cnn-s, resnet20, resnet18), custom `mlp:W0,...:ACT`, or a
    /// network file NET.json (docs/network-file.md).
    #[arg(long, help_heading = "Inputs")]
    pub model: String,
    /// Model state (safetensors, f32 or f64; a PyTorch state_dict is accepted).
    #[arg(long, help_heading = "Inputs")]
    pub weights: PathBuf,
    /// CIFAR-10 batch file; all its records form one batch.
    #[arg(long, help_heading = "Inputs")]
    pub data: PathBuf,
    /// Direction v (safetensors): one tensor per trainable parameter, under its name.
    #[arg(long, help_heading = "Inputs")]
    pub vector: PathBuf,
    /// Float type of the computation and of the output tensors.
    #[arg(long, value_enum, default_value_t = DType::F32, help_heading = "Computation")]
    pub dtype: DType,
    /// BatchNorm normalization: batch statistics (train) or running statistics (eval).
    #[arg(long, default_value = "eval", value_parser = super::bn_mode(), help_heading = "Computation")]
    pub bn_mode: BnUse,
    /// The loss: ce (softmax cross-entropy) or mse (squared error against one-hot targets).
    #[arg(long, value_enum, default_value_t = LossFn::Ce, help_heading = "Computation")]
    pub loss: LossFn,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true, help_heading = "Run")]
    pub threads: Option<usize>,
    /// Output safetensors file: logits, loss, grad.NAME and hvp.NAME (written atomically).
    #[arg(long, help_heading = "Run")]
    pub out: PathBuf,
    /// Remove this prefix from the weights file's tensor names where present: a wrapped
    /// PyTorch state_dict (`--strip-prefix model.` for `model.layers.0.weight`).
    #[arg(long, value_name = "PREFIX", help_heading = "Inputs")]
    pub strip_prefix: Option<String>,
}

/// Runs `flatmin hvp`.
pub fn run(args: &HvpArgs) -> Result<()> {
    super::with_threads(args.threads, || dispatch(args))
}

fn dispatch(args: &HvpArgs) -> Result<()> {
    check_out_path(&args.out)?;
    let tensors = match args.dtype {
        DType::F32 => compute::<f32>(args)?,
        DType::F64 => compute::<f64>(args)?,
    };
    write_safetensors(&args.out, &tensors)
        .with_context(|| format!("--out {}", args.out.display()))?;
    println!(
        "wrote {} ({} tensors: logits, loss, grad.NAME, hvp.NAME)",
        args.out.display(),
        tensors.len()
    );
    Ok(())
}

/// Refuses an output path that exists but is not a regular file: the atomic write renames a
/// new file over the path, which would replace a symlink, a device such as `/dev/null`, or
/// fail late on a folder.
fn check_out_path(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Ok(meta) if !meta.file_type().is_file() => {
            let what = if meta.file_type().is_symlink() {
                "a symbolic link"
            } else if meta.is_dir() {
                "a folder"
            } else {
                "not a regular file"
            };
            anyhow::bail!(
                "--out {}: exists and is {what}; refusing to replace it",
                out.display()
            )
        }
        _ => Ok(()),
    }
}

/// Refuses a non-finite loss, gradient or HVP entry (an overflow in the weights, the data
/// or the direction): the error names the value, the tensor and the inputs, and nothing is
/// written to `--out`.
fn check_finite<T: Scalar>(
    args: &HvpArgs,
    loss: T,
    names: &[&str],
    grads: &[Tensor<T>],
    hvps: &[Tensor<T>],
) -> Result<()> {
    let inputs = || {
        format!(
            "--model {} --weights {} --data {} --vector {}",
            args.model,
            args.weights.display(),
            args.data.display(),
            args.vector.display()
        )
    };
    if !loss.is_finite() {
        anyhow::bail!(
            "the loss is {loss:?}, not finite, for {}; nothing written to --out {}",
            inputs(),
            args.out.display()
        );
    }
    for (what, blocks) in [("gradient", grads), ("Hessian-vector product", hvps)] {
        for (name, t) in names.iter().zip(blocks) {
            if let Some(x) = t.data().iter().find(|x| !x.is_finite()) {
                anyhow::bail!(
                    "the {what} of '{name}' holds {x:?}, not finite (loss {loss:?}), for {}; \
                     nothing written to --out {}",
                    inputs(),
                    args.out.display()
                );
            }
        }
    }
    Ok(())
}

/// Everything `flatmin hvp` writes, computed in `T`: `logits` `[N, 10]`, `loss` `[]`, and
/// `grad.NAME` and `hvp.NAME` for every trainable parameter. A non-finite loss, gradient
/// or HVP entry is an error naming the value and the inputs.
pub fn compute<T: Scalar>(args: &HvpArgs) -> Result<Vec<RawTensor>> {
    let mut model = flatmin::cifar_model::<T>(&args.model, 0)?;
    model.set_loss_fn(args.loss.engine());
    model
        .load_stripped(&args.weights, args.strip_prefix.as_deref())
        .context("--weights")?;
    let v = model.load_param_like(&args.vector).context("--vector")?;
    let batch = read_batch_file(&args.data).context("--data")?;
    let n = batch.len();
    let data: Vec<T> = normalize_f64(&batch).into_iter().map(T::c).collect();
    let x = Tensor::<T>::from_vec(&[n, 3, 32, 32], data).context("--data")?;
    let labels = batch.labels_usize();
    let eval = model
        .evaluate(&x, &labels, &[v], args.bn_mode, true)
        .with_context(|| format!("evaluating {} on {}", args.model, args.data.display()))?;

    let names = model.param_names();
    let hvps = eval
        .hvps
        .first()
        .context("no Hessian-vector product computed")?;
    anyhow::ensure!(
        eval.grads.len() == names.len() && hvps.len() == names.len(),
        "evaluation returned {} gradients and {} HVP blocks for {} parameters",
        eval.grads.len(),
        hvps.len(),
        names.len()
    );
    check_finite(args, eval.loss, &names, &eval.grads, hvps)?;
    let mut out = Vec::with_capacity(2 + 2 * names.len());
    out.push(RawTensor {
        name: "logits".into(),
        shape: eval.logits.shape().to_vec(),
        data: float_raw(&eval.logits),
    });
    out.push(RawTensor {
        name: "loss".into(),
        shape: vec![],
        data: float_raw(&Tensor::scalar(eval.loss)),
    });
    for (prefix, blocks) in [("grad", &eval.grads), ("hvp", hvps)] {
        for (name, t) in names.iter().zip(blocks.iter()) {
            out.push(RawTensor {
                name: format!("{prefix}.{name}"),
                shape: t.shape().to_vec(),
                data: float_raw(t),
            });
        }
    }
    Ok(out)
}
