//! The engine: one thread that owns the model, the forward pass and the paged KV cache, fed
//! by a channel. Every step runs all running sequences together through one batched
//! forward pass (decode tokens plus chunks of prompts being prefilled), samples each
//! sequence that reached the end of its input, and streams the results back over each
//! request's own channel. A request whose receiver is gone is dropped within one step.

pub mod constraint;
pub mod cost;
pub mod grammar;
pub mod kv;
pub mod output;
pub mod sampling;
mod scheduler;

use crate::forward::Forward;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use sampling::{SamplingConfig, TokenLogprob};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences that run together in one step.
    pub max_num_seqs: usize,
    /// Requests that may wait for a slot; more are refused (HTTP 429).
    pub max_waiting: usize,
    /// Prompt plus generated tokens per sequence.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// Tokens per step (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    pub prefix_caching: bool,
    pub kv_dtype: kv::KvDtype,
}

/// One generation request, already tokenized and validated.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    /// Tokens to generate at most (the context limit also stops it).
    pub max_tokens: usize,
    /// Strings that end the output; they are not part of it.
    pub stop: Vec<String>,
    /// Token ids that end the output besides the tokenizer's end markers.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the end-of-sequence markers.
    pub ignore_eos: bool,
    /// Leave special tokens out of the text (token ids are still reported).
    pub skip_special_tokens: bool,
    /// Report log-probabilities of the prompt tokens, with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Test hook: emit these tokens instead of sampling (the forward pass still runs),
    /// then end the sequence as the model's end marker would.
    pub forced: Option<Vec<u32>>,
    /// Rules on the output (a reasoning budget, a grammar), applied where it samples.
    pub constraints: Vec<Box<dyn constraint::OutputConstraint>>,
    /// Set while the client leaves too much of the stream unread: the sequence is not
    /// decoded (it keeps its KV blocks) until the client catches up.
    pub client_backed_up: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end marker, stop token or stop string.
    Stop,
    /// The request's `max_tokens`.
    Length,
    /// The context window before `max_tokens`: the model's length limit, or a KV cache
    /// with no room left for the sequence.
    ContextFull,
}

impl FinishReason {
    /// The OpenAI name (`finish_reason`), which does not tell the two length stops apart.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's log-probabilities (the first token has none).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A generated token and the text it completes (possibly empty).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end. `tail` is text held back until the end (the start of a stop string that
    /// never completed); it follows the last token's text.
    Finished {
        tail: String,
        reason: FinishReason,
        stop: Option<StopReason>,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    Error(String),
}

/// Live figures the server reads for `/metrics` and admission.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests accepted and not yet ended (queued in the channel, waiting or running).
    pub in_flight: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub steps: AtomicU64,
    pub prefix_cached_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Set once the KV cache is allocated and a forward step has run: `/health` says
    /// 503 until then. A start-up that fails leaves the reason in `startup_error`.
    pub ready: std::sync::atomic::AtomicBool,
    pub startup_error: std::sync::Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// What the server holds: a sender to the engine thread and shared read-only state.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<GenRequest>,
    pub stats: Arc<EngineStats>,
    pub config: Arc<EngineConfig>,
    pub tokenizer: Arc<Tokenizer>,
    pub model_config: Arc<crate::config::ModelConfig>,
}

impl EngineHandle {
    /// Queues a request, or refuses it when every sequence slot is taken and
    /// `max_waiting` requests already wait.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        let capacity = self.config.max_num_seqs + self.config.max_waiting;
        let before = self.stats.in_flight.fetch_add(1, Ordering::SeqCst);
        if before >= capacity {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(
                before.saturating_sub(self.config.max_num_seqs),
            ));
        }
        self.tx.send(req).map_err(|_| {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Requests accepted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::SeqCst)
    }
}

/// Starts the engine thread. It ends when every handle is dropped and no work is left.
pub fn start(
    model: Model,
    pass: Box<dyn Forward>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let config = Arc::new(config);
    let model_config = Arc::new(model.config.clone());
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        config: config.clone(),
        tokenizer: tokenizer.clone(),
        model_config,
    };
    std::thread::Builder::new()
        .name("kimi-engine".into())
        .spawn(move || scheduler::Scheduler::new(model, pass, tokenizer, config, stats).run(rx))?;
    Ok(handle)
}
