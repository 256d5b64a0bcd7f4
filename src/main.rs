//! The `kimi-hybrid` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kimi_hybrid::backend::ReferenceBackend;
use kimi_hybrid::generate::{generate, GenerateRequest, SamplingParams};
use kimi_hybrid::model::Model;
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
    /// Describe a checkpoint: architecture, config, tensors, formats, anything unrecognised.
    Inspect {
        /// Checkpoint directory (default: the bundled demo checkpoint).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Checkpoint directory (default: the bundled demo checkpoint).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    prompt_ids: Vec<u32>,
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Inspect { model, json } => inspect(model, json),
    }
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
    let model =
        Model::load(&ckpt).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        stop_ids(&dir, &model)
    };
    let req = GenerateRequest {
        prompt: &args.prompt_ids,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop_ids: &stop_ids,
        keep_prompt_logits: args.logits_out.is_some(),
    };
    let out = generate(&model, &ReferenceBackend, &req)?;
    if let (Some(path), Some(logits)) = (&args.logits_out, &out.prompt_logits) {
        write_logits(path, logits, args.prompt_ids.len(), model.config.vocab_size)?;
    }
    if args.json {
        let value = serde_json::json!({
            "generated_ids": out.generated_ids,
            "finish_reason": format!("{:?}", out.finish_reason).to_lowercase(),
        });
        println!("{value}");
    } else {
        let ids: Vec<String> = out.generated_ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

/// End-of-sequence ids from config.json and generation_config.json.
fn stop_ids(dir: &Path, model: &Model) -> Vec<u32> {
    let mut ids = model.config.eos_token_ids.clone();
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
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

fn inspect(model: Option<PathBuf>, json: bool) -> Result<()> {
    let dir = model_dir(model)?;
    let ckpt = open(&dir)?;
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
