//! Where a pass's tokens go: each share of the batch laid out for its device (positions,
//! cache slots and block tables in the device's own block numbering) and the device's
//! latent pools grown to hold them.

use super::pass::Prepared;
use super::{DeviceOps, QueryBlocks};
use crate::device::DeviceResult;
use crate::model::{BatchEntry, LatentStore};

/// One entry's tokens within its device's share of the pass.
#[derive(Clone, Copy)]
pub(super) struct Span {
    pub(super) first: usize,
    pub(super) len: usize,
}

/// The entries of a pass that run on one device, and their layout there.
pub(super) struct Group<O: DeviceOps> {
    pub(super) device: usize,
    pub(super) entries: Vec<usize>,
    pub(super) spans: Vec<Span>,
    pub(super) tokens: usize,
    pub(super) positions: O::Ints,
    pub(super) slots: O::Ints,
    pub(super) blocks: QueryBlocks<O::Ints>,
}

/// Grows the pools of `layers` to hold `blocks` blocks (doubling, so a growing sequence
/// copies its cache a logarithmic number of times).
pub(super) fn ensure_pools<O: DeviceOps>(
    ops: &O,
    p: &mut Prepared<O>,
    (block_size, bf16): (usize, bool),
    blocks: usize,
    width: usize,
    layers: impl Iterator<Item = usize>,
) -> DeviceResult<()> {
    if p.block_size != block_size || p.pool_bf16 != bf16 {
        // A store with another layout: start over (its blocks are all new).
        p.pools = p
            .pools
            .iter()
            .map(|_| ops.pool(0, bf16))
            .collect::<DeviceResult<_>>()?;
        p.pool_blocks = 0;
        p.pool_generation += 1;
        p.block_size = block_size;
        p.pool_bf16 = bf16;
    }
    if blocks <= p.pool_blocks {
        return Ok(());
    }
    let grown = blocks.max(p.pool_blocks * 2);
    // Every pool is grown before any is replaced, so a failure (out of device memory)
    // leaves them all as they were.
    let layers: Vec<usize> = layers.collect();
    let bigger = layers
        .iter()
        .map(|&l| ops.grow_pool(&p.pools[l], grown * block_size * width))
        .collect::<DeviceResult<Vec<_>>>()?;
    for (l, pool) in layers.into_iter().zip(bigger) {
        p.pools[l] = pool;
    }
    p.pool_blocks = grown;
    // The pools moved: recordings of work that writes them are stale.
    p.pool_generation += 1;
    Ok(())
}

/// Each batch entry's (block size, block table) for the positions it reaches.
pub(super) fn block_tables(
    batch: &[BatchEntry],
    store: &mut dyn LatentStore,
) -> Vec<(usize, Vec<u32>)> {
    batch
        .iter()
        .enumerate()
        .map(|(i, e)| store.block_table(i, e.start + e.tokens.len()))
        .collect()
}

/// One share's token layout on the host: what every placement of it uploads.
pub(super) struct Layout {
    entries: Vec<usize>,
    spans: Vec<Span>,
    tokens: usize,
    positions: Vec<i32>,
    slots: Vec<i32>,
    query_tables: Vec<i32>,
    lens: Vec<i32>,
    pub(super) block_size: usize,
    max_blocks: usize,
    /// Blocks the pools must hold (the highest block number used, plus one).
    pub(super) needed_blocks: usize,
}

impl Layout {
    /// The layout of `entries` of `batch`, their blocks renumbered by `local`.
    pub(super) fn new(
        batch: &[BatchEntry],
        tables: &[(usize, Vec<u32>)],
        entries: Vec<usize>,
        local: &dyn Fn(u32) -> usize,
    ) -> Self {
        let block_size = tables[entries[0]].0;
        let max_blocks = entries
            .iter()
            .map(|&i| tables[i].1.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut spans, mut first) = (Vec::new(), 0);
        let (mut positions, mut slots, mut query_tables, mut lens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in &entries {
            let (e, (bs, table)) = (&batch[i], &tables[i]);
            spans.push(Span {
                first,
                len: e.tokens.len(),
            });
            first += e.tokens.len();
            let row: Vec<i32> = table.iter().map(|&b| local(b) as i32).collect();
            for pos in e.start..e.start + e.tokens.len() {
                positions.push(pos as i32);
                slots.push((local(table[pos / bs]) * bs + pos % bs) as i32);
                query_tables.extend_from_slice(&row);
                query_tables.resize(query_tables.len() + max_blocks - row.len(), 0);
                lens.push(pos as i32 + 1);
            }
        }
        let needed_blocks = entries
            .iter()
            .flat_map(|&i| tables[i].1.iter())
            .map(|&b| local(b) + 1)
            .max()
            .unwrap_or(0);
        Layout {
            entries,
            spans,
            tokens: first,
            positions,
            slots,
            query_tables,
            lens,
            block_size,
            max_blocks,
            needed_blocks,
        }
    }

    /// Tokens of the share.
    pub(super) fn tokens(&self) -> usize {
        self.tokens
    }

    /// This layout's indices uploaded to `device`.
    pub(super) fn place<O: DeviceOps>(&self, ops: &O, device: usize) -> DeviceResult<Group<O>> {
        Ok(Group {
            device,
            entries: self.entries.clone(),
            spans: self.spans.clone(),
            tokens: self.tokens,
            positions: ops.upload_ints(&self.positions)?,
            slots: ops.upload_ints(&self.slots)?,
            blocks: QueryBlocks {
                tables: ops.upload_ints(&self.query_tables)?,
                lens: ops.upload_ints(&self.lens)?,
                queries: self.tokens,
                max_blocks: self.max_blocks,
                block_size: self.block_size,
                max_len: self.lens.iter().map(|&l| l as usize).max().unwrap_or(0),
            },
        })
    }

    /// The block-table width of a recorded decode step of this layout: its widest table
    /// rounded up to a power of two, so one recording serves while contexts grow into it.
    pub(super) fn recorded_width(&self) -> usize {
        self.max_blocks.next_power_of_two()
    }

    /// Each query's block table padded with block 0 to `width` entries.
    fn tables_at(&self, width: usize) -> Vec<i32> {
        let mut out = Vec::with_capacity(self.tokens * width);
        for row in self.query_tables.chunks_exact(self.max_blocks) {
            out.extend_from_slice(row);
            out.resize(out.len() + width - self.max_blocks, 0);
        }
        out
    }

    /// This layout's indices on `device` with block tables `width` wide, as a recorded
    /// decode step reads them: the attention kernels' geometry then depends only on the
    /// token count and the width (`max_len` is the width's capacity).
    pub(super) fn place_recorded<O: DeviceOps>(
        &self,
        ops: &O,
        device: usize,
        width: usize,
    ) -> DeviceResult<Group<O>> {
        let mut g = self.place(ops, device)?;
        g.blocks.tables = ops.upload_ints(&self.tables_at(width))?;
        g.blocks.max_blocks = width;
        g.blocks.max_len = width * self.block_size;
        Ok(g)
    }

    /// Writes this layout's indices into `fixed` (made by [`place_recorded`] for a layout
    /// with as many tokens, the same block size and `width`), which keeps its buffers.
    pub(super) fn write_recorded<O: DeviceOps>(
        &self,
        ops: &O,
        fixed: &mut Group<O>,
    ) -> DeviceResult<()> {
        let width = fixed.blocks.max_blocks;
        ops.write_ints(&mut fixed.positions, &self.positions)?;
        ops.write_ints(&mut fixed.slots, &self.slots)?;
        ops.write_ints(&mut fixed.blocks.tables, &self.tables_at(width))?;
        ops.write_ints(&mut fixed.blocks.lens, &self.lens)?;
        fixed.entries.clone_from(&self.entries);
        fixed.spans.clone_from(&self.spans);
        Ok(())
    }
}
