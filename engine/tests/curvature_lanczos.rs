//! Lanczos eigenvalues and SLQ spectral densities against an explicitly assembled Hessian.

mod curvature_support;

use curvature_support::{explicit_hessian, jacobi_eigenvalues, matvec, rel_err, LowRank, Mlp};
use flatmin_engine::curvature::{
    exact_trace, gaussian_density, lanczos, slq, Hessian, HvpConfig, LanczosOptions, SlqOptions,
    Which,
};
use flatmin_engine::{Tape, Tensor, Var};

#[test]
fn top_eigenvalues_match_the_explicit_hessian() {
    let mlp = Mlp::<f64>::new(11, 1);
    let full = explicit_hessian(&mlp.params, |t, v| mlp.loss(t, v));
    let ev = jacobi_eigenvalues(&full);
    let trace: f64 = (0..full.len()).map(|i| full[i][i]).sum();
    assert!((ev.iter().sum::<f64>() - trace).abs() < 1e-12);
    let h = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let k = 5;
    let r = lanczos(
        &h,
        &LanczosOptions {
            k,
            max_iters: 66,
            tol: 1e-10,
            eigenvectors: true,
            seed: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let top: Vec<f64> = ev.iter().rev().take(k).copied().collect();
    let worst = r
        .eigenvalues
        .iter()
        .zip(&top)
        .map(|(a, b)| rel_err(*a, *b))
        .fold(0.0, f64::max);
    eprintln!(
        "lanczos top-{k}: {:?}\n  explicit {:?}\n  worst rel err {worst:.2e}, {} iterations, residuals {:?}",
        r.eigenvalues, top, r.iterations, r.residuals
    );
    assert!(r.converged);
    assert!(worst < 1e-8);
    assert_eq!(r.hvps, r.iterations);
    assert!(r.iterations < 66, "converged before the full dimension");
    // Ritz vectors are unit eigenvectors of the explicit Hessian.
    for (y, &theta) in r.eigenvectors.as_ref().unwrap().iter().zip(&r.eigenvalues) {
        let hy = matvec(&full, y);
        let res: f64 = hy
            .iter()
            .zip(y)
            .map(|(a, b)| (a - theta * b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(res < 1e-8 * theta.abs(), "residual {res:e}");
    }
    // The other end: the most negative eigenvalues.
    let low = lanczos(
        &h,
        &LanczosOptions {
            k: 2,
            max_iters: 66,
            tol: 1e-10,
            which: Which::Smallest,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("smallest: {:?} explicit {:?}", low.eigenvalues, &ev[..2]);
    for (a, b) in low.eigenvalues.iter().zip(&ev[..2]) {
        assert!((a - b).abs() < 1e-8 * ev[ev.len() - 1].abs());
    }
    // Running to the full dimension reproduces the whole spectrum.
    let all = lanczos(
        &h,
        &LanczosOptions {
            k: 66,
            max_iters: 66,
            tol: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(all.iterations, 66);
    assert!(all.converged);
    let scale = ev[ev.len() - 1].abs();
    for (a, b) in all.ritz_values.iter().zip(&ev) {
        assert!((a - b).abs() < 1e-10 * scale, "{a} vs {b}");
    }
    assert!(lanczos(
        &h,
        &LanczosOptions {
            k: 0,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn repeated_eigenvalues_are_found_by_restarting() {
    // f = Σ c_i θ_i²: H = 2 diag(c). A random start vector's Krylov space holds one copy of
    // each distinct eigenvalue (dimension 3); the restarts find the other copies.
    let c = vec![3.0, 3.0, 3.0, 1.0, 1.0, 0.5];
    let n = c.len();
    let theta = vec![Tensor::from_vec(&[n], vec![0.2; n]).unwrap()];
    let cw = Tensor::from_vec(&[n], c.clone()).unwrap();
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
    let r = lanczos(
        &h,
        &LanczosOptions {
            k: 4,
            max_iters: n,
            tol: 1e-10,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "repeated: {:?} restarts {} iterations {}",
        r.eigenvalues, r.restarts, r.iterations
    );
    assert!(r.restarts >= 1);
    for (a, b) in r.eigenvalues.iter().zip([6.0, 6.0, 6.0, 2.0]) {
        assert!((a - b).abs() < 1e-12, "{:?}", r.eigenvalues);
    }
}

#[test]
fn slq_density_integrates_to_one_with_first_moment_trace_over_d() {
    let mlp = Mlp::<f64>::new(11, 1);
    let h = Hessian::from_fn(&mlp.params, |t, v| mlp.loss(t, v), HvpConfig::default()).unwrap();
    let exact = exact_trace(&h).unwrap();
    let full = explicit_hessian(&mlp.params, |t, v| mlp.loss(t, v));
    let ev = jacobi_eigenvalues(&full);
    for reorth in [true, false] {
        let r = slq(
            &h,
            &SlqOptions {
                probes: 40,
                steps: 20,
                seed: 5,
                reorthogonalize: reorth,
            },
        )
        .unwrap();
        assert_eq!(r.hvps, 40 * 20);
        assert_eq!(r.passes, 20 * 2, "20 rounds of 40 probes at K = 32");
        let (nodes, weights) = r.nodes_and_weights();
        assert_eq!(nodes.len(), 40 * 20);
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Nodes lie inside the spectrum.
        let (lo, hi) = (ev[0], ev[ev.len() - 1]);
        let span = hi - lo;
        assert!(nodes
            .iter()
            .all(|&x| x >= lo - 1e-9 * span && x <= hi + 1e-9 * span));
        // The broadened density integrates to 1 (trapezoid rule).
        let sigma = 0.01 * span;
        let grid = r.grid(4001, 8.0 * sigma);
        let dens = r.density(&grid, sigma);
        let step = grid[1] - grid[0];
        let integral: f64 =
            step * (dens.iter().sum::<f64>() - 0.5 * (dens[0] + dens[dens.len() - 1]));
        // The first moment is a trace estimate over d.
        let m1 = r.moment(1);
        let z = (r.trace_estimate - exact.trace) / r.trace_std_error;
        eprintln!(
            "slq (reorth {reorth}): integral {integral:.12}, first moment {m1:.6} vs tr/d {:.6}, \
             trace {:.5} ± {:.5} (exact {:.5}, z {z:.2}); second moment {:.6} vs tr(H²)/d {:.6}",
            exact.normalized_trace,
            r.trace_estimate,
            r.trace_std_error,
            exact.trace,
            r.moment(2),
            ev.iter().map(|x| x * x).sum::<f64>() / 66.0
        );
        assert!((integral - 1.0).abs() < 1e-9);
        assert!((m1 * 66.0 - r.trace_estimate).abs() < 1e-10 * exact.trace.abs());
        assert!((r.normalized_trace_estimate - m1).abs() < 1e-12);
        assert!(z.abs() < 4.0);
    }
    assert!(slq(
        &h,
        &SlqOptions {
            probes: 0,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn slq_run_to_an_invariant_subspace_has_eigenvalue_nodes() {
    // d = 30 with an eigenvalue of multiplicity 20 (the ridge δ = 0.5 off the rank-10 part):
    // every probe's Krylov space is invariant after at most 11 steps, its quadrature is the
    // probe's exact spectral measure, and every node is an eigenvalue.
    let lr = LowRank::new(30, &[50.0, 10.0], 8, 0.1, 0.5, 2);
    let h = Hessian::from_fn(&lr.params, |t, v| lr.loss(t, v), HvpConfig::default()).unwrap();
    let full = explicit_hessian(&lr.params, |t, v| lr.loss(t, v));
    let ev = jacobi_eigenvalues(&full);
    let r = slq(
        &h,
        &SlqOptions {
            probes: 3,
            steps: 100,
            seed: 1,
            reorthogonalize: true,
        },
    )
    .unwrap();
    let scale = ev[ev.len() - 1].abs();
    let mut worst: f64 = 0.0;
    for p in &r.probes {
        assert!(
            p.steps <= 11,
            "stopped at the invariant subspace: {} steps",
            p.steps
        );
        for &x in &p.nodes {
            let gap = ev
                .iter()
                .map(|e| (e - x).abs())
                .fold(f64::INFINITY, f64::min);
            worst = worst.max(gap / scale);
        }
    }
    eprintln!(
        "slq invariant: steps {:?}, worst node distance to the spectrum {worst:.2e} (relative)",
        r.probes.iter().map(|p| p.steps).collect::<Vec<_>>()
    );
    assert!(worst < 1e-10);
    assert_eq!(r.hvps, r.probes.iter().map(|p| p.steps).sum::<usize>());
    // gaussian_density is a plain sum of normal densities.
    let g = gaussian_density(&[0.0, 1.0], &[0.25, 0.75], &[0.0], 1.0);
    let want = (0.25 + 0.75 * (-0.5f64).exp()) / (2.0 * std::f64::consts::PI).sqrt();
    assert!((g[0] - want).abs() < 1e-15);
}
