//! `flatmin train --resume` on a hostile `checkpoints/last.safetensors`: the first input byte
//! picks a run (a 246-parameter MLP trained one step with sgd, adamw, sam, rs or sa, made
//! once per process in a scratch folder under /dev/shm, left there), the rest replaces its
//! checkpoint. `Trainer::resume` must
//! load it or return an error, and a loaded run must take its next step (or stop with an
//! error) without panicking: optimizer state of the wrong shape or length, a step beyond the
//! run, counters out of range.
//!
//! With `FLATMIN_FUZZ_SEEDS=DIR` set, the real checkpoints (prefixed by their selector
//! byte) are also written to DIR, as a seed corpus.
#![no_main]

use flatmin::data::DataSource;
use flatmin::train::{OutputIterate, Silent, TrainConfig, Trainer};
use flatmin_datasets::Batch;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const OPTIMIZERS: [&str; 5] = ["sgd", "adamw", "sam", "rs", "sa"];

struct Fixture {
    dir: PathBuf,
    metrics: (Vec<u8>, Vec<u8>),
    train: Batch,
    test: Batch,
}

fn source(train: &Batch, test: &Batch) -> DataSource {
    DataSource {
        train: train.clone(),
        test: test.clone(),
        origin: "synthetic".into(),
        synthetic: true,
    }
}

fn fixtures() -> &'static [Fixture] {
    static FIXTURES: OnceLock<Vec<Fixture>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let root = base.join(format!("flatmin-fuzz-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (train, test) = flatmin_datasets::synthetic(20, 10, 1);
        let seeds = std::env::var_os("FLATMIN_FUZZ_SEEDS").map(PathBuf::from);
        OPTIMIZERS
            .iter()
            .enumerate()
            .map(|(i, opt)| {
                let cfg = TrainConfig {
                    model: "mlp:48,4,10:tanh:pool8".into(),
                    optimizer: opt.parse().expect("an optimizer name"),
                    lr: 0.01,
                    epochs: 2,
                    batch_size: 10,
                    train_size: 0,
                    test_size: 0,
                    data: "synthetic".into(),
                    output_iterate: if *opt == "rs" || *opt == "sa" {
                        OutputIterate::Random
                    } else {
                        OutputIterate::Last
                    },
                    t_gd: if *opt == "sa" { 1 } else { 0 },
                    ..TrainConfig::default()
                };
                let dir = root.join(opt);
                let mut t = Trainer::<f32>::create(cfg, source(&train, &test), &dir, false)
                    .expect("fixture run");
                t.run_until(&mut Silent, &|s| s >= 1).expect("fixture step");
                drop(t);
                if let Some(s) = &seeds {
                    let mut bytes = vec![i as u8];
                    bytes.extend(std::fs::read(dir.join("checkpoints/last.safetensors")).unwrap());
                    std::fs::create_dir_all(s).unwrap();
                    std::fs::write(s.join(format!("{opt}.bin")), bytes).unwrap();
                }
                Fixture {
                    metrics: (
                        std::fs::read(dir.join("metrics.jsonl")).unwrap(),
                        std::fs::read(dir.join("metrics.csv")).unwrap(),
                    ),
                    dir,
                    train: train.clone(),
                    test: test.clone(),
                }
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let fx = &fixtures()[pick as usize % OPTIMIZERS.len()];
    std::fs::write(fx.dir.join("checkpoints/last.safetensors"), bytes).unwrap();
    std::fs::write(fx.dir.join("metrics.jsonl"), &fx.metrics.0).unwrap();
    std::fs::write(fx.dir.join("metrics.csv"), &fx.metrics.1).unwrap();
    if let Ok(mut t) = Trainer::<f32>::resume(&fx.dir, source(&fx.train, &fx.test)) {
        let start = t.step();
        let _ = t.run_until(&mut Silent, &|s| s > start);
    }
});
