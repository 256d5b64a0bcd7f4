//! Element decoders for the stored number formats: BF16, F16 and FP8 E4M3 (the
//! `float8_e4m3fn` flavour: no infinities, 0x7f/0xff are NaN, exponent bias 7).

/// Decodes a little-endian bfloat16 bit pattern.
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The `index`-th little-endian BF16 value of `bytes`.
#[inline(always)]
pub fn bf16_at(bytes: &[u8], index: usize) -> f32 {
    bf16_to_f32(u16::from_le_bytes([bytes[2 * index], bytes[2 * index + 1]]))
}

/// Decodes a little-endian IEEE half bit pattern.
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Decodes one FP8 E4M3 (fn) byte.
#[inline(always)]
pub fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    FP8_E4M3_TABLE[byte as usize]
}

const fn fp8_e4m3_decode(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exponent = ((byte >> 3) & 0x0f) as i32;
    let mantissa = (byte & 0x07) as u32;
    if exponent == 0x0f && mantissa == 0x07 {
        return f32::NAN;
    }
    if exponent == 0 {
        // Subnormal: mantissa/8 * 2^-6 = mantissa * 2^-9.
        return sign * (mantissa as f32) * 0.001_953_125;
    }
    // Normal: 2^(e-7) * (1 + m/8), built directly as f32 bits (exact).
    let bits = (((exponent - 7 + 127) as u32) << 23) | (mantissa << 20);
    sign * f32::from_bits(bits)
}

const fn build_fp8_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = fp8_e4m3_decode(i as u8);
        i += 1;
    }
    table
}

static FP8_E4M3_TABLE: [f32; 256] = build_fp8_table();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_e4m3_known_values() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0); // e=7, m=0
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(fp8_e4m3_to_f32(0x3c), 1.5);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
        assert!(fp8_e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn bf16_and_f16_decode() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
    }
}
