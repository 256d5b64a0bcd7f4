//! What the engine's work costs, in multiply-adds: the scheduler's step budget and
//! `bench`'s arithmetic come from here.

use crate::config::ModelConfig;
use crate::model::MlaDims;

/// What a step's work costs, in multiply-adds, so that the step budget bounds a step's
/// time whatever the contexts are: a token costs the weights it goes through (every
/// projection and the active experts, once per token) plus its attention, which grows
/// with the context (tokens x context). A step takes at most `--max-batch-tokens`
/// tokens and at most the work of that many prompt tokens at [`BUDGET_CONTEXT`] tokens
/// of context: below it chunks are limited by tokens, beyond it by work, so a chunk of a
/// prompt 64K tokens deep gets about a sixth of the tokens one at its start gets (K2's
/// weights per token outweigh its attention up to about 25K tokens of context).
#[derive(Debug, Clone, Copy)]
pub struct StepCost {
    per_token: f64,
    layers: f64,
    dims: MlaDims,
}

impl StepCost {
    pub fn of(c: &ModelConfig) -> Self {
        let d = MlaDims::of(c);
        let h = c.hidden_size;
        let q = match c.q_lora_rank {
            Some(r) => h * r + r * d.heads * d.qk(),
            None => h * d.heads * d.qk(),
        };
        // kv_b is counted with attention (its work depends on the form).
        let attention = q + h * d.width() + d.heads * d.v * h;
        let dense_layers = c.first_k_dense_replace.min(c.num_hidden_layers);
        let dense = 3 * h * c.intermediate_size;
        let moe = 3 * h * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
            + h * c.n_routed_experts;
        let per_token = c.num_hidden_layers * attention
            + dense_layers * dense
            + (c.num_hidden_layers - dense_layers) * moe;
        StepCost {
            per_token: per_token.max(1) as f64,
            layers: c.num_hidden_layers as f64,
            dims: d,
        }
    }

    /// The step budget for `tokens` tokens per step.
    pub fn budget(&self, tokens: usize) -> f64 {
        self.chunk(BUDGET_CONTEXT, tokens)
    }

    /// `n` tokens of one sequence whose first `start` tokens are cached, attention in
    /// the cheaper form (as the devices choose it).
    pub fn chunk(&self, start: usize, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        n as f64 * self.per_token + self.attention(start, n)
    }

    /// The attention part of [`Self::chunk`], all layers.
    pub fn attention(&self, start: usize, n: usize) -> f64 {
        let keys = start + n;
        let visible = n * start + n * (n + 1) / 2;
        let d = &self.dims;
        let work = if n == 1 {
            d.absorbed_work(1, visible)
        } else {
            d.naive_work(keys, visible).min(d.absorbed_work(n, visible))
        };
        self.layers * work as f64
    }

    /// Attention's share of the multiply-adds of a prompt of `len` tokens prefilled alone,
    /// `chunk` tokens per step.
    pub fn prefill_attention_share(&self, len: usize, chunk: usize) -> f64 {
        let (mut total, mut attention) = (0.0, 0.0);
        let mut start = 0;
        while start < len {
            let n = chunk.max(1).min(len - start);
            total += self.chunk(start, n);
            attention += self.attention(start, n);
            start += n;
        }
        if total > 0.0 {
            attention / total
        } else {
            0.0
        }
    }

    /// The longest chunk, at most `remaining` tokens from `start`, that costs at most
    /// `budget` (0 when not even one token fits). Cost grows with the chunk.
    pub fn longest_chunk(&self, start: usize, remaining: usize, budget: f64) -> usize {
        let (mut lo, mut hi) = (0, remaining);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.chunk(start, mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// The context at which a step's work budget is `--max-batch-tokens` prompt tokens.
pub const BUDGET_CONTEXT: usize = 16_384;

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest chunk fits the budget and one more token would not; chunks shrink as
    /// the context grows, in proportion once attention dominates.
    #[test]
    fn chunks_fit_the_work_budget_and_shrink_with_context() {
        let cost = StepCost::of(&ModelConfig::kimi_k26());
        let budget = cost.budget(512);
        let mut last = usize::MAX;
        for start in [0, 8_192, 16_384, 32_768, 65_536, 131_072, 250_000] {
            let n = cost.longest_chunk(start, 100_000, budget);
            assert!(cost.chunk(start, n) <= budget, "{start}");
            assert!(cost.chunk(start, n + 1) > budget, "{start}");
            assert!(n <= last, "{start}: {n} after {last}");
            last = n;
            println!("K2.6 chunk at {start}: {n} tokens");
        }
        // Up to the budget's context a chunk is limited by tokens, not work.
        assert!(cost.longest_chunk(0, 100_000, budget) > 512);
        assert!(cost.longest_chunk(16_384, 512, budget) == 512);
        // Far beyond it, by work: four times the context, about a quarter of the tokens
        // (attention then dominates K2's cost).
        let (a, b) = (
            cost.longest_chunk(131_072, 100_000, budget),
            cost.longest_chunk(262_144 - 512, 100_000, budget),
        );
        assert!(a > 0 && b > 0 && b < a, "{a} {b}");
        // Nothing fits an empty budget; a decode token costs more deep in its context.
        assert_eq!(cost.longest_chunk(0, 10, 0.0), 0);
        assert!(cost.chunk(100_000, 1) > cost.chunk(10, 1));
    }
}
