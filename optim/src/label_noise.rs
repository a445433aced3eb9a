//! Label-noise SGD, classification form (Blanc et al. 2020; Damian et al. 2021; paper.md §7):
//! every step, each label of the batch is independently, with probability p, replaced by a
//! uniformly drawn other class, and SGD descends the loss of the noisy labels. Momentum and
//! coupled weight decay act through [`Sgd::apply`].
//!
//! The oracle applies the noise ([`crate::Oracle::eval_noisy`]) with [`corrupt_labels`], from
//! a seed this optimizer draws from its RNG, so a run is reproducible and resumable. The loss
//! in [`StepInfo`] is the noisy-label loss. Cost: one evaluation.

use crate::perturb::{load_rng, load_sgd, no_leftovers, rng_state};
use crate::rng::{derive_seed, Rng};
use crate::vecops::norm;
use crate::{check_hyper, LabelNoise, Optimizer, Oracle, Result, Sgd, StepInfo};
use flatmin_engine::{Scalar, Tensor};

/// The labels after noise: each one, with probability `noise.prob`, replaced by a class drawn
/// uniformly from the `classes − 1` others; the draws are a function of `noise.seed` and the
/// position in the batch only. Returns the labels and how many were replaced.
pub fn corrupt_labels(labels: &[usize], classes: usize, noise: &LabelNoise) -> (Vec<usize>, usize) {
    let mut rng = Rng::new(derive_seed(noise.seed, 0x4c4e));
    let mut flipped = 0;
    let out = labels
        .iter()
        .map(|&y| {
            let u = rng.uniform();
            let other = rng.below((classes.max(2) - 1) as u64) as usize;
            if u < noise.prob && classes > 1 {
                flipped += 1;
                if other >= y {
                    other + 1
                } else {
                    other
                }
            } else {
                y
            }
        })
        .collect();
    (out, flipped)
}

/// Label-noise SGD; see the module docs.
#[derive(Clone, Debug)]
pub struct LabelNoiseSgd<T> {
    prob: f64,
    sgd: Sgd<T>,
    rng: Rng,
}

impl<T: Scalar> LabelNoiseSgd<T> {
    /// Replacement probability `prob ∈ (0, 1]`, SGD momentum / Nesterov / weight decay, and
    /// `seed` of the noise.
    pub fn new(
        prob: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
        seed: u64,
    ) -> Result<Self> {
        check_hyper(
            "label_noise",
            prob,
            prob > 0.0 && prob <= 1.0,
            "must be in (0, 1]",
        )?;
        Ok(LabelNoiseSgd {
            prob,
            sgd: Sgd::new(momentum, nesterov, weight_decay)?,
            rng: Rng::new(derive_seed(seed, 0x4c53)),
        })
    }
}

impl<T: Scalar> Optimizer<T> for LabelNoiseSgd<T> {
    fn name(&self) -> &'static str {
        "label-noise"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let noise = LabelNoise {
            prob: self.prob,
            seed: self.rng.next_u64(),
        };
        let (loss, g) = oracle.eval_noisy(params, &noise)?;
        let gn = norm(&g);
        self.sgd.apply(params, &g, lr);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm: gn,
            grad_evals: 1,
            extra: vec![("label_noise".into(), self.prob)],
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        let mut out = self.sgd.state();
        out.push(rng_state(&self.rng, "label_noise.rng"));
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        self.rng = load_rng(&mut state, "label_noise.rng")?;
        no_leftovers(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_replaces_with_another_class_at_the_given_rate() {
        let labels: Vec<usize> = (0..100_000).map(|i| i % 10).collect();
        let noise = LabelNoise { prob: 0.3, seed: 9 };
        let (out, flipped) = corrupt_labels(&labels, 10, &noise);
        assert_eq!(
            out,
            corrupt_labels(&labels, 10, &noise).0,
            "deterministic in the seed"
        );
        let changed = labels.iter().zip(&out).filter(|(a, b)| a != b).count();
        assert_eq!(changed, flipped, "a replaced label is always another class");
        assert!((flipped as f64 / labels.len() as f64 - 0.3).abs() < 0.01);
        assert!(out.iter().all(|&y| y < 10));
        // The replacement is uniform over the 9 other classes.
        let mut counts = [0usize; 10];
        for (&a, &b) in labels.iter().zip(&out) {
            if a == 0 && b != 0 {
                counts[b] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        for &c in &counts[1..] {
            assert!(
                (c as f64 / total as f64 - 1.0 / 9.0).abs() < 0.02,
                "{counts:?}"
            );
        }
    }
}
