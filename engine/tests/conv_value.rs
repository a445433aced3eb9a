//! Values of conv2d and pooling against direct loops (the FD checker proves derivatives
//! consistent with the values; this proves the values themselves).

use flatmin_engine::{Tape, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    n: usize,
    cin: usize,
    h: usize,
    wd: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
) -> Vec<f64> {
    let ho = (h + 2 * p - k) / s + 1;
    let wo = (wd + 2 * p - k) / s + 1;
    let mut y = vec![0.0; n * cout * ho * wo];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = b.get(co).copied().unwrap_or(0.0);
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - p as isize;
                                let ix = (ox * s + kx) as isize - p as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x
                                        [((ni * cin + ci) * h + iy as usize) * wd + ix as usize]
                                        * w[((co * cin + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    y[((ni * cout + co) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn conv2d_matches_direct_loops() {
    let mut rng = StdRng::seed_from_u64(3);
    for &(n, cin, h, w, cout, k, s, p) in &[
        (2, 3, 7, 6, 4, 3, 1, 1),
        (1, 2, 8, 8, 3, 3, 2, 1),
        (2, 4, 5, 5, 2, 1, 1, 0),
        (1, 3, 9, 7, 2, 1, 2, 0),
        (1, 2, 6, 6, 3, 5, 1, 2),
        (1, 1, 4, 4, 1, 3, 1, 3),
    ] {
        let x = Tensor::<f64>::randn(&[n, cin, h, w], &mut rng);
        let wt = Tensor::<f64>::randn(&[cout, cin, k, k], &mut rng);
        let b = Tensor::<f64>::randn(&[cout], &mut rng);
        let mut tape = Tape::new(0);
        let (xv, wv, bv) = (
            tape.constant(x.clone()),
            tape.constant(wt.clone()),
            tape.constant(b.clone()),
        );
        let y = tape.conv2d(xv, wv, Some(bv), s, p).unwrap();
        let want = naive_conv(x.data(), wt.data(), b.data(), n, cin, h, w, cout, k, s, p);
        let got = tape.value(y).data();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() < 1e-12,
                "conv {n} {cin} {h} {w} {cout} {k} {s} {p}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn pooling_matches_direct_loops() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = Tensor::<f64>::randn(&[2, 3, 6, 4], &mut rng);
    let mut tape = Tape::new(0);
    let xv = tape.constant(x.clone());
    let mx = tape.max_pool2d(xv, 2, 2).unwrap();
    let av = tape.avg_pool2d(xv, 2, 2).unwrap();
    let gp = tape.global_avg_pool(xv).unwrap();
    for plane in 0..6 {
        let p = &x.data()[plane * 24..(plane + 1) * 24];
        for oy in 0..3 {
            for ox in 0..2 {
                let vals = [
                    p[2 * oy * 4 + 2 * ox],
                    p[2 * oy * 4 + 2 * ox + 1],
                    p[(2 * oy + 1) * 4 + 2 * ox],
                    p[(2 * oy + 1) * 4 + 2 * ox + 1],
                ];
                let m = vals.iter().cloned().fold(f64::MIN, f64::max);
                let a = vals.iter().sum::<f64>() / 4.0;
                assert_eq!(tape.value(mx).data()[plane * 6 + oy * 2 + ox], m);
                assert!((tape.value(av).data()[plane * 6 + oy * 2 + ox] - a).abs() < 1e-15);
            }
        }
        let mean = p.iter().sum::<f64>() / 24.0;
        assert!((tape.value(gp).data()[plane] - mean).abs() < 1e-14);
    }
    assert_eq!(tape.value(gp).shape(), &[2, 3]);
}
