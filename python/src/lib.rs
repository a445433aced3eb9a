//! `flatmin._native`: the thin PyO3 layer under the `flatmin` Python package. It converts
//! numpy arrays to and from flatmin tensors, checks arguments (naming them), releases the GIL
//! while the engine works, and calls the Rust library: [`Model::evaluate_batches`] for
//! gradients and HVPs, [`measure::trace`] for traces and [`spectrum`] for eigenvalues and
//! densities. The Python wrapper (`flatmin/__init__.py`) turns torch tensors and batch
//! iterators into the arrays and lists taken here.

mod convert;

use convert::{array, labels, model_error, tensor, value_error, vector};
use flatmin_engine::curvature::{LanczosOptions, SlqOptions, Which};
use flatmin_engine::{Loss, Scalar, Tensor};
use flatmin_models::io::{RawData, RawTensor};
use flatmin_models::measure::{self, TraceMethod, TraceOptions};
use flatmin_models::spectrum::{self, DensityOptions, EigenOptions};
use flatmin_models::{BnUse, EntryValue, Model};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Batches as the Python layer passes them: `(x, y)` numpy arrays.
type PyBatches<'py> = Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>;
/// One direction: `(parameter name, array)` pairs.
type PyDirection<'py> = Vec<(String, Bound<'py, PyAny>)>;
/// Batches as the library takes them.
type Batches<T> = Vec<(Tensor<T>, Vec<usize>)>;

/// The thread pool set by `set_num_threads` (None: rayon's global pool, which honours
/// `RAYON_NUM_THREADS`).
static POOL: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);

/// Runs `f` on the chosen thread pool, without the GIL.
fn compute<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.lock().map(|p| p.clone()).unwrap_or(None);
    py.detach(move || match pool {
        Some(p) => p.install(f),
        // On a worker of the global pool, as `install` does for a chosen pool: parallel
        // regions then fork from inside the pool instead of waking it from outside.
        None => rayon::scope(|_| f()),
    })
}

/// Sets the number of worker threads of every later call (`None`: rayon's default, the
/// `RAYON_NUM_THREADS` variable or one per core). Results are bit-identical for any count.
#[pyfunction]
#[pyo3(signature = (threads=None))]
fn set_num_threads(threads: Option<usize>) -> PyResult<()> {
    let pool = match threads {
        None => None,
        Some(0) => return Err(value_error("threads: must be at least 1")),
        Some(t) => Some(Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .map_err(|e| value_error(format!("threads: cannot start {t} threads: {e}")))?,
        )),
    };
    *POOL
        .lock()
        .map_err(|_| value_error("thread pool lock poisoned"))? = pool;
    Ok(())
}

/// The worker threads later calls use.
#[pyfunction]
fn num_threads() -> usize {
    match POOL.lock().ok().and_then(|p| p.clone()) {
        Some(p) => p.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// The float type of a computation.
#[derive(Clone, Copy)]
enum DType {
    F32,
    F64,
}

fn dtype(s: &str) -> PyResult<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(value_error(format!(
            "dtype: expected 'f32' or 'f64', got {other:?}"
        ))),
    }
}

fn bn_mode(s: &str) -> PyResult<BnUse> {
    BnUse::parse(s).ok_or_else(|| {
        value_error(format!(
            "bn_mode: expected 'train' (batch statistics) or 'eval' (running statistics), got {s:?}"
        ))
    })
}

/// A network with its state: parameters and buffers in float64, and the same state rounded
/// to float32 for float32 computations (both replaced together by `load_state_items`).
#[pyclass(module = "flatmin._native", name = "Net")]
struct Net {
    model: Model<f64>,
    model32: Model<f32>,
}

impl Net {
    fn new(model: Model<f64>) -> Self {
        Net {
            model32: model.cast(),
            model,
        }
    }
}

/// The float types a computation runs in, and the matching copy of a [`Net`]'s model.
trait Compute: Scalar + numpy::Element {
    fn model(net: &Net) -> &Model<Self>;
}

impl Compute for f64 {
    fn model(net: &Net) -> &Model<f64> {
        &net.model
    }
}

impl Compute for f32 {
    fn model(net: &Net) -> &Model<f32> {
        &net.model32
    }
}

#[pymethods]
impl Net {
    /// A preset (`tiny-tanh`, `mlp-s`, `cnn-s`, `resnet20`, `resnet18`), a custom
    /// `mlp:W1,W2,...:ACT`, or a network file path, with PyTorch's default initialization
    /// drawn from `seed`.
    #[staticmethod]
    #[pyo3(signature = (name, seed=0))]
    fn preset(name: &str, seed: u64) -> PyResult<Self> {
        Ok(Net::new(Model::named(name, seed).map_err(model_error)?))
    }

    /// Reads a network file (docs/network-file.md).
    #[staticmethod]
    #[pyo3(signature = (path, seed=0))]
    fn load(path: &str, seed: u64) -> PyResult<Self> {
        let net = flatmin_models::read_network(Path::new(path)).map_err(model_error)?;
        Ok(Net::new(Model::new(net, seed)))
    }

    /// Parses the text of a network file; `origin` names it in errors.
    #[staticmethod]
    #[pyo3(signature = (text, origin="network", seed=0))]
    fn from_json(text: &str, origin: &str, seed: u64) -> PyResult<Self> {
        let net = flatmin_models::parse_network(text, origin).map_err(model_error)?;
        Ok(Net::new(Model::new(net, seed)))
    }

    /// The network file text of this network.
    fn network_json(&self) -> String {
        flatmin_models::network_json(self.model.net())
    }

    /// Names of the trainable parameters, in order.
    #[getter]
    fn param_names(&self) -> Vec<String> {
        self.model
            .param_names()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    /// Shapes of the trainable parameters, in order.
    #[getter]
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.model
            .params()
            .iter()
            .map(|p| p.shape().to_vec())
            .collect()
    }

    /// The objective of every loss, gradient, HVP and curvature measurement: `"ce"` (softmax
    /// cross-entropy, the default) or `"mse"` (squared error against one-hot targets, mean
    /// over all logits).
    #[getter]
    fn loss(&self) -> &'static str {
        self.model.loss_fn().name()
    }

    /// Sets the objective (`"ce"` or `"mse"`).
    #[setter]
    fn set_loss(&mut self, name: &str) -> PyResult<()> {
        let loss = Loss::parse(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "loss: expected 'ce' (cross-entropy) or 'mse' (one-hot squared error), got {name:?}"
            ))
        })?;
        self.model.set_loss_fn(loss);
        self.model32.set_loss_fn(loss);
        Ok(())
    }

    /// Number of trainable scalars.
    #[getter]
    fn num_params(&self) -> usize {
        self.model.num_params()
    }

    /// Shape of one input sample.
    #[getter]
    fn input_shape(&self) -> Vec<usize> {
        self.model.net().input_shape().to_vec()
    }

    /// Number of classes (logits per sample).
    #[getter]
    fn num_classes(&self) -> usize {
        self.model.net().output_shape().iter().product()
    }

    /// Whether the network has BatchNorm layers (so `bn_mode` matters).
    #[getter]
    fn has_batch_norm(&self) -> bool {
        self.model.net().has_batch_norm()
    }

    /// The state as `(name, array)` pairs in `state_dict` order: float64 arrays, and a 0-d
    /// int64 array for each `num_batches_tracked`.
    fn state_items<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        let mut out = Vec::with_capacity(self.model.entries().len());
        for e in self.model.entries() {
            let value = match &e.value {
                EntryValue::Float(t) => array(py, t.clone())?,
                EntryValue::Count(c) => {
                    let a = numpy::PyArray1::from_vec(py, vec![*c]);
                    a.reshape(Vec::<usize>::new())?.into_any()
                }
            };
            out.push((e.name.clone(), value));
        }
        Ok(out)
    }

    /// Loads a state given as `(name, array)` pairs (float32 or float64; int64 for
    /// `num_batches_tracked`): every entry must be present with its shape.
    fn load_state_items(&mut self, items: Vec<(String, Bound<'_, PyAny>)>) -> PyResult<()> {
        let raw = items
            .iter()
            .map(|(name, obj)| raw_tensor(name, obj))
            .collect::<PyResult<Vec<_>>>()?;
        self.model
            .load_raw(Path::new("state_dict"), raw)
            .map_err(model_error)?;
        self.model32 = self.model.cast();
        Ok(())
    }

    /// Logits, loss, gradient and `H v` for each direction, over the batches (the mean
    /// cross-entropy over all their images). Returns a dict: `loss`, `logits`, `grad`
    /// {name: array}, `hvp` [ {name: array} per direction ].
    #[pyo3(signature = (batches, directions, dtype="f64", bn_mode="eval"))]
    fn hvp<'py>(
        &self,
        py: Python<'py>,
        batches: PyBatches<'py>,
        directions: Vec<PyDirection<'py>>,
        dtype: &str,
        bn_mode: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let bn = self::bn_mode(bn_mode)?;
        match self::dtype(dtype)? {
            DType::F64 => self.hvp_in::<f64>(py, &batches, &directions, bn),
            DType::F32 => self.hvp_in::<f32>(py, &batches, &directions, bn),
        }
    }

    /// The Hessian trace by `method`, as a JSON object (text) with the keys of
    /// `flatmin trace --json`, and the per-tensor traces and (when asked) diagonals.
    #[pyo3(signature = (batches, method="exact", dtype="f64", bn_mode="eval", seed=0,
        probes=None, tol=0.01, max_probes=1000, budget=99, chunk_size=128, directions=None,
        diagonal=false, max_seconds=3600.0))]
    #[allow(clippy::too_many_arguments)]
    fn trace<'py>(
        &self,
        py: Python<'py>,
        batches: PyBatches<'py>,
        method: &str,
        dtype: &str,
        bn_mode: &str,
        seed: u64,
        probes: Option<usize>,
        tol: f64,
        max_probes: usize,
        budget: usize,
        chunk_size: usize,
        directions: Option<usize>,
        diagonal: bool,
        max_seconds: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let method = TraceMethod::parse(method).ok_or_else(|| {
            value_error(format!(
                "method: expected one of exact, structural, exact-hvp, hutchinson, hutchpp, auto; got {method:?}"
            ))
        })?;
        let opts = TraceOptions {
            method,
            bn: self::bn_mode(bn_mode)?,
            seed,
            tol,
            max_probes: probes.map_or(max_probes, |p| p.max(max_probes)),
            probes,
            budget,
            chunk_size,
            directions,
            tensors: None,
            diagonal,
            max_seconds,
            ..TraceOptions::default()
        };
        match self::dtype(dtype)? {
            DType::F64 => self.trace_in::<f64>(py, &batches, &opts),
            DType::F32 => self.trace_in::<f32>(py, &batches, &opts),
        }
    }

    /// The `k` extreme Hessian eigenvalues by Lanczos: dict with `eigenvalues`, `residuals`
    /// (arrays), `iterations`, `converged`, `hvps`, and `eigenvectors` (a list of
    /// {name: array}) when asked for.
    #[pyo3(signature = (batches, k=1, steps=None, tol=1e-6, which="largest", seed=0,
        eigenvectors=false, dtype="f64", bn_mode="eval"))]
    #[allow(clippy::too_many_arguments)]
    fn eigenvalues<'py>(
        &self,
        py: Python<'py>,
        batches: PyBatches<'py>,
        k: usize,
        steps: Option<usize>,
        tol: f64,
        which: &str,
        seed: u64,
        eigenvectors: bool,
        dtype: &str,
        bn_mode: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let which = match which {
            "largest" => Which::Largest,
            "smallest" => Which::Smallest,
            "magnitude" => Which::LargestMagnitude,
            other => {
                return Err(value_error(format!(
                    "which: expected 'largest', 'smallest' or 'magnitude', got {other:?}"
                )))
            }
        };
        if !(tol.is_finite() && tol > 0.0) {
            return Err(value_error(format!("tol: must be positive, got {tol}")));
        }
        let opts = EigenOptions {
            lanczos: LanczosOptions {
                k,
                max_iters: steps.unwrap_or(100.max(k)),
                tol,
                which,
                seed,
                eigenvectors,
            },
            bn: self::bn_mode(bn_mode)?,
        };
        match self::dtype(dtype)? {
            DType::F64 => self.eigen_in::<f64>(py, &batches, &opts),
            DType::F32 => self.eigen_in::<f32>(py, &batches, &opts),
        }
    }

    /// The spectral density by stochastic Lanczos quadrature: dict with `nodes`, `weights`
    /// (all probes' quadratures, weights summing to 1), `grid` and `density` (the nodes
    /// broadened by a Gaussian of width `sigma`, default 1% of the spectrum's span), `trace`
    /// and `std_error` (the probes' trace estimate), `hvps`.
    #[pyo3(signature = (batches, probes=8, steps=64, points=1000, sigma=None, seed=0,
        dtype="f64", bn_mode="eval"))]
    #[allow(clippy::too_many_arguments)]
    fn density<'py>(
        &self,
        py: Python<'py>,
        batches: PyBatches<'py>,
        probes: usize,
        steps: usize,
        points: usize,
        sigma: Option<f64>,
        seed: u64,
        dtype: &str,
        bn_mode: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        if let Some(s) = sigma.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(value_error(format!("sigma: must be positive, got {s}")));
        }
        if points == 0 {
            return Err(value_error("points: must be at least 1"));
        }
        let opts = DensityOptions {
            slq: SlqOptions {
                probes,
                steps,
                seed,
                reorthogonalize: true,
            },
            bn: self::bn_mode(bn_mode)?,
            directions: None,
        };
        let grid = Grid { points, sigma };
        match self::dtype(dtype)? {
            DType::F64 => self.density_in::<f64>(py, &batches, &opts, grid),
            DType::F32 => self.density_in::<f32>(py, &batches, &opts, grid),
        }
    }

    fn __repr__(&self) -> String {
        let net = self.model.net();
        format!(
            "Net({} layers, {} parameters, input {:?}, {} classes{})",
            net.len(),
            self.model.num_params(),
            net.input_shape(),
            self.num_classes(),
            if net.has_batch_norm() {
                ", BatchNorm"
            } else {
                ""
            }
        )
    }
}

/// Where [`Net::density`] evaluates the broadened density.
#[derive(Clone, Copy)]
struct Grid {
    points: usize,
    sigma: Option<f64>,
}

/// The generic bodies of the methods, in the compute type `T`.
impl Net {
    fn batches<T: Scalar>(&self, batches: &PyBatches<'_>) -> PyResult<Batches<T>> {
        if batches.is_empty() {
            return Err(value_error("x: no images (an empty batch iterator?)"));
        }
        let sample = self.model.net().input_shape();
        let classes = self.num_classes();
        let many = batches.len() > 1;
        batches
            .iter()
            .enumerate()
            .map(|(b, (x, y))| {
                let at = if many {
                    format!(" (batch {b})")
                } else {
                    String::new()
                };
                let x: Tensor<T> = tensor(x, &format!("x{at}"))?;
                let shape = x.shape();
                if shape.len() != sample.len() + 1 || &shape[1..] != sample || shape[0] == 0 {
                    return Err(value_error(format!(
                        "x{at}: expected shape [N, {}] with N >= 1, got {shape:?}",
                        sample
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                if !convert::all_finite(x.data()) {
                    return Err(value_error(format!(
                        "x{at}: contains NaN or infinite values"
                    )));
                }
                let y = labels(y, shape[0], classes, &format!("y{at}"))?;
                Ok((x, y))
            })
            .collect()
    }

    /// Directions as tensors in parameter order, checking names, shapes and values.
    fn directions<T: Scalar>(&self, dirs: &[PyDirection<'_>]) -> PyResult<Vec<Vec<Tensor<T>>>> {
        let names = self.model.param_names();
        let shapes = self.param_shapes();
        dirs.iter()
            .enumerate()
            .map(|(k, dir)| {
                let what = if dirs.len() > 1 {
                    format!("v[{k}]")
                } else {
                    "v".into()
                };
                let mut slots: Vec<Option<Tensor<T>>> = vec![None; names.len()];
                for (name, obj) in dir {
                    let i = names.iter().position(|n| n == name).ok_or_else(|| {
                        value_error(format!(
                            "{what}: unknown parameter {name:?} (the parameters are {})",
                            names.join(", ")
                        ))
                    })?;
                    let t: Tensor<T> = tensor(obj, &format!("{what}[{name:?}]"))?;
                    if t.shape() != shapes[i].as_slice() {
                        return Err(value_error(format!(
                            "{what}[{name:?}]: shape {:?}, expected {:?}",
                            t.shape(),
                            shapes[i]
                        )));
                    }
                    if !convert::all_finite(t.data()) {
                        return Err(value_error(format!(
                            "{what}[{name:?}]: contains NaN or infinite values"
                        )));
                    }
                    slots[i] = Some(t);
                }
                slots
                    .into_iter()
                    .zip(&names)
                    .map(|(s, n)| {
                        s.ok_or_else(|| value_error(format!("{what}: missing parameter {n:?}")))
                    })
                    .collect()
            })
            .collect()
    }

    /// `{name: array}` of per-parameter tensors.
    fn named<'py, T: Scalar + numpy::Element>(
        &self,
        py: Python<'py>,
        tensors: Vec<Tensor<T>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.model.param_names().iter().zip(tensors) {
            d.set_item(*name, array(py, t)?)?;
        }
        Ok(d)
    }

    fn hvp_in<'py, T: Compute>(
        &self,
        py: Python<'py>,
        batches: &PyBatches<'py>,
        directions: &[PyDirection<'py>],
        bn: BnUse,
    ) -> PyResult<Bound<'py, PyDict>> {
        let data = self.batches::<T>(batches)?;
        let dirs = self.directions::<T>(directions)?;
        let model = T::model(self);
        let eval =
            compute(py, || model.evaluate_batches(&data, &dirs, bn, true)).map_err(model_error)?;
        let out = PyDict::new(py);
        out.set_item("loss", eval.loss.to_f64().unwrap_or(f64::NAN))?;
        out.set_item("logits", array(py, eval.logits)?)?;
        out.set_item("grad", self.named(py, eval.grads)?)?;
        let hvps = PyList::empty(py);
        for h in eval.hvps {
            hvps.append(self.named(py, h)?)?;
        }
        out.set_item("hvp", hvps)?;
        Ok(out)
    }

    fn trace_in<'py, T: Compute>(
        &self,
        py: Python<'py>,
        batches: &PyBatches<'py>,
        opts: &TraceOptions,
    ) -> PyResult<Bound<'py, PyDict>> {
        let data = self.batches::<T>(batches)?;
        let model = T::model(self);
        let rep = compute(py, || measure::trace(model, &data, opts)).map_err(model_error)?;
        let out = PyDict::new(py);
        out.set_item("json", serde_json_text(&rep.to_json()))?;
        if let Some(diag) = rep.diagonal {
            let d = PyDict::new(py);
            for t in diag {
                let tensor =
                    Tensor::from_vec(&t.shape, t.values).map_err(|e| value_error(e.to_string()))?;
                d.set_item(&t.name, array(py, tensor)?)?;
            }
            out.set_item("diagonal", d)?;
        }
        Ok(out)
    }

    fn eigen_in<'py, T: Compute>(
        &self,
        py: Python<'py>,
        batches: &PyBatches<'py>,
        opts: &EigenOptions,
    ) -> PyResult<Bound<'py, PyDict>> {
        let data = self.batches::<T>(batches)?;
        let model = T::model(self);
        let rep = compute(py, || spectrum::eigenvalues(model, &data, opts)).map_err(model_error)?;
        let r = rep.lanczos;
        let out = PyDict::new(py);
        out.set_item("eigenvalues", vector(py, r.eigenvalues))?;
        out.set_item("residuals", vector(py, r.residuals))?;
        out.set_item("iterations", r.iterations)?;
        out.set_item("restarts", r.restarts)?;
        out.set_item("converged", r.converged)?;
        out.set_item("hvps", r.hvps)?;
        out.set_item("passes", rep.passes)?;
        out.set_item("num_params", r.dim)?;
        if let Some(vecs) = r.eigenvectors {
            let list = PyList::empty(py);
            for flat in vecs {
                list.append(self.named(py, self.split_flat(flat)?)?)?;
            }
            out.set_item("eigenvectors", list)?;
        }
        Ok(out)
    }

    /// A flat vector in parameter order as one float64 tensor per parameter.
    fn split_flat(&self, flat: Vec<f64>) -> PyResult<Vec<Tensor<f64>>> {
        let mut rest = flat.as_slice();
        self.param_shapes()
            .iter()
            .map(|shape| {
                let n: usize = shape.iter().product();
                let (head, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                Tensor::from_vec(shape, head.to_vec()).map_err(|e| value_error(e.to_string()))
            })
            .collect()
    }

    fn density_in<'py, T: Compute>(
        &self,
        py: Python<'py>,
        batches: &PyBatches<'py>,
        opts: &DensityOptions,
        grid: Grid,
    ) -> PyResult<Bound<'py, PyDict>> {
        let data = self.batches::<T>(batches)?;
        let model = T::model(self);
        let rep = compute(py, || spectrum::density(model, &data, opts)).map_err(model_error)?;
        let r = rep.slq;
        let (nodes, weights) = r.nodes_and_weights();
        let lo = nodes.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = nodes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sigma = grid.sigma.unwrap_or_else(|| {
            if hi > lo {
                0.01 * (hi - lo)
            } else {
                1e-3 * lo.abs().max(1e-12)
            }
        });
        let points = r.grid(grid.points, 4.0 * sigma);
        let density = r.density(&points, sigma);
        let out = PyDict::new(py);
        out.set_item("grid", vector(py, points))?;
        out.set_item("density", vector(py, density))?;
        out.set_item("sigma", sigma)?;
        out.set_item("nodes", vector(py, nodes))?;
        out.set_item("weights", vector(py, weights))?;
        out.set_item("trace", r.trace_estimate)?;
        out.set_item(
            "std_error",
            r.trace_std_error.is_finite().then_some(r.trace_std_error),
        )?;
        out.set_item("normalized_trace", r.normalized_trace_estimate)?;
        out.set_item("second_moment", r.moment(2))?;
        out.set_item("probes", r.probes.len())?;
        out.set_item("steps", opts.slq.steps)?;
        out.set_item("hvps", r.hvps)?;
        out.set_item("passes", r.passes)?;
        out.set_item("num_params", r.dim)?;
        Ok(out)
    }
}

fn serde_json_text(map: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::Value::Object(map.clone()).to_string()
}

/// One state entry from Python as a raw tensor: float32/float64 arrays as floats, integer
/// arrays (`num_batches_tracked`) as int64.
fn raw_tensor(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<RawTensor> {
    let what = format!("state_dict[{name:?}]");
    if let Ok(a) = obj.cast::<PyArrayDyn<i64>>() {
        let ro = a.readonly();
        return Ok(RawTensor {
            name: name.to_string(),
            shape: a.shape().to_vec(),
            data: RawData::I64(ro.as_array().iter().copied().collect()),
        });
    }
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        let ro = a.readonly();
        return Ok(RawTensor {
            name: name.to_string(),
            shape: a.shape().to_vec(),
            data: RawData::F32(ro.as_array().iter().copied().collect()),
        });
    }
    let t: Tensor<f64> = tensor(obj, &what)?;
    Ok(RawTensor {
        name: name.to_string(),
        shape: t.shape().to_vec(),
        data: RawData::F64(t.into_vec()),
    })
}

/// flatmin's native layer (see the `flatmin` package).
///
/// Importing it tunes glibc's allocator as the `flatmin` binary does
/// ([`flatmin_engine::runtime::tune_allocator`]: freed memory is kept for reuse instead of
/// being returned to the system after every op, which otherwise costs page faults and zeroing
/// on every call); `FLATMIN_TUNE_ALLOCATOR=0` in the environment leaves the allocator alone.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if std::env::var_os("FLATMIN_TUNE_ALLOCATOR").is_none_or(|v| v != "0") {
        flatmin_engine::runtime::tune_allocator();
    }
    m.add_class::<Net>()?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
