//! The training recipe: every knob of a run, saved as `config.json` in the run folder.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Everything that determines a training run (together with the data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Model preset or custom MLP spec.
    pub model: String,
    /// Optimizer name (`sgd`, `adamw`).
    pub optimizer: String,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (coupled for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Learning-rate schedule: `constant`, `cosine` or `step`.
    pub schedule: String,
    /// `step` schedule: epochs between decays.
    pub step_every: usize,
    /// `step` schedule: decay factor.
    pub step_gamma: f64,
    /// Epochs of linear learning-rate warmup.
    pub warmup: usize,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Number of epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Training images (class-balanced subset; 0 = all available).
    pub train_size: usize,
    /// Test images (class-balanced subset; 0 = all available).
    pub test_size: usize,
    /// Random crop (4-pixel zero padding) and horizontal flip.
    pub augment: bool,
    /// Seed of everything random: initialization, subsets, order, augmentation.
    pub seed: u64,
    /// Float type: `f32` or `f64`.
    pub dtype: String,
    /// Evaluate on the test subset every this many epochs (and after the last).
    pub eval_every: usize,
    /// Keep a numbered checkpoint every this many epochs (0: only the latest).
    pub checkpoint_every: usize,
    /// Data source: `auto`, `synthetic` or a folder of the official binary release.
    pub data: String,
}

impl Default for TrainConfig {
    /// The default recipe (the PyTorch reference recipe): cnn-s, SGD with momentum 0.9,
    /// lr 0.05 with cosine decay to 0, weight decay 5e-4, batch 128, random crop + flip,
    /// 10 epochs, on a 10,000 / 2,000 image class-balanced subset.
    fn default() -> Self {
        TrainConfig {
            model: "cnn-s".into(),
            optimizer: "sgd".into(),
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            schedule: "cosine".into(),
            step_every: 30,
            step_gamma: 0.1,
            warmup: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            epochs: 10,
            batch_size: 128,
            train_size: 10_000,
            test_size: 2_000,
            augment: true,
            seed: 0,
            dtype: "f32".into(),
            eval_every: 1,
            checkpoint_every: 0,
            data: "auto".into(),
        }
    }
}

/// Optimizer names `flatmin train --optimizer` accepts.
pub const OPTIMIZERS: [&str; 2] = ["sgd", "adamw"];

impl TrainConfig {
    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        fn positive(flag: &str, v: f64) -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a positive number, got {v}");
            }
            Ok(())
        }
        positive("--lr", self.lr)?;
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("--momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be >= 0, got {}", self.weight_decay);
        }
        if !OPTIMIZERS.contains(&self.optimizer.as_str()) {
            bail!("--optimizer: unknown optimizer '{}' (one of {})", self.optimizer, OPTIMIZERS.join(", "));
        }
        if self.nesterov && self.optimizer == "sgd" && self.momentum == 0.0 {
            bail!("--nesterov needs --momentum > 0");
        }
        if !["constant", "cosine", "step"].contains(&self.schedule.as_str()) {
            bail!("--schedule: unknown schedule '{}' (constant, cosine or step)", self.schedule);
        }
        if self.schedule == "step" {
            if self.step_every == 0 {
                bail!("--step-every must be at least 1");
            }
            if !(self.step_gamma > 0.0 && self.step_gamma <= 1.0) {
                bail!("--step-gamma must be in (0, 1], got {}", self.step_gamma);
            }
        }
        for (flag, v) in [("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--eval-every", self.eval_every)] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if !["f32", "f64"].contains(&self.dtype.as_str()) {
            bail!("--dtype must be f32 or f64, got '{}'", self.dtype);
        }
        if self.optimizer == "adamw" {
            if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
                bail!("--beta1 and --beta2 must be in [0, 1)");
            }
            positive("--eps", self.eps)?;
        }
        flatmin_models::Arch::parse(&self.model).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
        Ok(())
    }
}
