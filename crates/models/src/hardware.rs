//! What this machine can do, as far as the swarm cares: CPU model, cores
//! available to this process, SIMD features detected at run time, memory,
//! and NVIDIA GPUs when the driver is present.
//!
//! Everything is read from the OS without running anything heavy, so a
//! node can profile itself at every start.

use std::fs;
use std::path::Path;
use std::process::Command;

use mycel_protocol::{Gpu, Hardware, limits};

/// Profiles this machine.
pub fn detect() -> Hardware {
    Hardware {
        cpu_model: cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        simd: simd_features(),
        memory_bytes: memory_bytes().unwrap_or(0),
        gpus: nvidia_gpus(),
    }
}

fn cpu_model() -> Option<String> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_model(&info)
}

fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model") || l.starts_with("Hardware"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| truncate(v.trim(), limits::SHORT_STRING))
}

fn memory_bytes() -> Option<u64> {
    parse_meminfo(&fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// SIMD extensions that matter for inference kernels, as detected now
/// (not as compiled for).
pub fn simd_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut out: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::is_x86_feature_detected!($f) { out.push($f); } )*};
        }
        probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::arch::is_aarch64_feature_detected!($f) { out.push($f); } )*};
        }
        probe!("neon", "dotprod", "i8mm", "bf16", "sve");
    }
    out.into_iter().map(String::from).collect()
}

/// NVIDIA GPUs, via `nvidia-smi` when the driver ships it. No driver, no
/// GPUs: never an error.
fn nvidia_gpus() -> Vec<Gpu> {
    if !Path::new("/proc/driver/nvidia").exists() {
        return Vec::new();
    }
    let Ok(out) = Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"])
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nvidia_smi(csv: &str) -> Vec<Gpu> {
    csv.lines()
        .filter_map(|line| {
            let mut cols = line.split(',').map(str::trim);
            let name = cols.next().filter(|n| !n.is_empty())?;
            let mib: u64 = cols.next()?.parse().ok()?;
            let cap = cols.next().and_then(|c| {
                let (major, minor) = c.split_once('.')?;
                Some(major.parse::<u32>().ok()? * 10 + minor.parse::<u32>().ok()?)
            });
            Some(Gpu {
                name: truncate(name, limits::SHORT_STRING),
                memory_bytes: mib * 1024 * 1024,
                compute_capability: cap.unwrap_or(0),
            })
        })
        .take(limits::GPUS_PER_ADVERT)
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_machine() {
        let hw = detect();
        assert!(hw.cores >= 1);
        assert!(!hw.cpu_model.is_empty());
        #[cfg(target_os = "linux")]
        assert!(hw.memory_bytes > 0);
        #[cfg(target_arch = "x86_64")]
        assert!(hw.simd.iter().any(|f| f == "sse4.2"), "{:?}", hw.simd);
    }

    #[test]
    fn parses_proc_files() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\nflags\t: fpu\n";
        assert_eq!(parse_cpu_model(cpu).as_deref(), Some("AMD EPYC 9654 96-Core Processor"));
        assert_eq!(parse_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24_576_000 * 1024));
        assert_eq!(parse_meminfo("nothing"), None);
    }

    #[test]
    fn parses_nvidia_smi() {
        let gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 9.0\nbroken line\n");
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].memory_bytes, 81559 * 1024 * 1024);
        assert_eq!(gpus[0].compute_capability, 90);
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
