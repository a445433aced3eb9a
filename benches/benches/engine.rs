//! criterion benchmarks: GEMM, conv2d, gradient, HVP and batched HVP of the presets.
//!
//! `cargo bench -p flatmin-benches` (all), or e.g. `cargo bench -p flatmin-benches -- hvp/cnn-s`.
//! The HVP/gradient cost ratio is the ratio of the `hvp/M` and `grad/M` times; the batched
//! HVP target compares `hvp16/M` with 16 × `hvp/M`. `flatmin bench` prints both ratios directly.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flatmin_benches::{GemmWorkload, Workload};
use flatmin_engine::{Tape, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::hint::black_box;
use std::time::Duration;

fn gemm(c: &mut Criterion) {
    flatmin_engine::runtime::tune_allocator();
    let mut g = c.benchmark_group("gemm");
    for n in [256, 512, 1024] {
        let mut w = GemmWorkload::<f32>::new(n);
        g.throughput(Throughput::Elements(w.flops() as u64));
        g.bench_function(BenchmarkId::new("sgemm", n), |b| b.iter(|| w.run()));
    }
    g.finish();
}

/// conv2d forward and backward (value gradient) at cnn-s and resnet20 layer shapes, batch 128.
fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv2d");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    // (name, cin, hw, cout, stride)
    for (name, cin, hw, cout, stride) in [
        ("cnn-s.conv1", 3, 32, 32, 1),
        ("cnn-s.conv2", 32, 16, 64, 1),
        ("resnet20.stage1", 16, 32, 16, 1),
        ("resnet20.stage3", 64, 8, 64, 1),
    ] {
        let mut rng = StdRng::seed_from_u64(0);
        let x = Tensor::<f32>::randn(&[128, cin, hw, hw], &mut rng);
        let w = Tensor::<f32>::randn(&[cout, cin, 3, 3], &mut rng);
        g.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| {
                let mut t = Tape::new(0);
                let (xv, wv) = (t.constant(x.clone()), t.constant(w.clone()));
                black_box(t.conv2d(xv, wv, None, stride, 1).unwrap());
            })
        });
        g.bench_function(BenchmarkId::new("forward+backward", name), |b| {
            b.iter(|| {
                let mut t = Tape::new(0);
                let xv = t.param(x.clone(), None).unwrap();
                let wv = t.param(w.clone(), None).unwrap();
                let y = t.conv2d(xv, wv, None, stride, 1).unwrap();
                let s = t.sum(y).unwrap();
                black_box(t.backward(s).unwrap());
            })
        });
    }
    g.finish();
}

fn models(c: &mut Criterion) {
    for model in ["mlp-s", "cnn-s", "resnet20"] {
        let k = 16;
        let w = Workload::<f32>::new(model, 128, k).expect("preset");
        let mut g = c.benchmark_group(model);
        g.sample_size(10)
            .measurement_time(Duration::from_secs(if model == "mlp-s" { 5 } else { 20 }));
        g.bench_function("grad", |b| b.iter(|| black_box(w.grad())));
        g.bench_function("hvp", |b| b.iter(|| black_box(w.hvp())));
        g.bench_function("hvp16", |b| b.iter(|| black_box(w.hvp_batched())));
        g.finish();
    }
}

/// Exact Hessian traces: by structure (tiny-tanh at batch 256, mlp-s and cnn-s at 128; the
/// BackPACK DiagHessian workloads) and by 6,506 basis HVPs (tiny-tanh at 256).
fn traces(c: &mut Criterion) {
    let mut g = c.benchmark_group("trace");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (model, batch) in [("tiny-tanh", 256), ("mlp-s", 128), ("cnn-s", 128)] {
        let w = Workload::<f32>::new(model, batch, 0).expect("preset");
        g.bench_function(BenchmarkId::new("structural", model), |b| {
            b.iter(|| black_box(w.trace_structural()))
        });
    }
    let w = Workload::<f32>::new("tiny-tanh", 256, 0).expect("preset");
    g.bench_function(BenchmarkId::new("basis", "tiny-tanh"), |b| {
        b.iter(|| black_box(w.trace_basis(64)))
    });
    g.finish();
}

criterion_group!(benches, gemm, conv, models, traces);
criterion_main!(benches);
