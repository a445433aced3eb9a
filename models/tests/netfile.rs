//! Network files (`docs/network-file.md`): every preset survives the round trip through its
//! file (same description, same state names, same logits), PyTorch's defaults and size
//! pairs are read, and every malformed file is an error naming the file and the layer.

use flatmin_engine::Tensor;
use flatmin_models::{network_json, parse_network, BnUse, Model, PRESETS};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tmp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("flatmin-netfile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn presets_round_trip_through_their_network_files() {
    let dir = tmp_dir("presets");
    let x = Tensor::<f64>::randn(&[2, 3, 32, 32], &mut StdRng::seed_from_u64(1));
    for name in PRESETS.into_iter().chain(["mlp:48,16,10:softplus:pool8"]) {
        let preset = Model::<f64>::named(name, 7).unwrap();
        let text = network_json(preset.net());
        let net = parse_network(&text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&net, preset.net(), "{name}");
        let path = dir.join(format!("{name}.json").replace(':', "_"));
        std::fs::write(&path, &text).unwrap();
        let from_file = Model::<f64>::named(path.to_str().unwrap(), 7).unwrap();
        assert_eq!(from_file.entries(), preset.entries(), "{name}: same state");
        if name == "resnet18" {
            continue; // the largest: names and state suffice
        }
        for bn in [BnUse::Train, BnUse::Eval] {
            let a = preset.evaluate(&x, &[1, 2], &[], bn, false).unwrap();
            let b = from_file.evaluate(&x, &[1, 2], &[], bn, false).unwrap();
            assert_eq!(a.logits, b.logits, "{name} {bn:?}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn pytorch_defaults_pairs_and_implicit_inputs_are_read() {
    let text = r#"{
      "flatmin_network": 1,
      "input": [3, 32, 32],
      "layers": [
        {"name": "features.0", "type": "Conv2d", "in_channels": 3, "out_channels": 4,
         "kernel_size": [3, 3], "padding": [1, 1], "dilation": 1, "groups": 1,
         "padding_mode": "zeros"},
        {"name": "features.1", "type": "BatchNorm2d", "num_features": 4, "momentum": null,
         "affine": true, "track_running_stats": true},
        {"name": "features.2", "type": "ReLU", "inplace": true},
        {"name": "features.3", "type": "MaxPool2d", "kernel_size": 2, "stride": null},
        {"name": "pool", "type": "AdaptiveAvgPool2d", "output_size": [1, 1]},
        {"name": "flat", "type": "Flatten", "start_dim": 1, "end_dim": -1},
        {"name": "head", "type": "Linear", "in_features": 4, "out_features": 10, "input": "flat"}
      ]
    }"#;
    let net = parse_network(text, "defaults.json").unwrap();
    let names: Vec<String> = net.state().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "features.0.weight",
            "features.0.bias",
            "features.1.weight",
            "features.1.bias",
            "features.1.running_mean",
            "features.1.running_var",
            "features.1.num_batches_tracked",
            "head.weight",
            "head.bias"
        ]
    );
    let conv = &net.nodes()[1];
    assert_eq!(conv.shape, vec![4, 32, 32]);
    assert_eq!(
        net.nodes()[4].shape,
        vec![4, 16, 16],
        "stride defaults to the kernel"
    );
    // momentum null: running statistics are the cumulative average of the batches seen.
    let mut m = Model::<f64>::new(net, 0);
    let mut rng = StdRng::seed_from_u64(2);
    let mut means = Vec::new();
    for _ in 0..3 {
        let x = Tensor::<f64>::randn(&[2, 3, 32, 32], &mut rng);
        let e = m.evaluate(&x, &[0, 1], &[], BnUse::Train, false).unwrap();
        means.push(e.bn_stats[0].mean.clone());
        m.update_running_stats(&e.bn_stats);
    }
    let running = m
        .entries()
        .iter()
        .find(|e| e.name == "features.1.running_mean")
        .unwrap();
    let flatmin_models::EntryValue::Float(rm) = &running.value else {
        panic!("a float buffer");
    };
    for (c, &got) in rm.data().iter().enumerate() {
        let avg = (means[0][c] + means[1][c] + means[2][c]) / 3.0;
        assert!((got - avg).abs() < 1e-12, "{got} vs {avg}");
    }
}

/// A valid file with `layers[i]` replaced by `layer`.
fn with_layer(i: usize, layer: &str) -> String {
    let mut layers = [
        r#"{"name": "conv", "type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3}"#.to_string(),
        r#"{"name": "relu", "type": "ReLU"}"#.to_string(),
        r#"{"name": "flat", "type": "Flatten"}"#.to_string(),
        r#"{"name": "fc", "type": "Linear", "in_features": 3600, "out_features": 10}"#.to_string(),
    ];
    layers[i] = layer.to_string();
    format!(
        r#"{{"flatmin_network": 1, "input": [3, 32, 32], "layers": [{}]}}"#,
        layers.join(", ")
    )
}

#[test]
fn malformed_files_name_the_file_and_the_layer() {
    parse_network(
        &with_layer(1, r#"{"name": "relu", "type": "ReLU"}"#),
        "ok.json",
    )
    .unwrap();
    let cases = [
        (
            with_layer(1, r#"{"name": "drop", "type": "Dropout", "p": 0.5}"#),
            "layer 'drop': unsupported type 'Dropout'",
        ),
        (
            with_layer(1, r#"{"name": "relu", "type": "ReLU", "slope": 0.1}"#),
            "layer 'relu': unknown key 'slope'",
        ),
        (
            with_layer(
                3,
                r#"{"name": "fc", "type": "Linear", "in_features": 100, "out_features": 10}"#,
            ),
            "layer 'fc': Linear with in_features 100 gets input [3600]",
        ),
        (
            with_layer(1, r#"{"name": "conv", "type": "ReLU"}"#),
            "layer 'conv': the name is already used",
        ),
        (
            with_layer(1, r#"{"name": "relu", "type": "ReLU", "input": "fc"}"#),
            "layer 'relu': reads 'fc', which is not an earlier layer",
        ),
        (
            with_layer(
                0,
                r#"{"name": "conv", "type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3, 5]}"#,
            ),
            "layer 'conv': \"kernel_size\" [3,5]: only square",
        ),
        (
            with_layer(
                0,
                r#"{"name": "conv", "type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3, "groups": 3}"#,
            ),
            "layer 'conv': Conv2d with \"groups\" 3 is not supported",
        ),
        (
            with_layer(1, r#"{"name": "g", "type": "GELU", "approximate": "tanh"}"#),
            "layer 'g': GELU with \"approximate\" \"tanh\" is not supported",
        ),
        (
            with_layer(1, r#"{"name": "add", "type": "Add", "inputs": ["conv"]}"#),
            "layer 'add': Add takes 2 input(s), got 1",
        ),
        (
            with_layer(1, r#"{"type": "ReLU"}"#),
            "layer '#1': needs a \"name\" string",
        ),
        (
            r#"{"flatmin_network": 2, "input": [3, 32, 32], "layers": []}"#.to_string(),
            "format version 2",
        ),
        (
            r#"{"flatmin_network": 1, "input": [3, 32, 32], "layers": [], "extra": 1}"#.to_string(),
            "unknown key 'extra'",
        ),
        ("[1, 2".to_string(), "not valid JSON"),
    ];
    for (text, want) in cases {
        let err = parse_network(&text, "my/net.json").unwrap_err().to_string();
        assert!(
            err.starts_with("my/net.json: ") && err.contains(want),
            "want '{want}' in: {err}"
        );
    }
    let err = Model::<f32>::named("/nonexistent/net.json", 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/net.json"), "{err}");
}
