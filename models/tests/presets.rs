//! Preset shapes, parameter counts, forward shapes, and state round trips.

use flatmin_engine::Tensor;
use flatmin_models::{Arch, BnUse, Model, ModelError, PRESETS};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn parameter_counts_match_pytorch() {
    let want = [
        ("tiny-tanh", 6_506),
        ("mlp-s", 855_050),
        ("cnn-s", 545_098),
        ("resnet20", 272_474),
        ("resnet18", 11_173_962),
    ];
    for (name, n) in want {
        let m = Model::<f32>::named(name, 0).unwrap();
        assert_eq!(m.num_params(), n, "{name}");
    }
    assert_eq!(PRESETS.len(), 5);
}

#[test]
fn state_names_follow_state_dict_order() {
    let m = Model::<f32>::named("resnet20", 0).unwrap();
    let names: Vec<&str> = m.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        &names[..7],
        [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.num_batches_tracked",
            "layer1.0.conv1.weight"
        ]
    );
    assert!(names.contains(&"layer2.0.shortcut.0.weight"));
    assert!(names.contains(&"layer3.0.shortcut.1.num_batches_tracked"));
    assert_eq!(names[names.len() - 2..], ["linear.weight", "linear.bias"]);
}

#[test]
fn forward_shapes_for_every_preset() {
    let mut rng = StdRng::seed_from_u64(1);
    let x = Tensor::<f32>::randn(&[2, 3, 32, 32], &mut rng);
    for name in ["tiny-tanh", "mlp-s", "cnn-s", "resnet20"] {
        let m = Model::<f32>::named(name, 0).unwrap();
        let e = m.evaluate(&x, &[1, 2], &[], BnUse::Train, true).unwrap();
        assert_eq!(e.logits.shape(), &[2, 10]);
        assert!(e.loss.is_finite());
        assert_eq!(e.grads.len(), m.params().len());
    }
}

#[test]
fn custom_mlp_parses_and_rejects_bad_specs() {
    assert!(matches!(
        Arch::parse("mlp:3072,64,10:gelu").unwrap(),
        Arch::Mlp { .. }
    ));
    assert!(matches!(
        Arch::parse("mlp:48,16,10:softplus:pool8").unwrap(),
        Arch::Mlp { input_pool: 8, .. }
    ));
    for bad in [
        "mlp:3072,64,9:relu",
        "mlp:100,10:relu",
        "mlp:3072,10:swish",
        "resnet99",
        "mlp:3072,0,10:relu",
    ] {
        assert!(
            matches!(Arch::parse(bad), Err(ModelError::UnknownModel(_))),
            "{bad}"
        );
    }
}

#[test]
fn oversized_custom_mlps_are_refused_before_allocating() {
    // Found by review while adding the memory estimate: these used to abort on allocation
    // (1e9 hidden units) or panic on a size overflow (1e17) when the model was built.
    for (spec, params) in [
        ("mlp:3072,1000000000,10:relu", "3083000000010"),
        ("mlp:3072,100000000000000000,10:relu", "more than 2^64"),
        ("mlp:3072,18446744073709551615,10:relu", "more than 2^64"),
    ] {
        let err = Arch::parse(spec).unwrap_err();
        assert!(
            matches!(err, ModelError::TooLarge { .. }),
            "{spec}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(params) && msg.contains("4294967296"),
            "{spec}: {msg}"
        );
        assert!(Model::<f32>::named(spec, 0).is_err());
    }
    // Counting parameters needs no model; it agrees with the built one.
    for name in ["tiny-tanh", "mlp-s", "cnn-s", "resnet20", "resnet18"] {
        let arch = Arch::parse(name).unwrap();
        assert_eq!(
            arch.num_params(),
            Model::<f32>::named(name, 0).unwrap().num_params(),
            "{name}"
        );
    }
    let wide = Arch::parse("mlp:3072,1000000,10:relu").unwrap();
    assert_eq!(
        wide.num_params(),
        3072 * 1_000_000 + 1_000_000 + 10_000_000 + 10
    );
}

#[test]
fn save_load_round_trip_and_errors() {
    let dir = std::env::temp_dir().join(format!("flatmin-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("r20.safetensors");
    let mut a = Model::<f32>::named("resnet20", 3).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let x = Tensor::<f32>::randn(&[4, 3, 32, 32], &mut rng);
    let e = a
        .evaluate(&x, &[0, 1, 2, 3], &[], BnUse::Train, false)
        .unwrap();
    a.update_running_stats(&e.bn_stats);
    a.save(&path).unwrap();
    let mut b = Model::<f32>::named("resnet20", 99).unwrap();
    b.load(&path).unwrap();
    assert_eq!(a.entries(), b.entries());
    // f64 model loads the f32 file.
    let mut c = Model::<f64>::named("resnet20", 0).unwrap();
    c.load(&path).unwrap();
    // a different architecture reports a missing or unexpected tensor by name
    let mut d = Model::<f32>::named("cnn-s", 0).unwrap();
    let err = d.load(&path).unwrap_err().to_string();
    assert!(
        err.contains("r20.safetensors") && err.contains("tensor"),
        "{err}"
    );
    // truncated file
    let bytes = std::fs::read(&path).unwrap();
    let trunc = dir.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let err = b.load(&trunc).unwrap_err().to_string();
    assert!(err.contains("trunc.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_to_replace_a_folder_or_link() {
    let dir = std::env::temp_dir().join(format!("flatmin-models-dest-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let m = Model::<f32>::named("tiny-tanh", 0).unwrap();
    let err = m.save(&dir.join("sub")).unwrap_err();
    assert!(matches!(err, ModelError::NotAFile(_)), "{err}");
    let target = dir.join("real.safetensors");
    m.save(&target).unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, dir.join("link.safetensors")).unwrap();
        assert!(matches!(
            m.save(&dir.join("link.safetensors")),
            Err(ModelError::NotAFile(_))
        ));
    }
    // no temporary files are left behind
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stacked directions in, stacked HVPs out: the same gradient and HVPs, bit for bit, as the
/// per-direction form (BatchNorm in train mode, three directions); a tangent list or a
/// direction that does not match the parameters is an error, not a panic.
#[test]
fn stacked_directions_give_the_per_direction_hvps_bit_for_bit() {
    let model = Model::<f64>::named("resnet20", 3).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let x = Tensor::randn(&[2, 3, 32, 32], &mut rng);
    let labels = [1, 7];
    let dirs: Vec<Vec<Tensor<f64>>> = (0..3)
        .map(|_| {
            let params = model.params();
            params
                .iter()
                .map(|p| Tensor::randn(p.shape(), &mut rng))
                .collect()
        })
        .collect();
    let stacked: Vec<Tensor<f64>> = (0..model.params().len())
        .map(|i| Tensor::stack(&dirs.iter().map(|d| d[i].clone()).collect::<Vec<_>>()).unwrap())
        .collect();
    let each = model
        .evaluate(&x, &labels, &dirs, BnUse::Train, true)
        .unwrap();
    let (all, hvps) = model
        .evaluate_stacked(&x, &labels, stacked.clone(), BnUse::Train)
        .unwrap();
    let bits = |t: &Tensor<f64>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(all.loss.to_bits(), each.loss.to_bits());
    assert!(all.hvps.is_empty());
    for (a, b) in all.grads.iter().zip(&each.grads) {
        assert_eq!(bits(a), bits(b));
    }
    assert_eq!(hvps.len(), stacked.len());
    for (i, h) in hvps.iter().enumerate() {
        assert_eq!(h.shape()[0], 3);
        for (k, per_direction) in each.hvps.iter().enumerate() {
            assert_eq!(
                bits(&h.index0(k)),
                bits(&per_direction[i]),
                "parameter {i}, direction {k}"
            );
        }
    }
    assert_eq!(
        model
            .stack_directions(&dirs)
            .unwrap()
            .iter()
            .map(bits)
            .collect::<Vec<_>>(),
        stacked.iter().map(bits).collect::<Vec<_>>()
    );
    let mut short_direction = dirs.clone();
    short_direction[1].pop();
    assert!(model
        .evaluate(&x, &labels, &short_direction, BnUse::Train, true)
        .is_err());
    let short = stacked[1..].to_vec();
    assert!(model
        .evaluate_stacked(&x, &labels, short, BnUse::Train)
        .is_err());
    let mut wrong_k = stacked;
    wrong_k[0] = Tensor::stack(&[dirs[0][0].clone(), dirs[1][0].clone()]).unwrap();
    assert!(model
        .evaluate_stacked(&x, &labels, wrong_k, BnUse::Train)
        .is_err());
}
