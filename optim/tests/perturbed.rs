//! Update rules of the perturbation optimizers on quadratics against hand-computed values,
//! zero-gradient safety, projection orthogonality, reservoir uniformity, the SA phases, and
//! state round trips that continue bit for bit (f64 and f32).

use flatmin_engine::{Scalar, Tensor};
use flatmin_optim::perturb::Reservoir;
use flatmin_optim::{
    EtaPrime, LabelNoise, LabelNoiseSgd, OptimError, Optimizer, Oracle, OutputIterate, Probe,
    ProbeData, ProbeSpec, Result, Rps, Rs, RsConfig, Sa, SaConfig, Sam, Sam1, SamVariant,
};

/// `f_i(x) = ½ Σ_k a_k (x_k − c_ik)²`, `f = mean_i f_i`: a finite-sum quadratic whose
/// sub-batch gradient is `a ⊙ (x − mean_{i∈S} c_i)`. A fresh batch has centre `fresh`;
/// noisy labels shift the centre by `seed % 7 / 10` (recorded in `last_seed`).
struct Quad {
    a: Vec<f64>,
    c: Vec<Vec<f64>>,
    fresh: Vec<f64>,
    calls: Vec<String>,
    last_seed: Option<u64>,
}

impl Quad {
    fn new(a: &[f64], c: &[&[f64]]) -> Self {
        Quad {
            a: a.to_vec(),
            c: c.iter().map(|r| r.to_vec()).collect(),
            fresh: vec![0.25; a.len()],
            calls: Vec::new(),
            last_seed: None,
        }
    }

    fn centre(&self, idx: &[usize]) -> Vec<f64> {
        let mut m = vec![0.0; self.a.len()];
        for &i in idx {
            for (mk, ck) in m.iter_mut().zip(&self.c[i]) {
                *mk += ck / idx.len() as f64;
            }
        }
        m
    }

    fn grad_at(&self, x: &[f64], centre: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(centre)
            .zip(&self.a)
            .map(|((x, c), a)| a * (x - c))
            .collect()
    }

    fn all(&self) -> Vec<usize> {
        (0..self.c.len()).collect()
    }

    fn out<T: Scalar>(&self, p: &[Tensor<T>], centre: &[f64]) -> (T, Vec<Tensor<T>>) {
        let x: Vec<f64> = p[0].data().iter().map(|v| v.to_f64().unwrap()).collect();
        let g = self.grad_at(&x, centre);
        let loss = x
            .iter()
            .zip(centre)
            .zip(&self.a)
            .map(|((x, c), a)| 0.5 * a * (x - c) * (x - c))
            .sum::<f64>();
        (
            T::c(loss),
            vec![Tensor::from_vec(&[x.len()], g.into_iter().map(T::c).collect()).unwrap()],
        )
    }
}

impl<T: Scalar> Oracle<T> for Quad {
    fn eval(&mut self, p: &[Tensor<T>]) -> Result<(T, Vec<Tensor<T>>)> {
        self.calls.push("batch".into());
        Ok(self.out(p, &self.centre(&self.all())))
    }
    fn eval_on(&mut self, p: &[Tensor<T>], probe: &Probe) -> Result<(T, Vec<Tensor<T>>)> {
        match probe {
            Probe::Batch => self.eval(p),
            Probe::SubBatch { indices } => {
                self.calls.push(format!("sub{indices:?}"));
                Ok(self.out(p, &self.centre(indices)))
            }
            Probe::Fresh { size } => {
                self.calls.push(format!("fresh{size}"));
                Ok(self.out(p, &self.fresh.clone()))
            }
        }
    }
    fn eval_noisy(&mut self, p: &[Tensor<T>], noise: &LabelNoise) -> Result<(T, Vec<Tensor<T>>)> {
        self.calls.push("noisy".into());
        self.last_seed = Some(noise.seed);
        let shift = (noise.seed % 7) as f64 / 10.0;
        let c: Vec<f64> = self.centre(&self.all()).iter().map(|v| v + shift).collect();
        Ok(self.out(p, &c))
    }
    fn batch_len(&self) -> Option<usize> {
        Some(self.c.len())
    }
}

fn p64(x: &[f64]) -> Vec<Tensor<f64>> {
    vec![Tensor::from_vec(&[x.len()], x.to_vec()).unwrap()]
}

fn close(got: &[f64], want: &[f64], tol: f64) -> bool {
    got.iter()
        .zip(want)
        .all(|(g, w)| (g - w).abs() <= tol * w.abs().max(1.0))
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert!(close(got, want, 1e-14), "{got:?} vs {want:?}");
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn extra(info: &flatmin_optim::StepInfo, key: &str) -> f64 {
    info.extra
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no extra '{key}'"))
}

const X0: [f64; 3] = [0.5, -1.0, 2.0];

fn quad() -> Quad {
    Quad::new(
        &[1.0, 2.0, 3.0],
        &[
            &[0.1, -0.2, 0.3],
            &[-0.3, 0.4, 0.1],
            &[0.2, 0.0, -0.5],
            &[0.0, 0.2, 0.1],
        ],
    )
}

#[test]
fn sam_usam_asam_match_hand_computed_steps() {
    let (rho, lr) = (0.05, 0.1);
    for variant in [
        SamVariant::Normalized,
        SamVariant::Unnormalized,
        SamVariant::Adaptive { eta: 0.01 },
    ] {
        let mut q = quad();
        let c = q.centre(&q.all());
        let g = q.grad_at(&X0, &c);
        let gn = norm(&g);
        let eps: Vec<f64> = match variant {
            SamVariant::Normalized => g.iter().map(|v| rho * v / gn).collect(),
            SamVariant::Unnormalized => g.iter().map(|v| rho * v).collect(),
            SamVariant::Adaptive { eta } => {
                let t: Vec<f64> = X0.iter().map(|x| x.abs() + eta).collect();
                let tg: Vec<f64> = t.iter().zip(&g).map(|(t, g)| t * g).collect();
                let n = norm(&tg);
                t.iter().zip(&g).map(|(t, g)| rho * t * t * g / n).collect()
            }
        };
        let xp: Vec<f64> = X0.iter().zip(&eps).map(|(x, e)| x + e).collect();
        let h = q.grad_at(&xp, &c);
        let want: Vec<f64> = X0.iter().zip(&h).map(|(x, h)| x - lr * h).collect();
        let mut opt = Sam::<f64>::new(rho, variant, None, 0.0, false, 0.0).unwrap();
        let mut p = p64(&X0);
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_close(p[0].data(), &want);
        assert_eq!(info.grad_evals, 2);
        assert!((extra(&info, "pert_norm") - norm(&eps)).abs() < 1e-15);
    }
}

#[test]
fn sam_with_momentum_weight_decay_and_m_sharpness() {
    let (rho, lr, mu, wd) = (0.05, 0.1, 0.9, 0.01);
    let mut q = quad();
    // m = 3 over a batch of 4: chunks {0,1,2} (weight 3/4) and {3} (weight 1/4).
    let mut opt = Sam::<f64>::new(rho, SamVariant::Normalized, Some(3), mu, false, wd).unwrap();
    let mut p = p64(&X0);
    let mut x = X0.to_vec();
    let mut buf = [0.0; 3];
    for step in 0..2 {
        let mut d = [0.0; 3];
        for (chunk, w) in [(vec![0, 1, 2], 0.75), (vec![3], 0.25)] {
            let c = q.centre(&chunk);
            let g = q.grad_at(&x, &c);
            let gn = norm(&g);
            let xp: Vec<f64> = x.iter().zip(&g).map(|(x, g)| x + rho * g / gn).collect();
            let h = q.grad_at(&xp, &c);
            for k in 0..3 {
                d[k] += w * h[k];
            }
        }
        for k in 0..3 {
            let dk = d[k] + wd * x[k];
            buf[k] = if step == 0 { dk } else { mu * buf[k] + dk };
            x[k] -= lr * buf[k];
        }
        q.calls.clear();
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_eq!(info.grad_evals, 5);
        assert_eq!(
            q.calls,
            ["batch", "sub[0, 1, 2]", "sub[0, 1, 2]", "sub[3]", "sub[3]"]
        );
        assert!(close(p[0].data(), &x, 1e-13), "{:?} vs {x:?}", p[0].data());
    }
}

#[test]
fn sam1_descends_along_one_samples_perturbed_gradient() {
    let (rho, lr) = (0.05, 0.1);
    let mut q = quad();
    let mut opt = Sam1::<f64>::new(rho, ProbeSpec::samples(1), 0.0, false, 0.0, 3).unwrap();
    let mut seen = [0usize; 4];
    let mut x = X0.to_vec();
    for _ in 0..200 {
        let mut p = p64(&x);
        q.calls.clear();
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_eq!(info.grad_evals, 3);
        // The result is the hand-computed 1-SAM step for one of the samples.
        let i = (0..4)
            .find(|&i| {
                let c = q.centre(&[i]);
                let g = q.grad_at(&x, &c);
                let gn = norm(&g);
                let xp: Vec<f64> = x.iter().zip(&g).map(|(x, g)| x + rho * g / gn).collect();
                let h = q.grad_at(&xp, &c);
                let want: Vec<f64> = x.iter().zip(&h).map(|(x, h)| x - lr * h).collect();
                close(p[0].data(), &want, 1e-14)
            })
            .expect("a 1-SAM step for some sample");
        assert_eq!(
            q.calls,
            [
                "batch".to_string(),
                format!("sub[{i}]"),
                format!("sub[{i}]")
            ]
        );
        seen[i] += 1;
        x = p[0].data().to_vec();
    }
    assert!(seen.iter().all(|&c| c > 20), "samples drawn {seen:?}");
}

#[test]
fn rps_step_is_a_gradient_at_a_point_on_the_sphere() {
    let (rho, lr) = (0.3, 0.1);
    let mut q = quad();
    let c = q.centre(&q.all());
    let mut opt = Rps::<f64>::new(rho, 0.0, false, 0.0, 1).unwrap();
    for _ in 0..20 {
        let mut p = p64(&X0);
        opt.step(&mut p, &mut q, lr).unwrap();
        // x' = x − η a ⊙ (x + ρ g − c)  ⇒  recover g and check it is a unit vector.
        let g: Vec<f64> = (0..3)
            .map(|k| ((X0[k] - p[0].data()[k]) / lr / q.a[k] - X0[k] + c[k]) / rho)
            .collect();
        assert!((norm(&g) - 1.0).abs() < 1e-12, "|g| = {}", norm(&g));
    }
}

#[test]
fn label_noise_descends_on_the_noisy_labels() {
    let lr = 0.1;
    let mut q = quad();
    let mut opt = LabelNoiseSgd::<f64>::new(0.2, 0.0, false, 0.0, 4).unwrap();
    let mut p = p64(&X0);
    opt.step(&mut p, &mut q, lr).unwrap();
    let shift = (q.last_seed.unwrap() % 7) as f64 / 10.0;
    let c: Vec<f64> = q.centre(&q.all()).iter().map(|v| v + shift).collect();
    let g = q.grad_at(&X0, &c);
    let want: Vec<f64> = X0.iter().zip(&g).map(|(x, g)| x - lr * g).collect();
    assert_close(p[0].data(), &want);
    assert_eq!(q.calls, ["noisy"]);
    let err = LabelNoiseSgd::<f64>::new(1.5, 0.0, false, 0.0, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label_noise"), "{err}");
}

fn rs_cfg(project: bool, eps0: Option<f64>) -> RsConfig {
    RsConfig {
        eps0,
        project,
        eta_prime: EtaPrime::Fixed(0.7),
        ..RsConfig::paper(0.2, 0.7, 0.0, 11)
    }
}

#[test]
fn rs_matches_algorithm_1_on_a_quadratic() {
    let (lr, eta_p, rho) = (0.1, 0.7, 0.2);
    let mut q = quad();
    let c = q.centre(&q.all());
    let a = q.a.clone();
    let g: Vec<f64> = q.grad_at(&X0, &c);
    // Gate closed (‖∇f‖ > ε0): one plain GD step.
    let mut opt = Rs::<f64>::new(rs_cfg(true, Some(0.5))).unwrap();
    let mut p = p64(&X0);
    let info = opt.step(&mut p, &mut q, lr).unwrap();
    let gd: Vec<f64> = X0.iter().zip(&g).map(|(x, g)| x - lr * g).collect();
    assert_close(p[0].data(), &gd);
    assert_eq!((info.grad_evals, extra(&info, "gate")), (1, 0.0));
    for project in [false, true] {
        let mut opt = Rs::<f64>::new(rs_cfg(project, Some(100.0))).unwrap();
        for _ in 0..50 {
            let mut p = p64(&X0);
            let info = opt.step(&mut p, &mut q, lr).unwrap();
            assert_eq!((info.grad_evals, extra(&info, "gate")), (2, 1.0));
            // v = (x − η∇f − x')/η'.
            let v: Vec<f64> = (0..3)
                .map(|k| (X0[k] - lr * g[k] - p[0].data()[k]) / eta_p)
                .collect();
            let vg: f64 = v.iter().zip(&g).map(|(a, b)| a * b).sum();
            if project {
                // v = Proj⊥_g (a ⊙ (x + ρu − c)) = ρ Proj⊥_g (a ⊙ u): orthogonal to g; and
                // some unit u reproduces it: u = (v/ρ + t g)/a for the right t.
                assert!(vg.abs() < 1e-12 * norm(&v) * norm(&g), "⟨v, g⟩ = {vg}");
                assert!(extra(&info, "v_cos_grad").abs() < 1e-12);
                let u = |t: f64| -> f64 {
                    norm(
                        &(0..3)
                            .map(|k| (v[k] / rho + t * g[k]) / a[k])
                            .collect::<Vec<_>>(),
                    )
                };
                let min = (-400..=400)
                    .map(|s| u(s as f64 * 0.01))
                    .fold(f64::INFINITY, f64::min);
                assert!(
                    min <= 1.0 + 1e-9,
                    "no unit direction reproduces v (min norm {min})"
                );
            } else {
                // v = a ⊙ (x + ρu − c): u must be a unit vector.
                let u: Vec<f64> = (0..3).map(|k| (v[k] / a[k] - X0[k] + c[k]) / rho).collect();
                assert!((norm(&u) - 1.0).abs() < 1e-12, "|u| = {}", norm(&u));
            }
        }
    }
}

#[test]
fn rs_and_sa_are_safe_at_a_zero_gradient() {
    // At the minimum of the batch loss ∇f = 0: the projection is the identity.
    let mut q = quad();
    let c = q.centre(&q.all());
    let mut rs = Rs::<f64>::new(rs_cfg(true, Some(0.0))).unwrap();
    let mut p = p64(&c);
    let info = rs.step(&mut p, &mut q, 0.1).unwrap();
    assert_eq!(extra(&info, "gate"), 1.0);
    assert!(p[0].all_finite());
    // v = a ⊙ ρu, u unit.
    let u: Vec<f64> = (0..3)
        .map(|k| (c[k] - p[0].data()[k]) / 0.7 / q.a[k] / 0.2)
        .collect();
    assert!((norm(&u) - 1.0).abs() < 1e-12);
    // SA when every single-sample gradient vanishes at x (all centres equal x): Remark 2's
    // shift gives a direction; with a zero loss everywhere the step is plain GD.
    let mut same = Quad::new(&[1.0, 2.0], &[&[0.3, 0.3], &[0.3, 0.3]]);
    let mut sa = Sa::<f64>::new(SaConfig::paper(0.1, 0.5, None, 2)).unwrap();
    let mut p = p64(&[0.3, 0.3]);
    let info = sa.step(&mut p, &mut same, 0.1).unwrap();
    assert_eq!(extra(&info, "zero_grad_fix"), 1.0);
    assert_eq!(info.grad_evals, 4);
    assert!(p[0].all_finite());
    let mut flat = Quad::new(&[0.0, 0.0], &[&[0.3, 0.3], &[0.1, 0.3]]);
    let mut p = p64(&[0.3, 0.3]);
    let info = sa.step(&mut p, &mut flat, 0.1).unwrap();
    assert_eq!(extra(&info, "zero_grad_fix"), 2.0);
    assert_eq!(p[0].data(), &[0.3, 0.3]);
}

#[test]
fn sa_matches_algorithm_2_on_a_finite_sum() {
    let (lr, eta_p, rho) = (0.1, 0.6, 0.15);
    let mut q = quad();
    let c = q.centre(&q.all());
    let mut opt = Sa::<f64>::new(SaConfig::paper(rho, eta_p, None, 5)).unwrap();
    let (mut signs, mut samples) = ([0usize; 2], [0usize; 4]);
    for _ in 0..200 {
        let mut p = p64(&X0);
        q.calls.clear();
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_eq!(info.grad_evals, 3);
        let sigma = extra(&info, "sign");
        let i: usize = q.calls[1]
            .trim_start_matches("sub[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        assert_eq!(
            q.calls,
            [
                "batch".to_string(),
                format!("sub[{i}]"),
                format!("sub[{i}]")
            ]
        );
        // Hand computation of Algorithm 2 for (i, σ).
        let g = q.grad_at(&X0, &c);
        let ci = q.centre(&[i]);
        let gi = q.grad_at(&X0, &ci);
        let n = norm(&gi);
        let xp: Vec<f64> = X0
            .iter()
            .zip(&gi)
            .map(|(x, gi)| x + sigma * rho * gi / n)
            .collect();
        let h = q.grad_at(&xp, &ci);
        let gg: f64 = g.iter().map(|v| v * v).sum();
        let hg: f64 = h.iter().zip(&g).map(|(a, b)| a * b).sum();
        let v: Vec<f64> = h.iter().zip(&g).map(|(h, g)| h - hg / gg * g).collect();
        let want: Vec<f64> = (0..3).map(|k| X0[k] - lr * g[k] - eta_p * v[k]).collect();
        assert!(
            close(p[0].data(), &want, 1e-14),
            "{:?} vs {want:?}",
            p[0].data()
        );
        signs[usize::from(sigma > 0.0)] += 1;
        samples[i] += 1;
    }
    assert!(
        signs.iter().all(|&s| s > 70) && samples.iter().all(|&s| s > 25),
        "{signs:?} {samples:?}"
    );
}

#[test]
fn sa_probe_options_select_the_data() {
    let mut q = quad();
    let mut spec = SaConfig::paper(0.1, 0.5, None, 1);
    // Whole batch: the gradient at x is reused, two evaluations.
    spec.probe = ProbeSpec::batch();
    let mut opt = Sa::<f64>::new(spec.clone()).unwrap();
    let info = opt.step(&mut p64(&X0), &mut q, 0.1).unwrap();
    assert_eq!(
        (info.grad_evals, q.calls.clone()),
        (2, vec!["batch".to_string(), "batch".into()])
    );
    // B = 2 of 4 samples.
    q.calls.clear();
    spec.probe = ProbeSpec::samples(2);
    let mut opt = Sa::<f64>::new(spec.clone()).unwrap();
    opt.step(&mut p64(&X0), &mut q, 0.1).unwrap();
    assert!(
        q.calls[1].starts_with("sub[")
            && q.calls[1].matches(',').count() == 1
            && q.calls[1] == q.calls[2],
        "{:?}",
        q.calls
    );
    // A fresh batch.
    q.calls.clear();
    spec.probe = ProbeSpec {
        size: Some(64),
        data: ProbeData::Fresh,
    };
    let mut opt = Sa::<f64>::new(spec).unwrap();
    opt.step(&mut p64(&X0), &mut q, 0.1).unwrap();
    assert_eq!(q.calls, ["batch", "fresh64", "fresh64"]);
    // An oracle without sub-batches says so.
    let mut plain = |p: &[Tensor<f64>]| Ok((0.0, p.to_vec()));
    let mut opt = Sa::<f64>::new(SaConfig::paper(0.1, 0.5, None, 1)).unwrap();
    let err = opt.step(&mut p64(&X0), &mut plain, 0.1).unwrap_err();
    assert!(matches!(err, OptimError::Unsupported(_)), "{err}");
}

#[test]
fn sa_hands_a_random_iterate_to_the_final_gd_phase() {
    let lr = 0.1;
    let mut q = quad();
    let c = q.centre(&q.all());
    let t = 6;
    let mut opt = Sa::<f64>::new(SaConfig::paper(0.1, 0.5, Some(t), 8)).unwrap();
    let mut p = p64(&X0);
    let mut iterates = Vec::new();
    for step in 0..t {
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_eq!(extra(&info, "phase"), 1.0);
        if step + 1 == t {
            let pick = extra(&info, "output_pick") as usize;
            assert!((1..=t as usize).contains(&pick));
            iterates.push(opt.last_iterate().unwrap()[0].data().to_vec());
            assert_eq!(
                p[0].data(),
                iterates[pick - 1].as_slice(),
                "parameters = x̂ = x_pick"
            );
        } else {
            iterates.push(p[0].data().to_vec());
        }
    }
    for _ in 0..3 {
        let x = p[0].data().to_vec();
        let info = opt.step(&mut p, &mut q, lr).unwrap();
        assert_eq!((extra(&info, "phase"), info.grad_evals), (2.0, 1));
        let g = q.grad_at(&x, &c);
        let want: Vec<f64> = x.iter().zip(&g).map(|(x, g)| x - lr * g).collect();
        assert_close(p[0].data(), &want);
    }
    assert_eq!((opt.steps(), opt.gd_steps()), (t, 3));
}

#[test]
fn reservoir_keeps_a_uniformly_random_iterate() {
    let t = 10u64;
    let runs = 20_000;
    let mut counts = vec![0usize; t as usize];
    for seed in 0..runs {
        let mut r = Reservoir::<f64>::new(seed);
        for k in 1..=t {
            r.offer(&[Tensor::scalar(k as f64)]);
        }
        let kept = r.sample().unwrap()[0].data()[0] as u64;
        assert_eq!(kept, r.pick());
        counts[kept as usize - 1] += 1;
    }
    // Chi-square with 9 degrees of freedom: the 99.9% quantile is 27.9.
    let e = runs as f64 / t as f64;
    let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
    println!("reservoir counts {counts:?}, chi2 = {chi2:.2} (9 dof)");
    assert!(chi2 < 27.9, "chi2 = {chi2} for {counts:?}");
}

/// Runs `opt` for `n` steps from `p`.
fn steps<T: Scalar>(
    opt: &mut dyn Optimizer<T>,
    p: &mut [Tensor<T>],
    q: &mut Quad,
    n: usize,
) -> Vec<Vec<(String, f64)>> {
    (0..n)
        .map(|_| opt.step(p, q, 0.05).unwrap().extra)
        .collect()
}

/// A named optimizer factory.
type Make<T> = (&'static str, Box<dyn Fn() -> Box<dyn Optimizer<T>>>);

fn all_optimizers<T: Scalar>() -> Vec<Make<T>> {
    vec![
        (
            "sam",
            Box::new(|| {
                Box::new(
                    Sam::<T>::new(0.05, SamVariant::Normalized, Some(3), 0.9, true, 1e-3).unwrap(),
                )
            }),
        ),
        (
            "asam",
            Box::new(|| {
                Box::new(
                    Sam::<T>::new(
                        0.5,
                        SamVariant::Adaptive { eta: 0.01 },
                        None,
                        0.9,
                        false,
                        0.0,
                    )
                    .unwrap(),
                )
            }),
        ),
        (
            "sam1",
            Box::new(|| {
                Box::new(Sam1::<T>::new(0.05, ProbeSpec::samples(1), 0.9, false, 0.0, 3).unwrap())
            }),
        ),
        (
            "rps",
            Box::new(|| Box::new(Rps::<T>::new(0.1, 0.5, false, 0.0, 3).unwrap())),
        ),
        (
            "label-noise",
            Box::new(|| Box::new(LabelNoiseSgd::<T>::new(0.1, 0.9, false, 0.0, 3).unwrap())),
        ),
        (
            "rs",
            Box::new(|| {
                let mut c = RsConfig::paper(0.1, 0.05, 1.5, 3);
                c.horizon = Some(7);
                c.momentum = 0.5;
                c.probe = ProbeSpec::samples(2);
                Box::new(Rs::<T>::new(c).unwrap())
            }),
        ),
        (
            "sa",
            Box::new(|| {
                let mut c = SaConfig::paper(0.1, 0.05, Some(7), 3);
                c.weight_decay = 1e-3;
                c.eta_prime = EtaPrime::SameAsLr;
                Box::new(Sa::<T>::new(c).unwrap())
            }),
        ),
        (
            "sa-last",
            Box::new(|| {
                let mut c = SaConfig::paper(0.1, 0.05, Some(7), 3);
                c.output = OutputIterate::Last;
                Box::new(Sa::<T>::new(c).unwrap())
            }),
        ),
    ]
}

fn round_trip<T: Scalar>() {
    for (name, make) in all_optimizers::<T>() {
        let x0: Vec<T> = X0.iter().map(|&v| T::c(v)).collect();
        // Uninterrupted: 12 steps (crossing the horizon of RS and SA at 7).
        let mut q = quad();
        let mut a = make();
        let mut pa = vec![Tensor::from_vec(&[3], x0.clone()).unwrap()];
        let mut log_a = steps(a.as_mut(), &mut pa, &mut q, 12);
        // Interrupted after 4 and after 9 steps: state saved, a fresh optimizer restored.
        let mut b = make();
        let mut pb = vec![Tensor::from_vec(&[3], x0).unwrap()];
        let mut log_b = steps(b.as_mut(), &mut pb, &mut q, 4);
        for n in [5, 3] {
            let state = b.state();
            let mut c = make();
            c.load_state(state).unwrap();
            b = c;
            log_b.extend(steps(b.as_mut(), &mut pb, &mut q, n));
        }
        assert!(
            pa == pb,
            "{name}: parameters differ after resume ({:?} vs {:?})",
            pa[0].data(),
            pb[0].data()
        );
        // NaN-free logs compare exactly.
        log_a
            .iter_mut()
            .chain(log_b.iter_mut())
            .flatten()
            .for_each(|(_, v)| assert!(v.is_finite()));
        assert_eq!(log_a, log_b, "{name}: logs differ after resume");
        // A state from another optimizer is refused.
        let mut other = Rps::<T>::new(0.1, 0.0, false, 0.0, 1).unwrap();
        if name != "rps" {
            assert!(
                other.load_state(a.state()).is_err(),
                "{name}: rps accepted its state"
            );
        }
    }
}

#[test]
fn state_round_trip_continues_bit_identically_f64() {
    round_trip::<f64>();
}

#[test]
fn state_round_trip_continues_bit_identically_f32() {
    round_trip::<f32>();
}

#[test]
fn hyperparameters_are_validated_with_their_field_name() {
    let bad = |r: Result<()>, flag: &str| {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(flag), "{e} should name {flag}");
    };
    bad(
        Sam::<f64>::new(0.0, SamVariant::Normalized, None, 0.0, false, 0.0).map(|_| ()),
        "rho",
    );
    bad(
        Sam::<f64>::new(0.1, SamVariant::Normalized, Some(0), 0.0, false, 0.0).map(|_| ()),
        "m_sharpness",
    );
    bad(
        Sam::<f64>::new(
            0.1,
            SamVariant::Adaptive { eta: -1.0 },
            None,
            0.0,
            false,
            0.0,
        )
        .map(|_| ()),
        "asam_eta",
    );
    let mut c = RsConfig::paper(0.1, -1.0, 0.1, 0);
    bad(Rs::<f64>::new(c.clone()).map(|_| ()), "eta_prime");
    c.eta_prime = EtaPrime::SameAsLr;
    c.eps0 = Some(-1.0);
    bad(Rs::<f64>::new(c).map(|_| ()), "eps0");
    let mut s = SaConfig::paper(0.1, 0.1, None, 0);
    s.probe = ProbeSpec::samples(0);
    bad(Sa::<f64>::new(s.clone()).map(|_| ()), "probe_batch");
    s.probe = ProbeSpec::samples(1);
    s.xi = 0.0;
    bad(Sa::<f64>::new(s).map(|_| ()), "zero_grad_xi");
}
