//! `flatmin eval`: loss and accuracy of a trained model (a run folder's `model.safetensors`,
//! or any safetensors checkpoint) on the test or training split.
//!
//! By default it evaluates exactly what the run evaluated: the run's data, seed, float type
//! and class-balanced subset of the split (the test subset is drawn with the seed the
//! trainer uses for it, `seed ^ 0x7e57`), with BatchNorm on its running statistics; the
//! test accuracy then equals the run's last `eval` record.

use anyhow::{bail, Context, Result};
use clap::Args;
use flatmin::data::{resolve, sized_subset, warn_if_synthetic_fallback};
use flatmin::train::{
    evaluate, evaluate_in_chunks, training_subset, DType, LossFn, RunDir, TrainConfig,
};
use flatmin_datasets::{Batch, Element};
use flatmin_engine::Scalar;
use flatmin_models::{BnUse, Model};
use std::path::{Path, PathBuf};

/// Seed offset of the trainer's test subset (`TrainConfig::test_size`).
const TEST_SUBSET_SEED: u64 = 0x7e57;
/// Images per forward pass with `--bn-mode train`, whose BatchNorm statistics are those of
/// each such chunk (so the size is part of the result; `--bn-mode eval` runs the trainer's
/// evaluation, [`flatmin::train::evaluate`]).
const BATCH_STATS_CHUNK: usize = 500;

/// Arguments of `flatmin eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run folder (its model.safetensors is evaluated) or a safetensors checkpoint.
    #[arg(
        value_name = "RUN_OR_CHECKPOINT",
        required_unless_present = "checkpoint"
    )]
    pub target: Option<PathBuf>,
    /// The same as the positional argument, as a flag: `--checkpoint C`.
    #[arg(
        long,
        value_name = "C",
        conflicts_with = "target",
        help_heading = "Model"
    )]
    pub checkpoint: Option<PathBuf>,
    /// Model preset, `mlp:...` spec or network file NET.json of a checkpoint outside a run folder [default: the
    /// run's, from its config.json].
    #[arg(long, help_heading = "Model")]
    pub model: Option<String>,
    /// Data: auto, synthetic, or a cifar-10-batches-bin folder [default: the run's, else auto].
    #[arg(long, help_heading = "Data")]
    pub data: Option<String>,
    /// Split to evaluate on.
    #[arg(long, default_value = "test", value_parser = ["test", "train"], help_heading = "Data")]
    pub split: String,
    /// Evaluate a class-balanced subset of N images of the split (0: all) [default: the
    /// run's subset of that split, else all].
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub size: Option<usize>,
    /// BatchNorm normalization: eval (running statistics) or train (batch statistics).
    #[arg(long, default_value = "eval", value_parser = super::bn_mode(), help_heading = "Evaluation")]
    pub bn_mode: BnUse,
    /// The loss reported: ce or mse [default: the run's --loss, else ce].
    #[arg(long, value_enum, help_heading = "Evaluation")]
    pub loss: Option<LossFn>,
    /// Float type [default: the run's, else f32].
    #[arg(long, value_enum, help_heading = "Evaluation")]
    pub dtype: Option<DType>,
    /// Seed of the subset and of synthetic data [default: the run's, else 0].
    #[arg(long, help_heading = "Data")]
    pub seed: Option<u64>,
    /// Also print one JSON line on stdout (the human line then goes to stderr).
    #[arg(long, help_heading = "Run")]
    pub json: bool,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true, help_heading = "Run")]
    pub threads: Option<usize>,
    /// Remove this prefix from the weights file's tensor names where present: a wrapped
    /// PyTorch state_dict (`--strip-prefix model.` for `model.layers.0.weight`).
    #[arg(long, value_name = "PREFIX", help_heading = "Model")]
    pub strip_prefix: Option<String>,
}

impl EvalArgs {
    /// The run folder or checkpoint to evaluate (positional or `--checkpoint`).
    pub fn path(&self) -> &Path {
        self.checkpoint
            .as_deref()
            .or(self.target.as_deref())
            .expect("clap requires RUN_OR_CHECKPOINT or --checkpoint")
    }
}

/// The weights to evaluate and the run they belong to, if any.
struct Target {
    weights: PathBuf,
    run: Option<(PathBuf, TrainConfig)>,
}

/// The configuration of the run folder `dir`.
fn run_config(dir: &Path) -> Result<(PathBuf, TrainConfig)> {
    let cfg = RunDir::open(dir)?.config()?;
    Ok((dir.join("config.json"), cfg))
}

/// Finds the weights of `target` and its run's configuration: a run folder, or a file
/// inside one (`RUN/model.safetensors`, `RUN/checkpoints/*.safetensors`), or a lone file.
fn locate(target: &Path) -> Result<Target> {
    if target.is_dir() {
        if !target.join("config.json").is_file() {
            bail!("{}: not a run folder (no config.json)", target.display());
        }
        let weights = target.join("model.safetensors");
        if !weights.is_file() {
            bail!("{}: the run has no model.safetensors yet", target.display());
        }
        return Ok(Target {
            weights,
            run: Some(run_config(target)?),
        });
    }
    if !target.is_file() {
        bail!(
            "{}: no such run folder or checkpoint file",
            target.display()
        );
    }
    let dir = target
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find(|d| d.join("config.json").is_file());
    Ok(Target {
        weights: target.to_path_buf(),
        run: dir.map(run_config).transpose()?,
    })
}

/// What one evaluation found.
struct Outcome {
    loss: f64,
    acc: f64,
}

/// Runs `flatmin eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    super::with_threads(args.threads, || dispatch(args))
}

fn dispatch(args: &EvalArgs) -> Result<()> {
    let target = locate(args.path())?;
    let cfg = target.run.as_ref().map(|(_, c)| c);
    let model = match (&args.model, &target.run) {
        (Some(m), Some((path, c))) if *m != c.model => bail!(
            "--model {m}: {} belongs to a run of model {} ({}); drop --model",
            args.path().display(),
            c.model,
            path.display()
        ),
        (Some(m), _) => m.clone(),
        (None, Some((_, c))) => c.model.clone(),
        (None, None) => bail!(
            "--model is needed for {}: it is not inside a run folder (no config.json beside it)",
            args.path().display()
        ),
    };
    let dtype = args.dtype.or(cfg.map(|c| c.dtype)).unwrap_or(DType::F32);
    let seed = args.seed.or(cfg.map(|c| c.data_seed())).unwrap_or(0);
    let bn = args.bn_mode;
    match dtype {
        DType::F32 => eval_as::<f32>(args, &target, &model, seed, bn, dtype),
        DType::F64 => eval_as::<f64>(args, &target, &model, seed, bn, dtype),
    }
}

/// Loads the weights into a `model` in float type `T`, picks the data and evaluates.
fn eval_as<T: Scalar + Element>(
    args: &EvalArgs,
    target: &Target,
    model: &str,
    seed: u64,
    bn: BnUse,
    dtype: DType,
) -> Result<()> {
    let mut net = flatmin::cifar_model::<T>(model, seed)?;
    // A training checkpoint also holds optimizer and trainer state; only the model's
    // tensors are loaded.
    let raw =
        flatmin_models::io::read_model_tensors(&target.weights, args.strip_prefix.as_deref())?;
    net.load_raw(&target.weights, raw)
        .with_context(|| format!("the weights do not fit model {model}"))?;
    let cfg = target.run.as_ref().map(|(_, c)| c);
    let loss_fn = args.loss.or(cfg.map(|c| c.loss)).unwrap_or(LossFn::Ce);
    net.set_loss_fn(loss_fn.engine());

    let images = eval_images(args, cfg, seed)?;
    let batch = &images.batch;
    let out = match bn {
        BnUse::Eval => {
            let (loss, acc) = evaluate(&net, batch)?;
            Outcome { loss, acc }
        }
        BnUse::Train => evaluate_batch_stats(&net, batch)?,
    };

    let human = format!(
        "{}: {} accuracy {:.2}%, {} loss {:.4} on {} {} images{} ({}; {}, {}, BatchNorm {})",
        args.path().display(),
        args.split,
        100.0 * out.acc,
        loss_fn,
        out.loss,
        batch.len(),
        args.split,
        if images.random_labels {
            " with the run's random labels"
        } else {
            ""
        },
        images.origin,
        model,
        dtype,
        bn.name()
    );
    if !args.json {
        println!("{human}");
        return Ok(());
    }
    eprintln!("{human}");
    let line = serde_json::json!({
        "target": args.path().display().to_string(),
        "weights": target.weights.display().to_string(),
        "model": model,
        "split": args.split,
        "images": batch.len(),
        "data": images.origin,
        "synthetic": images.synthetic,
        "bn_mode": bn.name(),
        "loss_fn": loss_fn.name(),
        "random_labels": images.random_labels,
        "dtype": dtype,
        "seed": seed,
        "loss": out.loss,
        "acc": out.acc,
    });
    println!("{line}");
    Ok(())
}

/// The images `flatmin eval` evaluates on.
struct EvalImages {
    batch: Batch,
    origin: String,
    synthetic: bool,
    /// The run's random training labels are applied.
    random_labels: bool,
}

/// The split's class-balanced subset: for `--split train` of a run, the run's own training
/// subset (its random labels included) unless `--size` or `--seed` asks for another; else
/// the run's subset size of the split (or `--size`).
fn eval_images(args: &EvalArgs, cfg: Option<&TrainConfig>, seed: u64) -> Result<EvalImages> {
    let spec = args
        .data
        .clone()
        .or_else(|| cfg.map(|c| c.data.clone()))
        .unwrap_or_else(|| "auto".into());
    let data = resolve(&spec, seed)?;
    warn_if_synthetic_fallback(&spec, &data, "evaluating");
    let as_trained = cfg.filter(|c| {
        args.split == "train"
            && args.size.is_none_or(|n| n == c.train_size)
            && seed == c.data_seed()
    });
    let batch = match as_trained {
        Some(c) => training_subset(c, data.train)?,
        None => {
            let (batch, run_size, subset_seed) = match args.split.as_str() {
                "train" => (data.train, cfg.map(|c| c.train_size), seed),
                _ => (data.test, cfg.map(|c| c.test_size), seed ^ TEST_SUBSET_SEED),
            };
            let size = args.size.or(run_size).unwrap_or(0);
            let what = format!("--split {}", args.split);
            sized_subset(batch, size, subset_seed, "--size", &what)?
        }
    };
    Ok(EvalImages {
        batch,
        origin: data.origin,
        synthetic: data.synthetic,
        random_labels: as_trained.is_some_and(|c| c.random_labels),
    })
}

/// Mean loss and accuracy with BatchNorm on the statistics of each chunk of
/// [`BATCH_STATS_CHUNK`] images.
fn evaluate_batch_stats<T: Scalar + Element>(model: &Model<T>, data: &Batch) -> Result<Outcome> {
    let (loss, acc) = evaluate_in_chunks(model, data, BnUse::Train, BATCH_STATS_CHUNK)?;
    Ok(Outcome { loss, acc })
}
