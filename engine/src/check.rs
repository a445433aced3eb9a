//! The one finite-difference checker every op test uses (f64, central differences).
//!
//! For an op `y = op(θ_1, …, θ_m)` it builds a random scalar probe
//! `f(θ) = Σ c ⊙ y + ½ Σ d ⊙ y²` and checks, against central differences of step `h`:
//! 1. the JVP (the tangent of `y`) in a random direction,
//! 2. the gradient of `f` (every coordinate for small inputs, plus random directions),
//! 3. the HVP `H v` against differences of gradients,
//! 4. symmetry `u·(H v) = v·(H u)`,
//! 5. that a batched HVP (K = 2) agrees with single-direction HVPs.

use crate::error::Result;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Largest errors found, each relative to the size of its reference.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// JVP vs differences of outputs.
    pub jvp: f64,
    /// Gradient vs differences of the probe.
    pub grad: f64,
    /// HVP vs differences of gradients.
    pub hvp: f64,
    /// |u·Hv − v·Hu| relative to their size.
    pub symmetry: f64,
    /// Batched (K = 2) vs single-direction HVP.
    pub batched: f64,
}

impl CheckReport {
    /// The largest of all errors.
    pub fn worst(&self) -> f64 {
        [self.jvp, self.grad, self.hvp, self.symmetry, self.batched]
            .into_iter()
            .fold(0.0, f64::max)
    }
}

type OpFn<'a> = dyn Fn(&mut Tape<f64>, &[Var]) -> Result<Var> + 'a;

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want
        .iter()
        .chain(got)
        .fold(0.0f64, |a, &b| a.max(b.abs()))
        .max(1e-6);
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (&g, &w)| a.max((g - w).abs()))
        / scale
}

struct Probe<'a> {
    op: &'a OpFn<'a>,
    c: Tensor<f64>,
    d: Tensor<f64>,
}

impl Probe<'_> {
    /// Records the op and the probe on `tape`; returns (op output, probe value).
    fn record(&self, tape: &mut Tape<f64>, vars: &[Var]) -> Result<(Var, Var)> {
        let y = (self.op)(tape, vars)?;
        let c = tape.constant(self.c.clone());
        let d = tape.constant(self.d.clone());
        let lin = tape.mul(y, c)?;
        let lin = tape.sum(lin)?;
        let sq = tape.square(y)?;
        let sq = tape.mul(sq, d)?;
        let sq = tape.sum(sq)?;
        let f = tape.add(lin, sq)?;
        Ok((y, f))
    }

    /// Probe value, op output, gradient and HVPs along `dirs` at `theta`.
    #[allow(clippy::type_complexity)]
    fn eval(
        &self,
        theta: &[Tensor<f64>],
        dirs: &[Vec<Tensor<f64>>],
    ) -> Result<(
        f64,
        Tensor<f64>,
        Option<Tensor<f64>>,
        Vec<f64>,
        Vec<Vec<f64>>,
    )> {
        let k = dirs.len();
        let mut tape = Tape::new(k);
        let mut vars = Vec::new();
        for (i, p) in theta.iter().enumerate() {
            let t = if k == 0 {
                None
            } else {
                Some(Tensor::stack(
                    &dirs.iter().map(|d| d[i].clone()).collect::<Vec<_>>(),
                )?)
            };
            vars.push(tape.param(p.clone(), t)?);
        }
        let (y, f) = self.record(&mut tape, &vars)?;
        let grads = tape.backward(f)?;
        let mut g = Vec::new();
        let mut hv = vec![Vec::new(); k];
        for &v in &vars {
            g.extend_from_slice(grads.grad(&tape, v).data());
            let h = grads.hvp(&tape, v);
            let len = tape.value(v).numel();
            for (kk, slot) in hv.iter_mut().enumerate() {
                slot.extend_from_slice(&h.data()[kk * len..(kk + 1) * len]);
            }
        }
        Ok((
            tape.value(f).data()[0],
            tape.value(y).clone(),
            tape.tangent(y).cloned(),
            g,
            hv,
        ))
    }
}

fn shift(theta: &[Tensor<f64>], dir: &[Tensor<f64>], h: f64) -> Vec<Tensor<f64>> {
    theta
        .iter()
        .zip(dir)
        .map(|(t, d)| {
            let mut t = t.clone();
            t.axpy(h, d);
            t
        })
        .collect()
}

fn flat(ts: &[Tensor<f64>]) -> Vec<f64> {
    ts.iter().flat_map(|t| t.data().iter().copied()).collect()
}

/// The probe for `op` at `theta`: records the op once for its output shape and draws the
/// probe weights from `rng`.
fn make_probe<'a>(theta: &[Tensor<f64>], op: &'a OpFn<'a>, rng: &mut StdRng) -> Result<Probe<'a>> {
    let mut tape = Tape::new(0);
    let vars: Vec<Var> = theta
        .iter()
        .map(|t| tape.param(t.clone(), None))
        .collect::<Result<_>>()?;
    let y = op(&mut tape, &vars)?;
    let yshape = tape.value(y).shape().to_vec();
    Ok(Probe {
        op,
        c: Tensor::randn(&yshape, rng),
        d: Tensor::randn(&yshape, rng),
    })
}

/// A random direction with the shapes of `theta`.
fn rand_dir(theta: &[Tensor<f64>], rng: &mut StdRng) -> Vec<Tensor<f64>> {
    theta
        .iter()
        .map(|t| Tensor::randn(t.shape(), rng))
        .collect()
}

/// Unit coordinate direction `j` over all entries of `theta`.
fn coordinate(theta: &[Tensor<f64>], j: usize) -> Vec<Tensor<f64>> {
    let mut e: Vec<Tensor<f64>> = theta.iter().map(|t| Tensor::zeros(t.shape())).collect();
    let mut rem = j;
    for t in e.iter_mut() {
        if rem < t.numel() {
            t.data_mut()[rem] = 1.0;
            break;
        }
        rem -= t.numel();
    }
    e
}

/// Gradient vs central differences of the probe along `u`, `v` and, when there are at most
/// 48 entries, every coordinate.
fn grad_error(
    probe: &Probe<'_>,
    theta: &[Tensor<f64>],
    g: &[f64],
    (u, v): (&[Tensor<f64>], &[Tensor<f64>]),
    h: f64,
) -> Result<f64> {
    let n: usize = theta.iter().map(|t| t.numel()).sum();
    let fval = |th: &[Tensor<f64>]| probe.eval(th, &[]).map(|r| r.0);
    let mut dirs: Vec<Vec<Tensor<f64>>> = vec![u.to_vec(), v.to_vec()];
    if n <= 48 {
        dirs.extend((0..n).map(|j| coordinate(theta, j)));
    }
    let mut got = Vec::new();
    let mut want = Vec::new();
    for d in &dirs {
        let fp = fval(&shift(theta, d, h))?;
        let fm = fval(&shift(theta, d, -h))?;
        want.push((fp - fm) / (2.0 * h));
        got.push(g.iter().zip(flat(d)).map(|(a, b)| a * b).sum());
    }
    Ok(rel_err(&got, &want))
}

/// |u·Hv − v·Hu| relative to their size, from the batched pass `hv2 = [Hu, Hv]`.
fn symmetry_error(u: &[Tensor<f64>], v: &[Tensor<f64>], hv2: &[Vec<f64>]) -> f64 {
    let (uf, vf) = (flat(u), flat(v));
    let u_hv: f64 = uf.iter().zip(&hv2[1]).map(|(a, b)| a * b).sum();
    let v_hu: f64 = vf.iter().zip(&hv2[0]).map(|(a, b)| a * b).sum();
    (u_hv - v_hu).abs() / u_hv.abs().max(v_hu.abs()).max(1e-6)
}

/// The message naming the first check of `report` whose error exceeds `tol` (NaN fails too).
fn first_failure(name: &str, report: &CheckReport, tol: f64) -> std::result::Result<(), String> {
    let checks = [
        ("JVP", report.jvp),
        ("gradient", report.grad),
        ("HVP", report.hvp),
        ("symmetry", report.symmetry),
        ("batched HVP", report.batched),
    ];
    for (what, err) in checks {
        // NaN errors fail too.
        if err.is_nan() || err > tol {
            return Err(format!(
                "{name}: {what} error {err:.3e} exceeds {tol:.1e} ({report:?})"
            ));
        }
    }
    Ok(())
}

/// Checks the op `op` at the inputs `theta` (all differentiable). Returns the report, or an
/// error message naming the first failed check when any error exceeds `tol`.
pub fn check_op(
    name: &str,
    theta: &[Tensor<f64>],
    tol: f64,
    op: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>,
) -> std::result::Result<CheckReport, String> {
    let fail = |what: &str, e: crate::EngineError| format!("{name}: {what}: {e}");
    let h = 1e-5;
    let mut rng = StdRng::seed_from_u64(0x5eed ^ name.len() as u64);
    let probe = make_probe(theta, &op, &mut rng).map_err(|e| fail("record", e))?;
    let (u, v) = (rand_dir(theta, &mut rng), rand_dir(theta, &mut rng));
    let eval = |th: &[Tensor<f64>], dirs: &[Vec<Tensor<f64>>]| {
        probe.eval(th, dirs).map_err(|e| fail("eval", e))
    };
    let mut report = CheckReport::default();

    let (_, _, ydot, g, hv1) = eval(theta, std::slice::from_ref(&v))?;
    let (_, _, _, _, hv2) = eval(theta, &[u.clone(), v.clone()])?;

    // 1. JVP.
    let (_, yp, _, gp, _) = eval(&shift(theta, &v, h), &[])?;
    let (_, ym, _, gm, _) = eval(&shift(theta, &v, -h), &[])?;
    let fd_y: Vec<f64> = yp
        .data()
        .iter()
        .zip(ym.data())
        .map(|(a, b)| (a - b) / (2.0 * h))
        .collect();
    let ydot = ydot
        .map(|t| t.into_vec())
        .unwrap_or_else(|| vec![0.0; fd_y.len()]);
    report.jvp = rel_err(&ydot, &fd_y);

    // 2. Gradient: every coordinate when small, and two random directions.
    report.grad = grad_error(&probe, theta, &g, (&u, &v), h).map_err(|e| fail("eval", e))?;

    // 3. HVP against differences of gradients.
    let fd_hv: Vec<f64> = gp
        .iter()
        .zip(&gm)
        .map(|(a, b)| (a - b) / (2.0 * h))
        .collect();
    report.hvp = rel_err(&hv1[0], &fd_hv);

    // 4. Symmetry u·Hv = v·Hu (from the batched pass: hv2[0] = Hu, hv2[1] = Hv).
    report.symmetry = symmetry_error(&u, &v, &hv2);

    // 5. Batched vs single.
    report.batched = rel_err(&hv2[1], &hv1[0]);

    first_failure(name, &report, tol)?;
    Ok(report)
}
