//! The standard CIFAR augmentation on `u8` CHW images (3 x 32 x 32): a random 32 x 32 crop of
//! the image zero-padded by `crop_pad` pixels on every side, then a random horizontal flip
//! with probability 1/2.
//!
//! **Padding is zero in pixel space**, i.e. black, before normalization — exactly what
//! PyTorch's `transforms.RandomCrop(32, padding=4)` does to the uint8 / PIL image ahead of
//! `Normalize`. After normalization the padded border is therefore `-mean_c / std_c`
//! (about -2), not 0.
//!
//! All randomness comes from the caller's RNG, in a fixed order per image: the crop's top
//! offset, then its left offset (each uniform in `0..=2 * crop_pad`, drawn only when
//! `crop_pad > 0`), then the flip (a `bool` with p = 1/2, drawn only when `flip` is on).

use crate::cifar10::{CHANNELS, IMAGE_BYTES, SIDE};
use rand::Rng;

/// Augmentation settings. [`Augment::none`] leaves images untouched and draws nothing from
/// the RNG; [`Augment::standard`] is the usual CIFAR setting (pad 4, flip).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Augment {
    /// Zero padding (in pixels, each side) of the random 32 x 32 crop; 0 disables cropping.
    pub crop_pad: usize,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
}

/// The random choices made for one image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AugmentDraw {
    /// Vertical shift: output row `y` shows input row `y + dy` (black outside the image).
    pub dy: isize,
    /// Horizontal shift: output column `x` shows input column `x + dx` (before the flip).
    pub dx: isize,
    /// Whether the cropped image is mirrored left-right.
    pub flip: bool,
}

impl Augment {
    /// No augmentation.
    pub const fn none() -> Self {
        Augment {
            crop_pad: 0,
            flip: false,
        }
    }

    /// The standard CIFAR augmentation: crop with 4-pixel zero padding, random flip.
    pub const fn standard() -> Self {
        Augment {
            crop_pad: 4,
            flip: true,
        }
    }

    /// True when images pass through unchanged (no crop padding, no flip).
    pub const fn is_identity(&self) -> bool {
        self.crop_pad == 0 && !self.flip
    }

    /// Draws the random choices for one image (see the module docs for the order).
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R) -> AugmentDraw {
        let mut d = AugmentDraw::default();
        if self.crop_pad > 0 {
            let pad = isize::try_from(self.crop_pad).unwrap_or(isize::MAX / 4);
            d.dy = rng.gen_range(0..=2 * pad) - pad;
            d.dx = rng.gen_range(0..=2 * pad) - pad;
        }
        if self.flip {
            d.flip = rng.gen_bool(0.5);
        }
        d
    }

    /// Augments one image (3072 bytes, CHW) into `out` (3072 bytes) with fresh draws from
    /// `rng`, and returns the draws.
    ///
    /// # Panics
    /// If `image` or `out` is not 3072 bytes long.
    pub fn apply<R: Rng + ?Sized>(&self, image: &[u8], out: &mut [u8], rng: &mut R) -> AugmentDraw {
        let d = self.draw(rng);
        apply_draw(image, out, d);
        d
    }
}

/// Writes into `out` the image `image` shifted by `(draw.dy, draw.dx)` with black (0)
/// filling what comes from outside, then mirrored left-right when `draw.flip`:
/// `out[c][y][x] = image[c][y + dy][x' + dx]`, with `x' = 31 - x` when flipped, else `x`.
///
/// # Panics
/// If `image` or `out` is not 3072 bytes long.
pub fn apply_draw(image: &[u8], out: &mut [u8], draw: AugmentDraw) {
    assert_eq!(image.len(), IMAGE_BYTES, "an image is 3 x 32 x 32 bytes");
    assert_eq!(out.len(), IMAGE_BYTES, "an image is 3 x 32 x 32 bytes");
    if draw == AugmentDraw::default() {
        out.copy_from_slice(image);
        return;
    }
    let side = SIDE as isize;
    // Output columns x whose source column x + dx is inside the image (before the flip).
    let x0 = (-draw.dx).clamp(0, side) as usize;
    let x1 = (side - draw.dx).clamp(0, side) as usize;
    for c in 0..CHANNELS {
        for y in 0..SIDE {
            let row = &mut out[(c * SIDE + y) * SIDE..][..SIDE];
            let sy = y as isize + draw.dy;
            if !(0..side).contains(&sy) || x0 >= x1 {
                row.fill(0);
                continue;
            }
            let src = &image[(c * SIDE + sy as usize) * SIDE..][..SIDE];
            let sx0 = (x0 as isize + draw.dx) as usize;
            row[..x0].fill(0);
            row[x0..x1].copy_from_slice(&src[sx0..sx0 + (x1 - x0)]);
            row[x1..].fill(0);
            if draw.flip {
                row.reverse();
            }
        }
    }
}

/// Mirrors a 3 x 32 x 32 CHW image left-right in place.
///
/// # Panics
/// If `image` is not 3072 bytes long.
pub fn flip_horizontal(image: &mut [u8]) {
    assert_eq!(image.len(), IMAGE_BYTES, "an image is 3 x 32 x 32 bytes");
    for row in image.chunks_exact_mut(SIDE) {
        row.reverse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// An image with no zero pixel and (nearly) unique values per row.
    fn test_image(seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..IMAGE_BYTES).map(|_| rng.gen_range(1..=255)).collect()
    }

    /// PyTorch's definition: pad with zeros, take the 32 x 32 window at (top, left), mirror.
    fn reference(image: &[u8], pad: usize, top: usize, left: usize, flip: bool) -> Vec<u8> {
        let ps = SIDE + 2 * pad;
        let mut padded = vec![0u8; CHANNELS * ps * ps];
        for c in 0..CHANNELS {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    padded[(c * ps + y + pad) * ps + x + pad] = image[(c * SIDE + y) * SIDE + x];
                }
            }
        }
        let mut out = vec![0u8; IMAGE_BYTES];
        for c in 0..CHANNELS {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let sx = if flip { SIDE - 1 - x } else { x };
                    out[(c * SIDE + y) * SIDE + x] = padded[(c * ps + y + top) * ps + sx + left];
                }
            }
        }
        out
    }

    #[test]
    fn none_and_pad_zero_are_identity() {
        let img = test_image(1);
        let mut out = vec![0u8; IMAGE_BYTES];
        for aug in [Augment::none(), Augment::default()] {
            assert!(aug.is_identity());
            let mut rng = StdRng::seed_from_u64(3);
            let before = rng.clone().gen::<u64>();
            let d = aug.apply(&img, &mut out, &mut rng);
            assert_eq!(d, AugmentDraw::default());
            assert_eq!(out, img);
            assert_eq!(rng.gen::<u64>(), before, "identity draws nothing");
        }
        assert!(!Augment::standard().is_identity());
    }

    #[test]
    fn flip_twice_is_identity() {
        let img = test_image(2);
        let mut twice = img.clone();
        flip_horizontal(&mut twice);
        assert_ne!(twice, img);
        assert_eq!(twice[0], img[31]);
        assert_eq!(twice[IMAGE_BYTES - 1], img[IMAGE_BYTES - 32]);
        flip_horizontal(&mut twice);
        assert_eq!(twice, img);
        // The same through apply_draw, and a flip always draws nothing else.
        let mut once = vec![0u8; IMAGE_BYTES];
        let mut back = vec![0u8; IMAGE_BYTES];
        let flip = AugmentDraw {
            flip: true,
            ..Default::default()
        };
        apply_draw(&img, &mut once, flip);
        apply_draw(&once, &mut back, flip);
        assert_eq!(back, img);
    }

    #[test]
    fn matches_pad_then_crop_reference() {
        let img = test_image(4);
        let mut out = vec![0u8; IMAGE_BYTES];
        for pad in [1usize, 4, 40] {
            let p = pad as isize;
            for (top, left) in [(0, 0), (pad, pad), (2 * pad, 0), (1, 2 * pad), (pad, 1)] {
                for flip in [false, true] {
                    let d = AugmentDraw {
                        dy: top as isize - p,
                        dx: left as isize - p,
                        flip,
                    };
                    apply_draw(&img, &mut out, d);
                    assert_eq!(out, reference(&img, pad, top, left, flip), "{pad} {d:?}");
                }
            }
        }
    }

    #[test]
    fn random_crops_only_shift() {
        let img = test_image(5);
        let aug = Augment::standard();
        let mut rng = StdRng::seed_from_u64(11);
        let mut out = vec![0u8; IMAGE_BYTES];
        let mut seen = std::collections::HashSet::new();
        let mut flips = 0;
        let trials = 4000;
        for _ in 0..trials {
            let d = aug.apply(&img, &mut out, &mut rng);
            assert!(d.dy.abs() <= 4 && d.dx.abs() <= 4, "{d:?}");
            flips += usize::from(d.flip);
            seen.insert((d.dy, d.dx));
            // Every output pixel is black or the input pixel at the shifted place.
            let mut zeros = 0;
            for c in 0..CHANNELS {
                for y in 0..SIDE as isize {
                    for x in 0..SIDE as isize {
                        let xs = if d.flip { SIDE as isize - 1 - x } else { x };
                        let (sy, sx) = (y + d.dy, xs + d.dx);
                        let v = out[((c * SIDE) as isize + y) as usize * SIDE + x as usize];
                        if (0..32).contains(&sy) && (0..32).contains(&sx) {
                            let want = img[(c * SIDE + sy as usize) * SIDE + sx as usize];
                            assert_eq!(v, want);
                        } else {
                            assert_eq!(v, 0);
                            zeros += 1;
                        }
                    }
                }
            }
            let (h, w) = (32 - d.dy.unsigned_abs(), 32 - d.dx.unsigned_abs());
            assert_eq!(zeros, 3 * (1024 - h * w), "black border only");
        }
        assert_eq!(seen.len(), 81, "every shift in -4..=4 x -4..=4 occurs");
        let frac = flips as f64 / trials as f64;
        assert!((0.45..0.55).contains(&frac), "flip rate {frac}");
    }

    #[test]
    fn same_rng_same_result() {
        let img = test_image(6);
        let aug = Augment::standard();
        let (mut a, mut b) = (vec![0u8; IMAGE_BYTES], vec![0u8; IMAGE_BYTES]);
        let (mut r1, mut r2) = (StdRng::seed_from_u64(8), StdRng::seed_from_u64(8));
        for _ in 0..20 {
            assert_eq!(
                aug.apply(&img, &mut a, &mut r1),
                aug.apply(&img, &mut b, &mut r2)
            );
            assert_eq!(a, b);
        }
    }
}
