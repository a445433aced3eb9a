//! Network files: the JSON form of a [`Net`] (`docs/network-file.md`), read and written.

use crate::arch::{Arch, MAX_PARAMS};
use crate::error::{ModelError, Result};
use flatmin_engine::net::{Activation, Layer, Net, NodeId, BN_EPS, BN_MOMENTUM};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The format version this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// True when `name` names a network file rather than a preset (it ends in `.json`).
pub fn is_network_file(name: &str) -> bool {
    name.ends_with(".json")
}

/// The network `name` stands for: a network file (a path ending in `.json`), a preset or a
/// custom MLP spec.
pub fn resolve(name: &str) -> Result<Net> {
    if is_network_file(name) {
        read_network(Path::new(name))
    } else {
        Arch::parse(name)?.net()
    }
}

/// Largest network file read (bytes): a network file describes layers, not weights.
pub const MAX_NETWORK_FILE_BYTES: u64 = 64 << 20;

/// Reads a network file; errors name the file and the layer. Only a regular file of at most
/// [`MAX_NETWORK_FILE_BYTES`] is read (a FIFO or a device is refused without blocking).
pub fn read_network(path: &Path) -> Result<Net> {
    let text = flatmin_engine::fsread::read_regular_to_string(path, MAX_NETWORK_FILE_BYTES)
        .map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
    parse_network(&text, &path.display().to_string())
}

/// Parses the JSON text of a network file; `origin` (a path) prefixes every error.
pub fn parse_network(text: &str, origin: &str) -> Result<Net> {
    let fail = |detail: String| ModelError::Network {
        origin: origin.to_string(),
        detail,
    };
    let root: Value =
        serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let obj = root
        .as_object()
        .ok_or_else(|| fail("must be a JSON object".into()))?;
    for key in obj.keys() {
        if !["flatmin_network", "input", "layers"].contains(&key.as_str()) {
            return Err(fail(format!(
                "unknown key '{key}' (flatmin_network, input, layers)"
            )));
        }
    }
    match obj.get("flatmin_network").and_then(Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(fail(format!(
                "format version {v}; this flatmin reads version {FORMAT_VERSION}"
            )))
        }
        None => {
            return Err(fail(format!(
                "needs \"flatmin_network\": {FORMAT_VERSION} (the format version)"
            )))
        }
    }
    let input = obj
        .get("input")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .filter(|v: &Vec<usize>| !v.is_empty() && v.iter().all(|&d| d > 0))
        .ok_or_else(|| fail("\"input\" must be a per-sample shape, e.g. [3, 32, 32]".into()))?;
    let layers = obj
        .get("layers")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| fail("\"layers\" must be a non-empty list".into()))?;
    let mut net = Net::new(&input);
    for (i, layer) in layers.iter().enumerate() {
        add_layer(&mut net, layer).map_err(|(name, detail)| {
            let at = name.unwrap_or_else(|| format!("#{i}"));
            fail(format!("layer '{at}': {detail}"))
        })?;
    }
    let params = net.num_params();
    if params > MAX_PARAMS {
        return Err(ModelError::TooLarge {
            name: origin.to_string(),
            params: params.to_string(),
            max: MAX_PARAMS,
        });
    }
    Ok(net)
}

type LayerError = (Option<String>, String);

/// Reads one layer object and adds it to `net`.
fn add_layer(net: &mut Net, v: &Value) -> std::result::Result<(), LayerError> {
    let obj = v
        .as_object()
        .ok_or((None, "must be a JSON object".to_string()))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or((None, "needs a \"name\" string".to_string()))?
        .to_string();
    let fail = |detail: String| (Some(name.clone()), detail);
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("needs a \"type\" string".into()))?;
    let args = Args {
        obj,
        kind,
        name: &name,
    };
    let (layer, keys) = args.layer()?;
    for key in obj.keys() {
        let known = ["name", "type", "input", "inputs"].contains(&key.as_str())
            || keys.contains(&key.as_str());
        if !known {
            return Err(fail(format!("unknown key '{key}' for {kind}")));
        }
    }
    let inputs = args.inputs(net, layer.arity())?;
    net.push(&name, layer, &inputs)
        .map_err(|e| fail(strip_layer_prefix(&e.to_string(), &name)))?;
    Ok(())
}

/// The engine's error names the layer already (`layer 'x': ...`); keep only the detail.
fn strip_layer_prefix(msg: &str, name: &str) -> String {
    msg.strip_prefix(&format!("layer '{name}': "))
        .unwrap_or(msg)
        .to_string()
}

/// The keys of one layer object.
struct Args<'a> {
    obj: &'a Map<String, Value>,
    kind: &'a str,
    name: &'a str,
}

/// A layer read from a file and the keys its entry may have.
type LayerAndKeys = std::result::Result<(Layer, &'static [&'static str]), LayerError>;

impl Args<'_> {
    fn fail(&self, detail: String) -> LayerError {
        (Some(self.name.to_string()), detail)
    }

    /// A size: an integer or a pair of equal integers.
    fn size(&self, key: &str, default: Option<usize>) -> std::result::Result<usize, LayerError> {
        let Some(v) = self.obj.get(key) else {
            return default.ok_or_else(|| self.fail(format!("{} needs \"{key}\"", self.kind)));
        };
        let as_size = |v: &Value| v.as_u64().map(|x| x as usize);
        let n = match v {
            Value::Array(a) if a.len() == 2 => match (as_size(&a[0]), as_size(&a[1])) {
                (Some(x), Some(y)) if x == y => Some(x),
                (Some(_), Some(_)) => {
                    return Err(self.fail(format!(
                        "\"{key}\" {v}: only square (equal) sizes are supported"
                    )))
                }
                _ => None,
            },
            _ => as_size(v),
        };
        n.ok_or_else(|| {
            self.fail(format!(
                "\"{key}\" must be a non-negative integer or a pair, got {v}"
            ))
        })
    }

    fn flag(&self, key: &str, default: bool) -> std::result::Result<bool, LayerError> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.fail(format!("\"{key}\" must be true or false, got {v}"))),
        }
    }

    fn number(&self, key: &str, default: f64) -> std::result::Result<f64, LayerError> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.fail(format!("\"{key}\" must be a number, got {v}"))),
        }
    }

    /// Requires `key`, when present, to hold the only supported value `want`.
    fn only(&self, key: &str, want: &Value) -> std::result::Result<(), LayerError> {
        let same = |v: &Value| match (v.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => v == want,
        };
        match self.obj.get(key) {
            Some(Value::Array(a)) if a.len() == 2 && same(&a[0]) && same(&a[1]) => Ok(()),
            Some(v) if !same(v) => Err(self.fail(format!(
                "{} with \"{key}\" {v} is not supported (only {want})",
                self.kind
            ))),
            _ => Ok(()),
        }
    }

    /// The layer and the keys it takes.
    fn layer(&self) -> LayerAndKeys {
        Ok(match self.kind {
            "Linear" => (
                Layer::Linear {
                    in_features: self.size("in_features", None)?,
                    out_features: self.size("out_features", None)?,
                    bias: self.flag("bias", true)?,
                },
                &["in_features", "out_features", "bias"],
            ),
            "Conv2d" => self.conv2d()?,
            "BatchNorm2d" => self.batch_norm2d()?,
            "GELU" => {
                self.only("approximate", &json!("none"))?;
                (Layer::Activation(Activation::Gelu), &["approximate"])
            }
            "Softplus" => {
                self.only("beta", &json!(1))?;
                self.only("threshold", &json!(20))?;
                (Layer::Activation(Activation::Softplus), &["beta", "threshold"])
            }
            "ReLU" | "Tanh" | "Sigmoid" => {
                let act = Activation::ALL
                    .into_iter()
                    .find(|a| a.torch_name() == self.kind)
                    .expect("listed above");
                (Layer::Activation(act), &["inplace"])
            }
            "MaxPool2d" | "AvgPool2d" => self.pool2d()?,
            "AdaptiveAvgPool2d" => {
                self.only("output_size", &json!(1))?;
                (Layer::AdaptiveAvgPool2d, &["output_size"])
            }
            "Flatten" => {
                self.only("start_dim", &json!(1))?;
                self.only("end_dim", &json!(-1))?;
                (Layer::Flatten, &["start_dim", "end_dim"])
            }
            "Identity" => (Layer::Identity, &[]),
            "Add" => (Layer::Add, &[]),
            other => {
                return Err(self.fail(format!(
                    "unsupported type '{other}' (Linear, Conv2d, BatchNorm2d, ReLU, Tanh, GELU, Sigmoid, Softplus, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, Add)"
                )))
            }
        })
    }

    /// A `Conv2d` (dilation 1, one group, zero padding only) and the keys it takes.
    fn conv2d(&self) -> LayerAndKeys {
        self.only("dilation", &json!(1))?;
        self.only("groups", &json!(1))?;
        self.only("padding_mode", &json!("zeros"))?;
        Ok((
            Layer::Conv2d {
                in_channels: self.size("in_channels", None)?,
                out_channels: self.size("out_channels", None)?,
                kernel: self.size("kernel_size", None)?,
                stride: self.size("stride", Some(1))?,
                padding: self.size("padding", Some(0))?,
                bias: self.flag("bias", true)?,
            },
            &[
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "bias",
                "dilation",
                "groups",
                "padding_mode",
            ],
        ))
    }

    /// A `BatchNorm2d` (affine, with running statistics) and the keys it takes.
    fn batch_norm2d(&self) -> LayerAndKeys {
        self.only("affine", &json!(true))?;
        self.only("track_running_stats", &json!(true))?;
        let momentum = match self.obj.get("momentum") {
            Some(Value::Null) => None,
            _ => Some(self.number("momentum", BN_MOMENTUM)?),
        };
        Ok((
            Layer::BatchNorm2d {
                features: self.size("num_features", None)?,
                eps: self.number("eps", BN_EPS)?,
                momentum,
            },
            &[
                "num_features",
                "eps",
                "momentum",
                "affine",
                "track_running_stats",
            ],
        ))
    }

    /// A `MaxPool2d` or `AvgPool2d` (no padding or dilation, floor mode) and the keys it
    /// takes.
    fn pool2d(&self) -> LayerAndKeys {
        self.only("padding", &json!(0))?;
        self.only("dilation", &json!(1))?;
        self.only("ceil_mode", &json!(false))?;
        let kernel = self.size("kernel_size", None)?;
        let stride = match self.obj.get("stride") {
            None | Some(Value::Null) => kernel,
            Some(_) => self.size("stride", None)?,
        };
        let layer = if self.kind == "MaxPool2d" {
            Layer::MaxPool2d { kernel, stride }
        } else {
            Layer::AvgPool2d { kernel, stride }
        };
        Ok((
            layer,
            &[
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "ceil_mode",
                "count_include_pad",
            ],
        ))
    }

    /// The nodes the layer reads: `input`/`inputs` by name, else the previous node.
    fn inputs(&self, net: &Net, arity: usize) -> std::result::Result<Vec<NodeId>, LayerError> {
        let names: Vec<&str> = match (self.obj.get("input"), self.obj.get("inputs")) {
            (Some(_), Some(_)) => {
                return Err(self.fail("give \"input\" or \"inputs\", not both".into()))
            }
            (Some(v), None) => vec![v
                .as_str()
                .ok_or_else(|| self.fail(format!("\"input\" must be a name, got {v}")))?],
            (None, Some(v)) => v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect())
                .ok_or_else(|| self.fail(format!("\"inputs\" must be a list of names, got {v}")))?,
            (None, None) if arity == 1 => return Ok(vec![net.output()]),
            (None, None) => {
                return Err(self.fail(format!(
                    "{} needs \"inputs\": {arity} layer names",
                    self.kind
                )))
            }
        };
        names
            .into_iter()
            .map(|n| {
                net.find(n)
                    .ok_or_else(|| self.fail(format!("reads '{n}', which is not an earlier layer")))
            })
            .collect()
    }
}

/// The network file of `net` (pretty-printed JSON, every input stated explicitly).
pub fn network_json(net: &Net) -> String {
    let mut layers = Vec::new();
    for node in net.nodes().iter().skip(1) {
        let mut o = Map::new();
        o.insert("name".into(), json!(node.name));
        o.insert("type".into(), json!(node.layer.kind()));
        match node.layer {
            Layer::Linear {
                in_features,
                out_features,
                bias,
            } => {
                o.insert("in_features".into(), json!(in_features));
                o.insert("out_features".into(), json!(out_features));
                o.insert("bias".into(), json!(bias));
            }
            Layer::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                bias,
            } => {
                o.insert("in_channels".into(), json!(in_channels));
                o.insert("out_channels".into(), json!(out_channels));
                o.insert("kernel_size".into(), json!(kernel));
                o.insert("stride".into(), json!(stride));
                o.insert("padding".into(), json!(padding));
                o.insert("bias".into(), json!(bias));
            }
            Layer::BatchNorm2d {
                features,
                eps,
                momentum,
            } => {
                o.insert("num_features".into(), json!(features));
                o.insert("eps".into(), json!(eps));
                o.insert("momentum".into(), json!(momentum));
            }
            Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
                o.insert("kernel_size".into(), json!(kernel));
                o.insert("stride".into(), json!(stride));
            }
            Layer::AdaptiveAvgPool2d => {
                o.insert("output_size".into(), json!(1));
            }
            _ => {}
        }
        let names: Vec<&str> = node
            .inputs
            .iter()
            .map(|i| net.node(*i).name.as_str())
            .collect();
        if names.len() == 1 {
            o.insert("input".into(), json!(names[0]));
        } else {
            o.insert("inputs".into(), json!(names));
        }
        layers.push(Value::Object(o));
    }
    let doc = json!({
        "flatmin_network": FORMAT_VERSION,
        "input": net.input_shape(),
        "layers": layers,
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value serializes") + "\n"
}
