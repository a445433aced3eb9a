//! Shared helpers of the golden tests: the counter-based generator of
//! `tools/make_fixtures.py` (bit for bit), the generated models, batches and directions, and
//! the fixture reader and comparisons. See the docstring of `tools/make_fixtures.py` for the
//! exact definitions; the two must stay in step.

#![allow(dead_code)]

use flatmin_engine::Tensor;
use flatmin_models::io::{read_safetensors, RawData, RawTensor};
use flatmin_models::{EntryKind, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the generator recorded in every fixture's metadata.
pub const GENERATOR: &str = "splitmix64-ctr-v1";
/// Tensors with more elements than this are stored as samples plus statistics.
pub const SAMPLES: usize = 4096;
/// CIFAR-10 channel means and standard deviations (design.md).
pub const MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
pub const PIXEL_STREAM: u64 = 1 << 32;
pub const LABEL_STREAM: u64 = (1 << 32) + 1;
pub const DIR_STREAM: u64 = 2 << 32;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of stream `stream` under `seed`.
pub fn stream_key(seed: u64, stream: u64) -> u64 {
    mix(mix(seed ^ 0x243F_6A88_85A3_08D3).wrapping_add(stream.wrapping_mul(GOLDEN)))
}

/// Element `i` of a stream with key `key`, as 64 raw bits.
pub fn bits_at(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add((i + 1).wrapping_mul(GOLDEN)))
}

/// The first `n` outputs of a stream.
pub fn bits(seed: u64, stream: u64, n: usize) -> Vec<u64> {
    let key = stream_key(seed, stream);
    (0..n as u64).map(|i| bits_at(key, i)).collect()
}

/// `n` floats `lo + (hi - lo) * u` with `u` in [0, 1) from the top 53 bits.
pub fn uniform(seed: u64, stream: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let key = stream_key(seed, stream);
    let scale = 1.0 / 9_007_199_254_740_992.0; // 2^-53
    (0..n as u64)
        .map(|i| {
            let u = (bits_at(key, i) >> 11) as f64 * scale;
            lo + (hi - lo) * u
        })
        .collect()
}

/// The normalized batch `[n, 3, 32, 32]` and its labels.
pub fn make_batch(seed: u64, n: usize) -> (Tensor<f64>, Vec<usize>) {
    let plane = 32 * 32;
    let x: Vec<f64> = bits(seed, PIXEL_STREAM, n * 3 * plane)
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let c = (i / plane) % 3;
            let pixel = (b >> 56) as f64;
            (pixel / 255.0 - MEAN[c]) / STD[c]
        })
        .collect();
    let labels = bits(seed, LABEL_STREAM, n)
        .into_iter()
        .map(|b| (((b >> 32) * 10) >> 32) as usize)
        .collect();
    (Tensor::from_vec(&[n, 3, 32, 32], x).unwrap(), labels)
}

/// A preset whose whole state (parameters and BatchNorm buffers) comes from the generator:
/// state entry number `e` (state_dict order) draws from stream `e`.
pub fn generated_model(preset: &str, seed: u64) -> Model<f64> {
    let mut model =
        Model::<f64>::named(preset, 0).unwrap_or_else(|e| panic!("preset {preset}: {e}"));
    let raw: Vec<RawTensor> = model
        .entries()
        .iter()
        .enumerate()
        .map(|(e, entry)| {
            let n: usize = entry.shape.iter().product();
            let range = match entry.kind {
                EntryKind::Weight { fan_in } | EntryKind::Bias { fan_in } => {
                    if let EntryKind::Weight { .. } = entry.kind {
                        let from_shape: usize = entry.shape[1..].iter().product();
                        assert_eq!(
                            fan_in, from_shape,
                            "{}: fan_in disagrees with the shape",
                            entry.name
                        );
                    }
                    let b = 1.0 / (fan_in as f64).sqrt();
                    Some((-b, b))
                }
                EntryKind::BnWeight | EntryKind::RunningVar => Some((0.5, 1.5)),
                EntryKind::BnBias | EntryKind::RunningMean => Some((-0.2, 0.2)),
                EntryKind::Count => None,
            };
            let data = match range {
                Some((lo, hi)) => RawData::F64(uniform(seed, e as u64, n, lo, hi)),
                None => RawData::I64(vec![0]),
            };
            RawTensor {
                name: entry.name.clone(),
                shape: entry.shape.clone(),
                data,
            }
        })
        .collect();
    model
        .load_raw(Path::new("<generated state>"), raw)
        .unwrap_or_else(|e| panic!("loading the generated state of {preset}: {e}"));
    model
}

/// One HVP direction: trainable parameter `j` draws from stream `DIR_STREAM + j`, in [-1, 1).
pub fn direction(model: &Model<f64>, seed: u64) -> Vec<Tensor<f64>> {
    model
        .params()
        .iter()
        .enumerate()
        .map(|(j, p)| {
            Tensor::from_vec(
                p.shape(),
                uniform(seed, DIR_STREAM + j as u64, p.numel(), -1.0, 1.0),
            )
            .unwrap()
        })
        .collect()
}

/// Flat indices kept for a tensor of `len > SAMPLES` elements.
pub fn sample_indices(len: usize) -> Vec<usize> {
    (0..SAMPLES as u64)
        .map(|k| (k * (len as u64 - 1) / (SAMPLES as u64 - 1)) as usize)
        .collect()
}

/// `[sum, sum of squares, sum of absolute values]`.
pub fn stats(v: &[f64]) -> [f64; 3] {
    let mut s = [0.0; 3];
    for &x in v {
        s[0] += x;
        s[1] += x * x;
        s[2] += x.abs();
    }
    s
}

/// Directory of the committed fixtures.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// A reference tensor as stored in a fixture.
#[derive(Clone, Debug)]
pub enum Stored {
    /// Every element.
    Whole { shape: Vec<usize>, data: Vec<f64> },
    /// Values at [`sample_indices`] plus statistics of all elements.
    Sampled {
        shape: Vec<usize>,
        samples: Vec<f64>,
        stats: [f64; 3],
    },
}

impl Stored {
    /// Full shape of the reference tensor.
    pub fn shape(&self) -> &[usize] {
        match self {
            Stored::Whole { shape, .. } | Stored::Sampled { shape, .. } => shape,
        }
    }

    /// The stored reference values.
    pub fn values(&self) -> &[f64] {
        match self {
            Stored::Whole { data, .. } => data,
            Stored::Sampled { samples, .. } => samples,
        }
    }

    /// The entries of `actual` (a full tensor) that correspond to [`Stored::values`].
    pub fn pick(&self, actual: &[f64]) -> Vec<f64> {
        match self {
            Stored::Whole { .. } => actual.to_vec(),
            Stored::Sampled { .. } => sample_indices(actual.len())
                .into_iter()
                .map(|i| actual[i])
                .collect(),
        }
    }

    /// Largest reference magnitude over the stored entries.
    pub fn max_abs(&self) -> f64 {
        self.values().iter().fold(0.0, |m, x| m.max(x.abs()))
    }
}

/// One fixture file: its tensors by name and its metadata.
pub struct Fixture {
    pub path: PathBuf,
    pub tensors: HashMap<String, RawTensor>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    /// Opens `models/tests/fixtures/<file>`; panics (naming the path) if it is missing or bad.
    pub fn open(file: &str) -> Fixture {
        let path = fixture_dir().join(file);
        assert!(
            path.is_file(),
            "golden fixture {} is missing: regenerate it with `/work/venv/bin/python tools/make_fixtures.py`",
            path.display()
        );
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("{}: bad safetensors header: {e:?}", path.display()));
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = read_safetensors(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Fixture {
            path,
            tensors,
            meta,
        }
    }

    /// A metadata string (panics naming the path when absent).
    pub fn meta(&self, key: &str) -> &str {
        self.meta
            .get(key)
            .unwrap_or_else(|| panic!("{}: metadata '{key}' missing", self.path.display()))
    }

    /// Metadata `key`, or `default` when the fixture does not have it.
    pub fn meta_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.meta.get(key).map(String::as_str).unwrap_or(default)
    }

    /// A raw tensor by name (panics naming the path when absent).
    pub fn raw(&self, name: &str) -> &RawTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: tensor '{name}' missing", self.path.display()))
    }

    fn f64s(&self, name: &str) -> Vec<f64> {
        match &self.raw(name).data {
            RawData::F64(v) => v.clone(),
            other => panic!(
                "{}: tensor '{name}' is not float64 ({other:?})",
                self.path.display()
            ),
        }
    }

    /// An int64 tensor's elements.
    pub fn i64s(&self, name: &str) -> Vec<i64> {
        match &self.raw(name).data {
            RawData::I64(v) => v.clone(),
            _ => panic!("{}: tensor '{name}' is not int64", self.path.display()),
        }
    }

    /// A stored float64 reference (whole, or sampled with statistics).
    pub fn stored(&self, name: &str) -> Stored {
        if let Some(t) = self.tensors.get(name) {
            return Stored::Whole {
                shape: t.shape.clone(),
                data: self.f64s(name),
            };
        }
        let shape: Vec<usize> = self
            .i64s(&format!("{name}.shape"))
            .into_iter()
            .map(|d| d as usize)
            .collect();
        let samples = self.f64s(&format!("{name}.samples"));
        let s = self.f64s(&format!("{name}.stats"));
        assert_eq!(
            samples.len(),
            SAMPLES,
            "{}: {name}.samples",
            self.path.display()
        );
        assert_eq!(s.len(), 3, "{}: {name}.stats", self.path.display());
        Stored::Sampled {
            shape,
            samples,
            stats: [s[0], s[1], s[2]],
        }
    }

    /// The recorded generator seed (after checking the generator's name).
    pub fn seed(&self) -> u64 {
        assert_eq!(self.meta("generator"), GENERATOR, "{}", self.path.display());
        self.meta("seed")
            .parse()
            .unwrap_or_else(|_| panic!("{}: bad seed", self.path.display()))
    }

    /// The recorded state_dict order: (name, shape) per entry.
    pub fn state_order(&self) -> Vec<(String, Vec<usize>)> {
        self.meta("state_dict")
            .split(';')
            .map(|item| {
                let (name, dims) = item.split_once(':').expect("name:shape");
                let shape = if dims.is_empty() {
                    vec![]
                } else {
                    dims.split('x')
                        .map(|d| d.parse().expect("dimension"))
                        .collect()
                };
                (name.to_string(), shape)
            })
            .collect()
    }
}

/// Relative error of `actual` (a full tensor) against a stored reference: the largest
/// absolute difference over the stored entries divided by the largest reference magnitude,
/// and for sampled references also |Δsum| / Σ|ref| and |Δ(sum of squares)| / Σ ref², taking
/// the worst of these. Panics if the shapes differ.
pub fn rel_error(what: &str, stored: &Stored, shape: &[usize], actual: &[f64]) -> f64 {
    assert_eq!(
        stored.shape(),
        shape,
        "{what}: shape differs from the reference"
    );
    let picked = stored.pick(actual);
    let diff = picked
        .iter()
        .zip(stored.values())
        .fold(0.0f64, |m, (a, r)| {
            if a.is_nan() {
                f64::INFINITY
            } else {
                m.max((a - r).abs())
            }
        });
    let scale = stored.max_abs();
    let mut err = if scale > 0.0 { diff / scale } else { diff };
    if let Stored::Sampled { stats: s, .. } = stored {
        let a = stats(actual);
        let sum_err = (a[0] - s[0]).abs() / s[2].max(f64::MIN_POSITIVE);
        let sq_err = (a[1] - s[1]).abs() / s[1].max(f64::MIN_POSITIVE);
        err = err.max(sum_err).max(sq_err);
    }
    err
}

/// Largest absolute difference over the stored entries (shapes checked).
pub fn abs_error(what: &str, stored: &Stored, shape: &[usize], actual: &[f64]) -> f64 {
    assert_eq!(
        stored.shape(),
        shape,
        "{what}: shape differs from the reference"
    );
    stored
        .pick(actual)
        .iter()
        .zip(stored.values())
        .fold(0.0f64, |m, (a, r)| {
            if a.is_nan() {
                f64::INFINITY
            } else {
                m.max((a - r).abs())
            }
        })
}

/// Worst error per kind of tensor, with the tensor it came from.
#[derive(Default, Debug)]
pub struct Worst {
    pub by_kind: Vec<(String, f64, String)>,
}

impl Worst {
    pub fn note(&mut self, kind: &str, err: f64, name: &str) {
        match self.by_kind.iter_mut().find(|(k, _, _)| k == kind) {
            Some(slot) => {
                if err > slot.1 || err.is_nan() {
                    slot.1 = err;
                    slot.2 = name.to_string();
                }
            }
            None => self.by_kind.push((kind.to_string(), err, name.to_string())),
        }
    }

    pub fn max(&self) -> f64 {
        self.by_kind.iter().fold(
            0.0,
            |m, (_, e, _)| if e.is_nan() { f64::INFINITY } else { m.max(*e) },
        )
    }

    pub fn summary(&self) -> String {
        self.by_kind
            .iter()
            .map(|(k, e, n)| format!("{k} {e:.2e} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
