//! `--profile auto`: a profile describing the machine this runs on. RAM, cores and NUMA
//! nodes come from /proc and /sys, the ISA from CPUID, GPUs from the CUDA probe.
//! Bandwidths and throughputs cannot be read from the system; they are conservative
//! estimates, and the description says so.

use super::profile::{
    AttentionParallel, Disk, Gpu, Host, KvDtype, Layout, NumaNode, Profile, Reserves, Workload,
};

fn meminfo_gib(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0 / 1024.0)
}

fn count_cpulist(list: &str) -> usize {
    list.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .unwrap_or(0)
                    .saturating_sub(a.parse().unwrap_or(0))
                    + 1
            }
            None => 1,
        })
        .sum()
}

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

/// The NUMA nodes under /sys (cores, memory GiB); one node with everything when absent.
fn numa_nodes(total_gib: f64, cores: usize) -> Vec<(usize, f64)> {
    let mut nodes = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/devices/system/node") {
        let mut dirs: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("node")
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for d in dirs {
            let cpus = std::fs::read_to_string(d.join("cpulist"))
                .map(|l| count_cpulist(&l))
                .unwrap_or(0);
            let mem = std::fs::read_to_string(d.join("meminfo"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find(|l| l.contains("MemTotal"))
                        .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
                })
                .map(|kib| kib / 1024.0 / 1024.0)
                .unwrap_or(0.0);
            if cpus > 0 && mem > 0.0 {
                nodes.push((cpus, mem));
            }
        }
    }
    let sum: f64 = nodes.iter().map(|n| n.1).sum();
    // hwloc and /sys can disagree with /proc/meminfo in VMs; budget from /proc/meminfo.
    if nodes.is_empty() || (sum - total_gib).abs() > 1.0 {
        return vec![(cores, total_gib)];
    }
    nodes
}

pub fn this_machine() -> Profile {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram = meminfo_gib(&meminfo, "MemTotal:").unwrap_or(8.0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let isa = isa();
    let per_core_tflops = if isa.iter().any(|i| i == "amx") {
        0.5
    } else if isa.iter().any(|i| i == "avx512") {
        0.1
    } else {
        0.05
    };
    let numa: Vec<NumaNode> = numa_nodes(ram, cores)
        .into_iter()
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
    fn cpulists_count() {
        assert_eq!(count_cpulist("0-3,8,10-11\n"), 7);
        assert_eq!(count_cpulist("0"), 1);
    }

    #[test]
    fn auto_profile_describes_this_machine() {
        let p = this_machine();
        assert!(p.host.ram_gib > 0.0 && !p.host.numa.is_empty());
        assert_eq!(p.gpu.count, 0);
    }
}
