//! `Model<T>`: a network description ([`Net`]) plus its named state (parameters and
//! BatchNorm buffers) in PyTorch's `state_dict` order, names and layouts; forward pass on a
//! tape; evaluation of loss, gradient and Hessian-vector products; safetensors load and save.

use crate::error::{ModelError, Result};
use crate::io::{
    read_safetensors, read_safetensors_header, strip_name, write_safetensors, RawData, RawTensor,
};
use flatmin_engine::net::{Layer, Net, NormStats, RunningStats};
use flatmin_engine::{BatchStats, Loss, Scalar, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;

pub use flatmin_engine::net::{BN_EPS, BN_MOMENTUM};

/// How BatchNorm layers normalize during a forward pass (default: running statistics, as
/// every measurement assumes unless told otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BnUse {
    /// Batch statistics (the batch statistics are returned; running ones are not touched).
    Train,
    /// Running statistics.
    #[default]
    Eval,
}

impl BnUse {
    /// Parses `train` or `eval`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "train" => Some(BnUse::Train),
            "eval" => Some(BnUse::Eval),
            _ => None,
        }
    }

    /// `"train"` or `"eval"`.
    pub fn name(self) -> &'static str {
        match self {
            BnUse::Train => "train",
            BnUse::Eval => "eval",
        }
    }
}

/// What a state entry is (the network description's [`flatmin_engine::net::StateKind`]).
pub use flatmin_engine::net::StateKind as EntryKind;

/// The value of a state entry.
#[derive(Clone, Debug, PartialEq)]
pub enum EntryValue<T> {
    /// Float tensor (parameters, running statistics).
    Float(Tensor<T>),
    /// Integer counter (`num_batches_tracked`).
    Count(i64),
}

/// One named entry of a model's state.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<T> {
    /// PyTorch `state_dict` key.
    pub name: String,
    /// Shape (`[]` for the counter).
    pub shape: Vec<usize>,
    /// What it is.
    pub kind: EntryKind,
    /// Its value.
    pub value: EntryValue<T>,
}

/// A network with its state.
#[derive(Clone, Debug)]
pub struct Model<T> {
    net: Net,
    entries: Vec<Entry<T>>,
    params: Vec<usize>,
    /// Per BatchNorm layer: entry indices of running_mean, running_var, num_batches_tracked.
    bns: Vec<[usize; 3]>,
    /// The objective every loss, gradient, HVP and curvature measurement of this model uses.
    loss: Loss,
}

/// Loss, logits, gradient and Hessian-vector products of a model on one batch.
#[derive(Clone, Debug)]
pub struct Evaluation<T> {
    /// Logits `[N, 10]`.
    pub logits: Tensor<T>,
    /// Mean loss (the model's [`Model::loss_fn`]).
    pub loss: T,
    /// Gradient per trainable parameter (empty when not requested).
    pub grads: Vec<Tensor<T>>,
    /// `hvps[k][i]`: parameter `i`'s block of `H v_k`.
    pub hvps: Vec<Vec<Tensor<T>>>,
    /// Batch statistics of every BatchNorm layer (train mode only), in layer order.
    pub bn_stats: Vec<BatchStats<T>>,
}

impl<T: Scalar> Model<T> {
    /// A model of `net` with PyTorch's default initialization, drawn from a seeded RNG.
    pub fn new(net: Net, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut entries = Vec::new();
        for spec in net.state() {
            let (name, shape, kind) = (spec.name, spec.shape, spec.kind);
            let value = match kind {
                EntryKind::Weight { fan_in } | EntryKind::Bias { fan_in } => {
                    // kaiming_uniform(a=√5) gives the same bound 1/√fan_in as the bias.
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    EntryValue::Float(Tensor::uniform(&shape, -bound, bound, &mut rng))
                }
                EntryKind::BnWeight | EntryKind::RunningVar => {
                    EntryValue::Float(Tensor::full(&shape, T::one()))
                }
                EntryKind::BnBias | EntryKind::RunningMean => {
                    EntryValue::Float(Tensor::zeros(&shape))
                }
                EntryKind::Count => EntryValue::Count(0),
            };
            entries.push(Entry {
                name,
                shape,
                kind,
                value,
            });
        }
        Self::from_entries(net, entries)
    }

    fn from_entries(net: Net, entries: Vec<Entry<T>>) -> Self {
        let params = (0..entries.len())
            .filter(|&i| entries[i].kind.trainable())
            .collect();
        let bns = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == EntryKind::RunningMean)
            .map(|(i, _)| [i, i + 1, i + 2])
            .collect();
        Model {
            net,
            entries,
            params,
            bns,
            loss: Loss::default(),
        }
    }

    /// The objective (cross-entropy unless set with [`Model::set_loss_fn`]).
    pub fn loss_fn(&self) -> Loss {
        self.loss
    }

    /// Sets the objective of every later evaluation and measurement.
    pub fn set_loss_fn(&mut self, loss: Loss) {
        self.loss = loss;
    }

    /// This model with objective `loss`.
    pub fn with_loss_fn(mut self, loss: Loss) -> Self {
        self.loss = loss;
        self
    }

    /// A preset, a custom MLP spec (see [`Arch::parse`]) or a network file (a path ending in
    /// `.json`, see `docs/network-file.md`), initialized from `seed`.
    pub fn named(name: &str, seed: u64) -> Result<Self> {
        Ok(Self::new(crate::netfile::resolve(name)?, seed))
    }

    /// The network description.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The statistics the BatchNorm layers normalize with in mode `bn`: batch statistics, or
    /// this model's running statistics.
    pub fn norm_stats(&self, bn: BnUse) -> NormStats<'_, T> {
        match bn {
            BnUse::Train => NormStats::Batch,
            BnUse::Eval => NormStats::Running(
                self.bns
                    .iter()
                    .map(|&[rm, rv, _]| RunningStats {
                        mean: self.float(rm).data(),
                        var: self.float(rv).data(),
                    })
                    .collect(),
            ),
        }
    }

    /// All state entries in `state_dict` order.
    pub fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }

    fn float(&self, i: usize) -> &Tensor<T> {
        match &self.entries[i].value {
            EntryValue::Float(t) => t,
            EntryValue::Count(_) => unreachable!("entry {i} is a float tensor by construction"),
        }
    }

    fn float_mut(&mut self, i: usize) -> &mut Tensor<T> {
        match &mut self.entries[i].value {
            EntryValue::Float(t) => t,
            EntryValue::Count(_) => unreachable!("entry {i} is a float tensor by construction"),
        }
    }

    /// Names of the trainable parameters, in order.
    pub fn param_names(&self) -> Vec<&str> {
        self.params
            .iter()
            .map(|&i| self.entries[i].name.as_str())
            .collect()
    }

    /// The trainable parameters, in order.
    pub fn params(&self) -> Vec<&Tensor<T>> {
        self.params.iter().map(|&i| self.float(i)).collect()
    }

    /// Copies of the trainable parameters, in order.
    pub fn params_cloned(&self) -> Vec<Tensor<T>> {
        self.params().into_iter().cloned().collect()
    }

    /// Mutable trainable parameters, in order.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor<T>> {
        let idx = self.params.clone();
        let mut out: Vec<Option<&mut Tensor<T>>> = self
            .entries
            .iter_mut()
            .map(|e| match &mut e.value {
                EntryValue::Float(t) => Some(t),
                EntryValue::Count(_) => None,
            })
            .collect();
        idx.iter()
            .map(|&i| out[i].take().expect("parameter entry"))
            .collect()
    }

    /// Replaces the trainable parameters (same count and shapes, checked).
    pub fn set_params(&mut self, params: Vec<Tensor<T>>) -> Result<()> {
        self.check_count("set_params", "tensors", params.len())?;
        for (slot, p) in self.params_mut().into_iter().zip(params) {
            if slot.shape() != p.shape() {
                return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                    op: "set_params",
                    detail: format!("{:?} for {:?}", p.shape(), slot.shape()),
                }));
            }
            *slot = p;
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|t| t.numel()).sum()
    }

    /// Records the forward pass of `x: [N, 3, 32, 32]` on `tape`, with `params` the tape
    /// variables of the trainable parameters (in order). Returns the logits and, in train
    /// mode, every BatchNorm layer's batch statistics.
    pub fn forward(
        &self,
        tape: &mut Tape<T>,
        params: &[Var],
        x: Var,
        bn: BnUse,
    ) -> Result<(Var, Vec<BatchStats<T>>)> {
        self.check_count("forward", "parameter variables", params.len())?;
        let rec = self.net.record(tape, params, x, &self.norm_stats(bn))?;
        Ok((rec.output(), rec.batch_stats))
    }

    /// Folds train-mode batch statistics into the running statistics as PyTorch does (each
    /// layer's momentum, or the cumulative average when it has none; unbiased variance) and
    /// counts the batch.
    pub fn update_running_stats(&mut self, stats: &[BatchStats<T>]) {
        let bns = self.bns.clone();
        let layers = self.net.batch_norms();
        for (([rm, rv, nbt], s), node) in bns.into_iter().zip(stats).zip(layers) {
            let count = match &mut self.entries[nbt].value {
                EntryValue::Count(c) => {
                    *c += 1;
                    *c
                }
                EntryValue::Float(_) => 1,
            };
            let m = match self.net.node(node).layer {
                Layer::BatchNorm2d {
                    momentum: Some(m), ..
                } => T::c(m),
                _ => T::c(1.0 / count.max(1) as f64),
            };
            for (r, &b) in self.float_mut(rm).data_mut().iter_mut().zip(&s.mean) {
                *r = (T::one() - m) * *r + m * b;
            }
            for (r, &b) in self
                .float_mut(rv)
                .data_mut()
                .iter_mut()
                .zip(&s.var_unbiased)
            {
                *r = (T::one() - m) * *r + m * b;
            }
        }
    }

    /// Logits, mean cross-entropy and, when `grad` is set, the gradient and `H v_k` for every
    /// direction in `dirs` (`dirs[k][i]` shaped like parameter `i`), on one batch.
    pub fn evaluate(
        &self,
        x: &Tensor<T>,
        labels: &[usize],
        dirs: &[Vec<Tensor<T>>],
        bn: BnUse,
        grad: bool,
    ) -> Result<Evaluation<T>> {
        self.evaluate_at(&self.params(), x, labels, dirs, bn, grad)
    }

    /// [`Model::evaluate`] of the mean cross-entropy over several batches: batch `b` weighs
    /// `|b| / N`, so the loss, gradient and HVPs are those of the mean over all `N` images
    /// (with BatchNorm in train mode, each batch normalized by its own statistics). The
    /// logits are concatenated and the batch statistics are those of every batch in turn.
    /// One batch gives exactly [`Model::evaluate`]'s result.
    pub fn evaluate_batches(
        &self,
        batches: &[(Tensor<T>, Vec<usize>)],
        dirs: &[Vec<Tensor<T>>],
        bn: BnUse,
        grad: bool,
    ) -> Result<Evaluation<T>> {
        let total: usize = batches.iter().map(|b| b.1.len()).sum();
        let Some(((x0, l0), rest)) = batches.split_first() else {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "evaluate_batches",
                detail: "no batches".into(),
            }));
        };
        let mut acc = self.evaluate(x0, l0, dirs, bn, grad)?;
        if rest.is_empty() {
            return Ok(acc);
        }
        let weigh = |t: &mut Tensor<T>, w: T| t.data_mut().iter_mut().for_each(|v| *v = *v * w);
        let w0 = T::c(l0.len() as f64 / total as f64);
        acc.loss = acc.loss * w0;
        acc.grads.iter_mut().for_each(|g| weigh(g, w0));
        acc.hvps.iter_mut().flatten().for_each(|h| weigh(h, w0));
        let mut logits = vec![acc.logits.clone()];
        for (x, labels) in rest {
            let e = self.evaluate(x, labels, dirs, bn, grad)?;
            let w = T::c(labels.len() as f64 / total as f64);
            acc.loss = acc.loss + w * e.loss;
            let pairs = acc.grads.iter_mut().zip(&e.grads);
            let hvp_pairs = acc.hvps.iter_mut().flatten().zip(e.hvps.iter().flatten());
            for (a, b) in pairs.chain(hvp_pairs) {
                a.data_mut()
                    .iter_mut()
                    .zip(b.data())
                    .for_each(|(a, &b)| *a = *a + w * b);
            }
            logits.push(e.logits);
            acc.bn_stats.extend(e.bn_stats);
        }
        let rows: usize = logits.iter().map(|t| t.shape()[0]).sum();
        let mut shape = acc.logits.shape().to_vec();
        shape[0] = rows;
        let data = logits
            .iter()
            .flat_map(|t| t.data().iter().copied())
            .collect();
        acc.logits = Tensor::from_vec(&shape, data)?;
        Ok(acc)
    }

    /// Like [`Model::evaluate`], at other parameter values `params` (one tensor per trainable
    /// parameter, in order; e.g. a perturbed point), with this model's BatchNorm buffers.
    pub fn evaluate_at(
        &self,
        params: &[&Tensor<T>],
        x: &Tensor<T>,
        labels: &[usize],
        dirs: &[Vec<Tensor<T>>],
        bn: BnUse,
        grad: bool,
    ) -> Result<Evaluation<T>> {
        self.check_params(params)?;
        let k = dirs.len();
        if !grad && k == 0 {
            return self.infer_at(params, x, labels, bn);
        }
        let tangents = (k > 0).then(|| self.stack_directions(dirs)).transpose()?;
        let (mut out, stacked) =
            self.record_and_differentiate(params, x, labels, tangents, bn, grad)?;
        out.hvps = (0..k)
            .map(|kk| stacked.iter().map(|h| h.index0(kk)).collect())
            .collect();
        Ok(out)
    }

    /// The `K` directions `dirs[k][i]` stacked per parameter, `[K, ...parameter i]` (the form
    /// [`Model::evaluate_stacked`] takes); an error when a direction does not have one tensor
    /// per trainable parameter or the shapes differ.
    pub fn stack_directions(&self, dirs: &[Vec<Tensor<T>>]) -> Result<Vec<Tensor<T>>> {
        for d in dirs {
            self.check_count("stack_directions", "direction tensors", d.len())?;
        }
        (0..self.params.len())
            .map(|i| {
                let parts: Vec<Tensor<T>> = dirs.iter().map(|d| d[i].clone()).collect();
                Ok(Tensor::stack(&parts)?)
            })
            .collect()
    }

    /// [`Model::evaluate`] with the `K` directions already stacked per parameter, as the
    /// engine carries them (`tangents[i]` shaped `[K, ...parameter i]`, e.g. `torch.stack`ed
    /// directions), at this model's parameters. Returns the evaluation (gradient included,
    /// `hvps` left empty) and the HVPs stacked the same way (`[K, ...parameter i]` each), so
    /// nothing is copied to split or join the directions.
    pub fn evaluate_stacked(
        &self,
        x: &Tensor<T>,
        labels: &[usize],
        tangents: Vec<Tensor<T>>,
        bn: BnUse,
    ) -> Result<(Evaluation<T>, Vec<Tensor<T>>)> {
        self.check_count("evaluate_stacked", "stacked tangents", tangents.len())?;
        self.record_and_differentiate(&self.params(), x, labels, Some(tangents), bn, true)
    }

    /// An error unless `params` has one tensor per trainable parameter, shaped like it.
    fn check_params(&self, params: &[&Tensor<T>]) -> Result<()> {
        self.check_count("evaluate_at", "parameter tensors", params.len())?;
        if let Some((got, want)) = params
            .iter()
            .zip(self.params())
            .find(|(a, b)| a.shape() != b.shape())
        {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "evaluate_at",
                detail: format!("{:?} for {:?}", got.shape(), want.shape()),
            }));
        }
        Ok(())
    }

    /// An error naming `op` unless `got` (of `what`) is one per trainable parameter.
    fn check_count(&self, op: &'static str, what: &str, got: usize) -> Result<()> {
        if got == self.params.len() {
            return Ok(());
        }
        Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
            op,
            detail: format!(
                "{got} {what} for the model's {} parameters",
                self.params.len()
            ),
        }))
    }

    /// One recorded pass at `params` with `tangents` (per parameter, `[K, ...]`; `None`: no
    /// directions) and, when `grad` or tangents are given, its backward pass: the evaluation
    /// (without `hvps`) and the stacked HVPs per parameter (empty without tangents).
    fn record_and_differentiate(
        &self,
        params: &[&Tensor<T>],
        x: &Tensor<T>,
        labels: &[usize],
        tangents: Option<Vec<Tensor<T>>>,
        bn: BnUse,
        grad: bool,
    ) -> Result<(Evaluation<T>, Vec<Tensor<T>>)> {
        let k = tangents
            .as_ref()
            .and_then(|t| t.first())
            .map_or(0, |t| t.shape().first().copied().unwrap_or(0));
        let mut tape = Tape::new(k);
        let mut tangents = tangents.map(Vec::into_iter);
        let mut vars = Vec::with_capacity(params.len());
        for &p in params {
            let tangent = tangents.as_mut().and_then(Iterator::next);
            vars.push(if grad || k > 0 {
                tape.param(p.clone(), tangent)?
            } else {
                tape.constant(p.clone())
            });
        }
        let xv = tape.constant(x.clone());
        let (logits, bn_stats) = self.forward(&mut tape, &vars, xv, bn)?;
        let loss = tape.loss(self.loss, logits, labels)?;
        let mut out = Evaluation {
            logits: tape.value(logits).clone(),
            loss: tape.value(loss).data()[0],
            grads: Vec::new(),
            hvps: Vec::new(),
            bn_stats,
        };
        let mut stacked = Vec::new();
        if grad || k > 0 {
            let mut g = tape.backward(loss)?;
            for &v in &vars {
                out.grads.push(
                    g.take_grad(v)
                        .unwrap_or_else(|| Tensor::zeros(tape.value(v).shape())),
                );
                if k > 0 {
                    stacked.push(g.take_hvp(v).unwrap_or_else(|| g.hvp(&tape, v)));
                }
            }
        }
        Ok((out, stacked))
    }

    /// [`Model::evaluate_at`] without gradients: the logits from [`Net::infer`] (no backward
    /// state, fused convolution epilogues), the same values bit for bit.
    fn infer_at(
        &self,
        params: &[&Tensor<T>],
        x: &Tensor<T>,
        labels: &[usize],
        bn: BnUse,
    ) -> Result<Evaluation<T>> {
        let (logits, bn_stats) = self.net.infer(params, x, &self.norm_stats(bn))?;
        let mut tape = Tape::new(0);
        let lv = tape.constant(logits);
        let loss = tape.loss(self.loss, lv, labels)?;
        Ok(Evaluation {
            logits: tape.value(lv).clone(),
            loss: tape.value(loss).data()[0],
            grads: Vec::new(),
            hvps: Vec::new(),
            bn_stats,
        })
    }

    /// Elements (scalars) a training forward pass records on its tape for a batch of
    /// `n` images: the parameters, the input and every intermediate value, measured by
    /// recording the pass (BatchNorm in train mode, then the loss) on `n` blank images.
    /// Memory estimates use it with `n` = 1 and 2 to find the per-image share.
    pub fn tape_elements(&self, n: usize) -> Result<usize> {
        let mut tape = Tape::new(0);
        let vars = self
            .params()
            .into_iter()
            .map(|p| tape.param(p.clone(), None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut shape = vec![n];
        shape.extend_from_slice(self.net.input_shape());
        let xv = tape.constant(Tensor::zeros(&shape));
        let (logits, _) = self.forward(&mut tape, &vars, xv, BnUse::Train)?;
        tape.loss(self.loss, logits, &vec![0; n])?;
        Ok(tape.value_elements())
    }

    /// The state as named tensors in `state_dict` order (floats in this model's dtype).
    pub fn to_raw(&self) -> Vec<RawTensor> {
        self.entries
            .iter()
            .map(|e| RawTensor {
                name: e.name.clone(),
                shape: e.shape.clone(),
                data: match &e.value {
                    EntryValue::Float(t) => float_raw(t),
                    EntryValue::Count(c) => RawData::I64(vec![*c]),
                },
            })
            .collect()
    }

    /// Saves the full state (parameters and buffers) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_safetensors(path, &self.to_raw())
    }

    /// Loads the full state from a safetensors file written by PyTorch or flatmin. Float
    /// tensors may be f32 or f64; every tensor must be present with the right shape, and
    /// no extra tensor may be present. Parameters and statistics must be finite.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.load_stripped(path, None)
    }

    /// [`Model::load`] of a file whose names carry `prefix` (`--strip-prefix`, for a
    /// wrapped `state_dict` such as `model.layers.0.weight`): it is removed where present.
    pub fn load_stripped(&mut self, path: &Path, prefix: Option<&str>) -> Result<()> {
        // Names and shapes from the header first: a file holding other tensors (or a huge
        // extra one) is refused before its data is read.
        let header: Vec<(String, Vec<usize>)> = read_safetensors_header(path)?
            .into_iter()
            .map(|(n, s)| (strip_name(&n, prefix).to_string(), s))
            .collect();
        check_layout(path, &self.state_layout(), &header)?;
        let mut raw = read_safetensors(path)?;
        for t in &mut raw {
            t.name = strip_name(&t.name, prefix).to_string();
        }
        self.load_raw(path, raw)
    }

    /// Names and shapes of every state entry, in `state_dict` order.
    fn state_layout(&self) -> Vec<(&str, &[usize])> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.shape.as_slice()))
            .collect()
    }

    /// Names and shapes of the trainable parameters, in order.
    fn param_layout(&self) -> Vec<(&str, &[usize])> {
        self.param_names()
            .into_iter()
            .zip(self.params().into_iter().map(|p| p.shape()))
            .collect()
    }

    /// Like [`Model::load`], from tensors already read (`path` names them in errors).
    pub fn load_raw(&mut self, path: &Path, raw: Vec<RawTensor>) -> Result<()> {
        let found: Vec<(String, Vec<usize>)> = raw
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        check_layout(path, &self.state_layout(), &found)?;
        let mut by_name: std::collections::HashMap<String, RawTensor> =
            raw.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut new_values = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let t = by_name
                .remove(&e.name)
                .expect("check_layout found every entry");
            new_values.push(match (&e.value, &t.data) {
                (EntryValue::Count(_), RawData::I64(v)) => EntryValue::Count(v[0]),
                (EntryValue::Count(_), other) => {
                    return Err(ModelError::Dtype {
                        path: path.to_path_buf(),
                        name: e.name.clone(),
                        dtype: format!("{other:?}").chars().take(3).collect(),
                        expected: "I64",
                    })
                }
                (EntryValue::Float(_), data) => {
                    let v = data.to_f64().ok_or_else(|| ModelError::Dtype {
                        path: path.to_path_buf(),
                        name: e.name.clone(),
                        dtype: "I64".into(),
                        expected: "F32 or F64",
                    })?;
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(ModelError::NonFinite {
                            path: path.to_path_buf(),
                            name: e.name.clone(),
                        });
                    }
                    EntryValue::Float(Tensor::from_vec(
                        &e.shape,
                        v.into_iter().map(T::c).collect(),
                    )?)
                }
            });
        }
        for (e, v) in self.entries.iter_mut().zip(new_values) {
            e.value = v;
        }
        Ok(())
    }

    /// The same model in another float type.
    pub fn cast<U: Scalar>(&self) -> Model<U> {
        let entries = self
            .entries
            .iter()
            .map(|e| Entry {
                name: e.name.clone(),
                shape: e.shape.clone(),
                kind: e.kind,
                value: match &e.value {
                    EntryValue::Float(t) => EntryValue::Float(t.cast()),
                    EntryValue::Count(c) => EntryValue::Count(*c),
                },
            })
            .collect();
        Model::from_entries(self.net.clone(), entries).with_loss_fn(self.loss)
    }

    /// Reads one tensor per trainable parameter, by name (e.g. HVP directions), from a
    /// safetensors file; missing, extra or mis-shaped tensors are errors naming them.
    pub fn load_param_like(&self, path: &Path) -> Result<Vec<Tensor<T>>> {
        let layout = self.param_layout();
        check_layout(path, &layout, &read_safetensors_header(path)?)?;
        let raw = read_safetensors(path)?;
        let found: Vec<(String, Vec<usize>)> = raw
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        check_layout(path, &layout, &found)?;
        let names = self.param_names();
        let mut out = Vec::with_capacity(names.len());
        for (name, p) in names.iter().zip(self.params()) {
            let t = raw
                .iter()
                .find(|t| t.name == *name)
                .expect("check_layout found every parameter");
            let v = t.data.to_f64().ok_or_else(|| ModelError::Dtype {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: "I64".into(),
                expected: "F32 or F64",
            })?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(ModelError::NonFinite {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                });
            }
            out.push(Tensor::from_vec(
                p.shape(),
                v.into_iter().map(T::c).collect(),
            )?);
        }
        Ok(out)
    }
}

/// Checks the tensors a file holds (`found`: names and shapes) against the ones expected,
/// in this order so the message does not depend on the file's layout: the first expected
/// tensor that is missing, then the alphabetically first unexpected one, then the first
/// expected tensor whose shape differs.
fn check_layout(
    path: &Path,
    expected: &[(&str, &[usize])],
    found: &[(String, Vec<usize>)],
) -> Result<()> {
    let shape_of = |name: &str| found.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    let names = || {
        let f: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        let e: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
        crate::error::names_held_and_expected(&f, &e)
    };
    if let Some((name, _)) = expected.iter().find(|(n, _)| shape_of(n).is_none()) {
        return Err(ModelError::Missing {
            path: path.to_path_buf(),
            name: name.to_string(),
            names: names(),
        });
    }
    let mut unexpected: Vec<&str> = found
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !expected.iter().any(|(e, _)| e == n))
        .collect();
    unexpected.sort_unstable();
    if let Some(name) = unexpected.first() {
        return Err(ModelError::Unexpected {
            path: path.to_path_buf(),
            name: name.to_string(),
            names: names(),
        });
    }
    for (name, shape) in expected {
        let got = shape_of(name).expect("checked above");
        if got.as_slice() != *shape {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
    }
    Ok(())
}

/// A float tensor as raw file data in its own precision.
pub fn float_raw<T: Scalar>(t: &Tensor<T>) -> RawData {
    match T::DTYPE {
        flatmin_engine::DType::F32 => RawData::F32(
            t.data()
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect(),
        ),
        flatmin_engine::DType::F64 => RawData::F64(
            t.data()
                .iter()
                .map(|x| x.to_f64().unwrap_or(f64::NAN))
                .collect(),
        ),
    }
}
