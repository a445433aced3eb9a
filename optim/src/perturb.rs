//! Pieces shared by the perturbation methods: the probe specification (which data the probe
//! gradient uses), the second rate η', the output iterate (reservoir sampling of a uniformly
//! random iterate), the final update through SGD, and state helpers.

use crate::rng::{decode_u64, encode_u64, Rng};
use crate::vecops::add_scaled;
use crate::{OptimError, Optimizer, Oracle, Probe, Result, Sgd};
use flatmin_engine::{Scalar, Tensor};

/// Where the probe gradients of a step come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeData {
    /// The step's batch (the whole batch, or a uniformly drawn sub-batch of it).
    Same,
    /// A fresh batch, independent of the step's batch ([`Probe::Fresh`]).
    Fresh,
}

/// The data of a probe gradient: how many samples, from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Samples in the probe batch; `None`: the whole batch (with [`ProbeData::Fresh`]: a fresh
    /// batch as large as the step's batch). A size at least the batch size means the whole
    /// batch for [`ProbeData::Same`].
    pub size: Option<usize>,
    /// Same batch or a fresh one.
    pub data: ProbeData,
}

impl ProbeSpec {
    /// The step's whole batch (the full gradient, for a full-batch oracle).
    pub fn batch() -> Self {
        ProbeSpec {
            size: None,
            data: ProbeData::Same,
        }
    }

    /// `k` samples drawn uniformly without replacement from the step's batch (`k = 1`: the
    /// single-sample gradient `∇f_i`, i ~ Unif of Algorithm 2).
    pub fn samples(k: usize) -> Self {
        ProbeSpec {
            size: Some(k),
            data: ProbeData::Same,
        }
    }

    /// Checks the size (`--probe-batch`).
    pub fn validate(&self) -> Result<()> {
        if let Some(k) = self.size {
            crate::check_hyper("probe_batch", k as f64, k > 0, "must be at least 1")?;
        }
        Ok(())
    }

    /// Draws this step's probe: the data selection, and whether it is the step's whole batch
    /// (then the gradient at the current parameters can be reused). Sub-batch positions come
    /// from `rng`.
    pub fn resolve<T>(&self, oracle: &dyn Oracle<T>, rng: &mut Rng) -> Result<(Probe, bool)> {
        let need_len = || {
            oracle.batch_len().ok_or_else(|| {
                OptimError::Unsupported("addressing single samples of the batch (batch_len)".into())
            })
        };
        match (self.data, self.size) {
            (ProbeData::Same, None) => Ok((Probe::Batch, true)),
            (ProbeData::Same, Some(k)) => {
                let n = need_len()?;
                if k >= n {
                    Ok((Probe::Batch, true))
                } else {
                    let indices = rng.sample_without_replacement(n, k);
                    Ok((Probe::SubBatch { indices }, false))
                }
            }
            (ProbeData::Fresh, Some(k)) => Ok((Probe::Fresh { size: k }, false)),
            (ProbeData::Fresh, None) => Ok((Probe::Fresh { size: need_len()? }, false)),
        }
    }
}

/// The rate η' on the perturbation term `v_t` of RS and SA.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EtaPrime {
    /// η' = η, the step's learning rate (paper.md §6 default; follows the LR schedule).
    SameAsLr,
    /// A fixed η', independent of the learning-rate schedule.
    Fixed(f64),
}

impl EtaPrime {
    /// η' for a step with learning rate `lr`.
    pub fn at(&self, lr: f64) -> f64 {
        match *self {
            EtaPrime::SameAsLr => lr,
            EtaPrime::Fixed(v) => v,
        }
    }

    /// Checks a fixed value (`--eta-prime`, ≥ 0).
    pub fn validate(&self) -> Result<()> {
        if let EtaPrime::Fixed(v) = *self {
            crate::check_hyper("eta_prime", v, v >= 0.0, "must be >= 0")?;
        }
        Ok(())
    }
}

/// Which iterate an RS/SA run returns after its T perturbed steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputIterate {
    /// The last iterate `x_T` (practice; no reservoir kept).
    Last,
    /// `x̂` drawn uniformly from `{x_1, ..., x_T}` (Algorithms 1 and 2), kept by reservoir
    /// sampling so the iterates are not stored. When the optimizer knows T (its horizon),
    /// the parameters are replaced by `x̂` right after step T; the last iterate stays
    /// available.
    Random,
}

/// Uniformly random element of a stream of iterates, by reservoir sampling (one copy kept):
/// the k-th iterate replaces the kept one with probability 1/k, so after T iterates each of
/// them is kept with probability 1/T. The draws use their own RNG stream, so whether a
/// reservoir is kept does not change the optimizer's other draws.
#[derive(Clone, Debug)]
pub struct Reservoir<T> {
    rng: Rng,
    seen: u64,
    pick: u64,
    sample: Option<Vec<Tensor<T>>>,
}

impl<T: Scalar> Reservoir<T> {
    /// An empty reservoir drawing from `seed`.
    pub fn new(seed: u64) -> Self {
        Reservoir {
            rng: Rng::new(seed),
            seen: 0,
            pick: 0,
            sample: None,
        }
    }

    /// Offers the next iterate.
    pub fn offer(&mut self, x: &[Tensor<T>]) {
        self.seen = self.seen.saturating_add(1);
        if self.rng.below(self.seen) == 0 {
            self.pick = self.seen;
            self.sample = Some(x.to_vec());
        }
    }

    /// Iterates offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Which iterate (1-based) is kept; 0 before the first offer.
    pub fn pick(&self) -> u64 {
        self.pick
    }

    /// The kept iterate.
    pub fn sample(&self) -> Option<&[Tensor<T>]> {
        self.sample.as_deref()
    }

    fn state(&self, prefix: &str, out: &mut Vec<(String, Tensor<T>)>) {
        out.push((
            format!("{prefix}.reservoir.counters"),
            encode_u64(&[self.rng.state(), self.seen, self.pick]),
        ));
        if let Some(s) = &self.sample {
            push_list(out, &format!("{prefix}.reservoir.x"), s);
        }
    }

    fn load(&mut self, prefix: &str, state: &mut Vec<(String, Tensor<T>)>) -> Result<()> {
        let name = format!("{prefix}.reservoir.counters");
        let c = take_u64s(state, &name)?.ok_or_else(|| OptimError::State(name.clone()))?;
        let [rng, seen, pick] = c[..] else {
            return Err(OptimError::State(name));
        };
        self.rng = Rng::from_state(rng);
        self.seen = seen;
        self.pick = pick;
        self.sample = take_list(state, &format!("{prefix}.reservoir.x"));
        Ok(())
    }
}

/// Iterate bookkeeping of RS and SA: perturbed-step counter, optional horizon T, reservoir
/// of the random output iterate, and the last iterate kept at the switch to `x̂`.
#[derive(Clone, Debug)]
pub(crate) struct Iterates<T> {
    pub t: u64,
    pub horizon: Option<u64>,
    pub reservoir: Option<Reservoir<T>>,
    pub last: Option<Vec<Tensor<T>>>,
}

impl<T: Scalar> Iterates<T> {
    pub fn new(horizon: Option<u64>, output: OutputIterate, seed: u64) -> Self {
        Iterates {
            t: 0,
            horizon,
            reservoir: (output == OutputIterate::Random).then(|| Reservoir::new(seed)),
            last: None,
        }
    }

    /// True while perturbed steps remain (always, without a horizon).
    pub fn in_phase1(&self) -> bool {
        self.horizon.is_none_or(|h| self.t < h)
    }

    /// Records the iterate just produced by a perturbed step; after step T (the horizon)
    /// with a random output, swaps the parameters for `x̂` and keeps the last iterate.
    pub fn after_step(&mut self, params: &mut [Tensor<T>], extra: &mut Vec<(String, f64)>) {
        self.t = self.t.saturating_add(1);
        if let Some(r) = &mut self.reservoir {
            r.offer(params);
            if self.horizon == Some(self.t) {
                self.last = Some(params.to_vec());
                if let Some(s) = r.sample() {
                    for (p, x) in params.iter_mut().zip(s) {
                        p.data_mut().copy_from_slice(x.data());
                    }
                }
                extra.push(("output_pick".into(), r.pick() as f64));
            }
        }
    }

    pub fn state(&self, prefix: &str, out: &mut Vec<(String, Tensor<T>)>) {
        out.push((format!("{prefix}.t"), encode_u64(&[self.t])));
        if let Some(r) = &self.reservoir {
            r.state(prefix, out);
        }
        if let Some(l) = &self.last {
            push_list(out, &format!("{prefix}.last"), l);
        }
    }

    pub fn load(&mut self, prefix: &str, state: &mut Vec<(String, Tensor<T>)>) -> Result<()> {
        let name = format!("{prefix}.t");
        self.t = take_u64s(state, &name)?
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        if let Some(r) = &mut self.reservoir {
            r.load(prefix, state)?;
        }
        self.last = take_list(state, &format!("{prefix}.last"));
        Ok(())
    }
}

/// Checks the gate ε0 (`--eps0`): ≥ 0, +∞ allowed (a gate that never closes).
pub(crate) fn check_eps0(eps0: Option<f64>) -> Result<()> {
    match eps0 {
        Some(e) if e.is_nan() || e < 0.0 => Err(OptimError::Hyper {
            name: "eps0",
            value: e,
            why: "must be >= 0",
        }),
        _ => Ok(()),
    }
}

/// Evaluates on `probe`, through [`Oracle::eval`] for the whole batch.
pub(crate) fn eval_probe<T>(
    oracle: &mut dyn Oracle<T>,
    params: &[Tensor<T>],
    probe: &Probe,
) -> Result<(T, Vec<Tensor<T>>)> {
    match probe {
        Probe::Batch => oracle.eval(params),
        p => oracle.eval_on(params, p),
    }
}

/// The final update `x ← x − η g − η' v` through SGD's momentum and weight decay: the
/// direction `g + (η'/η) v` is handed to [`Sgd::apply`] with rate η, so without momentum and
/// weight decay this is exactly the paper's update, and with them the momentum buffer carries
/// the whole direction and weight decay is coupled with rate η. When η = 0 the SGD step is a
/// no-op on the parameters and `η' v` is subtracted directly.
pub(crate) fn descend<T: Scalar>(
    sgd: &mut Sgd<T>,
    params: &mut [Tensor<T>],
    g: &[Tensor<T>],
    v: Option<(&[Tensor<T>], f64)>,
    lr: f64,
) {
    match v {
        Some((v, eta_prime)) if eta_prime != 0.0 => {
            if lr > 0.0 {
                let mut d = g.to_vec();
                add_scaled(&mut d, v, eta_prime / lr);
                sgd.apply(params, &d, lr);
            } else {
                sgd.apply(params, g, lr);
                add_scaled(params, v, -eta_prime);
            }
        }
        _ => sgd.apply(params, g, lr),
    }
}

/// Appends `name.0`, `name.1`, ... for the tensors of `list`.
pub(crate) fn push_list<T: Scalar>(
    out: &mut Vec<(String, Tensor<T>)>,
    name: &str,
    list: &[Tensor<T>],
) {
    for (i, t) in list.iter().enumerate() {
        out.push((format!("{name}.{i}"), t.clone()));
    }
}

/// Removes and returns `name.0`, `name.1`, ... (None when `name.0` is absent).
pub(crate) fn take_list<T: Scalar>(
    state: &mut Vec<(String, Tensor<T>)>,
    name: &str,
) -> Option<Vec<Tensor<T>>> {
    let mut out = Vec::new();
    loop {
        let key = format!("{name}.{}", out.len());
        match state.iter().position(|(n, _)| *n == key) {
            Some(i) => out.push(state.swap_remove(i).1),
            None => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes and decodes an integer state tensor (None when absent).
pub(crate) fn take_u64s<T: Scalar>(
    state: &mut Vec<(String, Tensor<T>)>,
    name: &str,
) -> Result<Option<Vec<u64>>> {
    match state.iter().position(|(n, _)| n == name) {
        Some(i) => {
            let (_, t) = state.swap_remove(i);
            decode_u64(&t, name).map(Some)
        }
        None => Ok(None),
    }
}

/// Removes the SGD entries (`sgd.*`) from `state` and loads them into `sgd`.
pub(crate) fn load_sgd<T: Scalar>(
    sgd: &mut Sgd<T>,
    state: &mut Vec<(String, Tensor<T>)>,
) -> Result<()> {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(state)
        .into_iter()
        .partition(|(n, _)| n.starts_with("sgd."));
    *state = rest;
    sgd.load_state(mine)
}

/// Fails when state entries are left over (they belong to another optimizer).
pub(crate) fn no_leftovers<T>(state: &[(String, Tensor<T>)]) -> Result<()> {
    match state.first() {
        Some((n, _)) => Err(OptimError::State(n.clone())),
        None => Ok(()),
    }
}

/// Loads the RNG saved under `name`.
pub(crate) fn load_rng<T: Scalar>(state: &mut Vec<(String, Tensor<T>)>, name: &str) -> Result<Rng> {
    let v = take_u64s(state, name)?.ok_or_else(|| OptimError::State(name.to_string()))?;
    v.first()
        .map(|&s| Rng::from_state(s))
        .ok_or_else(|| OptimError::State(name.to_string()))
}

/// The RNG as a state entry.
pub(crate) fn rng_state<T: Scalar>(rng: &Rng, name: &str) -> (String, Tensor<T>) {
    (name.to_string(), encode_u64(&[rng.state()]))
}
