//! Devices: the [`DeviceOps`] trait (what the forward pass needs from a device, on its
//! own buffers), how buffers move between devices ([`Fabric`]), and the devices: the CPU
//! ([`cpu::CpuDevice`], which also stands in for a GPU) and CUDA GPUs ([`cuda`]).

pub mod cpu;
pub mod cuda;

use crate::config::ModelConfig;
use crate::device::cpu::kernels::FfnWeights;
use crate::model::{router, AttentionForm, MlaDims};
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::Arc;

/// A device operation that failed after start-up (out of memory while buffers or the
/// latent pools grow, a failed launch or copy, a lost GPU): it fails the step it happened
/// in, whose requests end with this message; the pass and the engine go on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{device} failed during {operation}: {reason}")]
pub struct DeviceError {
    /// The device, as the logs name it (`GPU 0 (NVIDIA H200)`).
    pub device: String,
    /// What it was doing (`an upload`, `mla_decode`, `an NCCL all-reduce`).
    pub operation: String,
    pub reason: String,
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// Recordable work handed to [`DeviceOps::replay`]: it queues device operations and
/// stops at the first that fails.
pub type Work<'a> = dyn FnMut() -> DeviceResult<()> + 'a;

/// Where the queries of one pass read their keys: per query, its sequence's block table
/// (padded to `max_blocks`) and how many latents it attends to (its position + 1).
pub struct QueryBlocks<I> {
    pub tables: I,
    pub lens: I,
    pub queries: usize,
    pub max_blocks: usize,
    pub block_size: usize,
    /// The longest `lens` entry.
    pub max_len: usize,
}

/// How rotary embedding finds its pairs: element `(t, h, d)` of the buffer is at
/// `t * token_stride + h * head_stride + offset + d`, `d < rope dim`.
#[derive(Debug, Clone, Copy)]
pub struct RopeLayout {
    pub tokens: usize,
    pub heads: usize,
    pub token_stride: usize,
    pub head_stride: usize,
    pub offset: usize,
}

/// Identifies one piece of recordable work (see [`DeviceOps::replay`]): the set of fixed
/// buffers it works on (`io`), the generation of the latent pools it writes (pools move
/// when they grow), and which step of the pass it is (a decoder layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayKey {
    pub io: u64,
    pub generation: u64,
    pub step: usize,
}

/// The operations the resident forward pass needs from a device, on its own buffers.
/// Weights are the checkpoint's [`LinearWeight`]s; a device keeps its copies of them.
pub trait DeviceOps: Send + Sync {
    /// f32 values in device memory.
    type Buf: Send;
    /// i32 values in device memory.
    type Ints: Send;
    /// A device-to-host copy in flight.
    type Download: Send;
    /// One layer's latent cache, `[blocks, block_size, width]`, f32 or BF16.
    type Pool: Send;

    fn upload(&self, x: &[f32]) -> DeviceResult<Self::Buf>;
    fn upload_ints(&self, x: &[i32]) -> DeviceResult<Self::Ints>;
    fn zeros(&self, n: usize) -> DeviceResult<Self::Buf>;
    /// Values in `x`.
    fn len(&self, x: &Self::Buf) -> usize;
    /// Starts copying `x` to host memory (staged through pinned buffers on a GPU) and
    /// returns at once; the device goes on with later work.
    fn begin_download(&self, x: &Self::Buf) -> DeviceResult<Self::Download>;
    /// Waits for a copy and puts the values in `out`.
    fn finish_download(&self, d: Self::Download, out: &mut [f32]) -> DeviceResult<()>;
    /// An upload of host results in the hand-off (through pinned staging on a GPU).
    fn upload_staged(&self, x: &[f32]) -> DeviceResult<Self::Buf> {
        self.upload(x)
    }
    fn copy(&self, x: &Self::Buf) -> DeviceResult<Self::Buf>;
    /// `dst = src`, in place (`dst` keeps its address).
    fn copy_into(&self, dst: &mut Self::Buf, src: &Self::Buf) -> DeviceResult<()>;
    /// Overwrites `dst` (as long as `src`) with `src`, in place.
    fn write_ints(&self, dst: &mut Self::Ints, src: &[i32]) -> DeviceResult<()>;
    /// Whether this device records repeated work and replays the recording (CUDA graphs).
    /// The pass then keeps each decode step's inputs in fixed buffers and hands each
    /// layer's attention block to [`replay`](Self::replay).
    fn records(&self) -> bool {
        false
    }
    /// Runs `work`, which only queues device work on buffers whose addresses are the same
    /// every time it is called with `key` and reads nothing from the host. A device that
    /// records may instead record it and replay the recording for later calls with the
    /// same key. By default it simply runs.
    fn replay(&self, key: ReplayKey, work: &mut Work) -> DeviceResult<()> {
        let _ = key;
        work()
    }
    /// A zeroed latent cache pool of `len` values, stored in BF16 (rounded on write)
    /// when `bf16`, else f32.
    fn pool(&self, len: usize, bf16: bool) -> DeviceResult<Self::Pool>;
    /// A pool of `len` values holding `pool`'s values followed by zeros.
    fn grow_pool(&self, pool: &Self::Pool, len: usize) -> DeviceResult<Self::Pool>;
    /// Rows `rows` of `x` (rows of `width` values), in that order.
    fn take_rows(&self, x: &Self::Buf, rows: &[usize], width: usize) -> DeviceResult<Self::Buf>;
    /// `out[rows[i]] += src[i]` for rows of `width` values (`rows` distinct).
    fn add_rows(
        &self,
        out: &mut Self::Buf,
        rows: &[usize],
        src: &Self::Buf,
        width: usize,
    ) -> DeviceResult<()>;
    /// `x` cut into consecutive pieces of `lens` values.
    fn split(&self, x: &Self::Buf, lens: &[usize]) -> DeviceResult<Vec<Self::Buf>>;
    /// The pieces one after another.
    fn concat(&self, parts: &[Self::Buf]) -> DeviceResult<Self::Buf>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> DeviceResult<()>;
    /// In place, for `rows` rows at `stride`: the first `dim` values become
    /// `x * rsqrt(mean(x²) + eps) * w`.
    fn rms_norm(
        &self,
        x: &mut Self::Buf,
        w: &Self::Buf,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    ) -> DeviceResult<()>;
    /// Token embeddings: rows `ids` of the table, decoded on the host (n x hidden values
    /// go up, where keeping the table on a device would cost its whole size there).
    fn embed(&self, table: &LinearWeight, ids: &[u32]) -> DeviceResult<Self::Buf> {
        self.upload(&embedding_rows(table, ids))
    }
    /// `y = x Wᵀ` over all rows of `w`, `x` holding `tokens` rows.
    fn linear(&self, w: &LinearWeight, x: &Self::Buf, tokens: usize) -> DeviceResult<Self::Buf>;
    /// Rotary embedding (the model's YaRN tables) at `positions`, in place.
    fn rope(
        &self,
        x: &mut Self::Buf,
        rope: &DeviceRope<Self::Buf>,
        positions: &Self::Ints,
        layout: RopeLayout,
    ) -> DeviceResult<()>;
    /// `pool[slots[i]] = rows[i]` for rows of `width` values.
    fn write_rows(
        &self,
        pool: &mut Self::Pool,
        rows: &Self::Buf,
        slots: &Self::Ints,
        width: usize,
    ) -> DeviceResult<()>;
    /// Absorbed queries `[tokens, heads, latent + rope]`: per head
    /// `[q_nope · W_UK_h | q_pe]` from `q` `[tokens, heads, nope + rope]`.
    fn absorb_queries(
        &self,
        kv_b: &LinearWeight,
        q: &Self::Buf,
        dims: MlaDims,
        tokens: usize,
    ) -> DeviceResult<Self::Buf>;
    /// Attention of absorbed queries over the cached latents (values: the first `latent`
    /// of each): `[queries, heads, latent]`.
    fn mla(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        blocks: &QueryBlocks<Self::Ints>,
        dims: MlaDims,
        scale: f32,
    ) -> DeviceResult<Self::Buf>;
    /// Per head `W_UV_h · o_h`: `[tokens, heads, v]` from `[tokens, heads, latent]`.
    fn expand_values(
        &self,
        kv_b: &LinearWeight,
        o: &Self::Buf,
        dims: MlaDims,
        tokens: usize,
    ) -> DeviceResult<Self::Buf>;
    /// MLA attention of the rotated queries `q` `[tokens, heads, nope + rope]` over the
    /// cached latents, in `form`: `[tokens, heads, v]`. `sequences` holds each sequence's
    /// query rows (consecutive positions reading one block table).
    ///
    /// The naive form expands the sequence's cached latents through `kv_b` into per-head
    /// keys and values (cheap when many queries share them: a prefill chunk); the
    /// absorbed form folds `W_UK` into the queries and `W_UV` into the output
    /// ([`absorb_queries`](Self::absorb_queries), [`mla`](Self::mla),
    /// [`expand_values`](Self::expand_values); cheap for one query over a long context).
    /// Both are the same maths. By default every form is computed absorbed.
    #[allow(clippy::too_many_arguments)]
    fn mla_attention(
        &self,
        kv_b: &LinearWeight,
        q: &Self::Buf,
        pool: &Self::Pool,
        blocks: &QueryBlocks<Self::Ints>,
        sequences: &[Range<usize>],
        dims: MlaDims,
        scale: f32,
        form: AttentionForm,
    ) -> DeviceResult<Self::Buf> {
        let _ = (sequences, form);
        let q_lat = self.absorb_queries(kv_b, q, dims, blocks.queries)?;
        let o_lat = self.mla(&q_lat, pool, blocks, dims, scale)?;
        self.expand_values(kv_b, &o_lat, dims, blocks.queries)
    }
    /// Each token's routed experts, best first (see [`router::route`]).
    fn route(
        &self,
        cfg: &ModelConfig,
        logits: &Self::Buf,
        bias: Option<&Self::Buf>,
        tokens: usize,
    ) -> DeviceResult<Vec<Vec<(usize, f32)>>>;
    /// [`ffn_accumulate`](Self::ffn_accumulate) for each `(expert, tokens)` of a layer's
    /// work, in order. A device may prepare the whole list at once (one upload of every
    /// expert's token indices, so the host is not held up between experts).
    fn experts_accumulate(
        &self,
        work: &[(&FfnWeights, &[(usize, f32)])],
        x: &Self::Buf,
        out: &mut Self::Buf,
    ) -> DeviceResult<()> {
        for (f, tokens) in work {
            self.ffn_accumulate(f, x, tokens, out)?;
        }
        Ok(())
    }
    /// `ffn(x[t])` for every one of `tokens` rows (a dense layer's MLP or a shared
    /// expert): the values [`ffn_accumulate`](Self::ffn_accumulate) adds with weight 1
    /// to zeros, without index uploads (so it can be recorded).
    fn ffn_all(&self, ffn: &FfnWeights, x: &Self::Buf, tokens: usize) -> DeviceResult<Self::Buf> {
        let mut out = self.zeros(tokens * ffn.down.rows())?;
        let all: Vec<(usize, f32)> = (0..tokens).map(|t| (t, 1.0)).collect();
        self.ffn_accumulate(ffn, x, &all, &mut out)?;
        Ok(out)
    }
    /// For every `(t, weight)` of `tokens`: `out[t] += weight * ffn(x[t])`.
    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &Self::Buf,
        tokens: &[(usize, f32)],
        out: &mut Self::Buf,
    ) -> DeviceResult<()>;
}

/// Rows `ids` of an embedding table, decoded on the host.
pub fn embedding_rows(table: &LinearWeight, ids: &[u32]) -> Vec<f32> {
    let h = table.cols();
    let mut x = vec![0.0f32; ids.len() * h];
    for (row, &id) in x.chunks_exact_mut(h.max(1)).zip(ids) {
        table.decode_row(id as usize, row);
    }
    x
}

/// The rotary tables on the device, and the host's for twins that compute on the host.
pub struct DeviceRope<B> {
    pub host: crate::model::Rope,
    pub inv_freq: B,
}

/// How buffers move between devices: through host memory by default ([`ThroughHost`]);
/// GPUs with a collective library move them directly.
pub trait Fabric<O: DeviceOps>: Send + Sync {
    /// Each `(from, to, buffer)` moved from device `from` to device `to`; the buffers on
    /// their new devices, in order. Moves within one device keep their buffer.
    fn transfer(
        &self,
        devices: &[Arc<O>],
        moves: Vec<(usize, usize, O::Buf)>,
    ) -> DeviceResult<Vec<O::Buf>>;

    /// `parts[d]` on device `d`, for every device: their sum, on every device. By
    /// default gathered to the first device, added there and sent back, so every device
    /// holds the same values.
    fn all_reduce(&self, devices: &[Arc<O>], mut parts: Vec<O::Buf>) -> DeviceResult<Vec<O::Buf>> {
        let n = parts.len();
        if n < 2 {
            return Ok(parts);
        }
        let mut sum = parts.remove(0);
        let others = parts
            .into_iter()
            .enumerate()
            .map(|(i, b)| (i + 1, 0, b))
            .collect();
        let first = &devices[0];
        for b in self.transfer(devices, others)? {
            first.add(&mut sum, &b)?;
        }
        let back = (1..n)
            .map(|d| Ok((0, d, first.copy(&sum)?)))
            .collect::<DeviceResult<_>>()?;
        let mut all = vec![sum];
        all.extend(self.transfer(devices, back)?);
        Ok(all)
    }
}

/// Moves through host memory: every download is started before any is awaited.
pub struct ThroughHost;

impl<O: DeviceOps> Fabric<O> for ThroughHost {
    fn transfer(
        &self,
        devices: &[Arc<O>],
        moves: Vec<(usize, usize, O::Buf)>,
    ) -> DeviceResult<Vec<O::Buf>> {
        let mut started = Vec::with_capacity(moves.len());
        for (from, to, b) in moves {
            started.push(if from == to {
                (to, Err(b))
            } else {
                let n = devices[from].len(&b);
                (to, Ok((from, n, devices[from].begin_download(&b)?)))
            });
        }
        started
            .into_iter()
            .map(|(to, m)| match m {
                Err(local) => Ok(local),
                Ok((from, n, d)) => {
                    let mut host = vec![0.0f32; n];
                    devices[from].finish_download(d, &mut host)?;
                    devices[to].upload_staged(&host)
                }
            })
            .collect()
    }
}

/// Routes every token from router logits on the host (the twin's routing, and the
/// reference the device router is tested against).
pub fn route_on_host(
    cfg: &ModelConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
) -> Vec<Vec<(usize, f32)>> {
    let e = cfg.n_routed_experts;
    logits
        .chunks_exact(e.max(1))
        .map(|row| router::route(cfg, row, bias))
        .collect()
}
