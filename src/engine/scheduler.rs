//! The engine loop: admit waiting requests while KV blocks and sequence slots allow,
//! build one batch per step (every running decode token, then prompt chunks up to the
//! step's token budget), run it, sample, stream, and free what finished or was
//! abandoned. When the pool runs dry mid-decode, the most recently admitted sequence is
//! preempted: its blocks are released (its full blocks stay in the prefix cache) and it
//! is queued again at the front, to be recomputed from its tokens.

use super::constraint;
use super::cost::StepCost;
use super::kv::{KvPool, PagedBatch};
use super::output::TextOutput;
use super::sampling::{self, Sampler, TokenLogprob};
use super::{EngineConfig, EngineStats, Event, FinishReason, GenRequest, StopReason};
use crate::forward::Forward;
use crate::model::{AttentionForm, BatchEntry, Logits, Model};
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

/// Prompt tokens a chunk gets even when the budget is spent (by decode tokens over long
/// contexts): prefills always move, and in chunks big enough to run efficiently.
const MIN_PREFILL_CHUNK: usize = 64;

struct Seq {
    req: GenRequest,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose latents are in the cache.
    computed: usize,
    table: Vec<u32>,
    chain_hashes: Vec<u64>,
    sampler: Sampler,
    output: TextOutput,
    cached_tokens: usize,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    prompt_logprobs_sent: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn wants_prompt_logprobs(&self) -> bool {
        self.req.prompt_logprobs.is_some() && !self.prompt_logprobs_sent
    }
}

pub(super) struct Scheduler {
    model: Model,
    pass: Box<dyn Forward>,
    tokenizer: Arc<Tokenizer>,
    config: Arc<EngineConfig>,
    stats: Arc<EngineStats>,
    pool: KvPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Ids of the output grammar's markers, kept when special tokens are skipped.
    markers: Vec<u32>,
    cost: StepCost,
}

impl Scheduler {
    pub(super) fn new(
        model: Model,
        pass: Box<dyn Forward>,
        tokenizer: Arc<Tokenizer>,
        config: Arc<EngineConfig>,
        stats: Arc<EngineStats>,
    ) -> Self {
        // One partition per device whose latents the pass keeps apart; each holds at
        // least one sequence of the longest allowed length.
        let parts = pass.devices().max(1);
        let blocks = if parts > 1 {
            let longest = config.max_model_len.div_ceil(config.block_size.max(1));
            config
                .kv_blocks
                .max(parts * longest)
                .next_multiple_of(parts)
        } else {
            config.kv_blocks
        };
        let mut pool = KvPool::with_dtype(blocks, config.block_size, config.kv_dtype);
        pool.set_partitions(parts);
        stats
            .kv_blocks_total
            .store(pool.total_blocks(), Ordering::SeqCst);
        let markers = crate::tokenizer::parser::MARKERS
            .iter()
            .filter_map(|m| tokenizer.token_id(m))
            .collect();
        Scheduler {
            markers,
            cost: StepCost::of(&model.config),
            model,
            pass,
            tokenizer,
            config,
            stats,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<GenRequest>) {
        match self.reserve_cache() {
            Ok(()) => self.stats.ready.store(true, Ordering::SeqCst),
            Err(e) => {
                // Requests still get an error each rather than hanging.
                if let Ok(mut slot) = self.stats.startup_error.lock() {
                    *slot = Some(e.clone());
                }
                eprintln!("the engine cannot serve: {e}");
            }
        }
        let mut open = true;
        while open || !self.waiting.is_empty() || !self.running.is_empty() {
            if self.waiting.is_empty() && self.running.is_empty() {
                match rx.recv() {
                    Ok(req) => self.enqueue(req),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(req) => self.enqueue(req),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.admit();
            // A bug in one step must not take every other request (or the server) down:
            // the sequences in that step fail with an error and the engine goes on.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            match stepped {
                Err(_) => {
                    self.fail_running("internal error during a forward step; see the server log")
                }
                // Every running sequence waits for its client to read: wait for news
                // rather than spin.
                Ok(false) => match rx.recv_timeout(std::time::Duration::from_millis(10)) {
                    Ok(req) => self.enqueue(req),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                },
                Ok(true) => {}
            }
            self.publish();
        }
    }

    /// Allocates the whole KV cache now, before the server reports ready, rather than
    /// when the first long request reaches its last blocks: one single-token forward
    /// per partition writes that partition's last block, so every device pool grows
    /// to its full size (or start-up fails here, saying why). The written block is
    /// free and is overwritten by whichever sequence gets it.
    fn reserve_cache(&mut self) -> Result<(), String> {
        let total = self.pool.total_blocks();
        let parts = self.pool.partitions();
        let last_blocks: Vec<[u32; 1]> = (0..parts)
            .filter_map(|p| (0..total).rev().find(|b| b % parts == p))
            .map(|b| [b as u32])
            .collect();
        if last_blocks.is_empty() {
            return Ok(());
        }
        let token = [self
            .tokenizer
            .bos_id()
            .filter(|&id| (id as usize) < self.model.config.vocab_size)
            .unwrap_or(0)];
        let entries: Vec<BatchEntry> = last_blocks
            .iter()
            .map(|_| BatchEntry {
                tokens: &token,
                start: 0,
                logits: None,
            })
            .collect();
        let tables: Vec<&[u32]> = last_blocks.iter().map(|b| b.as_slice()).collect();
        let mut store = PagedBatch {
            pool: &mut self.pool,
            tables,
        };
        self.pass
            .forward_batch(
                &self.model,
                &entries,
                &mut store,
                AttentionForm::Auto,
                &mut |_, _| {},
            )
            .map(|_| ())
            .map_err(|e| format!("cannot allocate the KV cache ({total} blocks): {e}"))
    }

    fn fail_running(&mut self, message: &str) {
        for seq in std::mem::take(&mut self.running) {
            self.pool.release(&seq.table);
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = seq.req.events.send(Event::Error(message.to_string()));
        }
    }

    fn enqueue(&mut self, req: GenRequest) {
        let sampler = Sampler::new(req.sampling.clone(), &req.prompt);
        let output = TextOutput::new(
            req.stop.clone(),
            req.skip_special_tokens,
            self.markers.clone(),
        );
        self.waiting.push_back(Seq {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            computed: 0,
            table: Vec::new(),
            chain_hashes: Vec::new(),
            sampler,
            output,
            cached_tokens: 0,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_sent: false,
            req,
        });
    }

    /// Sequences whose client went away are freed before any more work is done for them.
    fn drop_abandoned(&mut self) {
        let pool = &mut self.pool;
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|s| {
            let gone = s.req.events.is_closed();
            if gone {
                pool.release(&s.table);
            }
            !gone
        });
        self.waiting.retain(|s| !s.req.events.is_closed());
        let dropped = before - self.running.len() - self.waiting.len();
        self.stats.in_flight.fetch_sub(dropped, Ordering::SeqCst);
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let len = seq.tokens.len();
            // At least the last token is computed, to get its logits.
            let reusable = if self.config.prefix_caching && !seq.wants_prompt_logprobs() {
                self.pool.match_prefix(&seq.tokens, len - 1)
            } else {
                Vec::new()
            };
            let needed = self.pool.blocks_for(len) - reusable.len();
            // A sequence's blocks all come from one partition of the pool (one device's
            // latents): its cached prefix's, or the roomiest.
            let part = match reusable.first() {
                Some(&b) => self.pool.partition_of(b),
                None => self.pool.roomiest_partition(),
            };
            let available = self.pool.available_in(part);
            // Keep one block per running sequence free for its next decode step.
            let sharing = self
                .running
                .iter()
                .filter(|s| s.table.first().map(|&b| self.pool.partition_of(b)) == Some(part))
                .count();
            let reserve = sharing.min(available);
            if needed + reserve > available && !self.running.is_empty() {
                self.pool.release(&reusable);
                self.waiting.push_front(seq);
                break;
            }
            let mut table = reusable;
            let reused = table.len() * self.pool.block_size();
            while table.len() < self.pool.blocks_for(len) {
                match self.pool.allocate_in(part) {
                    Some(b) => table.push(b),
                    None => break,
                }
            }
            if table.len() < self.pool.blocks_for(len) {
                // The pool cannot hold this prompt even with nothing else running.
                self.pool.release(&table);
                self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = seq.req.events.send(Event::Error(format!(
                    "the prompt needs {} KV blocks but the cache has {}{}",
                    self.pool.blocks_for(len),
                    self.pool.total_blocks() / self.pool.partitions(),
                    if self.pool.partitions() > 1 {
                        " per device"
                    } else {
                        ""
                    }
                )));
                continue;
            }
            seq.table = table;
            seq.computed = reused;
            seq.chain_hashes.clear();
            if seq.generated() == 0 {
                seq.cached_tokens = reused;
            }
            self.stats
                .prefix_cached_tokens
                .fetch_add(reused as u64, Ordering::Relaxed);
            self.running.push(seq);
        }
    }

    /// Each running sequence's token count for the next step, within the step budget
    /// (see [`StepCost`]): every decode token first, so streams keep flowing during long
    /// prefills; then prompt chunks, shortest remaining prompt first, so a short request
    /// that arrives while a long prompt is prefilled gets its first chunk (usually its
    /// whole prompt) in the next step, and the long prompt takes what the budget leaves
    /// (at least [`MIN_PREFILL_CHUNK`] tokens when nothing else prefills). A prompt alone
    /// in the step takes the whole token limit.
    fn step_counts(&self) -> Vec<usize> {
        let cost = &self.cost;
        let mut tokens = self.config.max_batch_tokens.max(1);
        let mut budget = cost.budget(tokens);
        let mut counts = vec![0; self.running.len()];
        let mut prefills = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            let backed_up = s
                .req
                .client_backed_up
                .as_ref()
                .is_some_and(|b| b.load(Ordering::SeqCst));
            match s.tokens.len() - s.computed {
                1 if backed_up => {}
                1 => {
                    counts[i] = 1;
                    tokens = tokens.saturating_sub(1);
                    budget -= cost.chunk(s.computed, 1);
                }
                0 => {}
                remaining => prefills.push((remaining, i)),
            }
        }
        prefills.sort();
        if let [(remaining, i)] = prefills[..] {
            if counts.iter().all(|&c| c == 0) {
                // Alone in the step there is nobody to be fair to, and small chunks would
                // cost more: each one re-reads (and in the naive form re-expands) the
                // whole context. A request that arrives meanwhile waits one step.
                counts[i] = remaining.min(tokens);
                return counts;
            }
        }
        let mut any_prefill = false;
        for (remaining, i) in prefills {
            let start = self.running[i].computed;
            let mut n = cost.longest_chunk(start, remaining.min(tokens), budget.max(0.0));
            if !any_prefill {
                n = n.max(remaining.min(MIN_PREFILL_CHUNK));
            }
            if n == 0 {
                break;
            }
            counts[i] = n;
            tokens = tokens.saturating_sub(n);
            budget -= cost.chunk(start, n);
            any_prefill = true;
        }
        counts
    }

    /// Makes sure every sequence in the batch has blocks for its next tokens, preempting
    /// the newest sequences when the pool is exhausted. Returns each running sequence's
    /// token count for this step.
    fn plan_step(&mut self) -> Vec<usize> {
        loop {
            let counts = self.step_counts();
            // Blocks for decode tokens crossing into a new block.
            let mut short = false;
            for (s, &c) in self.running.iter_mut().zip(&counts) {
                let need = self.pool.blocks_for(s.computed + c);
                let part = s.table.first().map_or_else(
                    || self.pool.roomiest_partition(),
                    |&b| self.pool.partition_of(b),
                );
                while s.table.len() < need {
                    match self.pool.allocate_in(part) {
                        Some(b) => s.table.push(b),
                        None => break,
                    }
                }
                if s.table.len() < need {
                    short = true;
                    break;
                }
            }
            if !short {
                return counts;
            }
            if self.running.len() == 1 {
                // Alone and still out of room: the cache is full for this sequence.
                let mut seq = self.running.remove(0);
                self.finish(&mut seq, FinishReason::ContextFull, None);
                return Vec::new();
            }
            // Preempt the newest sequence (possibly the one that ran short).
            let victim = self.running.len() - 1;
            let mut seq = self.running.remove(victim);
            self.pool.release(&seq.table);
            seq.table.clear();
            seq.chain_hashes.clear();
            seq.computed = 0;
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            self.waiting.push_front(seq);
        }
    }

    /// Runs one batched forward step; false when no sequence could run.
    fn step(&mut self) -> bool {
        if self.running.is_empty() {
            return true;
        }
        let counts = self.plan_step();
        if counts.iter().all(|&c| c == 0) {
            return false;
        }
        let active: Vec<usize> = (0..self.running.len()).filter(|&i| counts[i] > 0).collect();
        let entries: Vec<BatchEntry> = active
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                let end = s.computed + counts[i];
                let reaches_end = end == s.tokens.len();
                let logits = if s.wants_prompt_logprobs() && s.computed < s.prompt_len {
                    Some(Logits::All)
                } else if reaches_end {
                    Some(Logits::Last)
                } else {
                    None
                };
                BatchEntry {
                    tokens: &s.tokens[s.computed..end],
                    start: s.computed,
                    logits,
                }
            })
            .collect();
        let tables: Vec<&[u32]> = active
            .iter()
            .map(|&i| self.running[i].table.as_slice())
            .collect();
        let mut store = PagedBatch {
            pool: &mut self.pool,
            tables,
        };
        let result = self.pass.forward_batch(
            &self.model,
            &entries,
            &mut store,
            AttentionForm::Auto,
            &mut |_, _| {},
        );
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Inputs are validated before they reach the engine; fail the batch
                // rather than the process if something still slips through.
                let message = format!("forward pass failed: {e}");
                for &i in active.iter().rev() {
                    let seq = self.running.remove(i);
                    self.pool.release(&seq.table);
                    self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = seq.req.events.send(Event::Error(message.clone()));
                }
                return true;
            }
        };
        let vocab = self.model.config.vocab_size;
        let mut finished = Vec::new();
        for (&i, rows) in active.iter().zip(logits) {
            let s = &mut self.running[i];
            let start = s.computed;
            s.computed += counts[i];
            if self.config.prefix_caching {
                self.pool.register_full_blocks(
                    &s.tokens,
                    &s.table,
                    s.computed,
                    &mut s.chain_hashes,
                );
            }
            let Some(rows) = rows else {
                continue;
            };
            if s.wants_prompt_logprobs() && start < s.prompt_len {
                collect_prompt_logprobs(s, start, counts[i], &rows, vocab);
            }
            if s.computed < s.tokens.len() {
                continue;
            }
            let last = &rows[rows.len() - vocab..];
            if let Some(reason) = self.emit_next(i, last) {
                finished.push((i, reason));
            }
        }
        for (i, (reason, stop)) in finished.into_iter().rev() {
            let mut seq = self.running.remove(i);
            self.finish(&mut seq, reason, stop);
        }
        true
    }

    /// Samples (or takes the forced) next token, streams it, and says whether the
    /// sequence ends here.
    fn emit_next(
        &mut self,
        i: usize,
        logits: &[f32],
    ) -> Option<(FinishReason, Option<StopReason>)> {
        let s = &mut self.running[i];
        if s.wants_prompt_logprobs() {
            let lps = std::mem::take(&mut s.prompt_logprobs);
            s.prompt_logprobs_sent = true;
            let _ = s.req.events.send(Event::PromptLogprobs(lps));
        }
        // A rule that requires a token (a spent reasoning budget) decides before the
        // model does, and before the test hook that stands in for the model.
        let required = s.req.constraints.iter_mut().find_map(|r| r.force());
        let token = match (required, &s.req.forced) {
            (Some(t), _) => t,
            (None, Some(forced)) => match forced.get(s.generated()) {
                Some(&t) => t,
                // Forced text exhausted: end as the model's end marker would.
                None => return Some((FinishReason::Stop, None)),
            },
            (None, None) => {
                let sampler = &mut s.sampler;
                constraint::next_token(&mut s.req.constraints, logits, |l| sampler.sample(l))
            }
        };
        s.sampler.observe(token);
        for rule in &mut s.req.constraints {
            rule.observe(token);
        }
        s.tokens.push(token);
        let logprob = s
            .sampler
            .config()
            .logprobs
            .map(|top| sampling::logprobs(logits, token, top));
        let is_stop_token = s.req.stop_token_ids.contains(&token)
            || (!s.req.ignore_eos && self.tokenizer.stop_ids().contains(&token));
        if is_stop_token {
            let _ = s.req.events.send(Event::Token {
                id: token,
                text: String::new(),
                logprob,
            });
            return Some((FinishReason::Stop, Some(StopReason::Token(token))));
        }
        let (text, stop) = s.output.push(&self.tokenizer, token);
        let _ = s.req.events.send(Event::Token {
            id: token,
            text,
            logprob,
        });
        if let Some(stop) = stop {
            return Some((FinishReason::Stop, Some(StopReason::Text(stop))));
        }
        if s.generated() >= s.req.max_tokens {
            return Some((FinishReason::Length, None));
        }
        if s.tokens.len() >= self.config.max_model_len {
            return Some((FinishReason::ContextFull, None));
        }
        None
    }

    fn finish(&mut self, seq: &mut Seq, reason: FinishReason, stop: Option<StopReason>) {
        // Text held back for a stop string that never came, or an unfinished character.
        let tail = if matches!(stop, Some(StopReason::Text(_))) {
            String::new()
        } else {
            seq.output.finish()
        };
        self.pool.release(&seq.table);
        seq.table.clear();
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        let _ = seq.req.events.send(Event::Finished {
            tail,
            reason,
            stop,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated(),
            cached_tokens: seq.cached_tokens,
        });
    }

    fn publish(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::SeqCst);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::SeqCst);
        self.stats
            .kv_blocks_used
            .store(self.pool.used(), Ordering::SeqCst);
    }
}

/// Log-probabilities of prompt tokens `start + 1..` from the logits of positions
/// `start..start + count` (the first prompt token has none).
fn collect_prompt_logprobs(s: &mut Seq, start: usize, count: usize, rows: &[f32], vocab: usize) {
    if start == 0 {
        s.prompt_logprobs.push(None);
    }
    let top = s.req.prompt_logprobs.unwrap_or(0);
    for j in 0..count {
        let next = start + j + 1;
        if next >= s.prompt_len {
            break;
        }
        let row = &rows[j * vocab..(j + 1) * vocab];
        s.prompt_logprobs
            .push(Some(sampling::logprobs(row, s.tokens[next], top)));
    }
}
