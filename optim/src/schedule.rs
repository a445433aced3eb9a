//! Learning-rate schedules over optimizer steps, with optional linear warmup.

use crate::{check_hyper, Result};

/// How the learning rate evolves with the step count.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// Fixed rate.
    Constant,
    /// Cosine decay from the base rate to 0 over the run (PyTorch `CosineAnnealingLR`,
    /// `eta_min = 0`, `T_max` = total steps after warmup).
    Cosine,
    /// Multiply by `gamma` every `every` steps (PyTorch `StepLR`).
    Step {
        /// Steps between decays.
        every: usize,
        /// Decay factor.
        gamma: f64,
    },
}

/// A schedule bound to a base rate, a warmup length and the total number of steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    /// Base learning rate.
    pub base: f64,
    /// Shape of the schedule.
    pub kind: Schedule,
    /// Steps of linear warmup from base/warmup to base.
    pub warmup: usize,
    /// Total number of steps in the run.
    pub total: usize,
}

impl LrSchedule {
    /// Validates and binds a schedule.
    pub fn new(base: f64, kind: Schedule, warmup: usize, total: usize) -> Result<Self> {
        check_hyper("lr", base, base > 0.0, "must be > 0")?;
        if let Schedule::Step { every, gamma } = kind {
            check_hyper("step_every", every as f64, every > 0, "must be > 0")?;
            check_hyper(
                "step_gamma",
                gamma,
                gamma > 0.0 && gamma <= 1.0,
                "must be in (0, 1]",
            )?;
        }
        Ok(LrSchedule {
            base,
            kind,
            warmup,
            total,
        })
    }

    /// The learning rate for step `t` (0-based).
    pub fn at(&self, t: usize) -> f64 {
        if t < self.warmup {
            return self.base * (t + 1) as f64 / self.warmup as f64;
        }
        let s = t - self.warmup;
        match &self.kind {
            Schedule::Constant => self.base,
            Schedule::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                0.5 * self.base * (1.0 + (std::f64::consts::PI * (s as f64).min(span) / span).cos())
            }
            Schedule::Step { every, gamma } => self.base * gamma.powi((s / every) as i32),
        }
    }
}
