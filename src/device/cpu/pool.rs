//! Worker threads for the CPU kernels: one rayon pool per NUMA node, each thread pinned to
//! one of the node's CPUs, so an expert assigned to a node is computed by threads that
//! read that node's local memory. A pool over all CPUs serves work with no node.

use super::kernels::BackendError;
use crate::topology::Topology;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, OnceLock};

pub struct CpuPools {
    nodes: Vec<ThreadPool>,
    all: ThreadPool,
}

fn pinned_pool(cpus: Vec<usize>, name: String) -> Result<ThreadPool, BackendError> {
    let pool_name = name.clone();
    let count = cpus.len().max(1);
    ThreadPoolBuilder::new()
        .num_threads(count)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |i| {
            // Pinning is best effort: a CPU outside this process's affinity mask is refused
            // by the OS, and the thread then runs unpinned.
            if let Some(&cpu) = cpus.get(i) {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
        })
        .build()
        .map_err(|e| BackendError::Threads {
            name: pool_name,
            reason: e.to_string(),
        })
}

impl CpuPools {
    pub fn new(topology: &Topology) -> Result<Self, BackendError> {
        let nodes = topology
            .nodes
            .iter()
            .map(|n| pinned_pool(n.cpus.clone(), format!("numa{}", n.id)))
            .collect::<Result<Vec<_>, _>>()?;
        let all_cpus: Vec<usize> = topology
            .nodes
            .iter()
            .flat_map(|n| n.cpus.iter().copied())
            .collect();
        Ok(CpuPools {
            nodes,
            all: pinned_pool(all_cpus, "cpu".into())?,
        })
    }

    /// Pools for this machine's topology, started once per process.
    pub fn shared() -> Result<Arc<CpuPools>, BackendError> {
        static POOLS: OnceLock<Result<Arc<CpuPools>, BackendError>> = OnceLock::new();
        POOLS
            .get_or_init(|| CpuPools::new(&Topology::detect()).map(Arc::new))
            .clone()
    }

    /// The pool of NUMA node `node` (the all-CPU pool for an unknown node).
    pub fn node(&self, node: usize) -> &ThreadPool {
        self.nodes.get(node).unwrap_or(&self.all)
    }

    pub fn all(&self) -> &ThreadPool {
        &self.all
    }
}
