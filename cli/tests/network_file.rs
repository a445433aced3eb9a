//! Training a network exported from PyTorch (a network file): every optimizer trains it, the
//! run folder keeps its own copy of the network (the original may go away), resume is bit for
//! bit, the logged trace is measured by structure, and the saved state loads back by name.

use flatmin::train::{Optimizer, Outcome, Silent, Trainer};
use std::path::{Path, PathBuf};

mod common;
use common::{cfg, data, outcome};

/// A copy of the exported small ResNet's network file in a scratch folder.
fn network_copy(name: &str) -> PathBuf {
    let dir = common::scratch("netfile", name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/nets/small_resnet/network.json");
    let dst = dir.join("small_resnet.json");
    std::fs::copy(src, &dst).unwrap();
    dst
}

#[test]
fn every_optimizer_trains_an_exported_network() {
    let net = network_copy("optimizers");
    for &opt in Optimizer::ALL.iter() {
        let mut c = cfg(net.to_str().unwrap());
        c.optimizer = opt;
        c.epochs = 1;
        let dir = common::tmp("netfile", &format!("opt-{opt}"));
        let mut t = Trainer::<f32>::new(c, data(), &dir).unwrap_or_else(|e| panic!("{opt}: {e}"));
        t.run(&mut Silent)
            .unwrap_or_else(|e| panic!("{opt}: {e:#}"));
        let recs = t.run_dir().records().unwrap();
        let losses: Vec<f64> = recs.iter().filter_map(|r| r.loss).collect();
        assert!(
            !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
            "{opt}: {losses:?}"
        );
        let mut m = flatmin_models::Model::<f32>::named(net.to_str().unwrap(), 0).unwrap();
        m.load(&dir.join("model.safetensors"))
            .unwrap_or_else(|e| panic!("{opt}: {e}"));
    }
}

#[test]
fn the_run_folder_keeps_the_network_and_resumes_bit_for_bit() {
    let net = network_copy("resume");
    let mut c = cfg(net.to_str().unwrap());
    c.optimizer = Optimizer::Rs;
    c.epochs = 2;
    c.trace_every = 4;
    c.trace_size = 16;
    let full = common::tmp("netfile", "full");
    Trainer::<f32>::new(c.clone(), data(), &full)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let want = outcome(&full);
    let part = common::tmp("netfile", "part");
    let mut t = Trainer::<f32>::new(c, data(), &part).unwrap();
    assert_eq!(
        t.run_until(&mut Silent, &|s| s == 3).unwrap(),
        Outcome::Stopped { step: 3 }
    );
    drop(t);
    // The folder holds its own copy: the original file may change or go away.
    std::fs::remove_file(&net).unwrap();
    assert!(part.join("network.json").is_file());
    let config = std::fs::read_to_string(part.join("config.json")).unwrap();
    assert!(config.contains("\"model\": \"network.json\""), "{config}");
    let mut t = Trainer::<f32>::resume(&part, data()).unwrap();
    assert_eq!(
        t.run_until(&mut Silent, &|_| false).unwrap(),
        Outcome::Finished
    );
    let got = outcome(&part);
    assert_eq!(got.1, want.1, "metrics differ after resume");
    assert!(got.0 == want.0, "final weights differ after resume");
    // The logged trace is exact by structure (BatchNorm in eval mode).
    let traces: Vec<_> = t
        .run_dir()
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "trace")
        .collect();
    assert!(!traces.is_empty());
    for r in &traces {
        assert_eq!(r.method.as_deref(), Some("structural"), "{r:?}");
    }
}

#[test]
fn a_bad_network_file_is_an_error_naming_file_and_layer() {
    let dir = common::scratch("netfile", "bad");
    let path = dir.join("bad.json");
    std::fs::write(
        &path,
        r#"{"flatmin_network": 1, "input": [3, 32, 32], "layers": [
            {"name": "fc", "type": "Linear", "in_features": 3072, "out_features": 10}]}"#,
    )
    .unwrap();
    let c = cfg(path.to_str().unwrap());
    let err = Trainer::<f32>::new(c, data(), &dir.join("run"))
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("bad.json") && msg.contains("layer 'fc'") && msg.contains("Flatten"),
        "{msg}"
    );
}
