//! Runs the real `flatmin hvp` binary on inputs built in a scratch folder and checks its
//! output against `Model::evaluate` in-process, its determinism across thread counts, and
//! its one-line errors on bad input.

use flatmin_datasets::{normalize_f32, normalize_f64, read_batch_file};
use flatmin_engine::{DType, Scalar, Tensor};
use flatmin_models::io::{read_safetensors, write_safetensors, RawData, RawTensor};
use flatmin_models::model::float_raw;
use flatmin_models::{BnUse, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_flatmin");

mod common;
use common::{write_cifar, Rng};

/// A fresh empty folder for one test under cargo's scratch folder.
fn scratch(name: &str) -> PathBuf {
    common::scratch("hvp", name)
}

fn as_f32(t: RawTensor) -> RawTensor {
    let data = match t.data {
        RawData::F64(v) => RawData::F32(v.into_iter().map(|x| x as f32).collect()),
        other => other,
    };
    RawTensor { data, ..t }
}

/// Saves a model of `preset` (initialized from `seed`; with BatchNorm, its running
/// statistics updated from a few train-mode batches so that eval mode differs from train
/// mode) with `Model::save` in the given float type, PyTorch-style with
/// `num_batches_tracked`.
fn write_weights(path: &Path, preset: &str, seed: u64, dtype: DType) {
    let mut model = Model::<f64>::named(preset, seed).unwrap();
    if model.net().has_batch_norm() {
        let mut rng = Rng(seed.wrapping_mul(31) | 1);
        for _ in 0..3 {
            let x: Vec<f64> = (0..4 * 3072).map(|_| rng.uniform()).collect();
            let x = Tensor::from_vec(&[4, 3, 32, 32], x).unwrap();
            let e = model
                .evaluate(&x, &[0, 1, 2, 3], &[], BnUse::Train, false)
                .unwrap();
            model.update_running_stats(&e.bn_stats);
        }
    }
    match dtype {
        DType::F64 => model.save(path).unwrap(),
        DType::F32 => model.cast::<f32>().save(path).unwrap(),
    }
}

/// A random direction: one tensor per trainable parameter of `preset`, under its name.
fn write_vector(path: &Path, preset: &str, seed: u64, dtype: DType) {
    let model = Model::<f64>::named(preset, 0).unwrap();
    let mut rng = Rng(seed | 1);
    let raw: Vec<RawTensor> = model
        .param_names()
        .iter()
        .zip(model.params())
        .map(|(name, p)| RawTensor {
            name: name.to_string(),
            shape: p.shape().to_vec(),
            data: RawData::F64((0..p.numel()).map(|_| rng.uniform()).collect()),
        })
        .map(|t| if dtype == DType::F32 { as_f32(t) } else { t })
        .collect();
    write_safetensors(path, &raw).unwrap();
}

/// The inputs of one `flatmin hvp` run.
struct Inputs {
    dir: PathBuf,
    preset: String,
    weights: PathBuf,
    data: PathBuf,
    vector: PathBuf,
}

impl Inputs {
    fn new(name: &str, preset: &str, records: usize, file_dtype: DType) -> Self {
        let dir = scratch(name);
        let weights = dir.join("weights.safetensors");
        let data = dir.join("batch.bin");
        let vector = dir.join("vector.safetensors");
        write_weights(&weights, preset, 11, file_dtype);
        write_cifar(&data, records, 5);
        write_vector(&vector, preset, 23, file_dtype);
        Inputs {
            dir,
            preset: preset.into(),
            weights,
            data,
            vector,
        }
    }

    /// The full argument list for an output file `out` plus `extra` flags.
    fn args(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "hvp".into(),
            "--model".into(),
            self.preset.clone(),
            "--weights".into(),
            self.weights.display().to_string(),
            "--data".into(),
            self.data.display().to_string(),
            "--vector".into(),
            self.vector.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
}

fn run(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RAYON_NUM_THREADS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the flatmin binary")
}

fn run_ok(args: &[String], env: &[(&str, &str)]) {
    let out = run(args, env);
    assert!(
        out.status.success(),
        "flatmin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A success says what it wrote, in one line naming --out.
    let target = args.iter().skip_while(|a| *a != "--out").nth(1).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("wrote {target} (")) && stdout.lines().count() == 1,
        "{stdout}"
    );
}

/// Tensors as name -> (shape, bit patterns, dtype tag), for bitwise comparison.
type Bits = BTreeMap<String, (Vec<usize>, Vec<u64>, &'static str)>;

fn bits(tensors: Vec<RawTensor>) -> Bits {
    tensors
        .into_iter()
        .map(|t| {
            let (b, tag) = match &t.data {
                RawData::F32(v) => (v.iter().map(|x| u64::from(x.to_bits())).collect(), "F32"),
                RawData::F64(v) => (v.iter().map(|x| x.to_bits()).collect(), "F64"),
                RawData::I64(v) => (v.iter().map(|&x| x as u64).collect(), "I64"),
            };
            (t.name, (t.shape, b, tag))
        })
        .collect()
}

/// What `flatmin hvp` should write, computed in-process with the library.
fn reference<T: Scalar>(inputs: &Inputs, bn: BnUse) -> Vec<RawTensor> {
    let mut model = Model::<T>::named(&inputs.preset, 999).unwrap();
    model.load(&inputs.weights).unwrap();
    let v = model.load_param_like(&inputs.vector).unwrap();
    let batch = read_batch_file(&inputs.data).unwrap();
    let data: Vec<T> = match T::DTYPE {
        DType::F32 => normalize_f32(&batch)
            .into_iter()
            .map(|x| T::from(x).unwrap())
            .collect(),
        DType::F64 => normalize_f64(&batch)
            .into_iter()
            .map(|x| T::from(x).unwrap())
            .collect(),
    };
    let x = Tensor::from_vec(&[batch.len(), 3, 32, 32], data).unwrap();
    let e = model
        .evaluate(&x, &batch.labels_usize(), &[v], bn, true)
        .unwrap();
    let mut out = vec![
        RawTensor {
            name: "logits".into(),
            shape: vec![batch.len(), 10],
            data: float_raw(&e.logits),
        },
        RawTensor {
            name: "loss".into(),
            shape: vec![],
            data: float_raw(&Tensor::scalar(e.loss)),
        },
    ];
    for (i, name) in model.param_names().iter().enumerate() {
        out.push(RawTensor {
            name: format!("grad.{name}"),
            shape: e.grads[i].shape().to_vec(),
            data: float_raw(&e.grads[i]),
        });
        out.push(RawTensor {
            name: format!("hvp.{name}"),
            shape: e.hvps[0][i].shape().to_vec(),
            data: float_raw(&e.hvps[0][i]),
        });
    }
    out
}

fn expected_names(preset: &str) -> Vec<String> {
    let model = Model::<f32>::named(preset, 0).unwrap();
    let mut names = vec!["logits".to_string(), "loss".to_string()];
    for p in model.param_names() {
        names.push(format!("grad.{p}"));
        names.push(format!("hvp.{p}"));
    }
    names.sort();
    names
}

#[test]
fn output_matches_in_process_evaluation() {
    for preset in ["tiny-tanh", "resnet20"] {
        // Weights and vector stored in one precision, computed in either.
        for (file_dtype, records) in [(DType::F64, 4), (DType::F32, 3)] {
            let inputs = Inputs::new(
                &format!("match-{preset}-{}", file_dtype.name()),
                preset,
                records,
                file_dtype,
            );
            let model = Model::<f32>::named(preset, 0).unwrap();
            for dtype in ["f32", "f64"] {
                for bn in ["train", "eval"] {
                    let out = inputs.dir.join(format!("out-{dtype}-{bn}.safetensors"));
                    run_ok(
                        &inputs.args(&out, &["--dtype", dtype, "--bn-mode", bn]),
                        &[],
                    );
                    let got = bits(read_safetensors(&out).unwrap());
                    let bn_use = BnUse::parse(bn).unwrap();
                    let want = bits(match dtype {
                        "f32" => reference::<f32>(&inputs, bn_use),
                        _ => reference::<f64>(&inputs, bn_use),
                    });
                    let names: Vec<String> = got.keys().cloned().collect();
                    assert_eq!(names, expected_names(preset), "{preset} {dtype} {bn}");
                    let tag = if dtype == "f32" { "F32" } else { "F64" };
                    for (name, (shape, _, t)) in &got {
                        assert_eq!(*t, tag, "{name}");
                        let want_shape = match name.as_str() {
                            "logits" => vec![records, 10],
                            "loss" => vec![],
                            n => {
                                let p = n.split_once('.').unwrap().1;
                                let i = model.param_names().iter().position(|&q| q == p).unwrap();
                                model.params()[i].shape().to_vec()
                            }
                        };
                        assert_eq!(*shape, want_shape, "{name}");
                    }
                    assert!(
                        got == want,
                        "{preset} {dtype} {bn}: output differs from evaluate"
                    );
                }
            }
            // Defaults: f32, eval.
            let out = inputs.dir.join("out-default.safetensors");
            run_ok(&inputs.args(&out, &[]), &[]);
            let got = bits(read_safetensors(&out).unwrap());
            assert!(
                got == bits(reference::<f32>(&inputs, BnUse::Eval)),
                "{preset} defaults"
            );
            if preset == "resnet20" {
                // Eval and train mode really differ here (perturbed running statistics).
                let train =
                    bits(read_safetensors(&inputs.dir.join("out-f32-train.safetensors")).unwrap());
                assert!(train["logits"] != got["logits"]);
            }
        }
    }
}

#[test]
fn a_network_file_works_like_a_preset() {
    // The exported small ResNet (BatchNorm, projection shortcut) as `--model NET.json`.
    let net = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/nets/small_resnet/network.json");
    let inputs = Inputs::new("network-file", net.to_str().unwrap(), 3, DType::F64);
    for bn in ["train", "eval"] {
        let out = inputs.dir.join(format!("out-{bn}.safetensors"));
        run_ok(
            &inputs.args(&out, &["--dtype", "f64", "--bn-mode", bn]),
            &[],
        );
        let got = bits(read_safetensors(&out).unwrap());
        let names: Vec<String> = got.keys().cloned().collect();
        assert_eq!(names, expected_names(&inputs.preset), "{bn}");
        let want = bits(reference::<f64>(&inputs, BnUse::parse(bn).unwrap()));
        assert!(got == want, "{bn}: output differs from evaluate");
    }
}

#[test]
fn hessian_is_symmetric_end_to_end() {
    // <w, H v> = <v, H w> through the binary (tiny-tanh, f64).
    let inputs = Inputs::new("symmetric", "tiny-tanh", 6, DType::F64);
    let w_path = inputs.dir.join("w.safetensors");
    write_vector(&w_path, "tiny-tanh", 77, DType::F64);
    let hv = inputs.dir.join("hv.safetensors");
    let hw = inputs.dir.join("hw.safetensors");
    run_ok(&inputs.args(&hv, &["--dtype", "f64"]), &[]);
    let mut args = inputs.args(&hw, &["--dtype", "f64"]);
    let i = args.iter().position(|a| a == "--vector").unwrap();
    args[i + 1] = w_path.display().to_string();
    run_ok(&args, &[]);
    let read = |p: &Path| -> BTreeMap<String, Vec<f64>> {
        read_safetensors(p)
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.data.to_f64().unwrap()))
            .collect()
    };
    let (v, w, hv, hw) = (read(&inputs.vector), read(&w_path), read(&hv), read(&hw));
    let dot = |a: &BTreeMap<String, Vec<f64>>, prefix: &str, b: &BTreeMap<String, Vec<f64>>| {
        a.iter()
            .map(|(n, x)| {
                x.iter()
                    .zip(&b[&format!("{prefix}{n}")])
                    .map(|(p, q)| p * q)
                    .sum::<f64>()
            })
            .sum::<f64>()
    };
    let (whv, vhw) = (dot(&w, "hvp.", &hv), dot(&v, "hvp.", &hw));
    assert!(whv.abs() > 1e-6, "H v looks zero: {whv}");
    assert!(
        (whv - vhw).abs() <= 1e-10 * whv.abs().max(1.0),
        "{whv} vs {vhw}"
    );
    // The gradient and loss do not depend on the direction.
    assert_eq!(hv["loss"], hw["loss"]);
    assert_eq!(hv["grad.layers.0.weight"], hw["grad.layers.0.weight"]);
}

#[test]
fn bit_identical_across_thread_counts() {
    for (preset, extra) in [
        ("cnn-s", &["--dtype", "f32"][..]),
        ("resnet20", &["--bn-mode", "train"][..]),
    ] {
        let inputs = Inputs::new(&format!("threads-{preset}"), preset, 8, DType::F32);
        // (tag, RAYON_NUM_THREADS, --threads)
        let runs = [
            ("env1", "1", None),
            ("env2", "2", None),
            ("env3", "3", None),
            ("flag1", "2", Some("1")),
            ("flag2", "1", Some("2")),
        ];
        let mut files = Vec::new();
        for (tag, env, threads) in runs {
            let out = inputs.dir.join(format!("{tag}.safetensors"));
            let mut f: Vec<&str> = extra.to_vec();
            if let Some(t) = threads {
                f.extend(["--threads", t]);
            }
            run_ok(&inputs.args(&out, &f), &[("RAYON_NUM_THREADS", env)]);
            files.push((tag, std::fs::read(&out).unwrap()));
        }
        for (tag, bytes) in &files[1..] {
            assert!(
                bytes == &files[0].1,
                "{preset}: {tag} differs from {}",
                files[0].0
            );
        }
        let hv = bits(read_safetensors(&inputs.dir.join("env1.safetensors")).unwrap());
        assert!(hv
            .iter()
            .any(|(n, (_, b, _))| n.starts_with("hvp.") && b.iter().any(|&x| x != 0)));
    }
}

/// A wrapped state_dict (`model.` before every name) is refused naming both sides and the
/// flag; with `--strip-prefix model.` it gives the same bytes as the plain weights.
#[test]
fn strip_prefix_reads_a_wrapped_state_dict() {
    let inputs = Inputs::new("strip-prefix", "cnn-s", 4, DType::F32);
    let plain = inputs.dir.join("plain.safetensors");
    run_ok(&inputs.args(&plain, &[]), &[]);
    let wrapped = edited(&inputs.dir, "wrapped.safetensors", &inputs.weights, |t| {
        for x in t.iter_mut() {
            x.name = format!("model.{}", x.name);
        }
    });
    let args = with(
        &inputs.args(&inputs.dir.join("out.safetensors"), &[]),
        "--weights",
        &wrapped,
    );
    expect_error(
        &inputs,
        "wrapped",
        &args,
        &[
            "wrapped.safetensors",
            "'model.conv1.weight'",
            "--strip-prefix model.",
        ],
    );
    let out = inputs.dir.join("stripped.safetensors");
    let mut args = with(&inputs.args(&out, &[]), "--weights", &wrapped);
    args.extend(["--strip-prefix".to_string(), "model.".to_string()]);
    run_ok(&args, &[]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&plain).unwrap());
}

/// Runs a failing command and checks the one-line error report.
fn expect_error(inputs: &Inputs, case: &str, args: &[String], needles: &[&str]) {
    let out = run(args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{case}: succeeded: {args:?}");
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{case}: killed: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case}: panicked: {stderr}");
    let text = common::error_text(&out, case);
    eprintln!("{case}: {text}");
    for needle in needles {
        assert!(
            text.contains(needle),
            "{case}: {needle:?} not in {stderr:?}"
        );
    }
    assert!(
        !inputs.dir.join("out.safetensors").exists(),
        "{case}: output written despite the error"
    );
}

/// `args` with the value of `flag` replaced.
fn with(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut a = args.to_vec();
    let i = a.iter().position(|x| x == flag).unwrap();
    a[i + 1] = value.to_string();
    a
}

/// Writes `tensors` after applying `edit` to a copy.
fn edited(dir: &Path, file: &str, from: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) -> String {
    let mut t = read_safetensors(from).unwrap();
    edit(&mut t);
    let path = dir.join(file);
    write_safetensors(&path, &t).unwrap();
    path.display().to_string()
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let inputs = Inputs::new("errors", "tiny-tanh", 2, DType::F32);
    let dir = inputs.dir.clone();
    let out = dir.join("out.safetensors");
    let args = inputs.args(&out, &[]);
    let p = |name: &str| dir.join(name).display().to_string();

    // The good command works (and its output is then removed).
    run_ok(&args, &[]);
    std::fs::remove_file(&out).unwrap();

    // Missing files.
    for flag in ["--weights", "--data", "--vector"] {
        let a = with(&args, flag, &p("absent.file"));
        expect_error(&inputs, flag, &a, &[flag, "absent.file"]);
    }
    // Data file: wrong size, empty, bad label, a folder.
    std::fs::write(p("odd.bin"), vec![0u8; 2 * 3073 + 10]).unwrap();
    expect_error(
        &inputs,
        "odd size",
        &with(&args, "--data", &p("odd.bin")),
        &["odd.bin", "remainder 10", "3073"],
    );
    std::fs::write(p("empty.bin"), b"").unwrap();
    expect_error(
        &inputs,
        "empty",
        &with(&args, "--data", &p("empty.bin")),
        &["empty.bin", "empty"],
    );
    let mut bad = std::fs::read(&inputs.data).unwrap();
    bad[3073] = 10;
    std::fs::write(p("label.bin"), bad).unwrap();
    expect_error(
        &inputs,
        "label",
        &with(&args, "--data", &p("label.bin")),
        &["label.bin", "record 1", "label byte 10"],
    );
    std::fs::create_dir_all(p("folder.bin")).unwrap();
    expect_error(
        &inputs,
        "folder",
        &with(&args, "--data", &p("folder.bin")),
        &["folder.bin"],
    );

    // Truncated safetensors files.
    let w = std::fs::read(&inputs.weights).unwrap();
    std::fs::write(p("trunc_w.safetensors"), &w[..w.len() / 2]).unwrap();
    expect_error(
        &inputs,
        "truncated weights",
        &with(&args, "--weights", &p("trunc_w.safetensors")),
        &["trunc_w.safetensors"],
    );
    std::fs::write(p("header_w.safetensors"), &w[..20]).unwrap();
    expect_error(
        &inputs,
        "truncated header",
        &with(&args, "--weights", &p("header_w.safetensors")),
        &["header_w.safetensors"],
    );
    let v = std::fs::read(&inputs.vector).unwrap();
    std::fs::write(p("trunc_v.safetensors"), &v[..v.len() - 4]).unwrap();
    expect_error(
        &inputs,
        "truncated vector",
        &with(&args, "--vector", &p("trunc_v.safetensors")),
        &["trunc_v.safetensors"],
    );
    std::fs::write(
        p("garbage.safetensors"),
        b"this is not a safetensors file at all",
    )
    .unwrap();
    expect_error(
        &inputs,
        "garbage",
        &with(&args, "--weights", &p("garbage.safetensors")),
        &["garbage.safetensors"],
    );

    // Weights: missing, extra and mis-shaped tensors.
    let f = edited(&dir, "w_missing.safetensors", &inputs.weights, |t| {
        t.retain(|t| t.name != "layers.1.bias")
    });
    expect_error(
        &inputs,
        "weights missing",
        &with(&args, "--weights", &f),
        &["w_missing.safetensors", "layers.1.bias", "missing"],
    );
    let f = edited(&dir, "w_extra.safetensors", &inputs.weights, |t| {
        t.push(RawTensor {
            name: "extra.weight".into(),
            shape: vec![2],
            data: RawData::F32(vec![1.0, 2.0]),
        })
    });
    expect_error(
        &inputs,
        "weights extra",
        &with(&args, "--weights", &f),
        &["w_extra.safetensors", "extra.weight"],
    );
    let f = edited(&dir, "w_shape.safetensors", &inputs.weights, |t| {
        let e = t.iter_mut().find(|t| t.name == "layers.0.weight").unwrap();
        e.shape = vec![32, 191];
        e.data = RawData::F32(vec![0.0; 32 * 191]);
    });
    expect_error(
        &inputs,
        "weights shape",
        &with(&args, "--weights", &f),
        &["w_shape.safetensors", "layers.0.weight", "[32, 191]"],
    );
    let f = p("cnn_weights.safetensors");
    write_weights(Path::new(&f), "cnn-s", 1, DType::F32);
    expect_error(
        &inputs,
        "other model",
        &with(&args, "--weights", &f),
        &[
            "cnn_weights.safetensors",
            "missing tensor 'layers.0.weight'",
        ],
    );

    // Vector: wrong names, missing, mis-shaped, a BatchNorm-free model's buffers.
    let f = edited(&dir, "v_name.safetensors", &inputs.vector, |t| {
        t.iter_mut()
            .find(|t| t.name == "layers.0.bias")
            .unwrap()
            .name = "layers.0.b".into();
    });
    expect_error(
        &inputs,
        "vector name",
        &with(&args, "--vector", &f),
        &["v_name.safetensors", "layers.0.b"],
    );
    let f = edited(&dir, "v_missing.safetensors", &inputs.vector, |t| {
        t.retain(|t| t.name != "layers.1.weight")
    });
    expect_error(
        &inputs,
        "vector missing",
        &with(&args, "--vector", &f),
        &["v_missing.safetensors", "layers.1.weight"],
    );
    let f = edited(&dir, "v_shape.safetensors", &inputs.vector, |t| {
        let e = t.iter_mut().find(|t| t.name == "layers.1.bias").unwrap();
        e.shape = vec![1, 10];
    });
    expect_error(
        &inputs,
        "vector shape",
        &with(&args, "--vector", &f),
        &["v_shape.safetensors", "layers.1.bias"],
    );
    // The weights file is not a direction (it would be for a model without buffers, so use
    // one with BatchNorm buffers).
    let rw = p("r_weights.safetensors");
    write_weights(Path::new(&rw), "resnet20", 1, DType::F32);
    let rv = p("r_vector.safetensors");
    write_vector(Path::new(&rv), "resnet20", 2, DType::F32);
    let r_args = with(
        &with(&with(&args, "--model", "resnet20"), "--weights", &rw),
        "--vector",
        &rw,
    );
    expect_error(
        &inputs,
        "weights as vector",
        &r_args,
        &["--vector", "r_weights.safetensors", "unexpected tensor"],
    );
    run_ok(&with(&r_args, "--vector", &rv), &[]);
    std::fs::remove_file(&out).unwrap();

    // Flags.
    expect_error(
        &inputs,
        "preset",
        &with(&args, "--model", "resnet99"),
        &["--model", "resnet99"],
    );
    let mut a = args.clone();
    a.extend(["--dtype".into(), "f16".into()]);
    expect_error(&inputs, "dtype", &a, &["--dtype", "f16"]);
    let mut a = args.clone();
    a.extend(["--bn-mode".into(), "batch".into()]);
    expect_error(&inputs, "bn-mode", &a, &["--bn-mode", "batch"]);
    for threads in ["0", "-1", "two"] {
        let mut a = args.clone();
        a.extend(["--threads".into(), threads.into()]);
        expect_error(&inputs, "threads", &a, &["--threads", threads]);
    }
    let i = args.iter().position(|x| x == "--vector").unwrap();
    let mut a = args.clone();
    a.drain(i..i + 2);
    expect_error(&inputs, "no vector flag", &a, &["--vector"]);
    let mut a = args.clone();
    a.push("--bogus".into());
    expect_error(&inputs, "unknown flag", &a, &["--bogus"]);
    let nowhere = dir.join("no_such_dir").join("out.safetensors");
    expect_error(
        &inputs,
        "out folder",
        &with(&args, "--out", &nowhere.display().to_string()),
        &["--out", "no_such_dir"],
    );

    std::fs::create_dir_all(p("out_dir.safetensors")).unwrap();
    expect_error(
        &inputs,
        "out is a folder",
        &with(&args, "--out", &p("out_dir.safetensors")),
        &["--out", "out_dir.safetensors", "a folder"],
    );
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(dir.join("target.safetensors"), &link).unwrap();
    expect_error(
        &inputs,
        "out is a symlink",
        &with(&args, "--out", &link.display().to_string()),
        &["--out", "link.safetensors", "symbolic link"],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // Help and version are not errors.
    for flag in ["--help", "--version"] {
        let o = run(&["hvp".to_string(), flag.to_string()], &[]);
        assert!(o.status.success(), "{flag}");
        assert!(!o.stdout.is_empty());
    }
}

/// A FIFO, a character device (`/dev/zero`) or a folder given as `--weights`, `--data`,
/// `--vector` or as the network file of `--model X.json` is refused at once with one line
/// naming the flag, the path and what it is. Before the fix a FIFO blocked `open` for ever
/// and `/dev/zero` was read until memory ran out; the child is killed after 20 s.
#[test]
fn fifos_devices_and_folders_are_refused_without_blocking() {
    let inputs = Inputs::new("special", "tiny-tanh", 2, DType::F32);
    let dir = inputs.dir.clone();
    let out = dir.join("out.safetensors");
    let args = inputs.args(&out, &[]);
    let fifo = dir.join("fifo");
    common::mkfifo(&fifo);
    let net = dir.join("net.json");
    common::mkfifo(&net);
    let folder = dir.join("folder.safetensors");
    std::fs::create_dir_all(&folder).unwrap();
    let f = fifo.display().to_string();
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "--weights fifo",
            with(&args, "--weights", &f),
            vec!["--weights", &f, "a FIFO"],
        ),
        (
            "--data fifo",
            with(&args, "--data", &f),
            vec!["--data", &f, "a FIFO"],
        ),
        (
            "--vector fifo",
            with(&args, "--vector", &f),
            vec!["--vector", &f, "a FIFO"],
        ),
        (
            "--model fifo.json",
            with(&args, "--model", &net.display().to_string()),
            vec!["net.json", "a FIFO"],
        ),
        (
            "--weights /dev/zero",
            with(&args, "--weights", "/dev/zero"),
            vec!["--weights", "/dev/zero", "a character device"],
        ),
        (
            "--data /dev/zero",
            with(&args, "--data", "/dev/zero"),
            vec!["--data", "/dev/zero", "a character device"],
        ),
        (
            "--weights folder",
            with(&args, "--weights", &folder.display().to_string()),
            vec!["--weights", "folder.safetensors", "a folder"],
        ),
    ];
    for (case, a, needles) in cases {
        let (status, stderr) = common::run_bounded(BIN, &a, std::time::Duration::from_secs(20));
        eprintln!("{case}: {}", stderr.trim_end());
        assert!(
            status.code().is_some_and(|c| c != 0),
            "{case}: {status:?} {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
        let text = stderr.trim_end();
        assert_eq!(text.lines().count(), 1, "{case}: not one line: {stderr:?}");
        assert!(text.starts_with("error: "), "{case}: {stderr:?}");
        for needle in needles {
            assert!(
                text.contains(needle),
                "{case}: {needle:?} not in {stderr:?}"
            );
        }
        assert!(!out.exists(), "{case}: output written despite the error");
    }
}

/// Weights so large that the logits overflow f32 make the loss non-finite: `flatmin hvp`
/// fails with one line naming the loss value and the inputs, and writes nothing. Before the
/// fix it wrote the NaN/inf tensors and exited 0 without a word.
#[test]
fn non_finite_loss_is_an_error_and_nothing_is_written() {
    let inputs = Inputs::new("nonfinite", "tiny-tanh", 2, DType::F32);
    let dir = inputs.dir.clone();
    let out = dir.join("out.safetensors");
    let args = inputs.args(&out, &[]);
    let huge = edited(&dir, "huge.safetensors", &inputs.weights, |t| {
        for t in t.iter_mut() {
            if let RawData::F32(v) = &mut t.data {
                v.iter_mut().for_each(|x| *x = 3.0e38);
            }
        }
    });
    let a = with(&args, "--weights", &huge);
    expect_error(
        &inputs,
        "non-finite loss",
        &a,
        &[
            "the loss is",
            "not finite",
            "--weights",
            "huge.safetensors",
            "--data",
            "batch.bin",
        ],
    );
}
