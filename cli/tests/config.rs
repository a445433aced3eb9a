//! The typed run configuration: `config.json` keeps its historical words for every enum
//! setting and round-trips for every optimizer, old run folders' `config.json` still load,
//! unknown keys and unknown words are errors naming the key (and listing the choices), and
//! the command line accepts the same words.

use flatmin::train::{
    DType, DatasetIdentity, NonFinitePolicy, Optimizer, OptimizerSpec, OutputIterate, ProbeData,
    RunDir, RunMeta, Schedule, TraceMethod, TrainConfig, RUN_META_KEYS,
};
use std::process::Command;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_flatmin");

/// The words `config.json` has always held for each enum setting, in `--help` order.
#[test]
fn enum_words_are_the_historical_ones() {
    fn words<T: Copy + serde::Serialize>(all: &[T], name: fn(T) -> &'static str) -> Vec<String> {
        all.iter()
            .map(|&v| {
                let json = serde_json::to_value(v).unwrap();
                assert_eq!(json, name(v), "serialized word is the name");
                name(v).to_string()
            })
            .collect()
    }
    assert_eq!(
        words(Optimizer::ALL, Optimizer::name),
        [
            "sgd",
            "adamw",
            "sam",
            "asam",
            "usam",
            "sam1",
            "rps",
            "label-noise",
            "rs",
            "sa"
        ]
    );
    assert_eq!(
        words(Schedule::ALL, Schedule::name),
        ["constant", "cosine", "step"]
    );
    assert_eq!(words(DType::ALL, DType::name), ["f32", "f64"]);
    assert_eq!(
        words(NonFinitePolicy::ALL, NonFinitePolicy::name),
        ["stop", "skip-step"]
    );
    assert_eq!(words(ProbeData::ALL, ProbeData::name), ["same", "fresh"]);
    assert_eq!(
        words(OutputIterate::ALL, OutputIterate::name),
        ["last", "random"]
    );
    assert_eq!(
        words(TraceMethod::ALL, TraceMethod::name),
        ["auto", "structural", "hutchinson"]
    );
    for o in Optimizer::ALL {
        assert_eq!(o.name().parse::<Optimizer>().unwrap(), *o);
        assert_eq!(o.to_string(), o.name());
    }
}

/// Every optimizer's recipe survives config.json (with the run's metadata beside it)
/// unchanged, and the file holds the words.
#[test]
fn config_json_round_trips_for_every_optimizer() {
    let meta = RunMeta {
        flatmin_version: "0.0.0-test".into(),
        threads: 3,
        dataset: DatasetIdentity {
            origin: "synthetic".into(),
            synthetic: true,
            train_images: 10,
            test_images: 5,
            train_sha256: "ab".into(),
            test_sha256: "cd".into(),
        },
    };
    for (k, &o) in Optimizer::ALL.iter().enumerate() {
        let cfg = TrainConfig {
            optimizer: o,
            schedule: Schedule::ALL[k % 3],
            dtype: DType::ALL[k % 2],
            on_nonfinite: NonFinitePolicy::ALL[(k + 1) % 2],
            probe_data: ProbeData::ALL[k % 2],
            output_iterate: OutputIterate::ALL[(k + 1) % 2],
            trace_method: TraceMethod::ALL[k % 3],
            eta_prime: Some(0.5),
            ..TrainConfig::default()
        };
        // The plain serialization.
        let text = serde_json::to_string_pretty(&cfg).unwrap();
        assert_eq!(TrainConfig::from_json(&text).unwrap(), cfg, "{o}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["optimizer"], o.name());
        assert_eq!(v["schedule"], cfg.schedule.name());
        assert_eq!(v["dtype"], cfg.dtype.name());
        assert_eq!(v["on_nonfinite"], cfg.on_nonfinite.name());
        assert_eq!(v["probe_data"], cfg.probe_data.name());
        assert_eq!(v["output_iterate"], cfg.output_iterate.name());
        assert_eq!(v["trace_method"], cfg.trace_method.name());
        // A run folder's config.json: the recipe and the metadata.
        let dir = common::tmp("config", &format!("round-trip-{o}"));
        let run = RunDir::create(&dir, &cfg, false).unwrap();
        run.write_config(&cfg, &meta).unwrap();
        drop(run);
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        for key in RUN_META_KEYS {
            assert!(written.get(key).is_some(), "{key} in config.json");
        }
        assert_eq!(written["optimizer"], o.name());
        assert_eq!(RunDir::open(&dir).unwrap().config().unwrap(), cfg, "{o}");
        assert_eq!(cfg.optimizer_spec().optimizer(), o);
    }
}

/// The metadata keys allowed in a configuration are exactly those of `RunMeta`.
#[test]
fn run_meta_keys_are_those_of_run_meta() {
    let meta = RunMeta {
        flatmin_version: String::new(),
        threads: 1,
        dataset: DatasetIdentity::default(),
    };
    let v = serde_json::to_value(meta).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    let mut want = RUN_META_KEYS.to_vec();
    want.sort();
    assert_eq!(keys, want);
}

/// A config.json as earlier versions wrote it (string settings, metadata keys) loads.
#[test]
fn old_config_json_loads() {
    let old = r#"{
  "model": "resnet20",
  "optimizer": "label-noise",
  "lr": 0.1,
  "momentum": 0.0,
  "nesterov": false,
  "weight_decay": 0.0,
  "schedule": "step",
  "step_every": 5,
  "step_gamma": 0.5,
  "warmup": 1,
  "beta1": 0.9,
  "beta2": 0.999,
  "eps": 1e-8,
  "epochs": 20,
  "batch_size": 64,
  "train_size": 5000,
  "test_size": 1000,
  "augment": false,
  "seed": 7,
  "data_seed": null,
  "dtype": "f64",
  "eval_every": 2,
  "checkpoint_every": 5,
  "data": "synthetic",
  "on_nonfinite": "skip-step",
  "rho": 0.05,
  "eta_prime": null,
  "eps0": 0.25,
  "probe_batch": 0,
  "probe_data": "fresh",
  "project": true,
  "label_noise": 0.2,
  "m_sharpness": 0,
  "asam_eta": 0.01,
  "t_gd": 0,
  "output_iterate": "random",
  "zero_grad_xi": 1e-6,
  "random_labels": false,
  "init_from": null,
  "init_sha256": null,
  "trace_every": 10,
  "trace_size": 256,
  "trace_method": "hutchinson",
  "trace_probes": 16,
  "flatmin_version": "0.1.0",
  "threads": 8,
  "dataset": {
    "origin": "synthetic",
    "synthetic": true,
    "train_images": 5000,
    "test_images": 1000,
    "train_sha256": "00",
    "test_sha256": "11"
  }
}"#;
    let c = TrainConfig::from_json(old).unwrap();
    assert_eq!(c.optimizer, Optimizer::LabelNoise);
    assert_eq!(c.schedule, Schedule::Step);
    assert_eq!(c.dtype, DType::F64);
    assert_eq!(c.on_nonfinite, NonFinitePolicy::SkipStep);
    assert_eq!(c.probe_data, ProbeData::Fresh);
    assert_eq!(c.output_iterate, OutputIterate::Random);
    assert_eq!(c.trace_method, TraceMethod::Hutchinson);
    assert_eq!((c.epochs, c.seed, c.eps0), (20, 7, Some(0.25)));
    c.validate().unwrap();
    assert_eq!(
        c.optimizer_spec(),
        OptimizerSpec::LabelNoise {
            p: 0.2,
            sgd: flatmin::train::SgdParams {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0
            }
        }
    );
    // An early config.json with only some keys: the rest take the defaults.
    let c = TrainConfig::from_json(r#"{"optimizer": "sam", "rho": 0.1}"#).unwrap();
    assert_eq!(c.optimizer, Optimizer::Sam);
    assert_eq!(c.schedule, TrainConfig::default().schedule);
}

/// A key that is neither a setting nor run metadata is an error naming it (in-process, and
/// from `flatmin train --config`, which also names the file).
#[test]
fn unknown_key_is_an_error_naming_it() {
    let e = TrainConfig::from_json(r#"{"optimizer": "sgd", "learning_rate": 0.1}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key 'learning_rate'"), "{e}");
    // Metadata keys nested wrongly are not metadata.
    let e = TrainConfig::from_json(r#"{"origin": "synthetic"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'origin'"), "{e}");

    let dir = common::tmp("config", "unknown-key");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("recipe.json");
    std::fs::write(&file, r#"{"optimizer": "sgd", "momentun": 0.5}"#).unwrap();
    let out = Command::new(BIN)
        .args(["train", "--data", "synthetic", "--quiet", "--config"])
        .arg(&file)
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("momentun"), "{err}");
    assert!(err.contains("recipe.json"), "{err}");
    assert!(!dir.join("run").exists(), "nothing was created");

    // A run folder's config.json with an unknown key: `eval RUN`, `trace --run RUN` and
    // `train --resume RUN` refuse it naming the file and the key, and change nothing.
    let out = Command::new(BIN)
        .args([
            "train",
            "--data",
            "synthetic",
            "--model",
            "tiny-tanh",
            "--quiet",
        ])
        .args(["--epochs", "1", "--train-size", "32", "--test-size", "16"])
        .arg("--out")
        .arg(dir.join("done"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = dir.join("done/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let edited = text.replacen('{', "{\"epochz\": 3,", 1);
    std::fs::write(&config, &edited).unwrap();
    let metrics = std::fs::read(dir.join("done/metrics.jsonl")).unwrap();
    for args in [&["eval"][..], &["trace", "--run"], &["train", "--resume"]] {
        let out = Command::new(BIN)
            .args(args)
            .arg(dir.join("done"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("done/config.json") && err.contains("unknown key 'epochz'"),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read(dir.join("done/metrics.jsonl")).unwrap(),
        metrics
    );
}

/// An unknown word is refused with the choices listed: in a configuration file (naming the
/// key), parsed from a string, and on the command line (naming the flag).
#[test]
fn bad_enum_word_lists_the_choices() {
    let e = TrainConfig::from_json(r#"{"optimizer": "adam"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer") && e.contains("adam"), "{e}");
    for o in Optimizer::ALL {
        assert!(e.contains(o.name()), "{e}");
    }
    let e = TrainConfig::from_json(r#"{"on_nonfinite": "ignore"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("on_nonfinite") && e.contains("stop") && e.contains("skip-step"),
        "{e}"
    );
    let e = "linear".parse::<Schedule>().unwrap_err().to_string();
    assert!(
        e.contains("'linear'") && e.contains("constant, cosine, step"),
        "{e}"
    );
    for (flag, word, choices) in [
        ("--optimizer", "adam", "sgd, adamw, sam"),
        ("--schedule", "linear", "constant, cosine, step"),
        ("--dtype", "f16", "f32, f64"),
        ("--on-nonfinite", "ignore", "stop, skip-step"),
        ("--probe-data", "other", "same, fresh"),
        ("--output-iterate", "best", "last, random"),
        ("--trace-method", "lanczos", "auto, structural, hutchinson"),
    ] {
        let out = Command::new(BIN)
            .args(["train", flag, word])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains(word) && err.contains(choices),
            "{flag}: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["train", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("label-noise") && help.contains("skip-step"));
}

/// Which optimizer takes which optimizer-specific flag.
#[test]
fn optimizer_flags() {
    let names = |flag: &str| -> Vec<&str> {
        Optimizer::taking(flag)
            .iter()
            .map(|o| o.name())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names("--rho"),
        ["sam", "asam", "usam", "sam1", "rps", "rs", "sa"]
    );
    assert_eq!(names("--probe-data"), ["sam1", "rs", "sa"]);
    assert_eq!(names("--m-sharpness"), ["sam", "asam", "usam"]);
    assert_eq!(names("--asam-eta"), ["asam"]);
    assert_eq!(names("--label-noise"), ["label-noise"]);
    assert_eq!(names("--t-gd"), ["sa"]);
    assert_eq!(names("--zero-grad-xi"), ["sa"]);
    for flag in [
        "--eta-prime",
        "--eps0",
        "--project",
        "--no-project",
        "--output-iterate",
    ] {
        assert_eq!(names(flag), ["rs", "sa"], "{flag}");
    }
    assert!(Optimizer::Sgd.flags().is_empty() && Optimizer::AdamW.flags().is_empty());
}

/// A FIFO or `/dev/zero` as `--config` is refused at once with one line naming the file and
/// what it is (before the fix the FIFO blocked for ever and `/dev/zero` was read until
/// memory ran out; the child is killed after 20 s). A FIFO as a run folder's `config.json`
/// (`eval RUN`, `train --resume RUN`) was already refused ("no config.json", an `is_file`
/// check), and still is.
#[test]
fn config_fifos_and_devices_are_refused_without_blocking() {
    let dir = common::scratch("config", "special");
    let fifo = dir.join("recipe.json");
    common::mkfifo(&fifo);
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    common::mkfifo(&run.join("config.json"));
    let s = |p: &std::path::Path| p.display().to_string();
    let out = s(&dir.join("out"));
    let train = |config: &str| -> Vec<String> {
        [
            "train",
            "--data",
            "synthetic",
            "--quiet",
            "--config",
            config,
            "--out",
            &out,
        ]
        .map(String::from)
        .to_vec()
    };
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            train(&s(&fifo)),
            vec!["--config".into(), s(&fifo), "a FIFO".into()],
        ),
        (
            train("/dev/zero"),
            vec![
                "--config".into(),
                "/dev/zero".into(),
                "a character device".into(),
            ],
        ),
        (
            vec!["eval".into(), s(&run)],
            vec![s(&run), "config.json".into()],
        ),
        (
            vec!["train".into(), "--resume".into(), s(&run), "--quiet".into()],
            vec![s(&run), "config.json".into()],
        ),
    ];
    for (args, needles) in cases {
        let (status, stderr) = common::run_bounded(BIN, &args, std::time::Duration::from_secs(20));
        eprintln!("{args:?}: {}", stderr.trim_end());
        assert!(
            status.code().is_some_and(|c| c != 0),
            "{args:?}: {status:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
        for needle in needles {
            assert!(stderr.contains(&needle), "{needle:?} not in {stderr:?}");
        }
        assert!(!dir.join("out").exists(), "nothing was created");
    }
}
