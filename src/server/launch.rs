//! Starting `serve`: load the checkpoint, check the hardware profile or plan against this
//! machine, warm the mapped weights with a progress bar, size the KV cache, and start
//! the engine thread.

use super::metrics::Metrics;
use super::{AppState, Shared};
use crate::accel::cuda::{
    data_parallel_on_gpus, hybrid_on_gpu, pipeline_on_gpus, resident_on_gpu,
    tensor_parallel_on_gpus,
};
use crate::backend::{Backend, CudaBackend};
use crate::engine::kv::KvDtype;
use crate::engine::{self, EngineConfig};
use crate::model::Model;
use crate::placement::{self, ModelDesc, Plan, Profile};
use crate::resident::Forward;
use crate::tokenizer::chat_template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
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
    pub served_model_name: Option<String>,
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
    /// Run a GPU plan on stand-in GPUs computing on the host (see [`Gpus::Simulated`]).
    pub simulate_gpus: bool,
    /// Launch every GPU kernel one by one: no decode steps recorded as CUDA graphs.
    pub enforce_eager: bool,
}

/// Opens the GPUs a layout needs (none for CPU-only layouts). A machine without them is
/// refused with what to do instead.
fn open_gpus_for(what: &str, gpus: usize) -> Result<Vec<Arc<CudaBackend>>> {
    (0..gpus)
        .map(|g| {
            CudaBackend::open(g).map(Arc::new).map_err(|e| {
                anyhow::anyhow!(
                    "{what} places weights on {gpus} GPU(s), which cannot be used here \
                     (GPU {g}: {e}). Use --profile cpu-only (or --profile auto, which plans \
                     for this machine) instead, or add --simulate-gpus to run the plan on \
                     stand-in GPUs that compute on the host."
                )
            })
        })
        .collect()
}

/// The GPUs a placement runs on.
pub enum Gpus {
    Cuda(Vec<Arc<CudaBackend>>),
    /// Stand-ins computing with the host's CPU kernels (`--simulate-gpus`): the plan's
    /// schedule, block layout and hand-offs run exactly as on GPUs, slowly.
    Simulated(usize),
}

impl Gpus {
    fn count(&self) -> usize {
        match self {
            Gpus::Cuda(g) => g.len(),
            Gpus::Simulated(n) => *n,
        }
    }
}

/// How a plan runs on its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GpuLayout {
    /// All-GPU on one GPU.
    Whole,
    /// All-GPU, data-parallel attention, experts on their GPUs.
    DataParallel,
    /// All-GPU, tensor-parallel attention, experts on their GPUs.
    TensorParallel,
    /// Hybrid on one GPU.
    Hybrid,
    /// Hybrid over several GPUs, each with a range of layers.
    Pipeline,
}

impl GpuLayout {
    fn of(plan: &Plan, gpus: usize) -> Self {
        use crate::placement::{profile::AttentionParallel, PlanLayout};
        let data_parallel = plan.workload.attention == Some(AttentionParallel::Dp);
        match (plan.layout, gpus) {
            (PlanLayout::AllGpu, 1) => GpuLayout::Whole,
            (PlanLayout::AllGpu, _) if data_parallel => GpuLayout::DataParallel,
            (PlanLayout::AllGpu, _) => GpuLayout::TensorParallel,
            (_, 1) => GpuLayout::Hybrid,
            _ => GpuLayout::Pipeline,
        }
    }
}

/// Where the model runs: the plan (if any) and the GPUs it uses.
pub struct Placement {
    pub plan: Option<Plan>,
    pub gpus: Gpus,
    /// No CUDA graphs: every kernel launched one by one (`--enforce-eager`).
    pub enforce_eager: bool,
}

impl Placement {
    /// This placement, with CUDA graphs turned off when `enforce_eager`.
    pub fn eager(mut self, enforce_eager: bool) -> Self {
        self.enforce_eager = enforce_eager;
        if let Gpus::Cuda(gpus) = &self.gpus {
            for g in gpus {
                g.set_recording(!enforce_eager);
            }
        }
        self
    }

    /// The forward pass to run, on the CPU or resident on the GPUs: an all-GPU plan
    /// on one GPU runs there whole; over several, with data-parallel attention, each GPU
    /// runs its own sequences and the experts the plan gave it, with tensor-parallel
    /// attention each GPU computes its heads for every sequence; a hybrid plan runs its layers on its
    /// GPU(s), pipelined when there are several, with `host` computing the experts left
    /// in host RAM. Without a plan or GPUs, the CPU alone with `host`'s kernels.
    pub fn forward(&self, model: &Model, host: &str) -> Result<Box<dyn Forward>> {
        let name = host;
        let plan = self.plan.as_ref().filter(|_| self.gpus.count() > 0);
        if plan.is_none() {
            // `--backend cuda[:N]`: every weight (and the absorbed attention's f32 kv_b
            // copies) goes up now, so a GPU too small refuses at start, not mid-request.
            if let Some(ordinal) = crate::backend::cuda_ordinal(name).map_err(anyhow::Error::msg)? {
                let gpu = CudaBackend::open(ordinal).map_err(|e| {
                    anyhow::anyhow!("backend {name} cannot run here ({e}); use --backend cpu")
                })?;
                gpu.set_recording(!self.enforce_eager);
                return resident_on_gpu(model, Arc::new(gpu))
                    .map(|b| Box::new(b) as Box<dyn Forward>)
                    .map_err(|e| {
                        e.context(format!(
                            "--backend {name} needs the whole model on the GPU; use a hybrid \
                             --profile (e.g. 1xH100+512GB) or --backend cpu"
                        ))
                    });
            }
        }
        let host: Arc<dyn Backend> =
            Arc::from(crate::backend::by_name(name).map_err(anyhow::Error::msg)?);
        let Some(plan) = plan else {
            return Ok(Box::new(crate::resident::on_cpu(host)));
        };
        let layout = GpuLayout::of(plan, self.gpus.count());
        let gpus = match &self.gpus {
            Gpus::Cuda(gpus) => gpus.clone(),
            Gpus::Simulated(n) => return simulated(model, plan, layout, *n, host),
        };
        Ok(match layout {
            GpuLayout::Whole => Box::new(resident_on_gpu(model, gpus[0].clone())?),
            GpuLayout::DataParallel => Box::new(data_parallel_on_gpus(model, gpus)?),
            GpuLayout::TensorParallel => Box::new(tensor_parallel_on_gpus(model, gpus)?),
            GpuLayout::Hybrid => Box::new(hybrid_on_gpu(model, plan, gpus[0].clone(), host)?),
            GpuLayout::Pipeline => Box::new(pipeline_on_gpus(model, plan, gpus, host)?),
        })
    }
}

/// The plan's layout on `n` stand-in GPUs that compute with `host`'s kernels.
fn simulated(
    model: &Model,
    plan: &Plan,
    layout: GpuLayout,
    n: usize,
    host: Arc<dyn Backend>,
) -> Result<Box<dyn Forward>> {
    use crate::accel::sim::SimDevice;
    use crate::resident::twin::TwinOps;
    use crate::resident::{layer_devices, HeadSplit, Resident, VocabSplit};
    tracing_line(&format!(
        "simulating the plan's {n} GPU(s) ({layout:?} layout) with the {} backend",
        host.name()
    ));
    let twins: Vec<Arc<TwinOps>> = (0..n)
        .map(|_| Arc::new(TwinOps::new(host.clone())))
        .collect();
    let budget = plan.gpus.first().map_or(u64::MAX, |g| g.budget_bytes);
    let handoff = || -> Result<Arc<dyn crate::accel::Accelerator>> {
        Ok(Arc::new(SimDevice::new("simulated-gpu", budget)?))
    };
    let whole = match layout {
        GpuLayout::Whole => Resident::new(twins[0].clone(), None, None),
        GpuLayout::DataParallel => {
            Resident::on_devices(twins).with_vocab_split(VocabSplit::new(&model.lm_head, n)?)
        }
        GpuLayout::TensorParallel => Resident::tensor_parallel(twins, HeadSplit::new(model, n)?),
        GpuLayout::Hybrid => Resident::new(twins[0].clone(), Some(host.clone()), Some(handoff()?)),
        GpuLayout::Pipeline => Resident::pipeline(
            twins,
            layer_devices(plan, model.layers.len()),
            Some(host.clone()),
            Some(handoff()?),
        ),
    };
    Ok(Box::new(whole))
}

fn read_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read plan {}", path.display()))?;
    let plan: Plan = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a plan written by `kimi-hybrid plan --json`",
            path.display()
        )
    })?;
    if plan.schema != "kimi-hybrid-plan/1" {
        bail!(
            "{}: plan schema {:?} is not kimi-hybrid-plan/1",
            path.display(),
            plan.schema
        );
    }
    Ok(plan)
}

/// Places the model as a plan says: the plan file, or one made now for the profile
/// (`None` when neither is given). A plan that puts weights on GPUs, or cannot run, is
/// refused with what to do instead.
///
/// With `simulate_gpus` the plan's GPUs are stand-ins computing on the host (see
/// [`Gpus::Simulated`]) and no GPU is opened.
pub fn place(
    ckpt: &Checkpoint,
    model: &mut Model,
    profile: Option<&str>,
    plan_file: Option<&Path>,
    simulate_gpus: bool,
) -> Result<Placement> {
    let gpus = |what: String, n: usize| -> Result<Gpus> {
        if simulate_gpus {
            Ok(Gpus::Simulated(n))
        } else {
            open_gpus_for(&what, n).map(Gpus::Cuda)
        }
    };
    let (plan, gpus) = match (plan_file, profile) {
        (Some(path), _) => {
            let plan = read_plan(path)?;
            let gpus = gpus(format!("plan for {}", plan.profile), plan.gpus.len())?;
            (plan, gpus)
        }
        (None, Some(name)) => {
            let profile = Profile::resolve(name)?;
            let gpus = gpus(format!("profile {}", profile.name), profile.gpu.count)?;
            let desc = ModelDesc::from_checkpoint(ckpt);
            (
                placement::plan(&desc, &profile, &profile.workload, None),
                gpus,
            )
        }
        (None, None) => {
            return Ok(Placement {
                plan: None,
                gpus: Gpus::Cuda(Vec::new()),
                enforce_eager: false,
            })
        }
    };
    if !plan.feasible {
        bail!(
            "the plan for {} cannot run: {}",
            plan.profile,
            plan.problems.join("; ")
        );
    }
    let (on_gpu, on_nodes) = model.apply_plan(&plan);
    tracing_line(&format!(
        "placement: {on_gpu} routed experts on the GPU, {on_nodes} assigned to NUMA nodes by the plan for {}",
        plan.profile
    ));
    Ok(Placement {
        plan: Some(plan),
        gpus,
        enforce_eager: false,
    })
}

/// Loads everything and starts the engine; returns the state the routes share.
pub fn launch(opts: &LaunchOptions) -> Result<Shared> {
    let dir = &opts.model_dir;
    let ckpt = Checkpoint::open(dir)
        .with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(dir)
        .with_context(|| format!("cannot load the tokenizer of {}", dir.display()))?;
    let template = ChatTemplate::for_checkpoint(
        dir,
        tokenizer.bos_token().map(str::to_string),
        tokenizer.eos_token().map(str::to_string),
    )?;
    let mut model =
        Model::load(&ckpt).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;

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
    let kv_dtype = KvDtype::from_name(&opts.kv_cache_dtype).with_context(|| {
        format!(
            "--kv-cache-dtype {:?} is not one of auto, bf16, f32",
            opts.kv_cache_dtype
        )
    })?;
    let bytes_per_token = cfg.latent_cache_width() * cfg.num_hidden_layers * kv_dtype.bytes();
    let kv_tokens = match (opts.kv_cache_tokens, &plan) {
        (Some(t), _) => t,
        (None, Some(p)) => (p.workload.context * p.workload.concurrency) as usize,
        (None, None) => DEFAULT_KV_BYTES / bytes_per_token.max(1),
    };
    let max_model_len = opts
        .max_model_len
        .unwrap_or_else(|| cfg.max_position_embeddings.min(kv_tokens));
    if max_model_len < 2 {
        bail!("--max-model-len must be at least 2");
    }
    if max_model_len > cfg.max_position_embeddings {
        bail!(
            "--max-model-len {max_model_len} exceeds the model's max_position_embeddings {}",
            cfg.max_position_embeddings
        );
    }
    if kv_tokens < max_model_len {
        bail!(
            "the KV cache holds {kv_tokens} tokens, fewer than --max-model-len {max_model_len}; raise --kv-cache-tokens or lower --max-model-len"
        );
    }
    if opts.max_num_seqs == 0 || opts.block_size == 0 || opts.max_batch_tokens == 0 {
        bail!("--max-num-seqs, --block-size and --max-batch-tokens must be at least 1");
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
    let served_model_name = opts.served_model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kimi".into())
    });
    let handle = engine::start(model, pass, Arc::new(tokenizer), config)
        .context("cannot start the engine thread")?;
    Ok(Arc::new(AppState {
        engine: handle,
        template,
        served_model_name,
        api_key: opts.api_key.clone(),
        metrics: Metrics::default(),
        shutting_down: AtomicBool::new(false),
        allow_forced_output: opts.allow_forced_output,
        created: super::now_secs(),
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
