//! Every op through the one finite-difference checker (f64): JVP, gradient, HVP, symmetry,
//! batched-vs-single HVP.

use flatmin_engine::check::check_op;
use flatmin_engine::{BnMode, Loss, MaxPoolAfter, Tensor, Unary};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOL: f64 = 1e-6;

fn randn(shape: &[usize], seed: u64) -> Tensor<f64> {
    Tensor::randn(shape, &mut StdRng::seed_from_u64(seed))
}

fn run(
    name: &str,
    theta: &[Tensor<f64>],
    op: impl Fn(
        &mut flatmin_engine::Tape<f64>,
        &[flatmin_engine::Var],
    ) -> flatmin_engine::Result<flatmin_engine::Var>,
) {
    match check_op(name, theta, TOL, op) {
        Ok(r) => eprintln!("{name}: worst {:.2e} {r:?}", r.worst()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn unary_activations() {
    for (name, f) in [
        ("relu", Unary::Relu),
        ("tanh", Unary::Tanh),
        ("sigmoid", Unary::Sigmoid),
        ("gelu", Unary::Gelu),
        ("softplus", Unary::Softplus),
        ("square", Unary::Square),
        ("exp", Unary::Exp),
        ("add_scalar", Unary::AddScalar(0.7)),
        ("mul_scalar", Unary::MulScalar(-1.3)),
    ] {
        run(name, &[randn(&[3, 5], 1)], |t, v| t.unary(v[0], f));
    }
}

#[test]
fn softplus_above_threshold_is_linear() {
    let x = Tensor::from_vec(&[3], vec![21.0, 25.0, 30.0]).unwrap();
    run("softplus-linear", &[x], |t, v| t.softplus(v[0]));
}

#[test]
fn binary_same_shape_and_broadcast() {
    let a = randn(&[2, 3, 4], 2);
    let b = randn(&[2, 3, 4], 3);
    let mut pos = randn(&[2, 3, 4], 4);
    pos.data_mut().iter_mut().for_each(|x| *x = 1.0 + x.abs());
    run("add", &[a.clone(), b.clone()], |t, v| t.add(v[0], v[1]));
    run("sub", &[a.clone(), b.clone()], |t, v| t.sub(v[0], v[1]));
    run("mul", &[a.clone(), b.clone()], |t, v| t.mul(v[0], v[1]));
    run("div", &[a.clone(), pos.clone()], |t, v| t.div(v[0], v[1]));
    // bias broadcasting: [2,3,4] with [4], [3,1], and [1,3,1]
    let bias = randn(&[4], 5);
    let col = randn(&[3, 1], 6);
    let mut col_pos = randn(&[1, 3, 1], 7);
    col_pos
        .data_mut()
        .iter_mut()
        .for_each(|x| *x = 1.0 + x.abs());
    run("add-bcast", &[a.clone(), bias.clone()], |t, v| {
        t.add(v[0], v[1])
    });
    run("mul-bcast", &[a.clone(), col.clone()], |t, v| {
        t.mul(v[0], v[1])
    });
    run("sub-bcast-left", &[bias.clone(), a.clone()], |t, v| {
        t.sub(v[0], v[1])
    });
    run("div-bcast", &[a.clone(), col_pos], |t, v| t.div(v[0], v[1]));
}

#[test]
fn matmul_and_linear() {
    run("matmul", &[randn(&[4, 3], 8), randn(&[3, 5], 9)], |t, v| {
        t.matmul(v[0], v[1])
    });
    run(
        "linear",
        &[randn(&[4, 3], 10), randn(&[5, 3], 11), randn(&[5], 12)],
        |t, v| t.linear(v[0], v[1], Some(v[2])),
    );
    run(
        "linear-nobias",
        &[randn(&[2, 6], 13), randn(&[4, 6], 14)],
        |t, v| t.linear(v[0], v[1], None),
    );
}

#[test]
fn reductions_and_reshape() {
    run("sum", &[randn(&[3, 4], 15)], |t, v| t.sum(v[0]));
    run("mean", &[randn(&[3, 4], 16)], |t, v| t.mean(v[0]));
    run("reshape", &[randn(&[2, 3, 4], 17)], |t, v| {
        t.reshape(v[0], &[4, 6])
    });
    run("flatten", &[randn(&[2, 3, 2, 2], 18)], |t, v| {
        t.flatten(v[0])
    });
}

#[test]
fn conv2d_variants() {
    // (n, cin, h, w, cout, k, stride, pad, bias)
    let cases = [
        (2, 3, 5, 5, 4, 3, 1, 1, true),
        (2, 2, 6, 5, 3, 3, 2, 1, false),
        (1, 3, 4, 4, 2, 1, 1, 0, false),
        (2, 3, 5, 5, 2, 1, 2, 0, true),
        (1, 2, 5, 6, 2, 2, 1, 0, true),
    ];
    for (i, &(n, cin, h, w, cout, k, s, p, bias)) in cases.iter().enumerate() {
        let mut theta = vec![
            randn(&[n, cin, h, w], 20 + i as u64),
            randn(&[cout, cin, k, k], 30 + i as u64),
        ];
        if bias {
            theta.push(randn(&[cout], 40 + i as u64));
        }
        run(&format!("conv2d-{i}"), &theta, |t, v| {
            t.conv2d(v[0], v[1], v.get(2).copied(), s, p)
        });
    }
}

/// Convolution and max pooling as one op, with and without the ReLU between them, with 2x2
/// windows and overlapping 3x3 windows of stride 2.
#[test]
fn conv2d_max_pool_fused() {
    for (i, relu) in [false, true].into_iter().enumerate() {
        for (j, (kernel, stride)) in [(2, 2), (3, 2)].into_iter().enumerate() {
            let seed = 90 + 10 * i as u64 + 3 * j as u64;
            let theta = [
                randn(&[2, 2, 6, 5], seed),
                randn(&[3, 2, 3, 3], seed + 1),
                randn(&[3], seed + 2),
            ];
            let after = MaxPoolAfter {
                relu,
                kernel,
                stride,
            };
            run(&format!("conv2d_max_pool-{i}-{j}"), &theta, |t, v| {
                t.conv2d_max_pool(v[0], v[1], Some(v[2]), 1, 1, after)
            });
        }
    }
}

/// Strided convolutions large enough to run as implicit products through phase planes on
/// AVX-512 machines (forward columns and the per-phase input-gradient columns all >= 16;
/// elsewhere they are lowered and checked the same way): strides 2 and 3, kernels 1, 2, 3, 5,
/// pads 0-2, odd and even sizes.
#[test]
fn conv2d_strided_variants() {
    // (n, cin, h, w, cout, k, stride, pad, bias)
    let cases = [
        (2, 2, 9, 9, 3, 3, 2, 1, true),
        (1, 3, 10, 11, 2, 1, 2, 0, false),
        (1, 2, 14, 13, 2, 5, 3, 2, true),
        (2, 2, 11, 12, 3, 2, 3, 1, false),
        (1, 2, 12, 13, 2, 3, 2, 2, false),
    ];
    for (i, &(n, cin, h, w, cout, k, s, p, bias)) in cases.iter().enumerate() {
        let mut theta = vec![
            randn(&[n, cin, h, w], 120 + i as u64),
            randn(&[cout, cin, k, k], 130 + i as u64),
        ];
        if bias {
            theta.push(randn(&[cout], 140 + i as u64));
        }
        run(&format!("conv2d-strided-{i}"), &theta, |t, v| {
            t.conv2d(v[0], v[1], v.get(2).copied(), s, p)
        });
    }
}

#[test]
fn pooling() {
    run("max_pool2d", &[randn(&[2, 3, 4, 6], 50)], |t, v| {
        t.max_pool2d(v[0], 2, 2)
    });
    run("max_pool2d-overlap", &[randn(&[1, 2, 5, 5], 51)], |t, v| {
        t.max_pool2d(v[0], 3, 1)
    });
    run("avg_pool2d", &[randn(&[2, 3, 4, 6], 52)], |t, v| {
        t.avg_pool2d(v[0], 2, 2)
    });
    run("global_avg_pool", &[randn(&[2, 3, 3, 4], 53)], |t, v| {
        t.global_avg_pool(v[0])
    });
}

#[test]
fn batch_norm_train_and_eval() {
    let x = randn(&[3, 2, 2, 3], 60);
    let g = randn(&[2], 61);
    let b = randn(&[2], 62);
    run(
        "batch_norm2d-train",
        &[x.clone(), g.clone(), b.clone()],
        |t, v| Ok(t.batch_norm2d(v[0], v[1], v[2], BnMode::Train, 1e-5)?.0),
    );
    let mean = [0.3, -0.2];
    let var = [1.5, 0.7];
    run("batch_norm2d-eval", &[x, g, b], |t, v| {
        Ok(t.batch_norm2d(
            v[0],
            v[1],
            v[2],
            BnMode::Eval {
                mean: &mean,
                var: &var,
            },
            1e-5,
        )?
        .0)
    });
}

#[test]
fn batch_norm_relu_train_and_eval() {
    let x = randn(&[3, 2, 2, 3], 63);
    let g = randn(&[2], 64);
    let b = randn(&[2], 65);
    run(
        "batch_norm2d_relu-train",
        &[x.clone(), g.clone(), b.clone()],
        |t, v| {
            Ok(t.batch_norm2d_relu(v[0], v[1], v[2], BnMode::Train, 1e-5)?
                .0)
        },
    );
    let (mean, var) = ([0.3, -0.2], [1.5, 0.7]);
    let eval = BnMode::Eval {
        mean: &mean,
        var: &var,
    };
    run("batch_norm2d_relu-eval", &[x, g, b], |t, v| {
        Ok(t.batch_norm2d_relu(v[0], v[1], v[2], eval, 1e-5)?.0)
    });
}

#[test]
fn add_relu_same_shape_and_broadcast() {
    let a = randn(&[3, 2, 4], 66);
    run("add_relu", &[a.clone(), randn(&[3, 2, 4], 67)], |t, v| {
        t.add_relu(v[0], v[1])
    });
    run("add_relu-broadcast", &[a, randn(&[2, 1], 68)], |t, v| {
        t.add_relu(v[0], v[1])
    });
}

#[test]
fn losses() {
    run("log_softmax", &[randn(&[3, 5], 70)], |t, v| {
        t.log_softmax(v[0])
    });
    let labels = [1usize, 4, 0];
    run("cross_entropy", &[randn(&[3, 5], 71)], |t, v| {
        t.cross_entropy(v[0], &labels)
    });
    run("mse", &[randn(&[3, 4], 72), randn(&[3, 4], 73)], |t, v| {
        t.mse(v[0], v[1])
    });
    run("mse_one_hot", &[randn(&[3, 5], 74)], |t, v| {
        t.loss(Loss::Mse, v[0], &labels)
    });
}

#[test]
fn composite_network() {
    // conv -> [bn(train) -> relu] + bn_relu(train) -> maxpool -> flatten -> linear -> tanh ->
    // linear -> CE, with a residual add: checks that rules compose.
    let theta = vec![
        randn(&[3, 2, 4, 4], 80),
        randn(&[3, 2, 3, 3], 81),
        randn(&[3], 82),
        randn(&[3], 83),
        randn(&[5, 12], 84),
        randn(&[5], 85),
        randn(&[4, 5], 86),
    ];
    let labels = [0usize, 3, 2];
    run("composite", &theta, |t, v| {
        let c = t.conv2d(v[0], v[1], None, 1, 1)?;
        let (b, _) = t.batch_norm2d(c, v[2], v[3], BnMode::Train, 1e-5)?;
        let r = t.relu(b)?;
        let (r_fused, _) = t.batch_norm2d_relu(c, v[2], v[3], BnMode::Train, 1e-5)?;
        let r = t.add(r, r_fused)?;
        let r2 = t.add(r, c)?;
        let p = t.max_pool2d(r2, 2, 2)?;
        let f = t.flatten(p)?;
        let h = t.linear(f, v[4], Some(v[5]))?;
        let h = t.tanh(h)?;
        let z = t.linear(h, v[6], None)?;
        let l = t.cross_entropy(z, &labels)?;
        t.reshape(l, &[1])
    });
}

#[test]
fn mse_objective_through_a_smooth_network() {
    // linear -> tanh -> linear -> one-hot MSE: the HVP mixes the loss's constant Hessian with
    // the activation's curvature.
    let theta = vec![
        randn(&[4, 6], 91),
        randn(&[5, 6], 92),
        randn(&[5], 93),
        randn(&[3, 5], 94),
    ];
    let labels = [2usize, 0, 1, 2];
    run("mse network", &theta, |t, v| {
        let h = t.linear(v[0], v[1], Some(v[2]))?;
        let h = t.tanh(h)?;
        let z = t.linear(h, v[3], None)?;
        let l = t.loss(Loss::Mse, z, &labels)?;
        t.reshape(l, &[1])
    });
}

#[test]
fn checker_rejects_a_wrong_derivative() {
    // An "op" whose recorded derivative (with tangents) differs from the function that the
    // finite differences see (without tangents): the checker must fail.
    let err = check_op("wrong", &[randn(&[2, 3], 90)], TOL, |t, v| {
        let c = if t.directions() == 0 { 2.0 } else { 2.001 };
        t.mul_scalar(v[0], c)
    });
    assert!(err.is_err(), "the checker accepted a wrong JVP");
}
