//! The paged latent KV cache: fixed-size blocks of `block_size` tokens, a block
//! allocator, and prefix caching.
//!
//! A sequence owns a block table (block ids in position order). A block that is full
//! of computed latents gets a key: a hash of every token before it plus its own token
//! ids (compared exactly).
//! A new sequence whose prompt starts with the same tokens reuses those blocks (shared,
//! reference counted) instead of recomputing them. Blocks nobody references stay cached
//! until the allocator needs them, oldest use first (LRU).

use crate::model::LatentStore;
use rustc_hash::FxHashMap;
use std::collections::BTreeSet;

/// What identifies a full block's contents: the chained hash of all earlier blocks and
/// its own tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    prefix_hash: u64,
    tokens: Vec<u32>,
}

/// Chained hash of a prefix: `chain(previous, block tokens)`; SipHash with fixed keys,
/// so the value is the same in every run.
fn chain(previous: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6b69_6d69, 0x6879_6272_6964);
    previous.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    key: Option<BlockKey>,
    last_use: u64,
}

/// How latents are stored in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    /// Rounded to BF16 on write (the model's own precision; half the memory).
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(KvDtype::F32),
            "bf16" | "bfloat16" | "auto" => Some(KvDtype::Bf16),
            _ => None,
        }
    }
}

/// The block allocator of the latent cache: which blocks each sequence's positions live
/// in, shared prefix blocks and their eviction. The latents themselves are in the forward
/// pass's device pools, numbered by these blocks.
pub struct KvPool {
    block_size: usize,
    dtype: KvDtype,
    meta: Vec<BlockMeta>,
    /// Blocks with no contents worth keeping, per partition (block id mod partitions).
    free: Vec<Vec<u32>>,
    /// Unreferenced blocks that hold a cached prefix, by (last use, id).
    evictable: BTreeSet<(u64, u32)>,
    /// Evictable blocks per partition.
    evictable_in: Vec<usize>,
    cached: FxHashMap<BlockKey, u32>,
    tick: u64,
}

impl KvPool {
    pub fn new(blocks: usize, block_size: usize) -> Self {
        Self::with_dtype(blocks, block_size, KvDtype::F32)
    }

    pub fn with_dtype(blocks: usize, block_size: usize, dtype: KvDtype) -> Self {
        KvPool {
            block_size,
            dtype,
            meta: vec![BlockMeta::default(); blocks],
            free: vec![(0..blocks as u32).rev().collect()],
            evictable: BTreeSet::new(),
            evictable_in: vec![0],
            cached: FxHashMap::default(),
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Splits the blocks into `n` partitions (block id mod `n`), one per device of a pass
    /// that keeps each sequence's latents on one device. Only while no block is in use
    /// (at start-up); returns whether it took effect.
    pub fn set_partitions(&mut self, n: usize) -> bool {
        let n = n.max(1);
        if self.used() != 0 || !self.evictable.is_empty() {
            return false;
        }
        self.free = (0..n)
            .map(|p| {
                (0..self.meta.len() as u32)
                    .rev()
                    .filter(|b| *b as usize % n == p)
                    .collect()
            })
            .collect();
        self.evictable_in = vec![0; n];
        true
    }

    pub fn partitions(&self) -> usize {
        self.free.len()
    }

    pub fn partition_of(&self, block: u32) -> usize {
        block as usize % self.partitions()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.iter().map(Vec::len).sum::<usize>() + self.evictable.len()
    }

    /// Blocks of partition `p` that can be handed out now.
    pub fn available_in(&self, p: usize) -> usize {
        self.free.get(p).map_or(0, Vec::len) + self.evictable_in.get(p).copied().unwrap_or(0)
    }

    /// The partition with the most blocks to hand out (where a new sequence goes).
    pub fn roomiest_partition(&self) -> usize {
        (0..self.partitions())
            .max_by_key(|&p| (self.available_in(p), std::cmp::Reverse(p)))
            .unwrap_or(0)
    }

    /// Blocks referenced by some sequence.
    pub fn used(&self) -> usize {
        self.total_blocks() - self.available()
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached full blocks matching the start of `tokens`, at most
    /// `max_tokens` tokens long. The blocks are referenced for the caller.
    pub fn match_prefix(&mut self, tokens: &[u32], max_tokens: usize) -> Vec<u32> {
        let mut blocks = Vec::new();
        let mut prefix_hash = 0;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(self.block_size) {
            let key = BlockKey {
                prefix_hash,
                tokens: chunk.to_vec(),
            };
            let Some(&b) = self.cached.get(&key) else {
                break;
            };
            self.retain(b);
            blocks.push(b);
            prefix_hash = chain(prefix_hash, chunk);
        }
        blocks
    }

    fn retain(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        if m.refs == 0 && self.evictable.remove(&(m.last_use, b)) {
            let p = b as usize % self.free.len();
            self.evictable_in[p] -= 1;
        }
        m.refs += 1;
    }

    /// A fresh block, evicting the least recently used cached one if none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        self.allocate_in(self.roomiest_partition())
    }

    /// A fresh block of partition `p`, evicting that partition's least recently used
    /// cached block if none is free.
    pub fn allocate_in(&mut self, p: usize) -> Option<u32> {
        let parts = self.free.len();
        let b = match self.free.get_mut(p)?.pop() {
            Some(b) => b,
            None => {
                let &(tick, b) = self
                    .evictable
                    .iter()
                    .find(|(_, b)| *b as usize % parts == p)?;
                self.evictable.remove(&(tick, b));
                self.evictable_in[p] -= 1;
                if let Some(key) = self.meta[b as usize].key.take() {
                    self.cached.remove(&key);
                }
                b
            }
        };
        self.meta[b as usize].refs = 1;
        Some(b)
    }

    /// Drops one reference to each block; unreferenced blocks with contents stay cached.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            self.tick += 1;
            let tick = self.tick;
            let m = &mut self.meta[b as usize];
            m.refs = m.refs.saturating_sub(1);
            if m.refs > 0 {
                continue;
            }
            m.last_use = tick;
            let p = b as usize % self.free.len();
            if m.key.is_some() {
                self.evictable.insert((tick, b));
                self.evictable_in[p] += 1;
            } else {
                self.free[p].push(b);
            }
        }
    }

    /// Records that the first `computed` tokens of a sequence (`tokens`, block table
    /// `table`) are in the cache, so their full blocks can serve later prompts.
    /// `chain_hashes` holds the sequence's prefix hash after each block already
    /// considered; it grows by the blocks registered now.
    pub fn register_full_blocks(
        &mut self,
        tokens: &[u32],
        table: &[u32],
        computed: usize,
        chain_hashes: &mut Vec<u64>,
    ) {
        let full = (computed / self.block_size).min(table.len());
        for i in chain_hashes.len()..full {
            let block_tokens = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let prefix_hash = chain_hashes.last().copied().unwrap_or(0);
            chain_hashes.push(chain(prefix_hash, block_tokens));
            let b = table[i];
            if self.meta[b as usize].key.is_some() {
                continue;
            }
            let key = BlockKey {
                prefix_hash,
                tokens: block_tokens.to_vec(),
            };
            // Another sequence computed the same block first: keep that one.
            if self.cached.contains_key(&key) {
                continue;
            }
            self.cached.insert(key.clone(), b);
            self.meta[b as usize].key = Some(key);
        }
    }
}

/// The pool seen through the block tables of one batch's sequences.
pub struct PagedBatch<'a> {
    pub pool: &'a mut KvPool,
    pub tables: Vec<&'a [u32]>,
}

impl LatentStore for PagedBatch<'_> {
    fn partitions(&self) -> usize {
        self.pool.partitions()
    }

    fn bf16_latents(&self) -> bool {
        self.pool.dtype == KvDtype::Bf16
    }

    fn block_table(&self, seq: usize, len: usize) -> (usize, Vec<u32>) {
        let bs = self.pool.block_size;
        let table = self.tables[seq];
        (bs, table[..len.div_ceil(bs).min(table.len())].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_blocks_are_shared_and_evicted_lru() {
        let mut pool = KvPool::new(4, 2);
        let prompt = [1, 2, 3, 4, 5];
        let table: Vec<u32> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        let mut hashes = Vec::new();
        pool.register_full_blocks(&prompt, &table, 5, &mut hashes);
        assert_eq!(hashes.len(), 2);
        pool.release(&table);
        assert_eq!(pool.used(), 0);
        // The same prompt reuses both full blocks; a different second block stops at one.
        let hit = pool.match_prefix(&prompt, 4);
        assert_eq!(hit, table[..2].to_vec());
        pool.release(&hit);
        assert_eq!(pool.match_prefix(&[1, 2, 9, 9], 4), table[..1].to_vec());
        pool.release(&table[..1]);
        // Filling the pool evicts cached blocks (least recently used first).
        let all: Vec<u32> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(all.len(), 4);
        assert!(pool.allocate().is_none());
        assert!(pool.match_prefix(&prompt, 4).is_empty());
    }

    #[test]
    fn partitions_keep_their_own_blocks_and_evict_within_themselves() {
        let mut pool = KvPool::new(9, 2);
        assert!(pool.set_partitions(3));
        assert_eq!((pool.partitions(), pool.available_in(1)), (3, 3));
        let a: Vec<u32> = (0..3).map(|_| pool.allocate_in(1).unwrap()).collect();
        assert!(a.iter().all(|&b| pool.partition_of(b) == 1));
        assert!(pool.allocate_in(1).is_none(), "partition 1 is full");
        assert_eq!(pool.available(), 6);
        // Cached blocks of partition 1 are evicted only for partition 1.
        let mut hashes = Vec::new();
        pool.register_full_blocks(&[1, 2, 3, 4, 5, 6], &a, 6, &mut hashes);
        pool.release(&a);
        assert_eq!((pool.available_in(1), pool.available_in(0)), (3, 3));
        let hit = pool.match_prefix(&[1, 2, 3, 4, 5, 6, 7], 6);
        assert_eq!(hit, a);
        pool.release(&hit);
        let zero: Vec<u32> = (0..3).map(|_| pool.allocate_in(0).unwrap()).collect();
        assert!(zero.iter().all(|&b| pool.partition_of(b) == 0));
        assert_eq!(
            pool.match_prefix(&[1, 2, 3, 4, 5, 6, 7], 6),
            a,
            "still cached"
        );
        pool.release(&a);
        let b = pool.allocate_in(1).unwrap();
        assert_eq!(pool.partition_of(b), 1);
        assert_eq!(pool.roomiest_partition(), 2);
        // Only an idle pool can be re-partitioned.
        assert!(!pool.set_partitions(2));
    }
}
