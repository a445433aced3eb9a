//! Weights from PyTorch: a `torch.save` file (zip or legacy pickle) is named as such with a
//! one-line conversion command, a name mismatch lists what the file holds and what the
//! model expects (suggesting `--strip-prefix`), and `--strip-prefix model.` loads a wrapped
//! state_dict, wherever weights are read (`eval`, `trace --weights`, `train --init-from`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn tmp(name: &str) -> PathBuf {
    let d = common::tmp("torch-weights", name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn flatmin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

/// The one-line error of a failed command.
fn error_line(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// The commands that read weights, each with the weights file `w` and `extra` flags.
fn readers<'a>(w: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<Vec<&'a str>> {
    let data = ["--model", "tiny-tanh", "--data", "synthetic"];
    let mut eval = vec!["eval", w];
    eval.extend(data);
    eval.extend(["--size", "20"]);
    let mut trace = vec!["trace", "--weights", w];
    trace.extend(data);
    trace.extend(["--size", "20"]);
    let mut train = vec!["train", "--init-from", w, "--out", out, "--quiet"];
    train.extend(data);
    train.extend([
        "--train-size",
        "100",
        "--test-size",
        "50",
        "--epochs",
        "1",
        "--batch-size",
        "50",
    ]);
    let mut all = vec![eval, trace, train];
    for c in &mut all {
        c.extend_from_slice(extra);
    }
    all
}

#[test]
fn torch_save_files_are_named_with_the_conversion_command() {
    let dir = tmp("torch");
    let out = dir.join("run").display().to_string();
    for (name, kind) in [
        ("torch_zip.pt", "zip"),
        ("torch_legacy.pt", "legacy pickle"),
    ] {
        let w = fixture(name);
        for args in readers(&w, &out, &[]) {
            let err = error_line(&flatmin(&args));
            assert!(
                err.contains(&format!(
                    "{name}: this is a PyTorch {kind} file (torch.save), not safetensors"
                )) && err
                    .contains("python -c \"import torch; from safetensors.torch import save_file;")
                    && err.contains(&format!("torch.load('{w}'"))
                    && err.contains(&w.replace(".pt", ".safetensors")),
                "{args:?}: {err}"
            );
        }
    }
}

#[test]
fn a_wrapped_state_dict_is_named_and_loads_with_strip_prefix() {
    let dir = tmp("prefix");
    let run = dir.join("run");
    let o = flatmin(&[
        "train",
        "--model",
        "tiny-tanh",
        "--data",
        "synthetic",
        "--train-size",
        "100",
        "--test-size",
        "50",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plain = run.join("model.safetensors");
    let mut raw = flatmin_models::io::read_safetensors(&plain).unwrap();
    for t in &mut raw {
        t.name = format!("model.{}", t.name);
    }
    let wrapped = dir.join("wrapped.safetensors");
    flatmin_models::io::write_safetensors(&wrapped, &raw).unwrap();
    let w = wrapped.display().to_string();
    let out = dir.join("init").display().to_string();
    for args in readers(&w, &out, &[]) {
        let err = error_line(&flatmin(&args));
        assert!(
            err.contains("wrapped.safetensors: missing tensor 'layers.0.weight'")
                && err.contains("the file holds 4: 'model.layers.")
                && err.contains("'model.layers.0.weight'")
                && err.contains("the model expects 4: 'layers.")
                && err.contains("pass --strip-prefix model."),
            "{args:?}: {err}"
        );
    }
    for args in readers(&w, &out, &["--strip-prefix", "model."]) {
        let o = flatmin(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The same model as the plain file: eval gives the same line.
    let eval = |w: &str, extra: &[&str]| {
        let mut a = vec![
            "eval",
            w,
            "--model",
            "tiny-tanh",
            "--data",
            "synthetic",
            "--size",
            "20",
        ];
        a.extend_from_slice(extra);
        let o = flatmin(&a);
        String::from_utf8_lossy(&o.stdout).replace(w, "W")
    };
    assert_eq!(
        eval(&w, &["--strip-prefix", "model."]),
        eval(plain.to_str().unwrap(), &[])
    );
    let config = std::fs::read_to_string(Path::new(&out).join("config.json")).unwrap();
    assert!(
        config.contains("\"init_strip_prefix\": \"model.\""),
        "{config}"
    );
}
