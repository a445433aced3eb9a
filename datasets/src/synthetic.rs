//! A built-in, procedurally generated, learnable dataset with CIFAR-10 shapes (3 x 32 x 32
//! `u8` images, 10 classes), for machines without CIFAR-10 and for fast tests.
//!
//! Class `c` is a sinusoidal grating with a class-specific orientation (`c * 18` degrees)
//! and spatial frequency (2, 3 or 4 cycles per image) blending two class-specific colours;
//! the colours come from a small palette shared between classes, so neither colour nor
//! orientation alone gives the class. Every image draws its own nuisances: grating phase,
//! contrast, brightness and colour cast, a weaker grating of another class, and per-pixel
//! noise. A linear model learns it well above chance but not perfectly (a nearest-class-mean
//! classifier on raw pixels and a softmax regression on normalized pixels both get about
//! 70 % on held-out images, where chance is 10 %).
//!
//! Generation uses integer and basic float arithmetic only (its own sine), so the bytes are
//! the same on every platform for the same arguments (with the workspace's `rand` 0.8, whose
//! `StdRng` and `gen_range` it relies on).

use crate::cifar10::{Batch, CHANNELS, CLASSES, IMAGE_BYTES, PLANE_BYTES, SIDE};
use crate::seed::{derived_rng, tag};
use crate::subset::class_counts;
use rand::seq::SliceRandom;
use rand::Rng;

/// Palette of grating colours (R, G, B on the 0-255 scale).
const PALETTE: [[f64; 3]; 6] = [
    [186.0, 74.0, 66.0],  // red
    [74.0, 162.0, 82.0],  // green
    [74.0, 98.0, 194.0],  // blue
    [202.0, 186.0, 82.0], // yellow
    [146.0, 90.0, 162.0], // purple
    [82.0, 178.0, 178.0], // cyan
];

/// For each class: (palette index of colour A, palette index of colour B, cycles per image).
const CLASS_STYLE: [(usize, usize, f64); CLASSES] = [
    (0, 2, 2.0),
    (1, 3, 3.0),
    (2, 4, 4.0),
    (3, 5, 2.0),
    (4, 0, 3.0),
    (5, 1, 4.0),
    (0, 3, 3.0),
    (1, 4, 2.0),
    (2, 5, 3.0),
    (3, 0, 4.0),
];

/// Largest per-image phase shift of the grating, as a fraction of pi.
const PHASE_JITTER: f64 = 0.8;
/// Range of the grating's contrast (amplitude factor).
const CONTRAST: (f64, f64) = (0.35, 1.0);
/// Largest per-image brightness shift (levels, all channels).
const BRIGHTNESS: i32 = 25;
/// Largest per-image, per-channel colour cast (levels).
const CAST: i32 = 30;
/// Largest contrast of the distracting grating of another class.
const DISTRACTOR: f64 = 0.7;
/// Per-pixel noise: the sum of two uniform integers in `-NOISE..=NOISE`.
const NOISE: i32 = 45;

/// `sin(x)` from basic arithmetic only (range reduction and an odd Taylor polynomial,
/// absolute error below 1e-7), so it gives the same bits on every platform.
fn portable_sin(x: f64) -> f64 {
    use std::f64::consts::{PI, TAU};
    // Reduce to [-pi, pi], then to [-pi/2, pi/2] with sin(pi - x) = sin(x).
    let mut r = x - TAU * (x / TAU).round();
    if r > PI / 2.0 {
        r = PI - r;
    } else if r < -PI / 2.0 {
        r = -PI - r;
    }
    let r2 = r * r;
    let mut term = r;
    let mut sum = r;
    for k in 1..8 {
        let k = f64::from(k);
        term *= -r2 / ((2.0 * k) * (2.0 * k + 1.0));
        sum += term;
    }
    sum
}

/// The grating phase `2 pi f (x cos t + y sin t) / 32` of class `c` at every pixel, with its
/// sine and cosine, so per-image phase shifts need no trigonometry:
/// `sin(a + p) = sin a cos p + cos a sin p`.
struct Grating {
    sin: Vec<f64>,
    cos: Vec<f64>,
}

impl Grating {
    fn new(class: usize) -> Self {
        use std::f64::consts::{FRAC_PI_2, PI, TAU};
        let theta = class as f64 * PI / CLASSES as f64;
        let (st, ct) = (portable_sin(theta), portable_sin(theta + FRAC_PI_2));
        let freq = CLASS_STYLE[class].2;
        let mut sin = Vec::with_capacity(PLANE_BYTES);
        let mut cos = Vec::with_capacity(PLANE_BYTES);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (fx, fy) = (x as f64 - 15.5, y as f64 - 15.5);
                let a = TAU * freq * (fx * ct + fy * st) / SIDE as f64;
                sin.push(portable_sin(a));
                cos.push(portable_sin(a + FRAC_PI_2));
            }
        }
        Grating { sin, cos }
    }
}

/// Writes one image of class `class` into `out` (3072 bytes), drawing its nuisances from
/// `rng`.
fn render<R: Rng>(class: usize, gratings: &[Grating], rng: &mut R, out: &mut [u8]) {
    use std::f64::consts::{FRAC_PI_2, PI};
    let phase = rng.gen_range(-PHASE_JITTER..=PHASE_JITTER) * PI;
    let contrast = rng.gen_range(CONTRAST.0..=CONTRAST.1);
    let brightness = rng.gen_range(-BRIGHTNESS..=BRIGHTNESS);
    let cast: [i32; CHANNELS] = std::array::from_fn(|_| rng.gen_range(-CAST..=CAST));
    let other = (class + rng.gen_range(1..CLASSES)) % CLASSES;
    let other_phase = rng.gen_range(-1.0..=1.0) * PI;
    let other_contrast = rng.gen_range(0.0..=DISTRACTOR);
    let (sp, cp) = (portable_sin(phase), portable_sin(phase + FRAC_PI_2));
    let (so, co) = (
        portable_sin(other_phase),
        portable_sin(other_phase + FRAC_PI_2),
    );
    let (g, h) = (&gratings[class], &gratings[other]);
    let (a, b) = (PALETTE[CLASS_STYLE[class].0], PALETTE[CLASS_STYLE[class].1]);
    let (oa, ob) = (PALETTE[CLASS_STYLE[other].0], PALETTE[CLASS_STYLE[other].1]);
    for (c, plane) in out.chunks_exact_mut(PLANE_BYTES).enumerate() {
        let mid = 0.5 * (a[c] + b[c]);
        let half = 0.5 * (a[c] - b[c]) * contrast;
        let other_half = 0.5 * (oa[c] - ob[c]) * other_contrast;
        let offset = mid + f64::from(brightness + cast[c]);
        for (p, px) in plane.iter_mut().enumerate() {
            let wave = g.sin[p] * cp + g.cos[p] * sp;
            let distract = h.sin[p] * co + h.cos[p] * so;
            let noise = rng.gen_range(-NOISE..=NOISE) + rng.gen_range(-NOISE..=NOISE);
            let v = offset + half * wave + other_half * distract + f64::from(noise);
            *px = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// One split of `n` images: class-balanced labels (`n / 10` each, the remainder to the
/// lowest classes) in a seeded random order, each image drawn from its own RNG.
fn split(n: usize, seed: u64, split_id: u64, gratings: &[Grating]) -> Batch {
    let mut labels = Vec::with_capacity(n);
    for (c, &k) in class_counts(n).iter().enumerate() {
        labels.resize(labels.len() + k, c as u8);
    }
    labels.shuffle(&mut derived_rng(seed, &[tag::SYNTH_LABELS, split_id]));
    let mut pixels = vec![0u8; n * IMAGE_BYTES];
    // Every image has its own RNG, so splitting the work over threads changes nothing.
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = n.div_ceil(threads).max(64);
    std::thread::scope(|scope| {
        let chunks = pixels.chunks_mut(per_thread * IMAGE_BYTES);
        for (chunk_index, (chunk, chunk_labels)) in
            chunks.zip(labels.chunks(per_thread)).enumerate()
        {
            scope.spawn(move || {
                let images = chunk.chunks_exact_mut(IMAGE_BYTES).zip(chunk_labels);
                for (k, (out, &label)) in images.enumerate() {
                    let i = (chunk_index * per_thread + k) as u64;
                    let mut rng = derived_rng(seed, &[tag::SYNTH_IMAGE, split_id, i]);
                    render(usize::from(label), gratings, &mut rng, out);
                }
            });
        }
    });
    Batch { labels, pixels }
}

/// A synthetic dataset of `train` training and `test` test images with CIFAR-10 shapes
/// (see the module docs), the same bytes for the same arguments. Both splits are class
/// balanced (`n / 10` per class, the remainder one more each for the lowest class ids) and
/// in random order; they are drawn independently from the same distribution.
pub fn synthetic(train: usize, test: usize, seed: u64) -> (Batch, Batch) {
    let gratings: Vec<Grating> = (0..CLASSES).map(Grating::new).collect();
    (
        split(train, seed, 0, &gratings),
        split(test, seed, 1, &gratings),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accuracy on `test` of the nearest class mean (Euclidean, raw pixels) of `train`.
    fn nearest_class_mean(train: &Batch, test: &Batch) -> f64 {
        let mut sums = vec![vec![0f64; IMAGE_BYTES]; CLASSES];
        let mut counts = [0f64; CLASSES];
        for i in 0..train.len() {
            let c = usize::from(train.labels[i]);
            counts[c] += 1.0;
            for (s, &p) in sums[c].iter_mut().zip(train.image(i)) {
                *s += f64::from(p);
            }
        }
        for (s, n) in sums.iter_mut().zip(counts) {
            s.iter_mut().for_each(|v| *v /= n);
        }
        let mut correct = 0;
        for i in 0..test.len() {
            let img = test.image(i);
            let dist = |m: &Vec<f64>| -> f64 {
                m.iter()
                    .zip(img)
                    .map(|(a, &b)| (a - f64::from(b)).powi(2))
                    .sum()
            };
            let best = (0..CLASSES)
                .min_by(|&a, &b| dist(&sums[a]).total_cmp(&dist(&sums[b])))
                .unwrap();
            correct += usize::from(best == usize::from(test.labels[i]));
        }
        correct as f64 / test.len() as f64
    }

    #[test]
    fn sine_is_accurate() {
        for k in -2000..2000 {
            let x = k as f64 * 0.01237;
            assert!((portable_sin(x) - x.sin()).abs() < 1e-7, "{x}");
        }
    }

    #[test]
    fn deterministic_shapes_and_balanced() {
        let (tr, te) = synthetic(103, 20, 9);
        assert_eq!((tr.len(), te.len()), (103, 20));
        assert_eq!(tr.pixels.len(), 103 * IMAGE_BYTES);
        assert_eq!(te.pixels.len(), 20 * IMAGE_BYTES);
        assert_eq!((tr.clone(), te.clone()), synthetic(103, 20, 9));
        let counts = |b: &Batch| {
            let mut n = [0usize; CLASSES];
            b.labels.iter().for_each(|&l| n[usize::from(l)] += 1);
            n
        };
        assert_eq!(counts(&tr), class_counts(103));
        assert_eq!(counts(&te), [2; CLASSES]);
        // Labels are shuffled, not sorted; another seed gives other images.
        assert!(tr.labels.windows(2).any(|w| w[0] > w[1]));
        assert_ne!(synthetic(103, 20, 10).0.pixels, tr.pixels);
        assert_ne!(tr.image(0), te.image(0));
        let (e1, e2) = synthetic(0, 0, 1);
        assert!(e1.is_empty() && e2.is_empty());
        // Pixels use the range: not saturated, not flat.
        let mean = tr.pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / tr.pixels.len() as f64;
        assert!((90.0..170.0).contains(&mean), "{mean}");
        let zeros_or_max = tr.pixels.iter().filter(|&&p| p == 0 || p == 255).count();
        assert!(zeros_or_max * 20 < tr.pixels.len(), "{zeros_or_max}");
    }

    #[test]
    fn pinned_bytes() {
        // The generator must not change silently: it would change every synthetic run.
        let (tr, te) = synthetic(10, 3, 0);
        let fnv = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        };
        assert_eq!(tr.labels, [5, 7, 0, 4, 8, 1, 9, 3, 2, 6]);
        assert_eq!(te.labels, [2, 0, 1]);
        assert_eq!(
            (fnv(&tr.pixels), fnv(&te.pixels)),
            (0xc786_ea77_1d70_2eed, 0x3c0d_4333_9336_d0b4)
        );
    }

    #[test]
    fn learnable_not_trivial() {
        let (tr, te) = synthetic(2000, 1000, 3);
        let acc = nearest_class_mean(&tr, &te);
        eprintln!("nearest-class-mean accuracy {acc}");
        assert!(acc > 0.5, "learnable: {acc}");
        assert!(acc < 0.95, "not trivial: {acc}");
    }
}

#[cfg(test)]
mod linear_model {
    use super::*;
    use crate::normalize::normalize_f32;

    /// Train and test accuracy of a softmax regression trained on `train` by SGD.
    fn linear(train: &Batch, test: &Batch) -> (f64, f64) {
        let xtr = normalize_f32(train);
        let xte = normalize_f32(test);
        let d = IMAGE_BYTES;
        let mut w = vec![0f32; CLASSES * d];
        let mut b = [0f32; CLASSES];
        let lr = 0.002f32;
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = derived_rng(0, &[99]);
        for _ in 0..15 {
            order.shuffle(&mut rng);
            for &i in &order {
                let x = &xtr[i * d..][..d];
                let mut z = [0f32; CLASSES];
                for c in 0..CLASSES {
                    z[c] = b[c]
                        + w[c * d..][..d]
                            .iter()
                            .zip(x)
                            .map(|(a, b)| a * b)
                            .sum::<f32>();
                }
                let m = z.iter().cloned().fold(f32::MIN, f32::max);
                let s: f32 = z.iter().map(|v| (v - m).exp()).sum();
                for c in 0..CLASSES {
                    let p = (z[c] - m).exp() / s;
                    let g = p - f32::from(u8::from(c == usize::from(train.labels[i])));
                    b[c] -= lr * g;
                    for (wv, xv) in w[c * d..][..d].iter_mut().zip(x) {
                        *wv -= lr * g * xv + lr * 1e-3 * *wv;
                    }
                }
            }
        }
        let acc = |x: &[f32], bt: &Batch| {
            let mut ok = 0;
            for i in 0..bt.len() {
                let xi = &x[i * d..][..d];
                let best = (0..CLASSES)
                    .map(|c| {
                        b[c] + w[c * d..][..d]
                            .iter()
                            .zip(xi)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                    })
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap()
                    .0;
                ok += usize::from(best == usize::from(bt.labels[i]));
            }
            ok as f64 / bt.len() as f64
        };
        (acc(&xtr, train), acc(&xte, test))
    }

    /// A linear softmax classifier trained by SGD on normalized pixels: well above chance
    /// (about 70 % on held-out images), far from perfect. (2.6 s: the test profile is
    /// optimized.)
    #[test]
    fn linear_model_well_above_chance_not_perfect() {
        let (tr, te) = synthetic(5000, 1000, 3);
        let (train_acc, test_acc) = linear(&tr, &te);
        eprintln!("linear softmax: train {train_acc}, test {test_acc}");
        assert!((0.5..0.9).contains(&test_acc), "{test_acc}");
    }
}
