//! `Model<T>`: an architecture plus its named state (parameters and BatchNorm buffers) in
//! PyTorch's `state_dict` order, names and layouts; forward pass on a tape; evaluation of
//! loss, gradient and Hessian-vector products; safetensors load and save.

use crate::arch::{Activation, Arch};
use crate::error::{ModelError, Result};
use crate::io::{read_safetensors, write_safetensors, RawData, RawTensor};
use flatmin_engine::{BatchStats, BnMode, Scalar, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::Path;

/// BatchNorm momentum (PyTorch default).
pub const BN_MOMENTUM: f64 = 0.1;
/// BatchNorm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;

/// How BatchNorm layers normalize during a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnUse {
    /// Batch statistics (the batch statistics are returned; running ones are not touched).
    Train,
    /// Running statistics.
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

/// What a state entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A Linear or Conv weight (PyTorch default init: kaiming-uniform, a = √5).
    Weight {
        /// Fan-in of the layer.
        fan_in: usize,
    },
    /// A Linear or Conv bias (uniform ±1/√fan_in).
    Bias {
        /// Fan-in of the layer.
        fan_in: usize,
    },
    /// BatchNorm scale γ (init 1).
    BnWeight,
    /// BatchNorm shift β (init 0).
    BnBias,
    /// BatchNorm running mean (buffer, init 0).
    RunningMean,
    /// BatchNorm running variance (buffer, init 1).
    RunningVar,
    /// BatchNorm `num_batches_tracked` (int64 buffer).
    Count,
}

impl EntryKind {
    /// True for trainable parameters.
    pub fn trainable(self) -> bool {
        matches!(
            self,
            EntryKind::Weight { .. }
                | EntryKind::Bias { .. }
                | EntryKind::BnWeight
                | EntryKind::BnBias
        )
    }
}

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
    arch: Arch,
    entries: Vec<Entry<T>>,
    params: Vec<usize>,
    /// Per BatchNorm layer: entry indices of running_mean, running_var, num_batches_tracked.
    bns: Vec<[usize; 3]>,
}

/// Layout builder: entries in registration order.
struct Layout(Vec<(String, Vec<usize>, EntryKind)>);

impl Layout {
    fn linear(&mut self, name: &str, fan_in: usize, out: usize, bias: bool) {
        self.0.push((
            format!("{name}.weight"),
            vec![out, fan_in],
            EntryKind::Weight { fan_in },
        ));
        if bias {
            self.0.push((
                format!("{name}.bias"),
                vec![out],
                EntryKind::Bias { fan_in },
            ));
        }
    }
    fn conv(&mut self, name: &str, cin: usize, cout: usize, k: usize, bias: bool) {
        let fan_in = cin * k * k;
        self.0.push((
            format!("{name}.weight"),
            vec![cout, cin, k, k],
            EntryKind::Weight { fan_in },
        ));
        if bias {
            self.0.push((
                format!("{name}.bias"),
                vec![cout],
                EntryKind::Bias { fan_in },
            ));
        }
    }
    fn bn(&mut self, name: &str, c: usize) {
        for (suffix, kind) in [
            ("weight", EntryKind::BnWeight),
            ("bias", EntryKind::BnBias),
            ("running_mean", EntryKind::RunningMean),
            ("running_var", EntryKind::RunningVar),
        ] {
            self.0.push((format!("{name}.{suffix}"), vec![c], kind));
        }
        self.0.push((
            format!("{name}.num_batches_tracked"),
            vec![],
            EntryKind::Count,
        ));
    }
}

/// Trainable parameters of `arch`'s layout (no tensor is allocated). Cannot overflow for an
/// architecture [`Arch::parse`] accepted (at most [`crate::arch::MAX_PARAMS`]).
pub(crate) fn layout_params(arch: &Arch) -> usize {
    layout(arch)
        .0
        .iter()
        .filter(|(_, _, kind)| kind.trainable())
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum()
}

fn layout(arch: &Arch) -> Layout {
    let mut l = Layout(Vec::new());
    match arch {
        Arch::Mlp { widths, .. } => {
            for (i, w) in widths.windows(2).enumerate() {
                l.linear(&format!("layers.{i}"), w[0], w[1], true);
            }
        }
        Arch::Cnn => {
            l.conv("conv1", 3, 32, 3, true);
            l.conv("conv2", 32, 64, 3, true);
            l.linear("fc1", 64 * 8 * 8, 128, true);
            l.linear("fc2", 128, 10, true);
        }
        Arch::ResNet { blocks, widths } => {
            l.conv("conv1", 3, widths[0], 3, false);
            l.bn("bn1", widths[0]);
            let mut cin = widths[0];
            for (i, (&nb, &w)) in blocks.iter().zip(widths).enumerate() {
                for j in 0..nb {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let p = format!("layer{}.{j}", i + 1);
                    l.conv(&format!("{p}.conv1"), cin, w, 3, false);
                    l.bn(&format!("{p}.bn1"), w);
                    l.conv(&format!("{p}.conv2"), w, w, 3, false);
                    l.bn(&format!("{p}.bn2"), w);
                    if stride != 1 || cin != w {
                        l.conv(&format!("{p}.shortcut.0"), cin, w, 1, false);
                        l.bn(&format!("{p}.shortcut.1"), w);
                    }
                    cin = w;
                }
            }
            l.linear("linear", cin, 10, true);
        }
    }
    l
}

/// Walks parameters and BatchNorm layers in registration order during a forward pass.
struct Cursor<'a, T> {
    model: &'a Model<T>,
    params: &'a [Var],
    next_param: usize,
    next_bn: usize,
    bn: BnUse,
    stats: Vec<BatchStats<T>>,
}

impl<T: Scalar> Cursor<'_, T> {
    fn param(&mut self) -> Var {
        let v = self.params[self.next_param];
        self.next_param += 1;
        v
    }

    fn linear(&mut self, tape: &mut Tape<T>, x: Var) -> Result<Var> {
        let (w, b) = (self.param(), self.param());
        Ok(tape.linear(x, w, Some(b))?)
    }

    fn conv(
        &mut self,
        tape: &mut Tape<T>,
        x: Var,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Var> {
        let w = self.param();
        let b = if bias { Some(self.param()) } else { None };
        Ok(tape.conv2d(x, w, b, stride, pad)?)
    }

    fn bn(&mut self, tape: &mut Tape<T>, x: Var) -> Result<Var> {
        let (g, b) = (self.param(), self.param());
        let [rm, rv, _] = self.model.bns[self.next_bn];
        self.next_bn += 1;
        let mode = match self.bn {
            BnUse::Train => BnMode::Train,
            BnUse::Eval => BnMode::Eval {
                mean: self.model.float(rm).data(),
                var: self.model.float(rv).data(),
            },
        };
        let (y, stats) = tape.batch_norm2d(x, g, b, mode, BN_EPS)?;
        self.stats.extend(stats);
        Ok(y)
    }
}

/// Loss, logits, gradient and Hessian-vector products of a model on one batch.
#[derive(Clone, Debug)]
pub struct Evaluation<T> {
    /// Logits `[N, 10]`.
    pub logits: Tensor<T>,
    /// Mean cross-entropy.
    pub loss: T,
    /// Gradient per trainable parameter (empty when not requested).
    pub grads: Vec<Tensor<T>>,
    /// `hvps[k][i]`: parameter `i`'s block of `H v_k`.
    pub hvps: Vec<Vec<Tensor<T>>>,
    /// Batch statistics of every BatchNorm layer (train mode only), in layer order.
    pub bn_stats: Vec<BatchStats<T>>,
}

impl<T: Scalar> Model<T> {
    /// A model with PyTorch's default initialization, drawn from a seeded RNG.
    pub fn new(arch: Arch, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut entries = Vec::new();
        for (name, shape, kind) in layout(&arch).0 {
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
        Self::from_entries(arch, entries)
    }

    fn from_entries(arch: Arch, entries: Vec<Entry<T>>) -> Self {
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
            arch,
            entries,
            params,
            bns,
        }
    }

    /// A preset or custom model by name (see [`Arch::parse`]), initialized from `seed`.
    pub fn named(name: &str, seed: u64) -> Result<Self> {
        Ok(Self::new(Arch::parse(name)?, seed))
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
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
        if params.len() != self.params.len() {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "set_params",
                detail: format!(
                    "{} tensors for {} parameters",
                    params.len(),
                    self.params.len()
                ),
            }));
        }
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
        if params.len() != self.params.len() {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "forward",
                detail: format!(
                    "{} parameter variables for {} parameters",
                    params.len(),
                    self.params.len()
                ),
            }));
        }
        let xs = tape.value(x).shape();
        if xs.len() != 4 || xs[1..] != [3, 32, 32] {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "forward",
                detail: format!("input {xs:?}, want [N, 3, 32, 32]"),
            }));
        }
        let mut c = Cursor {
            model: self,
            params,
            next_param: 0,
            next_bn: 0,
            bn,
            stats: Vec::new(),
        };
        let logits = match &self.arch {
            Arch::Mlp {
                widths,
                act,
                input_pool,
            } => {
                let mut h = x;
                if *input_pool > 1 {
                    h = tape.avg_pool2d(h, *input_pool, *input_pool)?;
                }
                h = tape.flatten(h)?;
                let layers = widths.len() - 1;
                for i in 0..layers {
                    h = c.linear(tape, h)?;
                    if i + 1 < layers {
                        h = apply(tape, h, *act)?;
                    }
                }
                h
            }
            Arch::Cnn => {
                // max_pool2d(relu(z)) is computed as relu(max_pool2d(z)): ReLU is monotone, so
                // values, gradients and HVPs are the same (a window with no positive entry
                // gets a zero gradient either way), on a quarter of the elements.
                let mut h = c.conv(tape, x, 1, 1, true)?;
                h = tape.max_pool2d(h, 2, 2)?;
                h = tape.relu(h)?;
                h = c.conv(tape, h, 1, 1, true)?;
                h = tape.max_pool2d(h, 2, 2)?;
                h = tape.relu(h)?;
                h = tape.flatten(h)?;
                h = c.linear(tape, h)?;
                h = tape.relu(h)?;
                c.linear(tape, h)?
            }
            Arch::ResNet { blocks, widths } => {
                let mut h = c.conv(tape, x, 1, 1, false)?;
                h = c.bn(tape, h)?;
                h = tape.relu(h)?;
                let mut cin = widths[0];
                for (i, (&nb, &w)) in blocks.iter().zip(widths).enumerate() {
                    for j in 0..nb {
                        let stride = if i > 0 && j == 0 { 2 } else { 1 };
                        let mut o = c.conv(tape, h, stride, 1, false)?;
                        o = c.bn(tape, o)?;
                        o = tape.relu(o)?;
                        o = c.conv(tape, o, 1, 1, false)?;
                        o = c.bn(tape, o)?;
                        let short = if stride != 1 || cin != w {
                            let s = c.conv(tape, h, stride, 0, false)?;
                            c.bn(tape, s)?
                        } else {
                            h
                        };
                        o = tape.add(o, short)?;
                        h = tape.relu(o)?;
                        cin = w;
                    }
                }
                h = tape.global_avg_pool(h)?;
                c.linear(tape, h)?
            }
        };
        Ok((logits, c.stats))
    }

    /// Folds train-mode batch statistics into the running statistics as PyTorch does
    /// (momentum 0.1, unbiased variance) and counts the batch.
    pub fn update_running_stats(&mut self, stats: &[BatchStats<T>]) {
        let m = T::c(BN_MOMENTUM);
        let bns = self.bns.clone();
        for ([rm, rv, nbt], s) in bns.into_iter().zip(stats) {
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
            if let EntryValue::Count(c) = &mut self.entries[nbt].value {
                *c += 1;
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
        if params.len() != self.params.len()
            || params
                .iter()
                .zip(self.params())
                .any(|(a, b)| a.shape() != b.shape())
        {
            return Err(ModelError::Engine(flatmin_engine::EngineError::Shape {
                op: "evaluate_at",
                detail: format!(
                    "{} parameter tensors do not match the model's {}",
                    params.len(),
                    self.params.len()
                ),
            }));
        }
        let k = dirs.len();
        let mut tape = Tape::new(k);
        let mut vars = Vec::with_capacity(self.params.len());
        for (i, &p) in params.iter().enumerate() {
            let tangent = if k == 0 {
                None
            } else {
                let parts: Vec<Tensor<T>> = dirs.iter().map(|d| d[i].clone()).collect();
                Some(Tensor::stack(&parts)?)
            };
            vars.push(if grad || k > 0 {
                tape.param(p.clone(), tangent)?
            } else {
                tape.constant(p.clone())
            });
        }
        let xv = tape.constant(x.clone());
        let (logits, bn_stats) = self.forward(&mut tape, &vars, xv, bn)?;
        let loss = tape.cross_entropy(logits, labels)?;
        let mut out = Evaluation {
            logits: tape.value(logits).clone(),
            loss: tape.value(loss).data()[0],
            grads: Vec::new(),
            hvps: Vec::new(),
            bn_stats,
        };
        if grad || k > 0 {
            let mut g = tape.backward(loss)?;
            out.hvps = (0..k).map(|_| Vec::with_capacity(vars.len())).collect();
            for &v in &vars {
                out.grads.push(
                    g.take_grad(v)
                        .unwrap_or_else(|| Tensor::zeros(tape.value(v).shape())),
                );
                if k > 0 {
                    let h = g.take_hvp(v).unwrap_or_else(|| g.hvp(&tape, v));
                    for (kk, slot) in out.hvps.iter_mut().enumerate() {
                        slot.push(h.index0(kk));
                    }
                }
            }
        }
        Ok(out)
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
        let xv = tape.constant(Tensor::zeros(&[n, 3, 32, 32]));
        let (logits, _) = self.forward(&mut tape, &vars, xv, BnUse::Train)?;
        tape.cross_entropy(logits, &vec![0; n])?;
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
        let raw = read_safetensors(path)?;
        self.load_raw(path, raw)
    }

    /// Like [`Model::load`], from tensors already read (`path` names them in errors).
    pub fn load_raw(&mut self, path: &Path, raw: Vec<RawTensor>) -> Result<()> {
        // Report missing tensors first, then the alphabetically first unexpected one, so the
        // message does not depend on the file's data order.
        let mut unexpected: Vec<&str> = raw
            .iter()
            .filter(|t| !self.entries.iter().any(|e| e.name == t.name))
            .map(|t| t.name.as_str())
            .collect();
        unexpected.sort_unstable();
        if let Some(missing) = self
            .entries
            .iter()
            .find(|e| !raw.iter().any(|t| t.name == e.name))
        {
            return Err(ModelError::Missing {
                path: path.to_path_buf(),
                name: missing.name.clone(),
            });
        }
        if let Some(name) = unexpected.first() {
            return Err(ModelError::Unexpected {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        }
        let mut by_name: std::collections::HashMap<String, RawTensor> =
            raw.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut new_values = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let t = by_name.remove(&e.name).ok_or_else(|| ModelError::Missing {
                path: path.to_path_buf(),
                name: e.name.clone(),
            })?;
            if t.shape != e.shape {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name: e.name.clone(),
                    expected: e.shape.clone(),
                    got: t.shape,
                });
            }
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
        Model::from_entries(self.arch.clone(), entries)
    }

    /// Reads one tensor per trainable parameter, by name (e.g. HVP directions), from a
    /// safetensors file; missing, extra or mis-shaped tensors are errors naming them.
    pub fn load_param_like(&self, path: &Path) -> Result<Vec<Tensor<T>>> {
        let raw = read_safetensors(path)?;
        let names = self.param_names();
        let mut extra: Vec<&str> = raw
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !names.contains(n))
            .collect();
        extra.sort_unstable();
        let mut out = Vec::with_capacity(names.len());
        for (name, p) in names.iter().zip(self.params()) {
            let t = raw
                .iter()
                .find(|t| t.name == *name)
                .ok_or_else(|| ModelError::Missing {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                })?;
            if t.shape != p.shape() {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: p.shape().to_vec(),
                    got: t.shape.clone(),
                });
            }
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
        if let Some(name) = extra.first() {
            return Err(ModelError::Unexpected {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        }
        Ok(out)
    }
}

fn apply<T: Scalar>(tape: &mut Tape<T>, h: Var, act: Activation) -> Result<Var> {
    Ok(tape.unary(h, act.unary())?)
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
