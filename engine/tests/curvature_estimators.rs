//! Hutchinson and Hutch++ against exact traces: on a tiny tanh MLP, and on a quadratic whose
//! spectrum is dominated by a few large eigenvalues (where Hutch++ must win by far).

mod curvature_support;

use curvature_support::{LowRank, Mlp};
use flatmin_engine::curvature::{
    exact_trace, hutch_plus_plus, hutchinson, student_t_quantile, Hessian, HutchPlusPlusOptions,
    HutchinsonOptions, HvpConfig,
};
use flatmin_engine::{Tape, Tensor, Var};

#[test]
fn hutchinson_on_mlp_is_within_a_few_standard_errors() {
    let mlp = Mlp::<f64>::new(11, 1);
    let h = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let exact = exact_trace(&h).unwrap();
    let opts = HutchinsonOptions {
        seed: 11,
        min_probes: 20,
        max_probes: 4000,
        rel_tol: 0.05,
        ..Default::default()
    };
    let r = hutchinson(&h, &opts).unwrap();
    let z = (r.estimate - exact.trace) / r.std_error;
    eprintln!(
        "hutchinson: exact {} est {} se {} z {z:.2} probes {} converged {} rel half-width {:.4}",
        exact.trace, r.estimate, r.std_error, r.probes, r.converged, r.relative_half_width
    );
    assert!(z.abs() < 4.0);
    assert!(r.converged);
    assert!(r.relative_half_width <= 0.05);
    assert!(
        r.probes >= 20 && r.probes / 32 * 32 == r.probes,
        "rounds of K = 32 probes"
    );
    assert_eq!(r.hvps, r.probes);
    assert_eq!(r.samples.len(), r.probes);
    assert!((r.normalized_estimate - r.estimate / 66.0).abs() < 1e-15);
    // The per-tensor estimates add up to the total, and each is near its exact block trace.
    let sum: f64 = r.block_estimates.iter().sum();
    assert!((sum - r.estimate).abs() < 1e-10 * r.estimate.abs());
    for (i, b) in exact.blocks.iter().enumerate() {
        let zb = (r.block_estimates[i] - b.trace) / r.block_std_errors[i].max(1e-300);
        assert!(zb.abs() < 4.0 || (r.block_estimates[i] - b.trace).abs() < 1e-12);
    }
    // Same seed, same answer; the probe sequence does not depend on the round size.
    let again = hutchinson(&h, &opts).unwrap();
    assert_eq!(again, r);
    let fixed = |round| HutchinsonOptions {
        seed: 11,
        min_probes: 40,
        max_probes: 40,
        rel_tol: 0.0,
        probes_per_round: Some(round),
        ..Default::default()
    };
    let a = hutchinson(&h, &fixed(7)).unwrap();
    let b = hutchinson(&h, &fixed(40)).unwrap();
    assert_eq!(a.probes, 40);
    assert!(!a.converged);
    for (x, y) in a.samples.iter().zip(&b.samples) {
        assert!((x - y).abs() < 1e-12 * x.abs().max(1.0));
    }
}

#[test]
fn hutchinson_stopping_rule() {
    let mlp = Mlp::<f64>::new(11, 2);
    let h = Hessian::from_fn(
        &mlp.params,
        |t, v| mlp.loss(t, v),
        HvpConfig::with_directions(4),
    )
    .unwrap();
    let loose = hutchinson(
        &h,
        &HutchinsonOptions {
            min_probes: 8,
            rel_tol: 10.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(loose.converged);
    assert_eq!(loose.probes, 8);
    let capped = hutchinson(
        &h,
        &HutchinsonOptions {
            min_probes: 5,
            max_probes: 10,
            rel_tol: 1e-9,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!capped.converged);
    assert_eq!(capped.probes, 10);
    assert!(hutchinson(
        &h,
        &HutchinsonOptions {
            min_probes: 1,
            ..Default::default()
        }
    )
    .is_err());
    assert!(hutchinson(
        &h,
        &HutchinsonOptions {
            min_probes: 10,
            max_probes: 5,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn diagonal_hessian_has_zero_variance() {
    // f = Σ c_i θ_i² / 2 + Σ θ_i³ / 6 ... here simply Σ c_i θ_i²: H = 2 diag(c).
    let c: Vec<f64> = (0..20).map(|i| 0.5 + i as f64).collect();
    let theta = vec![Tensor::from_vec(&[20], vec![0.3; 20]).unwrap()];
    let cw = Tensor::from_vec(&[20], c.clone()).unwrap();
    let h = Hessian::from_fn(
        &theta,
        |t: &mut Tape<f64>, v: &[Var]| {
            let cv = t.constant(cw.clone());
            let sq = t.square(v[0])?;
            let w = t.mul(sq, cv)?;
            t.sum(w)
        },
        HvpConfig::default(),
    )
    .unwrap();
    let r = hutchinson(&h, &HutchinsonOptions::default()).unwrap();
    let want = 2.0 * c.iter().sum::<f64>();
    assert_eq!(r.std_error, 0.0);
    assert!(r.converged);
    assert!((r.estimate - want).abs() < 1e-12);
}

#[test]
fn hutch_plus_plus_on_mlp_is_within_a_few_standard_errors() {
    let mlp = Mlp::<f64>::new(11, 1);
    let h = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let exact = exact_trace(&h).unwrap().trace;
    let r = hutch_plus_plus(
        &h,
        &HutchPlusPlusOptions {
            budget: 60,
            seed: 3,
        },
    )
    .unwrap();
    let z = (r.estimate - exact) / r.std_error;
    eprintln!(
        "hutch++ (mlp): exact {exact} est {} se {} z {z:.2} rank {} probes {} top {}",
        r.estimate, r.std_error, r.rank, r.residual_probes, r.top_trace
    );
    assert!(z.abs() < 4.0);
    assert_eq!(r.hvps, 60);
    assert_eq!(r.sketch_size, 20);
    assert_eq!(r.rank + r.residual_probes, 40);
    assert_eq!(
        r.passes,
        1 + 2,
        "one pass for H S, two (40 > K = 32) for [Q, G]"
    );
    assert!(hutch_plus_plus(&h, &HutchPlusPlusOptions { budget: 5, seed: 0 }).is_err());
}

#[test]
fn hutch_plus_plus_wins_when_few_eigenvalues_dominate() {
    let d = 300;
    let lr = LowRank::new(d, &[400.0, 250.0, 120.0, 60.0, 30.0], 40, 0.05, 0.02, 9);
    let h = Hessian::from_fn(&lr.params, |t, v| lr.loss(t, v), HvpConfig::default()).unwrap();
    let exact = exact_trace(&h).unwrap().trace;
    let m = 45;
    let seeds = 30;
    let (mut se_h, mut se_pp) = (0.0, 0.0);
    let (mut worst_z_h, mut worst_z_pp): (f64, f64) = (0.0, 0.0);
    for seed in 0..seeds {
        let a = hutchinson(
            &h,
            &HutchinsonOptions {
                seed,
                min_probes: m,
                max_probes: m,
                rel_tol: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let b = hutch_plus_plus(&h, &HutchPlusPlusOptions { budget: m, seed }).unwrap();
        assert_eq!(a.hvps, m);
        assert_eq!(b.hvps, m);
        se_h += (a.estimate - exact).powi(2);
        se_pp += (b.estimate - exact).powi(2);
        worst_z_h = worst_z_h.max(((a.estimate - exact) / a.std_error).abs());
        worst_z_pp = worst_z_pp.max(((b.estimate - exact) / b.std_error).abs());
    }
    let rmse_h = (se_h / seeds as f64).sqrt();
    let rmse_pp = (se_pp / seeds as f64).sqrt();
    eprintln!(
        "low-rank d={d}, trace {exact:.4}, {m} HVPs, {seeds} seeds: RMSE hutchinson {rmse_h:.4e} \
         ({:.2e} rel), hutch++ {rmse_pp:.4e} ({:.2e} rel), ratio {:.1}; worst |z| {worst_z_h:.2} / \
         {worst_z_pp:.2}",
        rmse_h / exact,
        rmse_pp / exact,
        rmse_h / rmse_pp
    );
    assert!(rmse_pp * 20.0 < rmse_h);
    assert!(worst_z_h < 4.5 && worst_z_pp < 4.5);
}

/// The stated 95% intervals (estimate ± half_width: the Student-t quantile times the standard
/// error) of both estimators contain the
/// exact trace in at least 90% of 200 seeds: Hutchinson with its stopping rule (so the
/// optional stopping is part of what is checked) and Hutch++ at a fixed budget.
#[test]
fn confidence_intervals_cover_the_exact_trace_over_200_seeds() {
    let mlp = Mlp::<f64>::new(11, 1);
    let h = Hessian::from_fn(
        &mlp.params,
        |t, v| mlp.loss(t, v),
        HvpConfig::with_directions(8),
    )
    .unwrap();
    let exact = exact_trace(&h).unwrap().trace;
    let seeds = 200u64;
    let (mut hit_h, mut hit_pp) = (0, 0);
    let (mut probes, mut rel_width) = (0usize, 0.0);
    for seed in 0..seeds {
        let a = hutchinson(
            &h,
            &HutchinsonOptions {
                seed: 1000 + seed,
                min_probes: 16,
                max_probes: 2000,
                rel_tol: 0.1,
                probes_per_round: Some(8),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(a.converged);
        probes += a.probes;
        rel_width += a.relative_half_width;
        if (a.estimate - exact).abs() <= a.half_width {
            hit_h += 1;
        }
        let b = hutch_plus_plus(
            &h,
            &HutchPlusPlusOptions {
                budget: 30,
                seed: 5000 + seed,
            },
        )
        .unwrap();
        if (b.estimate - exact).abs() <= b.half_width {
            hit_pp += 1;
        }
    }
    let (cov_h, cov_pp) = (hit_h as f64 / seeds as f64, hit_pp as f64 / seeds as f64);
    eprintln!(
        "95% intervals over {seeds} seeds (exact trace {exact:.6}): hutchinson (--tol 0.1, mean {:.1} probes, mean half-width {:.3}) covers {:.1}%, hutch++ (30 HVPs) covers {:.1}%",
        probes as f64 / seeds as f64,
        rel_width / seeds as f64,
        100.0 * cov_h,
        100.0 * cov_pp
    );
    assert!(cov_h >= 0.90, "hutchinson coverage {cov_h}");
    assert!(cov_pp >= 0.90, "hutch++ coverage {cov_pp}");
}

/// Student-t quantiles against tabulated values (two-sided 95% and 99%).
#[test]
fn student_t_quantiles() {
    for (z, dof, want, tol) in [
        (1.959_964, 1, 12.706_2, 1e-3),
        (1.959_964, 2, 4.302_65, 1e-3),
        (1.959_964, 3, 3.182_45, 2e-3),
        (1.959_964, 9, 2.262_16, 1e-3),
        (1.959_964, 30, 2.042_27, 1e-4),
        (1.959_964, 1000, 1.962_34, 1e-4),
        (2.575_829, 9, 3.249_84, 3e-3),
        (2.575_829, 2, 9.924_84, 1e-3),
    ] {
        let t = student_t_quantile(z, dof);
        assert!(
            (t - want).abs() < tol * want,
            "z {z} dof {dof}: {t} vs {want}"
        );
    }
    assert!(student_t_quantile(1.96, 0).is_infinite());
}
