//! `--profile auto`: a profile describing the machine this runs on. RAM, cores and NUMA
//! nodes come from `topology` (/proc and /sys), the ISA from CPUID, GPUs from the CUDA probe.
//! Bandwidths and throughputs cannot be read from the system; they are conservative
//! estimates, and the description says so.

use super::profile::{
    AttentionParallel, Disk, Gpu, Host, KvDtype, Layout, NumaNode, Profile, Reserves, Workload,
};

fn isa() -> Vec<String> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push("avx2".to_string());
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            v.push("avx512".to_string());
        }
        if is_x86_feature_detected!("avx512vnni") {
            v.push("avx512_vnni".to_string());
        }
        if is_x86_feature_detected!("avx512bf16") {
            v.push("avx512_bf16".to_string());
        }
        if amx_tile() {
            v.push("amx".to_string());
        }
    }
    v
}

/// AMX-TILE: CPUID leaf 7 sub-leaf 0, EDX bit 24 (the stable `is_x86_feature_detected!`
/// does not know AMX yet).
#[cfg(target_arch = "x86_64")]
fn amx_tile() -> bool {
    // SAFETY: CPUID leaf 7 exists on every x86_64 CPU that reports max leaf >= 7.
    #[allow(unused_unsafe)]
    let (max_leaf, edx) = unsafe {
        (
            core::arch::x86_64::__cpuid(0).eax,
            core::arch::x86_64::__cpuid_count(7, 0).edx,
        )
    };
    max_leaf >= 7 && edx & (1 << 24) != 0
}

pub fn this_machine() -> Profile {
    let topology = crate::topology::Topology::detect();
    let cores = topology.cpu_count();
    let isa = isa();
    let per_core_tflops = if isa.iter().any(|i| i == "amx") {
        0.5
    } else if isa.iter().any(|i| i == "avx512") {
        0.1
    } else {
        0.05
    };
    let numa: Vec<NumaNode> = topology
        .nodes
        .iter()
        .map(|n| (n.cpus.len(), n.memory_bytes as f64 / super::profile::GIB))
        .map(|(c, mem)| NumaNode {
            cores: c,
            memory_gib: mem,
            dram_bandwidth_gbs: (8.0 * c as f64).min(300.0),
            matmul_tflops: per_core_tflops * c as f64,
        })
        .collect();
    let ram_total: f64 = numa.iter().map(|n| n.memory_gib).sum();
    let gpu_note = match kernels_cuda::driver_library_present() {
        Ok(_) => "CUDA driver present; GPU details need the CUDA backend, planned as CPU",
        Err(_) => "no CUDA driver",
    };
    Profile {
        name: "auto".into(),
        description: format!("this machine: {cores} cores, {ram_total:.1} GiB RAM, {gpu_note}; bandwidths are estimates (measure with `kimi-hybrid bench`)"),
        layout: Layout::Cpu,
        gpu: Gpu { count: 0, name: String::new(), memory_gib: 0.0, memory_bandwidth_gbs: 0.0, bf16_tflops: 0.0, interconnect_gbs: 0.0, pcie_gbs: 0.0 },
        host: Host { ram_gib: ram_total, isa, numa },
        disk: Disk { read_gbs: 2.0, capacity_gib: 1000.0 },
        reserves: Reserves { os_ram_gib: (ram_total * 0.1).clamp(1.0, 32.0).min(ram_total * 0.5), gpu_context_gib: 0.0, gpu_workspace_gib: 0.0 },
        workload: Workload { context: 8192, concurrency: 1, kv_dtype: KvDtype::Bf16, attention: AttentionParallel::Auto },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_profile_describes_this_machine() {
        let p = this_machine();
        assert!(p.host.ram_gib > 0.0 && !p.host.numa.is_empty());
        assert_eq!(p.gpu.count, 0);
    }
}
