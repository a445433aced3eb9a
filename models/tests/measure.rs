//! `flatmin_models::measure::trace`: the library trace against basis HVPs, the `Auto` policy
//! (structural, else basis HVPs with a note), Hutchinson's standard error and seed, and the
//! per-tensor breakdown.

use flatmin_engine::Tensor;
use flatmin_models::measure::{trace, MeasureError, TraceDetails, TraceMethod, TraceOptions};
use flatmin_models::{parse_network, BnUse, Model, ModelError};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A small BatchNorm network (a few hundred parameters).
const SMALL_BN: &str = r#"{
  "flatmin_network": 1,
  "input": [3, 32, 32],
  "layers": [
    {"name": "pool", "type": "AvgPool2d", "kernel_size": 8},
    {"name": "conv1", "type": "Conv2d", "in_channels": 3, "out_channels": 2,
     "kernel_size": 3, "padding": 1, "bias": false},
    {"name": "bn1", "type": "BatchNorm2d", "num_features": 2},
    {"name": "act", "type": "Tanh"},
    {"name": "flatten", "type": "Flatten"},
    {"name": "fc", "type": "Linear", "in_features": 32, "out_features": 10}
  ]
}"#;

/// Two batches (5 and 3 images) of random images with labels.
fn batches(seed: u64) -> Vec<(Tensor<f64>, Vec<usize>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    [5usize, 3]
        .iter()
        .map(|&n| {
            let x = Tensor::<f64>::randn(&[n, 3, 32, 32], &mut rng);
            (x, (0..n).map(|i| (i * 3 + 1) % 10).collect())
        })
        .collect()
}

fn tiny() -> Model<f64> {
    Model::<f64>::named("tiny-tanh", 3).unwrap()
}

fn opts(method: TraceMethod) -> TraceOptions {
    TraceOptions {
        method,
        ..TraceOptions::default()
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn library_trace_equals_basis_hvp_trace() {
    let (m, b) = (tiny(), batches(1));
    let auto = trace(&m, &b, &opts(TraceMethod::Auto)).unwrap();
    let basis = trace(&m, &b, &opts(TraceMethod::Basis)).unwrap();
    assert_eq!(basis.method_used, TraceMethod::Basis);
    assert_eq!(basis.hvps, m.num_params());
    assert_eq!(auto.dim, m.num_params());
    assert_eq!(auto.samples, 8);
    let (a, e) = (auto.trace.unwrap(), basis.trace.unwrap());
    assert!(close(a, e, 1e-8), "structural {a} vs basis {e}");
    assert!(close(
        auto.normalized_trace.unwrap(),
        e / m.num_params() as f64,
        1e-8
    ));
}

#[test]
fn auto_picks_structural_without_batch_norm() {
    let r = trace(&tiny(), &batches(2), &opts(TraceMethod::Auto)).unwrap();
    assert_eq!(r.method_used, TraceMethod::Structural);
    assert_eq!(r.note.as_deref(), Some("structural applies"));
    assert_eq!(r.hvps, 0);
    assert!(r.loss.is_some());
    assert!(matches!(r.details, TraceDetails::Structural { .. }));
}

#[test]
fn auto_falls_back_with_a_note_for_batch_norm_in_train_mode() {
    let net = parse_network(SMALL_BN, "small-bn.json").unwrap();
    let m = Model::<f64>::new(net, 5);
    let b = batches(3);
    let train = TraceOptions {
        bn: BnUse::Train,
        ..opts(TraceMethod::Auto)
    };
    let r = trace(&m, &b, &train).unwrap();
    assert_eq!(r.method_used, TraceMethod::Basis);
    let note = r.note.unwrap();
    assert!(
        note.starts_with("structural does not apply") && note.contains("basis instead"),
        "{note}"
    );
    // Train mode does not apply structurally: asking for it is an error naming why.
    let e = trace(
        &m,
        &b,
        &TraceOptions {
            method: TraceMethod::Structural,
            ..train.clone()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, ModelError::Measure(MeasureError::NotStructural { .. })),
        "{e}"
    );
    // Without basis HVPs allowed, Auto falls back to Hutchinson.
    let h = TraceOptions {
        basis_max_dim: 0,
        probes: Some(4),
        ..train
    };
    let r = trace(&m, &b, &h).unwrap();
    assert_eq!(r.method_used, TraceMethod::Hutchinson);
    assert!(r.note.unwrap().contains("hutchinson instead"));
    // Eval mode: structural applies, and equals basis HVPs.
    let s = trace(&m, &b, &opts(TraceMethod::Auto)).unwrap();
    let e = trace(&m, &b, &opts(TraceMethod::Basis)).unwrap();
    assert_eq!(s.method_used, TraceMethod::Structural);
    assert!(close(s.trace.unwrap(), e.trace.unwrap(), 1e-8));
}

#[test]
fn hutchinson_has_a_std_error_and_is_reproducible_by_seed() {
    let (m, b) = (tiny(), batches(4));
    let o = TraceOptions {
        seed: 11,
        probes: Some(6),
        directions: Some(3),
        ..opts(TraceMethod::Hutchinson)
    };
    let r1 = trace(&m, &b, &o).unwrap();
    let r2 = trace(&m, &b, &o).unwrap();
    assert_eq!(r1.method_used, TraceMethod::Hutchinson);
    assert_eq!(r1.probes, Some(6));
    assert!(r1.std_error.unwrap() > 0.0);
    assert_eq!(r1.trace, r2.trace);
    assert_eq!(r1.std_error, r2.std_error);
    let other = trace(&m, &b, &TraceOptions { seed: 12, ..o }).unwrap();
    assert_ne!(r1.trace, other.trace);
    assert!(r1.blocks.iter().all(|t| t.std_error.is_some()));
}

#[test]
fn per_tensor_traces_sum_to_the_total() {
    let (m, b) = (tiny(), batches(5));
    for method in [
        TraceMethod::Structural,
        TraceMethod::Basis,
        TraceMethod::Hutchinson,
    ] {
        let r = trace(&m, &b, &opts(method)).unwrap();
        let names = m.param_names();
        assert_eq!(r.blocks.len(), names.len());
        for (t, name) in r.blocks.iter().zip(&names) {
            assert_eq!(t.name, *name);
        }
        let sum: f64 = r.blocks.iter().map(|t| t.trace).sum();
        let total = r.trace.unwrap();
        assert!(close(sum, total, 1e-9), "{method}: {sum} vs {total}");
    }
}

#[test]
fn exact_diagonal_and_selected_tensors() {
    let (m, b) = (tiny(), batches(6));
    let o = TraceOptions {
        diagonal: true,
        ..opts(TraceMethod::Basis)
    };
    let r = trace(&m, &b, &o).unwrap();
    let diag = r.diagonal.unwrap();
    let sum: f64 = diag.iter().flat_map(|d| d.values.iter()).sum();
    assert!(close(sum, r.trace.unwrap(), 1e-9));
    let s = trace(
        &m,
        &b,
        &TraceOptions {
            method: TraceMethod::Structural,
            ..o
        },
    )
    .unwrap();
    assert!(s.diagonal.is_some());
    // Only tensor 0: its trace, no total.
    let one = trace(
        &m,
        &b,
        &TraceOptions {
            tensors: Some(vec![0]),
            ..opts(TraceMethod::Basis)
        },
    )
    .unwrap();
    assert_eq!(one.trace, None);
    assert_eq!(one.blocks.len(), 1);
    assert!(close(one.blocks[0].trace, r.blocks[0].trace, 1e-12));
    // The diagonal needs an exact method.
    let e = trace(
        &m,
        &b,
        &TraceOptions {
            diagonal: true,
            ..opts(TraceMethod::Hutchinson)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("exact"), "{e}");
}

#[test]
fn method_names_round_trip() {
    for m in [
        TraceMethod::Auto,
        TraceMethod::Exact,
        TraceMethod::Structural,
        TraceMethod::Basis,
        TraceMethod::Hutchinson,
        TraceMethod::HutchPlusPlus,
    ] {
        assert_eq!(TraceMethod::parse(m.name()), Some(m));
    }
    assert_eq!(TraceMethod::parse("nope"), None);
}

/// A progress callback only watches: the trace (structural, basis, Hutchinson, Hutch++), the
/// Lanczos eigenvalues and the SLQ density are the same bits with and without one, and the
/// callback is told the HVPs with their total.
#[test]
fn progress_callbacks_leave_the_results_bit_identical() {
    use flatmin_engine::curvature::{LanczosOptions, SlqOptions};
    use flatmin_models::measure::{trace_with_progress, TraceProgress};
    use flatmin_models::spectrum::{self, DensityOptions, EigenOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let (model, data) = (tiny(), batches(4));
    for method in [
        TraceMethod::Structural,
        TraceMethod::Basis,
        TraceMethod::Hutchinson,
        TraceMethod::HutchPlusPlus,
    ] {
        let o = TraceOptions {
            probes: Some(12),
            budget: 12,
            ..opts(method)
        };
        let events = AtomicUsize::new(0);
        let watch = |p: TraceProgress| {
            if let TraceProgress::Hvps { total, done, .. } = p {
                assert!(total.is_some_and(|t| done <= t), "{method:?}: {p:?}");
            }
            events.fetch_add(1, Ordering::SeqCst);
        };
        let mut with = trace_with_progress(&model, &data, &o, Some(&watch)).unwrap();
        let mut without = trace(&model, &data, &o).unwrap();
        (with.seconds, without.seconds) = (0.0, 0.0);
        assert_eq!(with, without, "{method:?}");
        assert!(events.load(Ordering::SeqCst) > 0, "{method:?}: no progress");
    }
    let eigen = EigenOptions {
        lanczos: LanczosOptions {
            k: 2,
            max_iters: 15,
            ..LanczosOptions::default()
        },
        bn: BnUse::Eval,
    };
    let seen = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen);
    let tell = Box::new(move |h: usize| s.store(h, Ordering::SeqCst));
    let with = spectrum::eigenvalues_with_progress(&model, &data, &eigen, Some(tell)).unwrap();
    assert_eq!(with, spectrum::eigenvalues(&model, &data, &eigen).unwrap());
    assert_eq!(seen.load(Ordering::SeqCst), with.lanczos.hvps);
    let density = DensityOptions {
        slq: SlqOptions {
            probes: 2,
            steps: 8,
            seed: 1,
            reorthogonalize: true,
        },
        bn: BnUse::Eval,
        directions: None,
    };
    let s = Arc::clone(&seen);
    let tell = Box::new(move |h: usize| s.store(h, Ordering::SeqCst));
    let with = spectrum::density_with_progress(&model, &data, &density, Some(tell)).unwrap();
    assert_eq!(with, spectrum::density(&model, &data, &density).unwrap());
    assert_eq!(seen.load(Ordering::SeqCst), with.slq.hvps);
}

/// A small model's HVP passes run several at once (chosen from the model and batch, never
/// the thread count), and the basis trace is bit for bit the one of one pass at a time, on
/// one thread and on three.
#[test]
fn concurrent_passes_leave_the_trace_bit_identical_for_any_thread_count() {
    use flatmin_engine::curvature::{exact_trace, HvpConfig};
    use flatmin_models::measure::{hessian, MAX_AUTO_DIRECTIONS};
    let (m, b) = (tiny(), batches(4));
    let params = m.params_cloned();
    let (mut h, k) = hessian(&m, &params, &b, BnUse::Eval, None).unwrap();
    let concurrent = h.config().concurrent_passes;
    assert_eq!(k, MAX_AUTO_DIRECTIONS);
    assert!(
        concurrent > 1,
        "tiny-tanh should run passes at once, got {concurrent}"
    );
    h.set_config(HvpConfig::with_directions(k)).unwrap();
    let one_at_a_time = exact_trace(&h).unwrap().trace;
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let r = pool.install(|| trace(&m, &b, &opts(TraceMethod::Basis)).unwrap());
        assert_eq!(r.directions, Some(k));
        assert_eq!(
            r.trace.unwrap().to_bits(),
            one_at_a_time.to_bits(),
            "{threads} threads"
        );
    }
}
