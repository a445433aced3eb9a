//! Runs the real `flatmin trace` binary: structural and basis-HVP traces agree (tiny-tanh on
//! synthetic data in unequal batches, and on a batch file); resnet20's structural per-tensor
//! traces equal in-process basis HVPs; BatchNorm train mode falls back (auto) or is refused
//! (structural) with the reason; the JSON parses and records the BatchNorm mode; bad input
//! ends in one `error:` line.

use flatmin_datasets::{normalize_f64, read_batch_file};
use flatmin_engine::curvature::{exact_trace_of, Hessian, HvpConfig};
use flatmin_engine::{EngineError, Tape, Tensor};
use flatmin_models::{BnUse, Model, ModelError};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_flatmin");

mod common;
use common::{write_cifar, Rng};

/// A fresh empty folder for one test under cargo's scratch folder.
fn scratch(name: &str) -> PathBuf {
    common::scratch("trace", name)
}

/// Saves a `preset` model (f64) whose BatchNorm running statistics come from a few
/// train-mode batches, so that eval mode differs from train mode.
fn write_weights(path: &Path, preset: &str, seed: u64) -> Model<f64> {
    let mut model = Model::<f64>::named(preset, seed).unwrap();
    if model.net().has_batch_norm() {
        let mut rng = Rng(seed.wrapping_mul(31) | 1);
        for _ in 0..2 {
            let x: Vec<f64> = (0..4 * 3072).map(|_| rng.uniform()).collect();
            let x = Tensor::from_vec(&[4, 3, 32, 32], x).unwrap();
            let e = model
                .evaluate(&x, &[0, 1, 2, 3], &[], BnUse::Train, false)
                .unwrap();
            model.update_running_stats(&e.bn_stats);
        }
    }
    model.save(path).unwrap();
    model
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("trace")
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .env("FLATMIN_DATA", "/nonexistent-flatmin-data")
        .output()
        .expect("run the flatmin binary")
}

/// Runs with `--json` and returns the parsed object.
fn run_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = run(&a);
    assert!(
        out.status.success(),
        "flatmin trace {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON {e}: {stdout}"))
}

/// Runs expecting failure; returns the single stderr line.
fn run_err(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "flatmin trace {args:?} should fail");
    common::error_text(&out, &format!("flatmin trace {args:?}"))
}

fn trace_of(v: &Value) -> f64 {
    v["trace"].as_f64().unwrap()
}

/// The `layers` object of a `--per-layer` report, as (tensor name, trace) by name.
fn layer_traces(v: &Value) -> Vec<(String, f64)> {
    v["layers"]
        .as_object()
        .expect("a layers object (--per-layer)")
        .iter()
        .map(|(name, l)| (name.clone(), l["trace"].as_f64().unwrap()))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

#[test]
fn tiny_tanh_structural_equals_basis() {
    let dir = scratch("tiny");
    let w = dir.join("w.safetensors");
    write_weights(&w, "tiny-tanh", 3);
    let ws = w.display().to_string();
    // 20 synthetic test images in batches of 8, 8 and 4 (weights 0.4, 0.4, 0.2).
    let common = [
        "--model",
        "tiny-tanh",
        "--weights",
        &ws,
        "--data",
        "synthetic",
        "--size",
        "20",
        "--batch",
        "8",
        "--dtype",
        "f64",
    ];
    let s = run_json(&[&common[..], &["--method", "structural", "--per-layer"]].concat());
    let b = run_json(&[&common[..], &["--method", "basis", "--per-layer"]].concat());
    let err = rel(trace_of(&s), trace_of(&b));
    eprintln!(
        "tiny-tanh: structural {} basis {} rel {err:.1e}",
        trace_of(&s),
        trace_of(&b)
    );
    assert!(err < 1e-9);
    for ((n1, t1), (n2, t2)) in layer_traces(&s).into_iter().zip(layer_traces(&b)) {
        assert_eq!(n1, n2);
        assert!(rel(t1, t2) < 1e-9, "{n1}: {t1} vs {t2}");
    }
    for v in [&s, &b] {
        assert_eq!(v["bn_mode"], "eval");
        assert_eq!(v["num_params"], 6506);
        assert_eq!(v["samples"], 20);
        for alias in ["dim", "images", "stderr", "compute_s"] {
            assert!(
                v.get(alias).is_none(),
                "one key per quantity: {alias} in {v}"
            );
        }
        assert_eq!(v["batches"], 3);
        assert_eq!(v["exact"], true);
        assert_eq!(v["synthetic"], true);
        let norm = v["normalized_trace"].as_f64().unwrap();
        assert!(rel(norm, trace_of(v) / 6506.0) < 1e-15);
    }
    assert_eq!(s["method"], "structural");
    assert_eq!(s["hvps"], 0);
    assert_eq!(b["hvps"], 6506);
    assert!(s["activation_trace"].as_f64().unwrap() != 0.0);

    // auto picks structural; f32 agrees to single precision; threads change no bit.
    let a = run_json(&[&common[..8], &["--dtype", "f32", "--threads", "1"]].concat());
    assert_eq!(a["method"], "structural");
    assert_eq!(a["requested_method"], "auto");
    assert!(rel(trace_of(&a), trace_of(&s)) < 1e-4);
    let a2 = run_json(&[&common[..8], &["--dtype", "f32", "--threads", "2"]].concat());
    assert_eq!(trace_of(&a).to_bits(), trace_of(&a2).to_bits());

    // Estimators report a standard error and probes; Lanczos eigenvalues; SLQ a density.
    let h = run_json(
        &[
            &common[..],
            &["--method", "hutchinson", "--max-probes", "40"],
        ]
        .concat(),
    );
    assert!(h["std_error"].as_f64().unwrap() > 0.0);
    assert!(h["probes"].as_u64().unwrap() <= 40);
    let l = run_json(
        &[
            &common[..],
            &["--method", "lanczos", "--top-k", "2", "--steps", "40"],
        ]
        .concat(),
    );
    assert_eq!(l["eigenvalues"].as_array().unwrap().len(), 2);
    assert!(l["trace"].is_null());
    let q = run_json(
        &[
            &common[..],
            &["--method", "slq", "--probes", "3", "--steps", "10"],
        ]
        .concat(),
    );
    let mass: f64 = q["density"]["histogram"]["mass"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_f64().unwrap())
        .sum();
    assert!((mass - 1.0).abs() < 1e-9);
    let p = run_json(&[&common[..], &["--method", "hutch++", "--budget", "30"]].concat());
    assert_eq!(p["hvps"], 30);
}

#[test]
fn batch_file_and_resnet20_against_in_process_basis_hvps() {
    let dir = scratch("resnet20");
    let w = dir.join("w.safetensors");
    let data = dir.join("batch.bin");
    let model = write_weights(&w, "resnet20", 5);
    write_cifar(&data, 3, 9);
    let (ws, ds) = (w.display().to_string(), data.display().to_string());
    let common = [
        "--model",
        "resnet20",
        "--weights",
        &ws,
        "--data",
        &ds,
        "--batch",
        "2",
        "--dtype",
        "f64",
    ];
    let s = run_json(&[&common[..], &["--method", "structural", "--per-layer"]].concat());
    assert_eq!(s["samples"], 3);
    assert_eq!(s["bn_mode"], "eval");
    assert_eq!(s["batch_norm_layers"], true);
    assert!(s["split"].is_null());

    // The same loss in-process: basis HVPs on a few tensors, batches of 2 and 1.
    let batch = read_batch_file(&data).unwrap();
    let x = normalize_f64(&batch);
    let labels = batch.labels_usize();
    let parts = [(0usize, 2usize), (2, 3)];
    let params = model.params_cloned();
    let names = model.param_names();
    let loss = flatmin_engine::curvature::Batches::new(
        vec![2.0, 1.0],
        |b: usize, t: &mut Tape<f64>, v: &[flatmin_engine::Var]| {
            let (lo, hi) = parts[b];
            let xb = Tensor::from_vec(&[hi - lo, 3, 32, 32], x[lo * 3072..hi * 3072].to_vec())?;
            let xv = t.constant(xb);
            let (z, _) = model.forward(t, v, xv, BnUse::Eval).map_err(|e| match e {
                ModelError::Engine(e) => e,
                other => EngineError::Shape {
                    op: "forward",
                    detail: other.to_string(),
                },
            })?;
            t.cross_entropy(z, &labels[lo..hi])
        },
    );
    let h = Hessian::new(&params, loss, HvpConfig::default()).unwrap();
    let pick: Vec<usize> = ["bn1.weight", "layer3.2.bn2.bias", "linear.bias"]
        .iter()
        .map(|n| names.iter().position(|m| m == n).unwrap())
        .collect();
    let e = exact_trace_of(&h, &pick).unwrap();
    let layers = layer_traces(&s);
    for b in &e.blocks {
        let name = &names[b.index];
        let t = &layers.iter().find(|l| &l.0 == name).unwrap().1;
        let err = rel(*t, b.trace);
        eprintln!(
            "resnet20 {name}: binary structural {t} in-process basis {} rel {err:.1e}",
            b.trace
        );
        assert!(err < 1e-9, "{name}");
    }

    // Train-mode BatchNorm: auto falls back to Hutchinson and says why; structural refuses.
    let a = run_json(&[&common[..], &["--bn-mode", "train", "--max-probes", "3"]].concat());
    assert_eq!(a["method"], "hutchinson");
    assert_eq!(a["bn_mode"], "train");
    let note = a["method_note"].as_str().unwrap();
    assert!(note.contains("train mode"), "{note}");
    let err = run_err(
        &[
            &common[..],
            &["--bn-mode", "train", "--method", "structural"],
        ]
        .concat(),
    );
    assert!(
        err.contains("--method structural") && err.contains("'bn1'") && err.contains("train mode"),
        "{err}"
    );

    // The human report names the BatchNorm mode too.
    let out = run(&[&common[..], &["--method", "structural"]].concat());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("BatchNorm eval") && text.contains("method: structural (exact)"),
        "{text}"
    );
}

#[test]
fn bad_input_is_one_line_naming_the_flag() {
    let dir = scratch("bad");
    let w = dir.join("w.safetensors");
    write_weights(&w, "tiny-tanh", 1);
    let data = dir.join("batch.bin");
    write_cifar(&data, 4, 2);
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let (ws, ds, js) = (
        w.display().to_string(),
        data.display().to_string(),
        junk.display().to_string(),
    );
    let base = ["--model", "tiny-tanh", "--weights", &ws, "--data", &ds];

    let e = run_err(&[
        "--model",
        "tiny-tanh",
        "--weights",
        "/no/such/w.safetensors",
        "--data",
        &ds,
    ]);
    assert!(e.contains("--weights /no/such/w.safetensors"), "{e}");
    let e = run_err(&["--model", "tiny-tanh", "--weights", &js, "--data", &ds]);
    assert!(e.contains("--weights"), "{e}");
    let e = run_err(&["--weights", &ws, "--data", &ds]);
    assert!(e.contains("--model is needed"), "{e}");
    let e = run_err(&["--model", "resnet20", "--weights", &ws, "--data", &ds]);
    assert!(e.contains("--weights"), "{e}");
    let e = run_err(&["--model", "nope", "--weights", &ws, "--data", &ds]);
    assert!(e.contains("--model nope"), "{e}");
    let e = run_err(&[
        "--model",
        "tiny-tanh",
        "--weights",
        &ws,
        "--data",
        "/no/such/data",
    ]);
    assert!(e.contains("--data /no/such/data"), "{e}");
    let e = run_err(&[&base[..], &["--size", "50"]].concat());
    assert!(e.contains("--size 50"), "{e}");
    let e = run_err(&[&base[..], &["--batch", "0"]].concat());
    assert!(e.contains("--batch"), "{e}");
    let e = run_err(&[&base[..], &["--method", "nope"]].concat());
    assert!(e.contains("--method"), "{e}");
    let e = run_err(&[&base[..], &["--budget", "3", "--method", "hutch++"]].concat());
    assert!(e.contains("--budget"), "{e}");
    // Probe counts whose Lanczos bases cannot fit (the largest used to panic on a capacity
    // overflow before anything else happened).
    for probes in ["18446744073709551615", "1000000000"] {
        let e = run_err(&[&base[..], &["--method", "slq", "--probes", probes]].concat());
        assert!(
            e.contains(&format!("--probes {probes} with --steps 64")) && e.contains("available"),
            "{e}"
        );
    }
    let e = run_err(&[&base[..], &["--tol", "-1"]].concat());
    assert!(e.contains("--tol"), "{e}");
    let e = run_err(&[&base[..], &["--threads", "0"]].concat());
    assert!(e.contains("--threads"), "{e}");
    let e = run_err(&[&base[..], &["--run", dir.to_str().unwrap()]].concat());
    assert!(e.contains("--run") || e.contains("--weights"), "{e}");
    let e = run_err(&["--run", dir.to_str().unwrap()]);
    assert!(e.contains("--run") && e.contains("not a run folder"), "{e}");
    let e = run_err(&["--model", "tiny-tanh", "--data", &ds]);
    assert!(e.contains("--weights") || e.contains("--run"), "{e}");
}

/// Runs another `flatmin` subcommand (`eigen`, `density`, `train`).
fn run_cmd(cmd: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg(cmd)
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .env("FLATMIN_DATA", "/nonexistent-flatmin-data")
        .output()
        .expect("run the flatmin binary")
}

/// The last stdout line of a successful run, parsed.
fn last_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The interface of the curvature issue: `--checkpoint` (a run folder or a checkpoint file),
/// `--limit`/`--batch-size`, the methods `exact`, `exact-hvp`, `hutchpp` and `--probes`,
/// `--per-layer` filters (basis HVPs then measure only those tensors), the cost refusal of
/// basis HVPs, the JSON keys, and the `eigen` and `density` commands.
#[test]
fn checkpoint_aliases_per_layer_eigen_and_density() {
    let dir = scratch("interface");
    let run_dir = dir.join("run");
    let out = run_cmd(
        "train",
        &[
            "--model",
            "tiny-tanh",
            "--data",
            "synthetic",
            "--epochs",
            "1",
            "--train-size",
            "64",
            "--test-size",
            "32",
            "--batch-size",
            "32",
            "--dtype",
            "f64",
            "--quiet",
            "--out",
            run_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rs = run_dir.display().to_string();
    let ckpt = run_dir.join("checkpoints").join("last.safetensors");
    let cs = ckpt.display().to_string();
    let base = ["--checkpoint", &rs, "--limit", "20", "--batch-size", "8"];

    // --checkpoint RUN takes the run's model, data and float type; --limit/--batch-size are
    // --size/--batch.
    let e = run_json(&[&base[..], &["--method", "exact", "--per-layer"]].concat());
    assert_eq!(e["method"], "structural");
    assert_eq!(e["requested_method"], "exact");
    assert_eq!(e["model"], "tiny-tanh");
    assert_eq!(e["dtype"], "f64");
    assert_eq!(e["samples"], 20);
    assert_eq!(e["batches"], 3);
    assert_eq!(e["num_params"], 6506);
    assert!(e["seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(e["layers"].as_object().unwrap().len(), 4);
    let long = run_json(&[
        "--run",
        &rs,
        "--size",
        "20",
        "--batch",
        "8",
        "--method",
        "structural",
    ]);
    assert_eq!(trace_of(&e).to_bits(), trace_of(&long).to_bits());
    assert!(long.get("layers").is_none(), "layers only with --per-layer");

    // A checkpoint file inside the run's checkpoints/ folder: the same run defaults.
    let c = run_json(&["--checkpoint", &cs, "--limit", "20", "--batch-size", "8"]);
    assert_eq!(c["run"], rs.as_str());
    assert_eq!(c["dtype"], "f64");
    assert_eq!(trace_of(&c).to_bits(), trace_of(&e).to_bits());

    // --per-layer NAMES with basis HVPs measures only those tensors: their traces equal the
    // structural ones, the total is not claimed.
    let b = run_json(
        &[
            &base[..],
            &["--method", "exact-hvp", "--per-layer", "layers.1"],
        ]
        .concat(),
    );
    assert_eq!(b["method"], "basis");
    assert!(b["trace"].is_null());
    assert_eq!(b["hvps"], 330);
    let exact_layers = layer_traces(&e);
    let got = layer_traces(&b);
    assert_eq!(
        got.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
        ["layers.1.bias", "layers.1.weight"]
    );
    let mut sum = 0.0;
    for (name, t) in &got {
        let want = exact_layers.iter().find(|l| &l.0 == name).unwrap().1;
        assert!(rel(*t, want) < 1e-9, "{name}: {t} vs {want}");
        sum += t;
    }
    assert!(rel(b["selected_trace"].as_f64().unwrap(), sum) < 1e-12);

    // --diagonal writes the exact diagonal (structural, and basis on the selected tensors):
    // each tensor's sum is its trace.
    let diag = dir.join("diag.safetensors");
    let ds = diag.display().to_string();
    let d = run_json(
        &[
            &base[..],
            &["--method", "exact", "--per-layer", "--diagonal", &ds],
        ]
        .concat(),
    );
    let tensors = flatmin_models::io::read_safetensors(&diag).unwrap();
    assert_eq!(tensors.len(), 4);
    for t in &tensors {
        let flatmin_models::io::RawData::F64(v) = &t.data else {
            panic!("{}: not f64", t.name)
        };
        let want = d["layers"][&t.name]["trace"].as_f64().unwrap();
        assert!(rel(v.iter().sum::<f64>(), want) < 1e-12, "{}", t.name);
    }
    let b_diag = dir.join("diag-basis.safetensors");
    run_json(
        &[
            &base[..],
            &[
                "--method",
                "exact-hvp",
                "--per-layer",
                "layers.1",
                "--diagonal",
                b_diag.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let bt = flatmin_models::io::read_safetensors(&b_diag).unwrap();
    assert_eq!(bt.len(), 2);
    for t in &bt {
        let st = tensors.iter().find(|s| s.name == t.name).unwrap();
        let (flatmin_models::io::RawData::F64(a), flatmin_models::io::RawData::F64(b)) =
            (&t.data, &st.data)
        else {
            panic!("not f64")
        };
        assert_eq!(t.shape, st.shape);
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-9 * y.abs().max(1e-6),
                "{}: {x} vs {y}",
                t.name
            );
        }
    }
    let e = run_err(&[&base[..], &["--method", "hutchinson", "--diagonal", &ds]].concat());
    assert!(e.contains("--diagonal"), "{e}");

    // hutchpp --probes P spends P HVPs; hutchinson --probes P uses exactly P probes.
    let p = run_json(&[&base[..], &["--method", "hutchpp", "--probes", "12"]].concat());
    assert_eq!(
        (p["method"].as_str(), p["hvps"].as_u64()),
        (Some("hutch++"), Some(12))
    );
    assert!(p["std_error"].as_f64().unwrap() > 0.0);
    let h = run_json(&[&base[..], &["--method", "hutchinson", "--probes", "24"]].concat());
    assert_eq!(h["probes"], 24);
    assert!(h["std_error"].as_f64().unwrap() > 0.0);

    // eigen --top K is trace --method lanczos --top-k K.
    let g = last_json(run_cmd(
        "eigen",
        &[&base[..], &["--top", "2", "--steps", "30", "--json"]].concat(),
    ));
    let l = run_json(
        &[
            &base[..],
            &["--method", "lanczos", "--top-k", "2", "--steps", "30"],
        ]
        .concat(),
    );
    assert_eq!(g["eigenvalues"], l["eigenvalues"]);
    assert_eq!(g["eigenvalues"].as_array().unwrap().len(), 2);

    // density draws the SLQ density.
    let svg = dir.join("density.svg");
    let q = last_json(run_cmd(
        "density",
        &[
            &base[..],
            &[
                "--probes",
                "2",
                "--steps",
                "12",
                "--out",
                svg.to_str().unwrap(),
                "--json",
            ],
        ]
        .concat(),
    ));
    assert_eq!(q["method"], "slq");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("eigenvalue"));

    // Refusals: a basis trace over the time limit (with the estimate), unknown --per-layer
    // names, --per-layer without a trace, a plot format flatmin cannot write.
    let e = run_err(
        &[
            &base[..],
            &[
                "--method",
                "exact-hvp",
                "--directions",
                "4",
                "--max-hours",
                "1e-9",
            ],
        ]
        .concat(),
    );
    assert!(
        e.contains("would take about") && e.contains("--max-hours"),
        "{e}"
    );
    let e = run_err(&[&base[..], &["--per-layer", "layers.1,conv9"]].concat());
    assert!(
        e.contains("--per-layer conv9") && e.contains("layers"),
        "{e}"
    );
    let e = run_err(&[&base[..], &["--method", "slq", "--per-layer"]].concat());
    assert!(e.contains("--per-layer"), "{e}");
    let out = run_cmd("density", &[&base[..], &["--out", "d.pdf"]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: --out d.pdf"), "{err}");
    let e = run_err(&["--checkpoint", dir.join("nope").to_str().unwrap()]);
    assert!(e.contains("--checkpoint"), "{e}");
}

/// A network file (the exported small ResNet) as `--model` of `trace`, `eigen` and `density`:
/// the exact trace equals the library's on the same batch file (structural, BatchNorm eval),
/// exact-hvp agrees with it, and the spectral commands run on it.
#[test]
fn a_network_file_is_measured_like_a_preset() {
    let dir = scratch("network-file");
    let net = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/nets/small_resnet/network.json");
    let net = net.to_str().unwrap();
    let w = dir.join("w.safetensors");
    let data = dir.join("batch.bin");
    let model = write_weights(&w, net, 7);
    write_cifar(&data, 3, 4);
    let (ws, ds) = (w.display().to_string(), data.display().to_string());
    let common = [
        "--model",
        net,
        "--weights",
        &ws,
        "--data",
        &ds,
        "--dtype",
        "f64",
    ];
    let s = run_json(&[&common[..], &["--method", "exact", "--per-layer"]].concat());
    assert_eq!(s["method"], "structural");

    let batch = read_batch_file(&data).unwrap();
    let x = Tensor::from_vec(&[3, 3, 32, 32], normalize_f64(&batch)).unwrap();
    let batches = vec![(x, batch.labels_usize())];
    let want = flatmin_models::measure::trace(
        &model,
        &batches,
        &flatmin_models::measure::TraceOptions::default(),
    )
    .unwrap()
    .trace
    .unwrap();
    assert_eq!(
        trace_of(&s),
        want,
        "the binary's trace differs from the library's"
    );
    // Basis HVPs on the classifier's tensors only (cheap) agree with the structural blocks.
    let b = run_json(&[&common[..], &["--method", "exact-hvp", "--per-layer", "fc"]].concat());
    let structural = layer_traces(&s);
    for (name, t) in layer_traces(&b) {
        let (_, st) = structural.iter().find(|(n, _)| *n == name).unwrap();
        assert!(rel(t, *st) < 1e-10, "{name}: {t} vs {st}");
    }

    let e = last_json(run_cmd(
        "eigen",
        &[&common[..], &["--top", "2", "--steps", "20", "--json"]].concat(),
    ));
    let ev = e["eigenvalues"].as_array().unwrap();
    assert_eq!(ev.len(), 2);
    assert!(ev[0].as_f64().unwrap() >= ev[1].as_f64().unwrap());
    // Fewer Lanczos steps than eigenvalues asked for is refused, naming both flags.
    let few = run_cmd(
        "eigen",
        &[&common[..], &["--top", "3", "--steps", "2"]].concat(),
    );
    let msg = String::from_utf8_lossy(&few.stderr);
    assert!(
        !few.status.success() && msg.contains("--steps") && msg.contains("--top"),
        "{msg}"
    );
    let d = last_json(run_cmd(
        "density",
        &[&common[..], &["--probes", "2", "--steps", "8", "--json"]].concat(),
    ));
    assert!(d["trace"].as_f64().unwrap().is_finite());
    let (mass, tol) = (
        &d["density"]["negative_mass"],
        &d["density"]["negative_tolerance"],
    );
    assert!((0.0..=1.0).contains(&mass.as_f64().unwrap()), "{d}");
    assert!(tol.as_f64().unwrap() > 0.0, "{d}");
}

/// Too few probes name the flag that was given: `--probes` when `--probes` set the count
/// (for every method that reads it), `--max-probes` only when that flag did; and `--probes`
/// for SLQ or Lanczos is not checked as a Hutchinson probe count.
#[test]
fn too_few_probes_name_the_flag_that_was_given() {
    let dir = scratch("probes");
    let w = dir.join("w.safetensors");
    write_weights(&w, "tiny-tanh", 1);
    let data = dir.join("batch.bin");
    write_cifar(&data, 4, 2);
    let (ws, ds) = (w.display().to_string(), data.display().to_string());
    let base = ["--model", "tiny-tanh", "--weights", &ws, "--data", &ds];
    for method in ["auto", "hutchinson", "hutch++"] {
        for probes in ["0", "1"] {
            let e = run_err(&[&base[..], &["--method", method, "--probes", probes]].concat());
            assert!(
                e.contains("--probes must be at least")
                    && e.contains(&format!("got {probes}"))
                    && !e.contains("--max-probes"),
                "{method} {probes}: {e}"
            );
        }
    }
    // Exact methods take no probes: --max-probes is not blamed for --probes.
    let out = run(&[&base[..], &["--method", "exact", "--probes", "0"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("max-probes"), "{stderr}");
    let e = run_err(&[&base[..], &["--method", "hutchinson", "--max-probes", "1"]].concat());
    assert!(e.contains("--max-probes must be at least 2, got 1"), "{e}");
    let e = run_err(&[&base[..], &["--method", "slq", "--probes", "0"]].concat());
    assert!(e.contains("--probes must be at least 1"), "{e}");
    // One SLQ probe vector is a valid request.
    let j = run_json(
        &[
            &base[..],
            &["--method", "slq", "--probes", "1", "--steps", "4"],
        ]
        .concat(),
    );
    assert!(j.is_object(), "{j}");
}

#[test]
fn eigen_out_writes_eigenvectors_that_hvp_confirms() {
    let dir = scratch("eigen-out");
    let w = dir.join("w.safetensors");
    let data = dir.join("batch.bin");
    write_weights(&w, "tiny-tanh", 3);
    write_cifar(&data, 12, 4);
    let (ws, ds) = (w.display().to_string(), data.display().to_string());
    let common = ["--model", "tiny-tanh", "--weights", &ws, "--data", &ds];
    let out = dir.join("v.safetensors");
    let os = out.display().to_string();
    let top2 = [
        "--dtype", "f64", "--top", "2", "--steps", "60", "--out", &os, "--json",
    ];
    let e = last_json(run_cmd("eigen", &[&common[..], &top2[..]].concat()));
    let files: Vec<String> = e["eigenvector_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (1..=2)
        .map(|k| dir.join(format!("v-{k}.safetensors")).display().to_string())
        .collect();
    assert_eq!(files, want);
    for (k, file) in files.iter().enumerate() {
        let lambda = e["eigenvalues"][k].as_f64().unwrap();
        // The file is a --vector: H v from `flatmin hvp` on the same images is λ v.
        let hv = dir.join(format!("hv-{k}.safetensors"));
        let hs = hv.display().to_string();
        let hvp_args = ["--vector", file.as_str(), "--dtype", "f64", "--out", &hs];
        let o = run_cmd("hvp", &[&common[..], &hvp_args[..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = flatmin_models::io::read_safetensors(Path::new(file)).unwrap();
        let h = flatmin_models::io::read_safetensors(&hv).unwrap();
        let (mut norm, mut resid) = (0.0, 0.0);
        for t in &v {
            let vt = t.data.to_f64().unwrap();
            let name = format!("hvp.{}", t.name);
            let ht = h.iter().find(|x| x.name == name).unwrap();
            for (a, b) in vt.iter().zip(&ht.data.to_f64().unwrap()) {
                norm += a * a;
                resid += (b - lambda * a).powi(2);
            }
        }
        assert!(
            (norm.sqrt() - 1.0).abs() < 1e-9,
            "unit norm: {}",
            norm.sqrt()
        );
        assert!(
            resid.sqrt() <= 1e-6 * lambda.abs(),
            "λ{}: ‖Hv − λv‖ = {:e}, λ = {lambda:e}",
            k + 1,
            resid.sqrt()
        );
    }
    // --top 1 writes OUT itself; a name without .safetensors is refused.
    let one = dir.join("top.safetensors").display().to_string();
    let top1 = ["--dtype", "f64", "--out", &one, "--json"];
    let e1 = last_json(run_cmd("eigen", &[&common[..], &top1[..]].concat()));
    assert_eq!(e1["eigenvector_files"][0], one.as_str());
    let o = run_cmd("eigen", &[&common[..], &["--out", "v.bin"][..]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("--out v.bin") && err.contains("safetensors"),
        "{err}"
    );
}
