//! The memory a training run needs, estimated before anything large is allocated, so that a
//! batch size or model that cannot fit fails at once with the estimate instead of being
//! killed by the kernel hours later.
//!
//! The estimate is the sum of
//! - the tape: a training step records every intermediate value of the forward pass; the
//!   number of scalars is measured by recording the pass on 1 and on 2 blank images
//!   ([`flatmin_models::Model::tape_elements`]), which gives a fixed part and a per-image
//!   part, scaled to the batch. It is counted twice, values plus the adjoints of the
//!   backward pass (same shapes), or once for the 500-image evaluation batches (no backward
//!   pass) when that is larger;
//! - parameter-sized buffers: eight copies of the parameters (model, the trainer's copy,
//!   gradient, momentum or first moment, second moment or perturbed point, second gradient,
//!   and two while a checkpoint is serialized);
//! - the images: the training and test subsets as bytes, twice (the loaded release and the
//!   subset), and the loader's prepared batches in the float type.
//!
//! Scratch buffers of the kernels and the allocator's slack are not counted, and the copies
//! above are not all alive at once, so the figure is an estimate, not a bound: against the
//! measured peak resident memory of short runs it was within 25% either way (see
//! docs/reliability.md). `--max-memory` replaces the budget when it is wrong.

use super::config::{DType, TrainConfig};
use anyhow::{bail, Context, Result};

/// Images of the CIFAR-10 training set (what `--train-size 0` means).
const FULL_TRAIN: usize = 50_000;
/// Images of the CIFAR-10 test set (what `--test-size 0` means).
const FULL_TEST: usize = 10_000;
/// Parameter-sized buffers alive during a step or a checkpoint (see the module notes).
const PARAM_COPIES: f64 = 8.0;
/// Prepared batches of the loader (its prefetch depth, one being consumed, one being built).
const LOADER_BATCHES: f64 = (flatmin_datasets::DEFAULT_PREFETCH + 2) as f64;

/// The estimate of a run's peak memory, by part (bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Tape values and adjoints of the largest batch.
    pub tape: f64,
    /// Parameter-sized buffers.
    pub params: f64,
    /// Images in memory.
    pub data: f64,
}

impl MemoryEstimate {
    /// The whole estimate (bytes).
    pub fn total(&self) -> f64 {
        self.tape + self.params + self.data
    }
}

/// The parameter-sized buffers of training `cfg` (bytes), from the model's layout alone:
/// nothing is allocated, so it is safe to call for any model spec.
pub fn param_bytes(cfg: &TrainConfig) -> Result<f64> {
    let net = flatmin_models::netfile::resolve(&cfg.model)
        .with_context(|| format!("--model {}", cfg.model))?;
    let elem = if cfg.dtype == DType::F64 { 8.0 } else { 4.0 };
    Ok(PARAM_COPIES * net.num_params() as f64 * elem)
}

/// Estimates the peak memory of training `cfg` (see the module notes). Builds the model
/// once and records two tiny forward passes; allocates nothing in proportion to the batch,
/// but the model itself: check [`param_bytes`] first when the model may not fit.
pub fn estimate_memory(cfg: &TrainConfig) -> Result<MemoryEstimate> {
    let elem = if cfg.dtype == DType::F64 { 8.0 } else { 4.0 };
    let (one, two, params) = if cfg.dtype == DType::F64 {
        tape_sizes::<f64>(&cfg.model)?
    } else {
        tape_sizes::<f32>(&cfg.model)?
    };
    let per_image = two.saturating_sub(one) as f64;
    let fixed = one as f64 - per_image;
    // Training: values and adjoints; evaluation (no backward pass): values only.
    let train = 2.0 * (fixed + per_image * cfg.batch_size as f64);
    let eval = fixed + per_image * super::EVAL_BATCH as f64;
    let tape = train.max(eval) * elem;
    let images = |n: usize, full: usize| if n == 0 { full } else { n } as f64;
    let record = flatmin_datasets::cifar10::RECORD_BYTES as f64;
    let data =
        2.0 * (images(cfg.train_size, FULL_TRAIN) + images(cfg.test_size, FULL_TEST)) * record
            + LOADER_BATCHES * cfg.batch_size as f64 * 3072.0 * elem;
    Ok(MemoryEstimate {
        tape,
        params: PARAM_COPIES * params as f64 * elem,
        data,
    })
}

fn tape_sizes<T: flatmin_engine::Scalar>(model: &str) -> Result<(usize, usize, usize)> {
    let m = crate::cifar_model::<T>(model, 0)?;
    let one = m.tape_elements(1)?;
    let two = m.tape_elements(2)?;
    Ok((one, two, m.num_params()))
}

pub use flatmin_models::spectrum::available_memory;

/// Parses a `--max-memory` size: a number with a binary unit, `K`, `M`, `G` or `T`
/// (optionally followed by `iB` or `B`), e.g. `512M`, `16GiB`, `1.5T`.
pub fn parse_size(s: &str) -> Result<f64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let scale = match unit {
        "K" | "k" => 1024.0,
        "M" | "m" => 1024.0 * 1024.0,
        "G" | "g" => 1024.0 * 1024.0 * 1024.0,
        "T" | "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => bail!("--max-memory: '{s}' is not a size (a number and a unit: 512M, 16G, 1.5T)"),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * scale),
        _ => bail!("--max-memory: '{s}' is not a positive size (e.g. 512M, 16G, 1.5T)"),
    }
}

/// A byte count for people: `1.5 GiB`, `412 GiB`, `96.0 MiB`.
pub fn human_bytes(b: f64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    if b >= 10.0 * GIB {
        format!("{:.0} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

/// Refuses, before training, a run whose estimated peak memory exceeds `limit` (bytes; the
/// `--max-memory` given) or else the memory available now. No check when neither is known.
pub fn check_memory(cfg: &TrainConfig, limit: Option<f64>) -> Result<()> {
    let (budget, what) = match limit {
        Some(l) => (l, "--max-memory allows only"),
        None => match available_memory() {
            Some(a) => (a, "only"),
            None => return Ok(()),
        },
    };
    let tail = if limit.is_some() {
        ""
    } else {
        " are available (MemAvailable)"
    };
    // The parameters first, from the layout: a model too large to build is refused without
    // building it.
    let params = param_bytes(cfg)?;
    if params > budget {
        bail!(
            "--model {} needs about {} for its parameters and optimizer state alone, but {what} {}{tail}; pick a smaller model, or set --max-memory if the estimate is wrong",
            cfg.model,
            human_bytes(params),
            human_bytes(budget),
        );
    }
    let need = estimate_memory(cfg)?;
    if need.total() > budget {
        bail!(
            "--batch-size {} with {} needs about {} (estimate: {} tape, {} parameters and optimizer state, {} images), but {what} {}{tail}; lower --batch-size, or set --max-memory if the estimate is wrong",
            cfg.batch_size,
            cfg.model,
            human_bytes(need.total()),
            human_bytes(need.tape),
            human_bytes(need.params),
            human_bytes(need.data),
            human_bytes(budget),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512.0 * 1024.0 * 1024.0);
        assert_eq!(parse_size("16GiB").unwrap(), 16.0 * (1u64 << 30) as f64);
        assert_eq!(parse_size("1.5T").unwrap(), 1.5 * (1u64 << 40) as f64);
        assert_eq!(parse_size("2kB").unwrap(), 2048.0);
        for bad in ["", "12", "G", "-1G", "0G", "nanG", "1X", "1.2.3M"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.starts_with("--max-memory"), "{bad}: {e}");
        }
    }

    #[test]
    fn estimate_grows_with_the_batch_and_the_model() {
        let cfg = |model: &str, batch: usize| TrainConfig {
            model: model.into(),
            batch_size: batch,
            ..TrainConfig::default()
        };
        let small = estimate_memory(&cfg("cnn-s", 128)).unwrap();
        let big = estimate_memory(&cfg("cnn-s", 100_000)).unwrap();
        assert!(big.tape > 100.0 * small.tape, "{small:?} {big:?}");
        let resnet = estimate_memory(&cfg("resnet18", 128)).unwrap();
        assert!(resnet.params > 10.0 * small.params);
        // The default recipe fits in a few GiB.
        assert!(small.total() < 4.0 * (1u64 << 30) as f64, "{small:?}");
        assert!(human_bytes(big.total()).ends_with("GiB"));
    }
}
