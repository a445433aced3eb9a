//! `flatmin train --config FILE` past the parser: an arbitrary run configuration goes
//! through what the command does before and at the first step (`validate`, the memory check
//! with a 256 MiB budget, `Trainer::create` on a small synthetic dataset in a scratch folder
//! under /dev/shm, one training step), which must end in an error or a step, never a panic.
//! The data source is fixed (synthetic, 40 training and 20 test images), whatever the
//! configuration's `data` and `init_from` say.
#![no_main]

use flatmin::data::DataSource;
use flatmin::train::{check_memory, Silent, TrainConfig, Trainer};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("flatmin-fuzz-train-setup-{}", std::process::id()))
    })
}

fn data() -> &'static (flatmin_datasets::Batch, flatmin_datasets::Batch) {
    static DATA: OnceLock<(flatmin_datasets::Batch, flatmin_datasets::Batch)> = OnceLock::new();
    DATA.get_or_init(|| flatmin_datasets::synthetic(40, 20, 3))
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(mut cfg) = TrainConfig::from_json(text) else {
        return;
    };
    // Files from elsewhere are out of scope here (the safetensors target covers them).
    cfg.init_from = None;
    cfg.init_sha256 = None;
    if cfg.validate().is_err() || check_memory(&cfg, Some(256.0 * 1024.0 * 1024.0)).is_err() {
        return;
    }
    let (train, test) = data();
    let source = DataSource {
        train: train.clone(),
        test: test.clone(),
        origin: "synthetic".into(),
        synthetic: true,
    };
    let dir = scratch();
    let _ = std::fs::remove_dir_all(dir);
    if let Ok(mut t) = Trainer::<f32>::create(cfg, source, dir, false) {
        let _ = t.run_until(&mut Silent, &|s| s >= 1);
    }
});
