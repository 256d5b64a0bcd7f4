//! The `kimi-hybrid` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kimi_hybrid::generate::{generate, GenerateRequest, SamplingConfig};
use kimi_hybrid::model::Model;
use kimi_hybrid::tokenizer::chat_template::ChatTemplate;
use kimi_hybrid::tokenizer::{Specials, Tokenizer};
use kimi_hybrid::weights::Checkpoint;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "kimi-hybrid",
    version,
    about = "Kimi K2 / DeepSeek-V3 inference runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens from prompt token ids.
    Run(RunArgs),
    /// Encode text to token ids with a checkpoint's tokenizer.
    Tokenize {
        /// Checkpoint directory (default: the bundled demo checkpoint).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        /// Read the text from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Treat special-token text (e.g. `<|im_end|>`) as ordinary text.
        #[arg(long)]
        plain: bool,
        #[arg(long)]
        json: bool,
    },
    /// Decode token ids to text.
    Detokenize {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        ids: Vec<u32>,
    },
    /// Render a conversation with the checkpoint's chat template (printed exactly, no newline added).
    ChatTemplate {
        #[arg(long)]
        model: Option<PathBuf>,
        /// JSON file with the messages array.
        #[arg(long)]
        messages: PathBuf,
        /// JSON file with the tools array.
        #[arg(long)]
        tools: Option<PathBuf>,
        #[arg(long)]
        add_generation_prompt: bool,
        /// Extra template variables as a JSON object, e.g. '{"thinking": false}'.
        #[arg(long)]
        kwargs: Option<String>,
    },
    /// Plan where every tensor and routed expert lives on a hardware profile, with a speed estimate.
    Plan(PlanArgs),
    /// Run prompts through a model and record how often each (layer, expert) is routed to.
    Calibrate {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Text file: each non-empty line is one prompt.
        #[arg(long)]
        prompts: PathBuf,
        /// Where to write the statistics (JSON, read by `plan --stats`).
        #[arg(long)]
        out: PathBuf,
        /// Also generate this many tokens per prompt (greedy), counting their routing too.
        #[arg(long, default_value_t = 0)]
        generate: usize,
        /// Compute backend (see `run --backend`).
        #[arg(long, default_value = "cpu")]
        backend: String,
    },
    /// Benchmarks. `bench kernels`: the CPU expert kernels at Kimi K2 shapes against this
    /// machine's measured read bandwidth and instruction peak. `bench gpu`: MLA decode and
    /// the INT4 expert matmuls on GPU 0 against its copy bandwidth and cuBLAS BF16.
    /// `bench -p 512 -n 128 [-c N] [--profile P]` (no subject): prompt and generation
    /// tokens/s of the engine, like llama-bench.
    Bench(BenchArgs),
    /// Serve the OpenAI- and Anthropic-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// Describe a checkpoint: architecture, config, tensors, formats, anything unrecognised.
    Inspect {
        /// Checkpoint directory (default: the bundled demo checkpoint).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Read every tensor and report non-finite values and unusable scales, per
        /// tensor (exit status 1 when any is found).
        #[arg(long)]
        verify: bool,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// What to benchmark: `kernels` (CPU), `gpu` (CUDA kernels), or nothing for the engine
    /// benchmark.
    what: Option<String>,
    /// kernels: working set of distinct experts, GB (at least 2 so weights come from DRAM;
    /// default: a whole 384-expert K2 layer, 9.5 GB, where memory allows, else 2).
    #[arg(long)]
    working_set_gb: Option<f64>,
    /// kernels: interleaved rounds; each figure is its best round (on a shared or noisy
    /// machine more rounds find the quiet moments for the kernels and the references
    /// alike).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Checkpoint directory (default: the bundled demo checkpoint).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt tokens per request.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens per request.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Concurrent requests (comma-separated list runs each).
    #[arg(short = 'c', long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Compute backend (see `run --backend`; with --profile, the host's).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Engine benchmark: place the model for a hardware profile first (a GPU profile
    /// benchmarks the resident pass its plan lays out: hybrid, pipelined or all-GPU).
    #[arg(long)]
    profile: Option<String>,
    /// Run the GPU profile's or plan's layout on stand-in GPUs that compute with the host
    /// backend's kernels (no GPU opened): checks a plan's execution on any machine.
    #[arg(long)]
    simulate_gpus: bool,
    /// Run every GPU kernel launch by launch: no decode step recorded as a CUDA graph
    /// (by default each layer's attention block of a decode step is replayed as one).
    #[arg(long)]
    enforce_eager: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Checkpoint directory (default: the bundled demo checkpoint).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Hardware profile to plan for: a built-in name, a TOML path, or `auto`.
    #[arg(long, conflicts_with = "plan")]
    profile: Option<String>,
    /// A plan written by `kimi-hybrid plan --json`.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Run the GPU profile's or plan's layout on stand-in GPUs that compute with the host
    /// backend's kernels (no GPU opened): checks a plan's execution on any machine.
    #[arg(long)]
    simulate_gpus: bool,
    /// Run every GPU kernel launch by launch: no decode step recorded as a CUDA graph
    /// (by default each layer's attention block of a decode step is replayed as one).
    #[arg(long)]
    enforce_eager: bool,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model names clients may use; the first is the one responses report (default:
    /// the checkpoint directory's name).
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Let browsers on these origins call the API (`*` for any); off by default.
    #[arg(long, num_args = 1..)]
    cors_allow_origin: Vec<String>,
    /// Seconds a stream may sit unread before it is dropped; its generation pauses as
    /// soon as the client falls behind (its KV blocks stay held until then).
    #[arg(long, default_value_t = 60)]
    stream_stall_timeout: u64,
    /// Open connections served at once; further connections only get `/health` and
    /// 503 (load balancers and probes keep an answer).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers, and between the chunks of
    /// its body, before the connection is closed.
    #[arg(long, default_value_t = 30)]
    request_read_timeout: u64,
    /// Request log format on stderr: `text` or `json` (one object per line).
    /// RUST_LOG filters it (default: info).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Require this key (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    #[arg(long, env = "KIMI_HYBRID_API_KEY")]
    api_key: Option<String>,
    /// Prompt plus output tokens per request (default: what the model and KV cache allow).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sequences batched together.
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    /// Requests allowed to wait for a slot; more get HTTP 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// KV cache capacity in tokens (default: the plan's workload, else 4 GiB of latents).
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Tokens per engine step (decode tokens plus prompt chunks; the chunk placement plans
    /// reserve GPU memory for). Deep in a long context a step also stays within the work
    /// of this many tokens at 16K of context, so chunks shrink as attention grows.
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Turn off reuse of cached prompt prefixes.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Latent KV cache precision: auto (BF16, the model's precision), bf16 or f32.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Expert deferral: per token, add this many of its lowest-weighted host experts one
    /// layer later (overlaps host and device work; changes the numbers; 0 = off).
    #[arg(long, default_value_t = 0)]
    defer_host_experts: usize,
    /// Compute backend (see `run --backend`).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Largest request body accepted, MiB (larger get HTTP 413).
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Seconds running requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Test option: accept a `forced_output` request field that replaces sampling.
    #[arg(long, hide = true)]
    allow_forced_output: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// A built-in profile name, a path to a profile TOML file, or `auto`.
    #[arg(long)]
    profile: String,
    /// Plan for this checkpoint (exact tensor sizes); default: the bundled Kimi K2.6 INT4 config.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expert activation statistics from `kimi-hybrid calibrate`.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Tokens per sequence (default: the profile's workload).
    #[arg(long)]
    context: Option<u64>,
    /// Sequences at once (default: the profile's workload).
    #[arg(long)]
    concurrency: Option<u64>,
    /// Print the full plan as JSON (schema kimi-hybrid-plan/1).
    #[arg(long)]
    json: bool,
    /// List the expert ids on every tier.
    #[arg(long)]
    detail: bool,
    /// Print the equivalent vLLM or SGLang command (all-GPU plans).
    #[arg(long, value_parser = ["vllm", "sglang"])]
    emit: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Checkpoint directory (default: the bundled demo checkpoint).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', num_args = 1.., required_unless_present = "prompt", conflicts_with = "prompt")]
    prompt_ids: Vec<u32>,
    /// Prompt as text (tokenized with the checkpoint's tokenizer); the output is printed as text.
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap --prompt in the chat template as one user message, with the generation prompt.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Extra chat-template variables as a JSON object, e.g. '{"thinking": false}'.
    #[arg(long, requires = "chat")]
    chat_kwargs: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Write the prompt's logits ([prompt_len, vocab], F32, tensor `logits`) to a safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Print one JSON object with `generated_ids`.
    #[arg(long)]
    json: bool,
    /// Compute backend: cpu (fast kernels; int16 activations for INT4 weights, within
    /// rounding of the reference), cpu-f32 (f32 activations), cpu-int8 (int8 activations
    /// for INT4, BF16 for BF16 batches: fastest, approximate), reference (scalar); cpu*
    /// take :scalar, :avx2 or :avx512-vnni.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Place experts for a hardware profile (see `plan`); GPU profiles need a GPU.
    #[arg(long, conflicts_with = "plan")]
    profile: Option<String>,
    /// Place experts as a plan written by `kimi-hybrid plan --json` says.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Run the GPU profile's or plan's layout on stand-in GPUs that compute with the host
    /// backend's kernels (no GPU opened): checks a plan's execution on any machine.
    #[arg(long)]
    simulate_gpus: bool,
    /// Run every GPU kernel launch by launch: no decode step recorded as a CUDA graph
    /// (by default each layer's attention block of a decode step is replayed as one).
    #[arg(long)]
    enforce_eager: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Inspect {
            model,
            json,
            verify,
        } => inspect(model, json, verify),
        Command::Plan(args) => plan(args),
        Command::Bench(args) => bench(args),
        Command::Serve(args) => serve(*args),
        Command::Calibrate {
            model,
            prompts,
            out,
            generate,
            backend,
        } => calibrate(model, &prompts, &out, generate, &backend),
        Command::Tokenize {
            model,
            text,
            file,
            plain,
            json,
        } => tokenize(model, text, file, plain, json),
        Command::Detokenize { model, ids } => detokenize(model, &ids),
        Command::ChatTemplate {
            model,
            messages,
            tools,
            add_generation_prompt,
            kwargs,
        } => chat_template(
            model,
            &messages,
            tools.as_deref(),
            add_generation_prompt,
            kwargs.as_deref(),
        ),
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    match args.what.as_deref() {
        Some("kernels") => {
            if let Some(gb) = args.working_set_gb {
                if !(gb > 0.0 && gb < 1024.0) {
                    bail!("--working-set-gb must be between 0 and 1024");
                }
            }
            let opts = kimi_hybrid::bench::KernelBenchOptions {
                working_set_bytes: args.working_set_gb.map(|gb| (gb * 1e9) as usize),
                repeats: args.repeats,
            };
            print!("{}", kimi_hybrid::bench::kernels(&opts)?);
            Ok(())
        }
        Some("gpu") => {
            print!("{}", kernels_cuda::bench::run(args.repeats)?);
            Ok(())
        }
        Some(other) => {
            bail!("unknown benchmark {other:?}; available: kernels, gpu, or none for the engine")
        }
        None => {
            let dir = model_dir(args.model)?;
            let opts = kimi_hybrid::bench::EngineBenchOptions {
                model_dir: dir,
                prompt_tokens: args.n_prompt,
                gen_tokens: args.n_gen,
                concurrency: args.concurrency,
                backend: args.backend,
                profile: args.profile,
                simulate_gpus: args.simulate_gpus,
                enforce_eager: args.enforce_eager,
            };
            print!("{}", kimi_hybrid::bench::engine(&opts)?);
            Ok(())
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The request log: one line per request through `tracing`, on stderr.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn cors_origins(origins: &[String]) -> Result<kimi_hybrid::server::Cors> {
    use kimi_hybrid::server::Cors;
    if origins.is_empty() {
        return Ok(Cors::Off);
    }
    if origins.iter().any(|o| o == "*") {
        return Ok(Cors::AnyOrigin);
    }
    let parsed = origins
        .iter()
        .map(|o| {
            o.parse::<axum::http::HeaderValue>()
                .map_err(|_| anyhow::anyhow!("--cors-allow-origin {o:?} is not a valid origin"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Cors::Origins(parsed))
}

fn serve(args: ServeArgs) -> Result<()> {
    use kimi_hybrid::server::{self, launch};
    init_logging(args.log_format);
    let cors = cors_origins(&args.cors_allow_origin)?;
    let served_model_names = if args.served_model_name.is_empty() && args.model.is_none() {
        vec!["kimi-hybrid-demo".to_string()]
    } else {
        args.served_model_name
    };
    let opts = launch::LaunchOptions {
        model_dir: model_dir(args.model)?,
        profile: args.profile,
        plan: args.plan,
        backend: args.backend,
        served_model_names,
        api_key: args.api_key,
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_waiting: args.max_waiting,
        kv_cache_tokens: args.kv_cache_tokens,
        block_size: args.block_size,
        max_batch_tokens: args.max_batch_tokens,
        prefix_caching: !args.no_prefix_caching,
        kv_cache_dtype: args.kv_cache_dtype,
        defer_host_experts: args.defer_host_experts,
        allow_forced_output: args.allow_forced_output,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        simulate_gpus: args.simulate_gpus,
        enforce_eager: args.enforce_eager,
        stream_stall_timeout: std::time::Duration::from_secs(args.stream_stall_timeout.max(1)),
    };
    let state = launch::launch(&opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(server::serve(
        state,
        server::ServeOptions {
            host: args.host,
            port: args.port,
            body_limit: args.max_body_mib.saturating_mul(1 << 20),
            drain_timeout: std::time::Duration::from_secs(args.shutdown_timeout),
            cors,
            max_connections: args.max_connections.max(1),
            read_timeout: std::time::Duration::from_secs(args.request_read_timeout.max(1)),
        },
    ))?;
    Ok(())
}

fn model_dir(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir),
        None => kimi_hybrid::demo::demo_checkpoint_dir()
            .context("cannot write the bundled demo checkpoint to the cache directory"),
    }
}

fn open(dir: &Path) -> Result<Checkpoint> {
    Checkpoint::open(dir).with_context(|| format!("cannot load checkpoint {}", dir.display()))
}

fn run(args: RunArgs) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be 0 or more, got {}", args.temperature);
    }
    if args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let dir = model_dir(args.model)?;
    let ckpt = open(&dir)?;
    let mut model =
        Model::load(&ckpt).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let placement = kimi_hybrid::runtime::place(
        &ckpt,
        &mut model,
        args.profile.as_deref(),
        args.plan.as_deref(),
        args.simulate_gpus,
    )?
    .eager(args.enforce_eager);
    let tokenizer = match &args.prompt {
        Some(_) => Some(load_tokenizer(&dir)?),
        None => None,
    };
    let prompt_ids = match (&args.prompt, &tokenizer) {
        (Some(text), Some(tok)) => {
            if args.chat {
                // The message is user text: special-token strings in it stay text.
                let messages = serde_json::json!([{"role": "user", "content": text}]);
                let kwargs = parse_kwargs(args.chat_kwargs.as_deref())?;
                let template = ChatTemplate::for_checkpoint(
                    &dir,
                    tok.bos_token().map(str::to_string),
                    tok.eos_token().map(str::to_string),
                )?;
                tok.encode_rendered(&template.render_prompt(tok, &messages, None, true, &kwargs)?)
            } else {
                tok.encode(text, Specials::Recognise)
            }
        }
        _ => args.prompt_ids.clone(),
    };
    // The tokenizer gathers every end id (tokenizer_config, generation_config, config.json,
    // and `<|im_end|>`/`[EOS]` for Kimi), also when the prompt is given as ids; a checkpoint
    // without tokenizer files stops on the configs' ids only.
    let stop_tokenizer = match &tokenizer {
        Some(_) => None,
        None => Tokenizer::from_dir(&dir).ok(),
    };
    let mut stop_ids = match tokenizer.as_ref().or(stop_tokenizer.as_ref()) {
        Some(tok) => tok.stop_ids().to_vec(),
        None => stop_ids(&dir, &model),
    };
    if args.ignore_eos {
        stop_ids.clear();
    }
    let req = GenerateRequest {
        prompt: &prompt_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: Some(args.seed),
            ..SamplingConfig::default()
        },
        stop_ids: &stop_ids,
        keep_prompt_logits: args.logits_out.is_some(),
    };
    let pass = placement.forward(&model, &args.backend)?;
    let out = generate(&model, pass.as_ref(), &req)?;
    if let (Some(path), Some(logits)) = (&args.logits_out, &out.prompt_logits) {
        write_logits(path, logits, prompt_ids.len(), model.config.vocab_size)?;
    }
    let text = match &tokenizer {
        Some(tok) => Some(tok.decode(&out.generated_ids)?),
        None => None,
    };
    if args.json {
        let mut value = serde_json::json!({
            "generated_ids": out.generated_ids,
            "finish_reason": out.finish_reason.as_str(),
        });
        if let Some(text) = &text {
            value["prompt_ids"] = serde_json::json!(prompt_ids);
            value["text"] = serde_json::json!(text);
        }
        println!("{value}");
    } else if let Some(text) = text {
        println!("{text}");
    } else {
        let ids: Vec<String> = out.generated_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

/// End-of-sequence ids from config.json and generation_config.json.
fn stop_ids(dir: &Path, model: &Model) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    if let Ok(text) = kimi_hybrid::files::read_to_string(&dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Array(items)) => {
                    ids.extend(items.iter().filter_map(|i| i.as_u64()).map(|i| i as u32))
                }
                Some(x) => ids.extend(x.as_u64().map(|i| i as u32)),
                None => {}
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn write_logits(path: &Path, logits: &[f32], rows: usize, vocab: usize) -> Result<()> {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, vocab], &bytes)
            .context("building the logits tensor")?;
    safetensors::serialize_to_file([("logits", view)], None, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn inspect(model: Option<PathBuf>, json: bool, verify: bool) -> Result<()> {
    let dir = model_dir(model)?;
    let ckpt = open(&dir)?;
    if verify {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(ckpt.file_bytes() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let checked = kimi_hybrid::inspect::verify(&ckpt, &|done| bar.set_position(done));
        bar.finish_and_clear();
        if json {
            println!("{}", serde_json::to_string_pretty(&checked)?);
        } else {
            print!("{checked}");
        }
        if !checked.bad.is_empty() {
            bail!(
                "checkpoint {}: {} tensors hold non-finite values or unusable scales",
                dir.display(),
                checked.bad.len()
            );
        }
        return Ok(());
    }
    let report = kimi_hybrid::inspect::inspect(&ckpt);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if let Some(problem) = report.problem {
        bail!("checkpoint {} cannot be loaded: {problem}", dir.display());
    }
    Ok(())
}

fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::from_dir(dir)
        .with_context(|| format!("cannot load the tokenizer of {}", dir.display()))
}

fn parse_kwargs(text: Option<&str>) -> Result<serde_json::Map<String, serde_json::Value>> {
    match text {
        None => Ok(Default::default()),
        Some(t) => match serde_json::from_str(t) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => bail!("--kwargs must be a JSON object"),
            Err(e) => bail!("--kwargs is not valid JSON: {e}"),
        },
    }
}

fn read_json_file(path: &Path) -> Result<serde_json::Value> {
    let text = kimi_hybrid::files::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The checkpoint's chat template with its tokenizer's BOS/EOS text.
fn render_chat(
    dir: &Path,
    tok: &Tokenizer,
    messages: &serde_json::Value,
    tools: Option<&serde_json::Value>,
    add_generation_prompt: bool,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let template = ChatTemplate::for_checkpoint(
        dir,
        tok.bos_token().map(str::to_string),
        tok.eos_token().map(str::to_string),
    )?;
    Ok(template.render(messages, tools, add_generation_prompt, kwargs)?)
}

fn tokenize(
    model: Option<PathBuf>,
    text: Option<String>,
    file: Option<PathBuf>,
    plain: bool,
    json: bool,
) -> Result<()> {
    let dir = model_dir(model)?;
    let tok = load_tokenizer(&dir)?;
    let text = match (text, file) {
        (Some(t), _) => t,
        (None, Some(f)) => kimi_hybrid::files::read_to_string(&f)
            .with_context(|| format!("cannot read {}", f.display()))?,
        (None, None) => bail!("give --text or --file"),
    };
    let ids = tok.encode(
        &text,
        if plain {
            Specials::AsText
        } else {
            Specials::Recognise
        },
    );
    if json {
        println!("{}", serde_json::json!({ "ids": ids, "count": ids.len() }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        );
    }
    Ok(())
}

fn detokenize(model: Option<PathBuf>, ids: &[u32]) -> Result<()> {
    let dir = model_dir(model)?;
    let tok = load_tokenizer(&dir)?;
    print!("{}", tok.decode(ids)?);
    Ok(())
}

fn chat_template(
    model: Option<PathBuf>,
    messages: &Path,
    tools: Option<&Path>,
    add_generation_prompt: bool,
    kwargs: Option<&str>,
) -> Result<()> {
    let dir = model_dir(model)?;
    let tok = load_tokenizer(&dir)?;
    let messages = read_json_file(messages)?;
    let tools = tools.map(read_json_file).transpose()?;
    let kwargs = parse_kwargs(kwargs)?;
    let text = render_chat(
        &dir,
        &tok,
        &messages,
        tools.as_ref(),
        add_generation_prompt,
        &kwargs,
    )?;
    print!("{text}");
    Ok(())
}

fn plan(args: PlanArgs) -> Result<()> {
    use kimi_hybrid::placement::{self, ExpertStats, ModelDesc, Profile};
    let profile = Profile::resolve(&args.profile)?;
    let (desc, model_path) = match &args.model {
        Some(dir) => (
            ModelDesc::from_checkpoint(&open(dir)?),
            dir.display().to_string(),
        ),
        None => (
            ModelDesc::from_config(
                &kimi_hybrid::config::ModelConfig::kimi_k26(),
                "Kimi K2.6 (bundled config, INT4)",
            ),
            "moonshotai/Kimi-K2.6".to_string(),
        ),
    };
    let stats = match &args.stats {
        Some(path) => {
            let s = ExpertStats::load(path)?;
            s.validate(&desc, &path.display().to_string())?;
            Some(s)
        }
        None => None,
    };
    let mut workload = profile.workload.clone();
    if let Some(c) = args.context {
        workload.context = c;
    }
    if let Some(c) = args.concurrency {
        workload.concurrency = c;
    }
    if let Err((field, reason)) = workload.check() {
        bail!("--{field}: {reason}");
    }
    let plan = placement::plan(&desc, &profile, &workload, stats.as_ref());
    if let Some(engine) = &args.emit {
        println!("{}", placement::report::emit(&plan, engine, &model_path)?);
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", placement::report::render(&plan, args.detail));
    }
    Ok(())
}

fn calibrate(
    model: Option<PathBuf>,
    prompts: &Path,
    out: &Path,
    generate_tokens: usize,
    backend: &str,
) -> Result<()> {
    use kimi_hybrid::model::{AttentionForm, KvCache, Logits};
    use kimi_hybrid::placement::ExpertStats;
    let dir = model_dir(model)?;
    let ckpt = open(&dir)?;
    let mut model =
        Model::load(&ckpt).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let pass = kimi_hybrid::runtime::place(&ckpt, &mut model, None, None, false)?
        .forward(&model, backend)?;
    let tok = load_tokenizer(&dir)?;
    let text = kimi_hybrid::files::read_to_string(prompts)
        .with_context(|| format!("cannot read {}", prompts.display()))?;
    let experts = model.config.n_routed_experts;
    let mut stats = ExpertStats::new(&dir.display().to_string(), model.config.num_experts_per_tok);
    let mut observed = 0usize;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let ids = tok.encode(line, Specials::AsText);
        if ids.is_empty() {
            continue;
        }
        let mut cache = KvCache::new(&model.config);
        let mut record = |layer: usize, routes: &[(usize, f32)]| {
            for &(e, _) in routes {
                stats.record(layer, e, experts);
            }
        };
        let mut logits = pass
            .forward_observed(
                &model,
                &ids,
                &mut cache,
                AttentionForm::Auto,
                Logits::Last,
                &mut record,
            )
            .with_context(|| format!("{} line {}", prompts.display(), n + 1))?;
        observed += ids.len();
        for _ in 0..generate_tokens {
            let next = kimi_hybrid::engine::sampling::argmax(&logits);
            logits = pass.forward_observed(
                &model,
                &[next],
                &mut cache,
                AttentionForm::Auto,
                Logits::Last,
                &mut record,
            )?;
            observed += 1;
        }
    }
    if observed == 0 {
        bail!("{} holds no prompt", prompts.display());
    }
    stats.tokens = observed as u64;
    std::fs::write(out, serde_json::to_string_pretty(&stats)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("recorded routing of {observed} tokens to {}", out.display());
    Ok(())
}
