//! The machine's CPU topology: NUMA nodes with their CPUs and memory, read from
//! /sys/devices/system/node (no system libraries needed). When /sys has no node
//! information, or it disagrees with /proc/meminfo (as in some VMs), the machine is one
//! node with every CPU.

use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct NumaNode {
    pub id: usize,
    /// Logical CPU ids of the node.
    pub cpus: Vec<usize>,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub nodes: Vec<NumaNode>,
    /// MemTotal of /proc/meminfo.
    pub memory_bytes: u64,
}

/// Parses a Linux cpulist such as `0-3,8,10-11`.
pub fn parse_cpulist(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// The value of a `key ... N kB` line of a meminfo text, in bytes.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains(key))?;
    let mut words = line.split_whitespace();
    words.position(|w| w.starts_with(key))?;
    words.next()?.parse::<u64>().ok().map(|kib| kib * 1024)
}

impl Topology {
    /// This machine's NUMA nodes: from hwloc when built with the `hwloc` feature and it
    /// answers, else from sysfs.
    pub fn detect() -> Self {
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| kib_field(&t, "MemTotal:"))
            .unwrap_or(0);
        #[cfg(feature = "hwloc")]
        if let Some(t) = Self::from_hwloc(memory) {
            return t;
        }
        Self::from_sysfs(Path::new("/sys/devices/system/node"), memory)
    }

    /// NUMA nodes as hwloc reports them (cpus of each node's cpuset, local memory).
    #[cfg(feature = "hwloc")]
    pub fn from_hwloc(memory_bytes: u64) -> Option<Self> {
        use hwlocality::object::attributes::ObjectAttributes;
        use hwlocality::object::types::ObjectType;
        let topo = hwlocality::Topology::new().ok()?;
        let mut nodes = Vec::new();
        for (i, obj) in topo.objects_with_type(ObjectType::NUMANode).enumerate() {
            let cpus: Vec<usize> = obj
                .cpuset()
                .map(|set| set.iter_set().map(usize::from).collect())
                .unwrap_or_default();
            let memory = match obj.attributes() {
                Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
                _ => 0,
            };
            nodes.push(NumaNode {
                id: obj.os_index().unwrap_or(i),
                cpus,
                memory_bytes: memory,
            });
        }
        if nodes.is_empty() || nodes.iter().all(|n| n.cpus.is_empty()) {
            return None;
        }
        nodes.sort_by_key(|n| n.id);
        Some(Topology {
            nodes,
            memory_bytes,
        })
    }

    /// Reads `root/node*/{cpulist,meminfo}`; `memory_bytes` is the machine total.
    pub fn from_sysfs(root: &Path, memory_bytes: u64) -> Self {
        let mut nodes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(root) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(id) = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                let cpus = std::fs::read_to_string(entry.path().join("cpulist"))
                    .map(|l| parse_cpulist(&l))
                    .unwrap_or_default();
                let mem = std::fs::read_to_string(entry.path().join("meminfo"))
                    .ok()
                    .and_then(|t| kib_field(&t, "MemTotal:"))
                    .unwrap_or(0);
                if !cpus.is_empty() && mem > 0 {
                    nodes.push(NumaNode {
                        id,
                        cpus,
                        memory_bytes: mem,
                    });
                }
            }
        }
        nodes.sort_by_key(|n| n.id);
        let sum: u64 = nodes.iter().map(|n| n.memory_bytes).sum();
        let gib = 1u64 << 30;
        if nodes.is_empty() || (memory_bytes > 0 && sum.abs_diff(memory_bytes) > gib) {
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            nodes = vec![NumaNode {
                id: 0,
                cpus: (0..cpus).collect(),
                memory_bytes: memory_bytes.max(sum),
            }];
        }
        Topology {
            nodes,
            memory_bytes: memory_bytes.max(sum),
        }
    }

    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("5"), vec![5]);
        assert!(parse_cpulist("").is_empty());
    }

    #[test]
    fn two_node_sysfs_tree() {
        let tmp = tempfile::tempdir().unwrap();
        for (id, cpus, kib) in [(0, "0-3", 4 * 1024 * 1024), (1, "4-7", 4 * 1024 * 1024)] {
            let dir = tmp.path().join(format!("node{id}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cpulist"), cpus).unwrap();
            std::fs::write(
                dir.join("meminfo"),
                format!("Node {id} MemTotal:       {kib} kB\nNode {id} MemFree: 1 kB\n"),
            )
            .unwrap();
        }
        std::fs::create_dir(tmp.path().join("power")).unwrap();
        let t = Topology::from_sysfs(tmp.path(), 8 << 30);
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[1].cpus, vec![4, 5, 6, 7]);
        assert_eq!(t.nodes[0].memory_bytes, 4 << 30);
        // Disagreeing with /proc/meminfo (a VM): one node with every CPU.
        let t = Topology::from_sysfs(tmp.path(), 64 << 30);
        assert_eq!(t.nodes.len(), 1);
        // No sysfs at all.
        let t = Topology::from_sysfs(&tmp.path().join("missing"), 1 << 30);
        assert_eq!(t.nodes.len(), 1);
        assert!(t.cpu_count() >= 1);
    }

    /// With `--features hwloc` (needs libhwloc-dev, libudev-dev, pkg-config): hwloc and
    /// sysfs report the same nodes and cpus.
    #[cfg(feature = "hwloc")]
    #[test]
    fn hwloc_and_sysfs_agree() {
        let hw = Topology::from_hwloc(0).expect("hwloc reports NUMA nodes");
        let fs = Topology::from_sysfs(Path::new("/sys/devices/system/node"), 0);
        let cpus = |t: &Topology| -> Vec<(usize, Vec<usize>)> {
            t.nodes.iter().map(|n| (n.id, n.cpus.clone())).collect()
        };
        assert_eq!(cpus(&hw), cpus(&fs));
    }

    #[test]
    fn this_machine_has_a_node() {
        let t = Topology::detect();
        assert!(!t.nodes.is_empty() && t.cpu_count() >= 1);
    }
}
