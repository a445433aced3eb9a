//! SGEMM throughput per CPU-second, for A/B runs on a shared machine where wall-clock timings
//! swing with the other tenants' load: the packed product (`gemm_packed`, one thread; or
//! `gemm_par` with `par`) of two square f32 matrices, timed by CPU time (the calling thread's,
//! or the whole process's with `par`: both workers and any spinning), best and median of
//! `REPS` calls, against the one-thread FMA peak also measured by CPU time.
//!
//! ```text
//! cargo run --release -p flatmin-engine --example gemm_cpu_time -- [SIZE [REPS [par]]]
//! ```

use flatmin_engine::kernels::cpu::fma_peak_gflops;
use flatmin_engine::kernels::gemm::{gemm_packed, gemm_par, MatRef};

/// Multiply-adds of one `fma_peak_gflops(0.0)` call: 2^16 rounds of 12 chains of 16 lanes.
const PEAK_CALL_FLOPS: f64 = (1u64 << 16) as f64 * 12.0 * 16.0 * 2.0;

/// CPU seconds so far, of the calling thread or of the whole process.
fn cpu_seconds(process: bool) -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let clock = if process {
        libc::CLOCK_PROCESS_CPUTIME_ID
    } else {
        libc::CLOCK_THREAD_CPUTIME_ID
    };
    // SAFETY: `t` is a valid timespec to write.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The one-thread FMA peak in GFLOP per CPU-second (best of five batches), or `None`
/// without a vector kernel.
fn peak_per_cpu_second() -> Option<f64> {
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = cpu_seconds(false);
        for _ in 0..400 {
            fma_peak_gflops(0.0)?;
        }
        best = best.max(400.0 * PEAK_CALL_FLOPS / (cpu_seconds(false) - t0) / 1e9);
    }
    Some(best)
}

/// Argument `i` parsed as a number, `default` when absent.
fn arg(i: usize, default: usize) -> usize {
    match std::env::args().nth(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!("argument {i}: expected a whole number, got {s:?}");
            std::process::exit(2)
        }),
    }
}

fn main() {
    let (size, reps) = (arg(1, 1024), arg(2, 20).max(1));
    let par = std::env::args().nth(3).as_deref() == Some("par");
    let a: Vec<f32> = (0..size * size)
        .map(|i| ((i * 7919) % 13) as f32 * 0.1 - 0.6)
        .collect();
    let b: Vec<f32> = (0..size * size)
        .map(|i| ((i * 104_729) % 11) as f32 * 0.1 - 0.5)
        .collect();
    let mut c = vec![0f32; size * size];
    let (av, bv) = (MatRef::new(&a, size, size), MatRef::new(&b, size, size));
    let mut cpu = Vec::new();
    for _ in 0..reps + 1 {
        let t0 = cpu_seconds(par);
        if par {
            gemm_par(1.0, av, bv, 0.0, &mut c);
        } else {
            gemm_packed(1.0, av, bv, 0.0, &mut c);
        }
        cpu.push(cpu_seconds(par) - t0);
    }
    cpu.remove(0);
    cpu.sort_by(f64::total_cmp);
    let flops = 2.0 * (size as f64).powi(3);
    let (best, median) = (flops / cpu[0] / 1e9, flops / cpu[cpu.len() / 2] / 1e9);
    let peak = peak_per_cpu_second().unwrap_or(f64::NAN);
    println!(
        "sgemm {size}, {}: {best:.1} GFLOP per CPU-second best, {median:.1} median; \
         one-thread peak {peak:.1}; best / peak {:.3}",
        if par { "gemm_par" } else { "one thread" },
        best / peak
    );
}
