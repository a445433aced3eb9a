//! CIFAR-10 input normalization, the same everywhere in flatmin:
//! `x = (pixel / 255 - mean_c) / std_c`, computed in f64 in exactly that order and then
//! rounded once to the target float type.

use crate::cifar10::{Batch, CHANNELS, PLANE_BYTES};

/// Per-channel mean (R, G, B) on the `pixel / 255` scale.
pub const MEAN: [f64; CHANNELS] = [0.4914, 0.4822, 0.4465];
/// Per-channel standard deviation (R, G, B) on the `pixel / 255` scale.
pub const STD: [f64; CHANNELS] = [0.2470, 0.2435, 0.2616];

/// The normalized value of one pixel byte of channel `channel` (0 R, 1 G, 2 B):
/// `((pixel as f64) / 255.0 - MEAN[c]) / STD[c]`.
///
/// # Panics
/// If `channel >= 3`.
pub fn normalize_pixel(pixel: u8, channel: usize) -> f64 {
    (f64::from(pixel) / 255.0 - MEAN[channel]) / STD[channel]
}

/// Normalizes NCHW pixel bytes (whole images of 3 x 1024 bytes, R, G, B planes) with the
/// f64 formula of [`normalize_pixel`], converting each value with `convert`.
fn normalize_with<T: Copy>(pixels: &[u8], convert: impl Fn(f64) -> T) -> Vec<T> {
    let table: Vec<[T; 256]> = (0..CHANNELS)
        .map(|c| std::array::from_fn(|p| convert(normalize_pixel(p as u8, c))))
        .collect();
    let mut out = Vec::with_capacity(pixels.len());
    for (plane, bytes) in pixels.chunks(PLANE_BYTES).enumerate() {
        let t = &table[plane % CHANNELS];
        out.extend(bytes.iter().map(|&p| t[usize::from(p)]));
    }
    out
}

/// Normalizes NCHW pixel bytes (a whole number of 3 x 32 x 32 images) to f64.
pub fn normalize_pixels_f64(pixels: &[u8]) -> Vec<f64> {
    normalize_with(pixels, |x| x)
}

/// Normalizes NCHW pixel bytes (a whole number of 3 x 32 x 32 images) to f32 (computed in
/// f64, rounded once).
pub fn normalize_pixels_f32(pixels: &[u8]) -> Vec<f32> {
    normalize_with(pixels, |x| x as f32)
}

/// The batch's images as normalized f64 values, NCHW `[N, 3, 32, 32]` (`N * 3072` values).
pub fn normalize_f64(batch: &Batch) -> Vec<f64> {
    normalize_pixels_f64(&batch.pixels)
}

/// The batch's images as normalized f32 values, NCHW `[N, 3, 32, 32]` (`N * 3072` values),
/// computed in f64 and rounded once to f32.
pub fn normalize_f32(batch: &Batch) -> Vec<f32> {
    normalize_pixels_f32(&batch.pixels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cifar10::IMAGE_BYTES;

    #[test]
    fn known_values() {
        assert_eq!(normalize_pixel(0, 0), -0.4914 / 0.2470);
        assert_eq!(normalize_pixel(255, 2), (1.0 - 0.4465) / 0.2616);
        assert_eq!(normalize_pixel(51, 1), (0.2 - 0.4822) / 0.2435);
        assert!((normalize_pixel(0, 0) - (-1.989_473_684_210_526_3)).abs() < 1e-12);
        assert!((normalize_pixel(255, 1) - 2.126_488_706_365_503).abs() < 1e-12);
    }

    #[test]
    fn layout_and_rounding() {
        // Two images whose every byte encodes its own position.
        let pixels: Vec<u8> = (0..2 * IMAGE_BYTES).map(|i| (i * 7 % 256) as u8).collect();
        let batch = Batch {
            labels: vec![0, 1],
            pixels: pixels.clone(),
        };
        let x64 = normalize_f64(&batch);
        let x32 = normalize_f32(&batch);
        assert_eq!(x64.len(), 2 * 3 * 32 * 32);
        assert_eq!(x32.len(), x64.len());
        for n in 0..2 {
            for c in 0..3 {
                for h in 0..32 {
                    for w in 0..32 {
                        let i = ((n * 3 + c) * 32 + h) * 32 + w;
                        let p = pixels[i];
                        let want = ((p as f64) / 255.0 - MEAN[c]) / STD[c];
                        assert_eq!(x64[i].to_bits(), want.to_bits());
                        assert_eq!(x32[i].to_bits(), (want as f32).to_bits());
                    }
                }
            }
        }
        assert_eq!(normalize_pixels_f64(&pixels), x64);
        assert!(normalize_f64(&Batch::default()).is_empty());
    }
}
