//! Cutting a linear weight into the part one tensor-parallel rank multiplies: a band of
//! rows (output features: one rank's heads of `q_b_proj`/`kv_b_proj`) or of columns
//! (input features: its heads' share of `o_proj`).
//!
//! A cut keeps the stored format wherever the format's blocks allow it (dense always,
//! INT4 on its groups, FP8 on its scale blocks); otherwise the cut is decoded to F32,
//! which holds exactly the values the stored form decodes to, so every kernel computes
//! the same products either way. Row bands are views of the same bytes; column bands are
//! copies.

use super::linear::{DenseDtype, LinearWeight};
use super::TensorData;
use std::ops::Range;

impl LinearWeight {
    /// Rows `rows` (`rows.end <= self.rows()`) as a weight of their own.
    pub fn row_slice(&self, rows: Range<usize>) -> std::io::Result<LinearWeight> {
        let n = rows.len();
        let view = |d: &TensorData, row_bytes: usize| {
            d.view(rows.start * row_bytes, rows.end * row_bytes)
                .ok_or_else(|| out_of_range("rows", &rows))
        };
        match self {
            LinearWeight::Dense {
                dtype, data, cols, ..
            } => Ok(LinearWeight::Dense {
                dtype: *dtype,
                data: view(data, cols * dtype.bytes())?,
                rows: n,
                cols: *cols,
            }),
            LinearWeight::Int4 {
                packed,
                scales,
                cols,
                group,
                ..
            } => Ok(LinearWeight::Int4 {
                packed: view(packed, cols / 8 * 4)?,
                scales: view(scales, cols / group * 2)?,
                rows: n,
                cols: *cols,
                group: *group,
            }),
            LinearWeight::Fp8 {
                data,
                scale_inv,
                rows: all,
                cols,
                block,
            } if on_blocks(&rows, block[0], *all) => {
                let scale_row = cols.div_ceil(block[1]) * 4;
                let (first, last) = (rows.start / block[0], rows.end.div_ceil(block[0]));
                Ok(LinearWeight::Fp8 {
                    data: view(data, *cols)?,
                    scale_inv: scale_inv
                        .view(first * scale_row, last * scale_row)
                        .ok_or_else(|| out_of_range("rows", &rows))?,
                    rows: n,
                    cols: *cols,
                    block: *block,
                })
            }
            LinearWeight::Fp8 { .. } => self.decoded(rows, 0..self.cols()),
        }
    }

    /// Columns `cols` (`cols.end <= self.cols()`) as a weight of their own.
    pub fn col_slice(&self, cols: Range<usize>) -> std::io::Result<LinearWeight> {
        if cols.end > self.cols() || cols.start > cols.end {
            return Err(out_of_range("columns", &cols));
        }
        let rows = self.rows();
        // Each row's bytes `first..last` (per row of `width` bytes), one after another.
        let cut = |d: &TensorData, width: usize, first: usize, last: usize| {
            let bytes = d.bytes();
            let mut out = Vec::with_capacity(bytes.len() / width.max(1) * (last - first));
            for row in bytes.chunks_exact(width.max(1)) {
                out.extend_from_slice(&row[first..last]);
            }
            TensorData::owned(&out)
        };
        match self {
            LinearWeight::Dense {
                dtype,
                data,
                cols: all,
                ..
            } => {
                let b = dtype.bytes();
                Ok(LinearWeight::Dense {
                    dtype: *dtype,
                    data: cut(data, all * b, cols.start * b, cols.end * b)?,
                    rows,
                    cols: cols.len(),
                })
            }
            LinearWeight::Int4 {
                packed,
                scales,
                cols: all,
                group,
                ..
            } if cols.start.is_multiple_of(*group)
                && cols.end.is_multiple_of(*group)
                && group.is_multiple_of(8) =>
            {
                Ok(LinearWeight::Int4 {
                    packed: cut(packed, all / 8 * 4, cols.start / 8 * 4, cols.end / 8 * 4)?,
                    scales: cut(
                        scales,
                        all / group * 2,
                        cols.start / group * 2,
                        cols.end / group * 2,
                    )?,
                    rows,
                    cols: cols.len(),
                    group: *group,
                })
            }
            LinearWeight::Fp8 {
                data,
                scale_inv,
                cols: all,
                block,
                ..
            } if on_blocks(&cols, block[1], *all) => {
                let (first, last) = (cols.start / block[1], cols.end.div_ceil(block[1]));
                Ok(LinearWeight::Fp8 {
                    data: cut(data, *all, cols.start, cols.end)?,
                    scale_inv: cut(scale_inv, all.div_ceil(block[1]) * 4, first * 4, last * 4)?,
                    rows,
                    cols: cols.len(),
                    block: *block,
                })
            }
            _ => self.decoded(0..rows, cols),
        }
    }

    /// Rows `rows` and columns `cols`, decoded to F32.
    fn decoded(&self, rows: Range<usize>, cols: Range<usize>) -> std::io::Result<LinearWeight> {
        if rows.end > self.rows() || rows.start > rows.end {
            return Err(out_of_range("rows", &rows));
        }
        let mut row = vec![0.0f32; self.cols()];
        let mut bytes = Vec::with_capacity(rows.len() * cols.len() * 4);
        for r in rows.clone() {
            self.decode_row(r, &mut row);
            for v in &row[cols.clone()] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(LinearWeight::Dense {
            dtype: DenseDtype::F32,
            data: TensorData::owned(&bytes)?,
            rows: rows.len(),
            cols: cols.len(),
        })
    }
}

/// Whether `range` starts on a block and ends on one (or at the end, `len`).
fn on_blocks(range: &Range<usize>, block: usize, len: usize) -> bool {
    let block = block.max(1);
    range.start.is_multiple_of(block) && (range.end.is_multiple_of(block) || range.end == len)
}

fn out_of_range(what: &str, r: &Range<usize>) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{what} {}..{} lie outside the weight", r.start, r.end),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(bytes: &[u8]) -> TensorData {
        TensorData::owned(bytes).expect("anonymous map")
    }

    fn pseudo(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as u8
            })
            .collect()
    }

    /// Every weight format at 256 x 256, with finite values.
    fn formats() -> Vec<LinearWeight> {
        let (rows, cols) = (256, 256);
        // BF16 with small exponents (no NaN or infinity).
        let bf16: Vec<u8> = pseudo(rows * cols * 2, 7)
            .chunks_exact(2)
            .flat_map(|c| half::bf16::from_f32((c[0] as f32 - 128.0) / 64.0).to_le_bytes())
            .collect();
        let scales: Vec<u8> = (0..rows * cols / 32)
            .flat_map(|i| half::bf16::from_f32(0.01 * (1 + i % 5) as f32).to_le_bytes())
            .collect();
        // E4M3 bytes without the NaN codes (0x7f, 0xff).
        let fp8: Vec<u8> = pseudo(rows * cols, 11)
            .into_iter()
            .map(|b| b & 0xf7)
            .collect();
        let scale_inv: Vec<u8> = (0..4)
            .flat_map(|i| (0.5f32 + i as f32).to_le_bytes())
            .collect();
        vec![
            LinearWeight::Dense {
                dtype: DenseDtype::Bf16,
                data: owned(&bf16),
                rows,
                cols,
            },
            LinearWeight::Int4 {
                packed: owned(&pseudo(rows * cols / 2, 3)),
                scales: owned(&scales),
                rows,
                cols,
                group: 32,
            },
            LinearWeight::Fp8 {
                data: owned(&fp8),
                scale_inv: owned(&scale_inv),
                rows,
                cols,
                block: [128, 128],
            },
        ]
    }

    fn decode(w: &LinearWeight) -> Vec<Vec<f32>> {
        (0..w.rows())
            .map(|r| {
                let mut row = vec![0.0f32; w.cols()];
                w.decode_row(r, &mut row);
                row
            })
            .collect()
    }

    #[test]
    fn cuts_decode_to_the_values_of_the_whole_weight() {
        for w in formats() {
            let whole = decode(&w);
            for rows in [0..256, 128..256, 0..128, 32..96, 100..101] {
                let cut = w.row_slice(rows.clone()).expect("row cut");
                assert_eq!(decode(&cut), whole[rows.clone()].to_vec(), "{rows:?}");
            }
            for cols in [0..256, 128..256, 64..128, 16..48, 200..201] {
                let cut = w.col_slice(cols.clone()).expect("column cut");
                let want: Vec<Vec<f32>> = whole.iter().map(|r| r[cols.clone()].to_vec()).collect();
                assert_eq!(decode(&cut), want, "{} {cols:?}", w.format_name());
            }
        }
    }

    #[test]
    fn cuts_keep_the_stored_format_on_its_blocks() {
        let mut all = formats().into_iter();
        let (bf16, int4, fp8) = (
            all.next().expect("bf16"),
            all.next().expect("int4"),
            all.next().expect("fp8"),
        );
        let name = |w: std::io::Result<LinearWeight>| w.expect("cut").format_name();
        assert_eq!(name(bf16.row_slice(3..7)), "BF16");
        assert_eq!(name(bf16.col_slice(3..7)), "BF16");
        assert_eq!(name(int4.row_slice(3..7)), "INT4");
        assert_eq!(name(int4.col_slice(64..128)), "INT4");
        assert_eq!(name(int4.col_slice(16..48)), "F32");
        assert_eq!(name(fp8.row_slice(128..256)), "FP8");
        assert_eq!(name(fp8.row_slice(32..96)), "F32");
        assert_eq!(name(fp8.col_slice(128..256)), "FP8");
        assert_eq!(name(fp8.col_slice(64..128)), "F32");
        // Row bands share the whole weight's bytes; column bands are copies.
        let band = bf16.row_slice(8..16).expect("cut");
        assert_eq!(band.identity().0, bf16.identity().0 + 8 * 256 * 2);
        assert!(bf16.row_slice(250..260).is_err());
        assert!(fp8.col_slice(0..300).is_err());
    }
}
