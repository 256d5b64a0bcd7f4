//! Rotary position embedding with YaRN scaling, applied to interleaved pairs
//! `(x[2i], x[2i+1])` as the DeepSeek-V3/Kimi checkpoints expect.

use crate::config::{yarn_get_mscale, ModelConfig};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplier on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    magnitude: f32,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // f_i = base^(-2i/dim)
        let freq: Vec<f64> = (0..half)
            .map(|i| base.powf(-(2.0 * i as f64) / dim as f64))
            .collect();
        let Some(y) = &cfg.rope_scaling else {
            return Rope {
                inv_freq: freq.iter().map(|&f| f as f32).collect(),
                magnitude: 1.0,
            };
        };
        // Dimension index at which a wavelength completes `rotations` turns over the
        // original context: corr(r) = dim * ln(L / (2 pi r)) / (2 ln base).
        let corr = |rotations: f64| {
            dim as f64
                * (y.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * base.ln())
        };
        let low = corr(y.beta_fast).floor().max(0.0);
        let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv_freq = freq
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                // ramp 0 below `low` (keep the original frequency: extrapolate), 1 above
                // `high` (divide by factor: interpolate).
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                let f = f as f32;
                (f / y.factor as f32) * ramp + f * (1.0 - ramp)
            })
            .collect();
        let magnitude = (yarn_get_mscale(y.factor, y.mscale)
            / yarn_get_mscale(y.factor, y.mscale_all_dim)) as f32;
        Rope {
            inv_freq,
            magnitude,
        }
    }

    /// YaRN's attention magnitude factor applied to cos and sin.
    pub fn magnitude(&self) -> f32 {
        self.magnitude
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates `x` (length qk_rope_head_dim) in place for absolute position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            // Angles in f32, as the reference computes them.
            let angle = pos as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (cos, sin) = (cos * self.magnitude, sin * self.magnitude);
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos - b * sin;
            x[2 * i + 1] = b * cos + a * sin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_inverse_frequencies_match_formula_for_k2() {
        // K2.6: dim 64, base 50000, factor 64, L 4096, beta 32/1.
        let cfg = ModelConfig::kimi_k26();
        let rope = Rope::new(&cfg);
        let f = rope.inv_freq();
        assert_eq!(f.len(), 32);
        // Fast-rotating dims are kept as-is, slow ones divided by the factor.
        assert!((f[0] - 1.0).abs() < 1e-7);
        let base_last = 50000f64.powf(-62.0 / 64.0) as f32;
        assert!((f[31] - base_last / 64.0).abs() < 1e-12);
        // Monotonically decreasing.
        assert!(f.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let cfg = ModelConfig::kimi_k26();
        let rope = Rope::new(&cfg);
        let orig: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = orig.clone();
        rope.apply(&mut x, 0);
        assert_eq!(x, orig);
        rope.apply(&mut x, 1234);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
}
