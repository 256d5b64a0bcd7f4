//! From a plan to a running layout, for `serve`, `run`, `bench` and `calibrate` alike:
//! [`place`] reads or makes the plan, applies it to the model and opens its GPUs (real,
//! or stand-ins computing on the host with `--simulate-gpus`); [`Placement::forward`]
//! builds the forward pass its layout runs. [`assemble`] is the one place a layout's
//! pass is put together from its devices; on real GPUs [`cuda`] first uploads and checks
//! what the plan puts on each.

pub mod budget;
pub mod cuda;

use crate::device::cpu::kernels::CpuKernels;
use crate::device::cpu::CpuDevice;
use crate::device::cuda::CudaBackend;
use crate::device::DeviceOps;
use crate::forward::handoff::HandoffCounter;
use crate::forward::{layer_devices, Forward, HeadSplit, Pass, VocabSplit};
use crate::model::Model;
use crate::placement::{self, ModelDesc, Plan, Profile};
use crate::weights::Checkpoint;
use kernels_cuda::CudaError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a plan cannot be made into a running layout.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "{what} places weights on {gpus} GPU(s), which cannot be used here (GPU {gpu}: \
         {cause}). Use --profile cpu-only (or --profile auto, which plans for this machine) \
         instead, or add --simulate-gpus to run the plan on stand-in GPUs that compute on the \
         host."
    )]
    GpusMissing {
        what: String,
        gpus: usize,
        gpu: usize,
        cause: CudaError,
    },
    #[error("backend {name} cannot run here ({cause}); use --backend cpu")]
    BackendCannotRun { name: String, cause: CudaError },
    #[error(
        "--backend {name} needs the whole model on the GPU ({cause}); use a hybrid --profile \
         (e.g. 1xH100+512GB) or --backend cpu"
    )]
    ModelDoesNotFit {
        name: String,
        cause: Box<RuntimeError>,
    },
    #[error(transparent)]
    CpuKernels(#[from] crate::device::cpu::kernels::BackendError),
    #[error(transparent)]
    Profile(#[from] crate::placement::profile::ProfileError),
    #[error("cannot read plan {path}: {cause}")]
    ReadPlan {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a plan written by `kimi-hybrid plan --json`: {cause}")]
    ParsePlan {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: plan schema {schema:?} is not kimi-hybrid-plan/1")]
    PlanSchema { path: PathBuf, schema: String },
    #[error("{path}: {what} does not fit this model: {reason}")]
    PlanExperts {
        path: PathBuf,
        what: String,
        reason: String,
    },
    #[error("the plan for {profile} cannot run: {problems}")]
    Infeasible { profile: String, problems: String },
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
    /// A GPU refused what the plan puts on it (an upload or allocation failed).
    #[error("{what}: {cause}")]
    Gpu { what: String, cause: CudaError },
    #[error("{what}: {cause}")]
    Split {
        what: &'static str,
        cause: std::io::Error,
    },
    #[error("no GPUs to run on")]
    NoGpus,
    #[error("the {0} pass was assembled without its split of the weights")]
    Unsplit(&'static str),
    #[error("a hybrid layout needs the host's kernels")]
    NeedsHost,
}

type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Opens the GPUs a layout needs (none for CPU-only layouts). A machine without them is
/// refused with what to do instead.
fn open_gpus_for(what: &str, gpus: usize) -> Result<Vec<Arc<CudaBackend>>> {
    (0..gpus)
        .map(|g| {
            CudaBackend::open(g)
                .map(Arc::new)
                .map_err(|cause| RuntimeError::GpusMissing {
                    what: what.to_string(),
                    gpus,
                    gpu: g,
                    cause,
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
    pub fn count(&self) -> usize {
        match self {
            Gpus::Cuda(g) => g.len(),
            Gpus::Simulated(n) => *n,
        }
    }
}

/// How a plan runs on its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayout {
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
    pub fn of(plan: &Plan, gpus: usize) -> Self {
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
            if let Some(ordinal) = crate::device::cpu::kernels::cuda_ordinal(name)? {
                let gpu =
                    CudaBackend::open(ordinal).map_err(|cause| RuntimeError::BackendCannotRun {
                        name: name.to_string(),
                        cause,
                    })?;
                gpu.set_recording(!self.enforce_eager);
                return cuda::resident_on_gpu(model, Arc::new(gpu))
                    .map(|b| Box::new(b) as Box<dyn Forward>)
                    .map_err(|e| RuntimeError::ModelDoesNotFit {
                        name: name.to_string(),
                        cause: Box::new(e),
                    });
            }
        }
        let host: Arc<dyn CpuKernels> = Arc::from(crate::device::cpu::kernels::by_name(name)?);
        let Some(plan) = plan else {
            return Ok(Box::new(crate::forward::on_cpu(host)));
        };
        let layout = GpuLayout::of(plan, self.gpus.count());
        Ok(match &self.gpus {
            Gpus::Cuda(gpus) => {
                let gpus = gpus.clone();
                match layout {
                    GpuLayout::Whole => Box::new(cuda::resident_on_gpu(model, gpus[0].clone())?),
                    GpuLayout::DataParallel => Box::new(cuda::data_parallel_on_gpus(model, gpus)?),
                    GpuLayout::TensorParallel => {
                        Box::new(cuda::tensor_parallel_on_gpus(model, gpus)?)
                    }
                    GpuLayout::Hybrid => {
                        Box::new(cuda::hybrid_on_gpu(model, plan, gpus[0].clone(), host)?)
                    }
                    GpuLayout::Pipeline => {
                        Box::new(cuda::pipeline_on_gpus(model, plan, gpus, host)?)
                    }
                }
            }
            Gpus::Simulated(n) => {
                eprintln!(
                    "simulating the plan's {n} GPU(s) ({layout:?} layout) with the {} backend",
                    host.name()
                );
                let stand_ins = (0..*n)
                    .map(|_| Arc::new(CpuDevice::stand_in(host.clone())))
                    .collect();
                let host = HostExperts {
                    plan,
                    kernels: host,
                    handoff: Arc::new(HandoffCounter::new()),
                };
                Box::new(assemble(layout, model, stand_ins, Some(host))?)
            }
        })
    }
}

/// What a hybrid layout's host side needs: the plan (which layers each GPU runs), the
/// kernels the host computes its experts with, and where the hand-off bytes are counted.
pub struct HostExperts<'a> {
    pub plan: &'a Plan,
    pub kernels: Arc<dyn CpuKernels>,
    pub handoff: Arc<HandoffCounter>,
}

/// The forward pass of `layout` over `devices` (real or stand-in GPUs): one GPU whole;
/// data-parallel (each device its own sequences, the lm_head split by vocabulary);
/// tensor-parallel (each device its heads of every sequence); hybrid on one GPU, or
/// pipelined over several by the plan's layer ranges, with `host` computing the experts
/// left in host RAM. Nothing is uploaded here: a device fetches what it computes with.
pub fn assemble<O: DeviceOps>(
    layout: GpuLayout,
    model: &Model,
    devices: Vec<Arc<O>>,
    host: Option<HostExperts>,
) -> Result<Pass<O>> {
    let n = devices.len();
    if n == 0 {
        return Err(RuntimeError::NoGpus);
    }
    let needs_host = || RuntimeError::NeedsHost;
    Ok(match layout {
        GpuLayout::Whole => Pass::new(devices[0].clone(), None, None),
        GpuLayout::DataParallel => {
            let vocab =
                VocabSplit::new(&model.lm_head, n).map_err(|cause| RuntimeError::Split {
                    what: "cutting the lm_head by vocabulary",
                    cause,
                })?;
            Pass::on_devices(devices).with_vocab_split(vocab)
        }
        GpuLayout::TensorParallel => {
            let split = HeadSplit::new(model, n).map_err(|cause| RuntimeError::Split {
                what: "cutting the attention weights by heads",
                cause,
            })?;
            Pass::tensor_parallel(devices, split)
        }
        GpuLayout::Hybrid => {
            let h = host.ok_or_else(needs_host)?;
            Pass::new(devices[0].clone(), Some(h.kernels), Some(h.handoff))
        }
        GpuLayout::Pipeline => {
            let h = host.ok_or_else(needs_host)?;
            let layers = layer_devices(h.plan, model.layers.len());
            Pass::pipeline(devices, layers, Some(h.kernels), Some(h.handoff))
        }
    })
}

fn read_plan(path: &Path) -> Result<Plan> {
    let text = crate::files::read_to_string(path).map_err(|cause| RuntimeError::ReadPlan {
        path: path.to_path_buf(),
        cause,
    })?;
    let plan: Plan = serde_json::from_str(&text).map_err(|cause| RuntimeError::ParsePlan {
        path: path.to_path_buf(),
        cause,
    })?;
    if plan.schema != "kimi-hybrid-plan/1" {
        return Err(RuntimeError::PlanSchema {
            path: path.to_path_buf(),
            schema: plan.schema,
        });
    }
    Ok(plan)
}

/// Every expert range of a plan file names a MoE layer of `model` and experts it has,
/// in order: a hand-edited range of `[0, 2^64 - 1]` would otherwise be walked id by id.
fn check_plan_experts(plan: &Plan, model: &Model, path: &Path) -> Result<()> {
    let cfg = &model.config;
    let holders = plan
        .gpus
        .iter()
        .map(|g| (format!("GPU {}", g.index), &g.experts))
        .chain(
            plan.numa
                .iter()
                .map(|n| (format!("NUMA node {}", n.node), &n.experts)),
        )
        .chain(std::iter::once(("disk".to_string(), &plan.disk.experts)));
    for (holder, sets) in holders {
        for (&layer, ranges) in sets {
            let bad = |reason: String| RuntimeError::PlanExperts {
                path: path.to_path_buf(),
                what: format!("{holder}'s experts of layer {layer}"),
                reason,
            };
            if layer >= cfg.num_hidden_layers {
                return Err(bad(format!(
                    "the model has {} layers",
                    cfg.num_hidden_layers
                )));
            }
            for r in ranges {
                if r[0] > r[1] || r[1] > cfg.n_routed_experts {
                    return Err(bad(format!(
                        "range [{}, {}) is not within the {} routed experts",
                        r[0], r[1], cfg.n_routed_experts
                    )));
                }
            }
        }
    }
    Ok(())
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
            check_plan_experts(&plan, model, path)?;
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
        return Err(RuntimeError::Infeasible {
            profile: plan.profile,
            problems: plan.problems.join("; "),
        });
    }
    let (on_gpu, on_nodes) = model.apply_plan(&plan);
    eprintln!(
        "placement: {on_gpu} routed experts on the GPU, {on_nodes} assigned to NUMA nodes by the plan for {}",
        plan.profile
    );
    Ok(Placement {
        plan: Some(plan),
        gpus,
        enforce_eager: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_model() -> Model {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kimi-int4");
        let ckpt = Checkpoint::open(&dir).expect("fixture");
        Model::load(&ckpt).expect("model")
    }

    fn no_plan() -> Placement {
        Placement {
            plan: None,
            gpus: Gpus::Cuda(Vec::new()),
            enforce_eager: false,
        }
    }

    #[test]
    fn backend_names_become_passes_or_errors_saying_what_to_use() {
        let model = fixture_model();
        for name in ["cpu", "cpu-f32", "reference"] {
            let pass = no_plan().forward(&model, name).expect(name);
            assert_eq!(pass.devices(), 1, "{name}");
        }
        let e = no_plan().forward(&model, "gpu").err().expect("unknown");
        assert!(e.to_string().contains("unknown backend"), "{e}");
        // Without a GPU, `--backend cuda` says why and what to use instead (with one,
        // the whole model goes up, as tests/golden.rs checks).
        if let Err(e) = no_plan().forward(&model, "cuda:0") {
            let e = format!("{e:#}");
            assert!(
                e.contains("no CUDA device") && e.contains("--backend cpu"),
                "{e}"
            );
        }
    }

    /// A plan file whose expert range reaches past the model (a hand-edited
    /// `[0, 2^64 - 1]`) is refused, naming the file, the holder and the layer, instead of
    /// being walked id by id.
    #[test]
    fn a_plan_file_with_experts_the_model_lacks_is_refused() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kimi-int4");
        let ckpt = Checkpoint::open(&dir).expect("fixture");
        let mut model = Model::load(&ckpt).expect("model");
        let profile = Profile::resolve("cpu-only").expect("profile");
        let plan = placement::plan(
            &ModelDesc::from_checkpoint(&ckpt),
            &profile,
            &profile.workload,
            None,
        );
        let layer = *plan.numa[0].experts.keys().next().expect("a layer");
        let tmp = tempfile::tempdir().expect("tmp");
        for (edit, layer_shown) in [([0, usize::MAX], layer), ([5, 2], layer), ([0, 1], 1000)] {
            let mut bad = plan.clone();
            bad.numa[0].experts.insert(layer_shown, vec![edit]);
            let path = tmp.path().join("plan.json");
            std::fs::write(&path, serde_json::to_string(&bad).expect("json")).expect("write");
            let started = std::time::Instant::now();
            let e = match place(&ckpt, &mut model, None, Some(&path), true) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{edit:?} in layer {layer_shown} was accepted"),
            };
            assert!(
                e.contains("plan.json")
                    && e.contains("NUMA node 0")
                    && e.contains(&format!("layer {layer_shown}")),
                "{e}"
            );
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
    }
}
