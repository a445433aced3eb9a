//! Update rules against torch.optim (values from tools/optim_reference.py, float64).

use flatmin_engine::Tensor;
use flatmin_optim::{AdamW, LrSchedule, Optimizer, Schedule, Sgd};

const A: [f64; 3] = [1.0, 2.0, 3.0];
const B: [f64; 3] = [0.1, -0.2, 0.3];

fn run(opt: &mut dyn Optimizer<f64>, lr: f64) -> Vec<f64> {
    let mut params = vec![Tensor::from_vec(&[3], vec![0.5, -1.0, 2.0]).unwrap()];
    let mut oracle = |p: &[Tensor<f64>]| {
        let d = p[0].data();
        let loss = (0..3)
            .map(|i| 0.5 * A[i] * d[i] * d[i] + B[i] * d[i])
            .sum::<f64>();
        let g = (0..3).map(|i| A[i] * d[i] + B[i]).collect();
        Ok((loss, vec![Tensor::from_vec(&[3], g).unwrap()]))
    };
    for _ in 0..5 {
        opt.step(&mut params, &mut oracle, lr).unwrap();
    }
    params[0].data().to_vec()
}

fn close(got: &[f64], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-14 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn sgd_matches_torch() {
    close(
        &run(&mut Sgd::new(0.0, false, 0.0).unwrap(), 0.1),
        &[0.25429399999999996, -0.260448, 0.252947],
    );
    close(
        &run(&mut Sgd::new(0.9, false, 0.01).unwrap(), 0.1),
        &[
            -0.12106245547396059,
            0.7415636998164211,
            -1.7349900940438323,
        ],
    );
    close(
        &run(&mut Sgd::new(0.9, true, 0.01).unwrap(), 0.1),
        &[-0.16537456101256728, 0.55729142444194, -0.8267076860530898],
    );
}

#[test]
fn adamw_matches_torch() {
    close(
        &run(&mut AdamW::new(0.9, 0.999, 1e-8, 0.1).unwrap(), 0.01),
        &[0.44768940211194613, -0.9451559604262624, 1.940145503482618],
    );
}

#[test]
fn state_round_trip_continues_identically() {
    let mut a = Sgd::<f64>::new(0.9, true, 0.01).unwrap();
    let full = run(&mut a, 0.1);
    // Fresh optimizer restored from `a`'s state after 5 steps, then both take 5 more.
    let mut b = Sgd::<f64>::new(0.9, true, 0.01).unwrap();
    b.load_state(a.state()).unwrap();
    let mut pa = vec![Tensor::from_vec(&[3], full.clone()).unwrap()];
    let mut pb = pa.clone();
    let mut oracle = |p: &[Tensor<f64>]| {
        let g = p[0]
            .data()
            .iter()
            .enumerate()
            .map(|(i, &x)| A[i] * x + B[i])
            .collect();
        Ok((0.0, vec![Tensor::from_vec(&[3], g).unwrap()]))
    };
    for _ in 0..5 {
        a.step(&mut pa, &mut oracle, 0.1).unwrap();
        b.step(&mut pb, &mut oracle, 0.1).unwrap();
    }
    assert_eq!(pa, pb);
    let mut c = AdamW::<f64>::new(0.9, 0.999, 1e-8, 0.1).unwrap();
    run(&mut c, 0.01);
    let mut d = AdamW::<f64>::new(0.9, 0.999, 1e-8, 0.1).unwrap();
    d.load_state(c.state()).unwrap();
    assert_eq!(c.state(), d.state());
}

#[test]
fn invalid_hyperparameters_name_their_field() {
    let e = Sgd::<f64>::new(1.5, false, 0.0).unwrap_err().to_string();
    assert!(e.contains("momentum"), "{e}");
    let e = Sgd::<f64>::new(0.0, true, 0.0).unwrap_err().to_string();
    assert!(e.contains("Nesterov"), "{e}");
    let e = AdamW::<f64>::new(0.9, 0.999, 0.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eps"), "{e}");
    let e = LrSchedule::new(-0.1, Schedule::Constant, 0, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
}

#[test]
fn schedules() {
    let c = LrSchedule::new(0.1, Schedule::Cosine, 0, 100).unwrap();
    assert!((c.at(0) - 0.1).abs() < 1e-15);
    assert!((c.at(50) - 0.05).abs() < 1e-15);
    assert!(c.at(100).abs() < 1e-15);
    let w = LrSchedule::new(0.1, Schedule::Constant, 4, 100).unwrap();
    assert_eq!(
        [w.at(0), w.at(1), w.at(3), w.at(4)],
        [0.025, 0.05, 0.1, 0.1]
    );
    let s = LrSchedule::new(
        1.0,
        Schedule::Step {
            every: 10,
            gamma: 0.5,
        },
        0,
        100,
    )
    .unwrap();
    assert_eq!([s.at(9), s.at(10), s.at(25)], [1.0, 0.5, 0.25]);
}
