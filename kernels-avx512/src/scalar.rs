//! Scalar reference kernels: the definition of how each stored weight layout decodes.
//! Fast paths are tested against these.
//!
//! All byte slices are little-endian and may be unaligned (safetensors does not promise
//! alignment), so values are assembled from bytes rather than reinterpreted.

use crate::formats::{bf16_to_f32, f16_to_f32, fp8_e4m3_to_f32};

#[inline(always)]
fn u16_at(bytes: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])
}

#[inline(always)]
fn u32_at(bytes: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([
        bytes[4 * i],
        bytes[4 * i + 1],
        bytes[4 * i + 2],
        bytes[4 * i + 3],
    ])
}

/// Decodes `out.len()` BF16 values.
pub fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = bf16_to_f32(u16_at(bytes, i));
    }
}

/// Decodes `out.len()` IEEE half values.
pub fn decode_f16(bytes: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f16_to_f32(u16_at(bytes, i));
    }
}

/// Decodes `out.len()` F32 values.
pub fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = f32::from_bits(u32_at(bytes, i));
    }
}

/// Decodes one row of a compressed-tensors `pack-quantized` INT4 weight.
///
/// `packed` holds the row's I32 words: value k sits in word k/8 at bit offset 4*(k%8)
/// (lowest nibble = lowest k), stored as unsigned q+8. `scales` holds the row's BF16
/// group scales, one per `group` values. `w[k] = (nibble - 8) * scale[k / group]`.
pub fn decode_int4_row(packed: &[u8], scales: &[u8], group: usize, out: &mut [f32]) {
    for (k, o) in out.iter_mut().enumerate() {
        let word = u32_at(packed, k / 8);
        let nibble = (word >> (4 * (k % 8))) & 0xf;
        let scale = bf16_to_f32(u16_at(scales, k / group));
        *o = (nibble as i32 - 8) as f32 * scale;
    }
}

/// Decodes one row of an FP8 E4M3 block-scaled weight. `scale_inv_row` holds the F32
/// scales of the row's block row, one per `block_cols` columns: `w = fp8 * scale_inv`.
pub fn decode_fp8_row(bytes: &[u8], scale_inv_row: &[u8], block_cols: usize, out: &mut [f32]) {
    for (k, o) in out.iter_mut().enumerate() {
        let scale = f32::from_bits(u32_at(scale_inv_row, k / block_cols));
        *o = fp8_e4m3_to_f32(bytes[k]) * scale;
    }
}

/// Dot product accumulated in f32.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_nibble_order_and_offset() {
        // Word 0x76543210 holds nibbles 0..7 for k = 0..7, i.e. values -8..-1.
        let packed = 0x7654_3210u32.to_le_bytes();
        let scale = 0x4000u16.to_le_bytes(); // bf16 2.0
        let mut out = [0.0f32; 8];
        decode_int4_row(&packed, &scale, 8, &mut out);
        assert_eq!(out, [-16.0, -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0]);
        let packed = 0xfedc_ba98u32.to_le_bytes();
        decode_int4_row(&packed, &scale, 8, &mut out);
        assert_eq!(out, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]);
    }

    #[test]
    fn int4_group_scales_apply_per_group() {
        let mut packed = Vec::new();
        for _ in 0..2 {
            packed.extend_from_slice(&0x9999_9999u32.to_le_bytes()); // all +1
        }
        let mut scales = Vec::new();
        scales.extend_from_slice(&0x3f80u16.to_le_bytes()); // 1.0
        scales.extend_from_slice(&0xbf80u16.to_le_bytes()); // -1.0
        let mut out = [0.0f32; 16];
        decode_int4_row(&packed, &scales, 8, &mut out);
        assert!(out[..8].iter().all(|&v| v == 1.0));
        assert!(out[8..].iter().all(|&v| v == -1.0));
    }

    #[test]
    fn fp8_rows_use_block_scale() {
        let bytes = [0x38u8, 0x38, 0x38]; // 1.0 each
        let mut scales = Vec::new();
        scales.extend_from_slice(&0.5f32.to_le_bytes());
        scales.extend_from_slice(&4.0f32.to_le_bytes());
        let mut out = [0.0f32; 3];
        decode_fp8_row(&bytes, &scales, 2, &mut out);
        assert_eq!(out, [0.5, 0.5, 4.0]);
    }
}
