//! `flatmin bench`: every task runs on small workloads, its last stdout line is JSON with the
//! keys the performance issue asks for, the structural and basis exact traces of the same
//! workload agree, and bad input is one `error:` line.

use serde_json::Value;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_flatmin");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .output()
        .expect("run the flatmin binary")
}

fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "flatmin bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn every_task_reports_json() {
    let common = ["--batch", "4", "--reps", "2", "--threads", "2"];
    for task in ["grad", "hvp", "hvp-batched"] {
        let v = json(
            &[
                &[task, "--model", "tiny-tanh", "--vectors", "3"],
                &common[..],
            ]
            .concat(),
        );
        for key in [
            "task",
            "model",
            "batch",
            "threads",
            "vectors",
            "median_ms",
            "min_ms",
            "reps",
            "per_second",
            "gflops",
        ] {
            assert!(v.get(key).is_some(), "{task}: no {key} in {v}");
        }
        assert_eq!(v["task"], task);
        assert_eq!(v["bn_mode"], "eval", "tiny-tanh has no BatchNorm: {v}");
        assert_eq!(v["batch"], 4);
        assert_eq!(v["threads"], 2);
        assert_eq!(v["reps"], 2);
        assert!(v["median_ms"].as_f64().unwrap() >= v["min_ms"].as_f64().unwrap());
        if task != "grad" {
            assert!(v["hvp_over_grad"].as_f64().unwrap() > 0.0, "{v}");
        }
    }
    let b = json(
        &[
            &["hvp-batched", "--model", "tiny-tanh", "--vectors", "3"],
            &common[..],
        ]
        .concat(),
    );
    assert_eq!(b["vectors"], 3);
    assert!(b["batched_over_singles"].as_f64().unwrap() > 0.0);
    let g = json(&["gemm", "--size", "64", "--reps", "2"]);
    assert_eq!(g["size"], 64);
    assert!(g["gflops"].as_f64().unwrap() > 0.0);

    // The exact trace of one workload by structure and by basis HVPs (f32), and a Hutchinson
    // estimate with its per-probe time.
    let s = json(&[&["trace", "--model", "tiny-tanh"], &common[..]].concat());
    let e = json(
        &[
            &[
                "trace",
                "--model",
                "tiny-tanh",
                "--method",
                "basis",
                "--vectors",
                "64",
            ],
            &common[..],
        ]
        .concat(),
    );
    assert_eq!(
        (s["method"].as_str(), e["method"].as_str()),
        (Some("structural"), Some("basis"))
    );
    let (ts, tb) = (s["trace"].as_f64().unwrap(), e["trace"].as_f64().unwrap());
    assert!(
        (ts - tb).abs() < 1e-4 * ts.abs(),
        "structural {ts} vs basis {tb}"
    );
    let h = json(
        &[
            &[
                "trace",
                "--model",
                "tiny-tanh",
                "--method",
                "hutchinson",
                "--probes",
                "8",
            ],
            &common[..],
        ]
        .concat(),
    );
    assert_eq!(h["probes"], 8);
    assert!(h["per_probe_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_is_one_error_line() {
    for (args, flag) in [
        (&["grad", "--batch", "0"][..], "--batch"),
        (&["hvp", "--model", "nope"][..], "nope"),
        (&["trace", "--probes", "1"][..], "--probes"),
        (&["gemm", "--reps", "0"][..], "--reps"),
        (&["grad", "--threads", "0"][..], "--threads"),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with("error:") && err.contains(flag),
            "{args:?}: {err}"
        );
        // A usage error (status 2) is clap's report; any other error is one line.
        if out.status.code() != Some(2) {
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
        assert!(!err.contains("panicked"));
    }
}

/// `gemm --shape MxKxN --layout` times that product and reports it with the machine's
/// instruction set and its fraction of the FMA peak; `peak` measures the peak alone (null
/// only where no vector kernel exists); a malformed shape is one `error:` line naming it.
#[test]
fn gemm_shapes_and_the_fma_peak() {
    for layout in ["nn", "nt", "tn"] {
        let v = json(&[
            "gemm", "--shape", "40x30x20", "--layout", layout, "--reps", "2",
        ]);
        assert_eq!(v["shape"], serde_json::json!([40, 30, 20]), "{v}");
        assert_eq!(v["layout"], layout);
        assert!(v["gflops"].as_f64().unwrap() > 0.0, "{v}");
        let isa = v["isa"].as_str().unwrap();
        assert!(["avx512", "avx2", "portable"].contains(&isa), "{v}");
        match v["peak_fraction"].as_f64() {
            Some(f) => assert!(f > 0.0 && f < 1.5, "{v}"),
            None => assert_eq!(isa, "portable", "{v}"),
        }
    }
    let v = json(&["peak", "--threads", "1"]);
    assert_eq!(v["task"], "peak");
    assert!(
        v["peak_gflops"].as_f64().is_some() || v["isa"] == "portable",
        "{v}"
    );
    let out = run(&["gemm", "--shape", "40x0x20"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("40x0x20") && err.contains("MxKxN"), "{err}");
}

#[test]
fn a_network_file_is_benchmarked_like_a_preset() {
    let net = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/nets/small_resnet/network.json");
    let net = net.to_str().unwrap();
    for task in ["grad", "hvp", "trace"] {
        let v = json(&[task, "--model", net, "--batch", "4", "--reps", "1"]);
        assert_eq!(v["model"], net, "{task}");
        // BatchNorm: gradients and HVPs are timed in train mode, the structural trace in eval.
        let bn = if task == "trace" { "eval" } else { "train" };
        assert_eq!(v["bn_mode"], bn, "{task}");
        assert!(v["median_ms"].as_f64().unwrap() > 0.0, "{task}: {v}");
    }
    let t = json(&["trace", "--model", net, "--batch", "4", "--reps", "1"]);
    assert!(t["trace"].as_f64().unwrap().is_finite(), "{t}");
}

/// A network whose input is not an image of CIFAR's shape, with 3 classes: the benchmark feeds
/// it inputs of its own shape and labels below its width (it panicked on CIFAR-shaped inputs).
#[test]
fn a_network_file_of_another_input_shape_is_benchmarked() {
    let dir = std::env::temp_dir().join(format!("flatmin-bench-shape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let net = dir.join("net.json");
    std::fs::write(
        &net,
        r#"{"flatmin_network": 1, "input": [4, 6, 6], "layers": [
            {"name": "conv", "type": "Conv2d", "in_channels": 4, "out_channels": 8,
             "kernel_size": 3, "padding": 1},
            {"name": "pool", "type": "MaxPool2d", "kernel_size": 2},
            {"name": "relu", "type": "ReLU"},
            {"name": "flatten", "type": "Flatten"},
            {"name": "fc", "type": "Linear", "in_features": 72, "out_features": 3}]}"#,
    )
    .unwrap();
    let net = net.to_str().unwrap();
    for task in ["grad", "hvp", "hvp-batched", "trace"] {
        let v = json(&[
            task,
            "--model",
            net,
            "--batch",
            "5",
            "--reps",
            "1",
            "--vectors",
            "2",
        ]);
        assert!(v["median_ms"].as_f64().unwrap() > 0.0, "{task}: {v}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
