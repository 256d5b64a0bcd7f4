//! Starting `serve`: load the checkpoint, check the hardware profile or plan against this
//! machine, warm the mapped weights with a progress bar, size the KV cache, and start
//! the engine thread.

use super::metrics::Metrics;
use super::{AppState, Shared};
use crate::engine::kv::KvDtype;
use crate::engine::{self, EngineConfig};
use crate::model::Model;
use crate::runtime::place;
use crate::runtime::RuntimeError;
use crate::tokenizer::chat_template::ChatTemplate;
use crate::tokenizer::chat_template::TemplateError;
use crate::tokenizer::Tokenizer;
use crate::tokenizer::TokenizerError;
use crate::weights::Checkpoint;
use crate::weights::WeightsError;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Default KV cache when neither a flag nor a plan sizes it.
const DEFAULT_KV_BYTES: usize = 4 << 30;

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub model_dir: PathBuf,
    pub profile: Option<String>,
    pub plan: Option<PathBuf>,
    pub backend: String,
    /// Names clients may use for the model; the first is reported (empty: the
    /// checkpoint directory's name).
    pub served_model_names: Vec<String>,
    pub api_key: Option<String>,
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
    pub kv_cache_tokens: Option<usize>,
    pub block_size: usize,
    pub max_batch_tokens: usize,
    pub prefix_caching: bool,
    /// `auto` (BF16, the model's precision), `bf16` or `f32`.
    pub kv_cache_dtype: String,
    /// Expert deferral (see `Model::defer_host_experts`; 0 = off).
    pub defer_host_experts: usize,
    pub allow_forced_output: bool,
    /// Show a progress bar while warming the weights.
    pub progress: bool,
    /// Run a GPU plan on stand-in GPUs computing on the host (see [`crate::runtime::Gpus::Simulated`]).
    pub simulate_gpus: bool,
    /// Launch every GPU kernel one by one: no decode steps recorded as CUDA graphs.
    pub enforce_eager: bool,
    /// How long a stream may sit unread before it is dropped (its generation pauses
    /// as soon as it falls behind).
    pub stream_stall_timeout: std::time::Duration,
}

/// Why `serve` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot load checkpoint {dir}: {cause}")]
    Checkpoint {
        dir: PathBuf,
        cause: Box<WeightsError>,
    },
    #[error("cannot load checkpoint {dir}: {cause}")]
    Model {
        dir: PathBuf,
        cause: Box<crate::model::ModelError>,
    },
    #[error("cannot load the tokenizer of {dir}: {cause}")]
    Tokenizer { dir: PathBuf, cause: TokenizerError },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("--kv-cache-dtype {0:?} is not one of auto, bf16, f32")]
    KvDtype(String),
    /// Flags that contradict each other or the model.
    #[error("{0}")]
    Flags(String),
    #[error("cannot start the engine thread: {0}")]
    Engine(std::io::Error),
}

type Result<T, E = LaunchError> = std::result::Result<T, E>;

/// Loads everything and starts the engine; returns the state the routes share.
pub fn launch(opts: &LaunchOptions) -> Result<Shared> {
    let dir = &opts.model_dir;
    let ckpt = Checkpoint::open(dir).map_err(|cause| LaunchError::Checkpoint {
        dir: dir.clone(),
        cause: Box::new(cause),
    })?;
    let tokenizer = Tokenizer::from_dir(dir).map_err(|cause| LaunchError::Tokenizer {
        dir: dir.clone(),
        cause,
    })?;
    let template = ChatTemplate::for_checkpoint(
        dir,
        tokenizer.bos_token().map(str::to_string),
        tokenizer.eos_token().map(str::to_string),
    )?;
    if template.source_name().starts_with("built-in") {
        tracing::warn!(
            checkpoint = %dir.display(),
            "the checkpoint ships no chat template (chat_template.jinja or tokenizer_config.json); \
             using the built-in K2.6 template"
        );
    }
    let mut model = Model::load(&ckpt).map_err(|cause| LaunchError::Model {
        dir: dir.clone(),
        cause: Box::new(cause),
    })?;

    let placement = place(
        &ckpt,
        &mut model,
        opts.profile.as_deref(),
        opts.plan.as_deref(),
        opts.simulate_gpus,
    )?
    .eager(opts.enforce_eager);
    let plan = placement.plan.clone();

    model.defer_host_experts = opts.defer_host_experts;
    warm(&ckpt, opts.progress);

    let cfg = model.config.clone();
    let kv_dtype = KvDtype::from_name(&opts.kv_cache_dtype)
        .ok_or_else(|| LaunchError::KvDtype(opts.kv_cache_dtype.clone()))?;
    let bytes_per_token = cfg.latent_cache_width() * cfg.num_hidden_layers * kv_dtype.bytes();
    let kv_tokens = match (opts.kv_cache_tokens, &plan) {
        (Some(t), _) => t,
        (None, Some(p)) => (p.workload.context * p.workload.concurrency) as usize,
        // Without a plan: what the configured sequences can use at full length, at
        // most DEFAULT_KV_BYTES (a small model gets a small cache).
        (None, None) => {
            let full_length = opts.max_model_len.unwrap_or(cfg.max_position_embeddings);
            (DEFAULT_KV_BYTES / bytes_per_token.max(1))
                .min(full_length.saturating_mul(opts.max_num_seqs.max(1)))
        }
    };
    let max_model_len = opts
        .max_model_len
        .unwrap_or_else(|| cfg.max_position_embeddings.min(kv_tokens));
    if max_model_len < 2 {
        return Err(LaunchError::Flags(
            "--max-model-len must be at least 2".into(),
        ));
    }
    if max_model_len > cfg.max_position_embeddings {
        return Err(LaunchError::Flags(format!(
            "--max-model-len {max_model_len} exceeds the model's max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    if kv_tokens < max_model_len {
        return Err(LaunchError::Flags(format!(
            "the KV cache holds {kv_tokens} tokens, fewer than --max-model-len {max_model_len}; raise --kv-cache-tokens or lower --max-model-len"
        )));
    }
    if opts.max_num_seqs == 0 || opts.block_size == 0 || opts.max_batch_tokens == 0 {
        return Err(LaunchError::Flags(
            "--max-num-seqs, --block-size and --max-batch-tokens must be at least 1".into(),
        ));
    }
    let config = EngineConfig {
        max_num_seqs: opts.max_num_seqs,
        max_waiting: opts.max_waiting,
        max_model_len,
        block_size: opts.block_size,
        kv_blocks: kv_tokens.div_ceil(opts.block_size),
        max_batch_tokens: opts.max_batch_tokens,
        prefix_caching: opts.prefix_caching,
        kv_dtype,
    };
    tracing_line(&format!(
        "KV cache: {} blocks of {} tokens ({} tokens, {:.2} GiB of {:?} latents); max model length {}",
        config.kv_blocks,
        config.block_size,
        config.kv_blocks * config.block_size,
        (config.kv_blocks * config.block_size * bytes_per_token) as f64 / (1u64 << 30) as f64,
        kv_dtype,
        max_model_len
    ));
    let pass = placement.forward(&model, &opts.backend)?;
    let model_names = if opts.served_model_names.is_empty() {
        vec![dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kimi".into())]
    } else {
        opts.served_model_names.clone()
    };
    let served_model_name = model_names[0].clone();
    let handle =
        engine::start(model, pass, Arc::new(tokenizer), config).map_err(LaunchError::Engine)?;
    Ok(Arc::new(AppState {
        engine: handle,
        template,
        served_model_name,
        model_names,
        api_key: opts.api_key.clone(),
        metrics: Metrics::default(),
        shutting_down: AtomicBool::new(false),
        allow_forced_output: opts.allow_forced_output,
        created: super::now_secs(),
        responses: Default::default(),
        grammar: Default::default(),
        stream_stall_timeout: opts.stream_stall_timeout,
    }))
}

fn tracing_line(s: &str) {
    eprintln!("{s}");
}

fn warm(ckpt: &Checkpoint, progress: bool) {
    let total = ckpt.file_bytes() as u64;
    let bar = if progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "warming weights {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    ckpt.warm(|done| bar.set_position(done));
    bar.finish_and_clear();
}
