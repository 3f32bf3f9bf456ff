//! Kernel sources and their compilation with NVRTC: for the device's own architecture, cached on disk
//! keyed by source hash, architecture and NVRTC version, with NVRTC's log on error.

use std::ffi::CString;
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use e4m3_core::error::{Error, Result};

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel file of `kernels/`, by name.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("embed", include_str!("../../kernels/embed.cu")),
    ("norm", include_str!("../../kernels/norm.cu")),
    ("rope", include_str!("../../kernels/rope.cu")),
    ("elementwise", include_str!("../../kernels/elementwise.cu")),
    ("quant", include_str!("../../kernels/quant.cu")),
    ("linear", include_str!("../../kernels/linear.cu")),
    ("attention", include_str!("../../kernels/attention.cu")),
    ("topk", include_str!("../../kernels/topk.cu")),
    ("gemma4", include_str!("../../kernels/gemma4.cu")),
    ("vision", include_str!("../../kernels/vision.cu")),
];

/// The full text NVRTC compiles for one file: the shared helpers, then the file.
pub fn source(file: &str) -> Option<String> {
    let (_, src) = KERNEL_FILES.iter().find(|(n, _)| *n == file)?;
    Some(format!("{COMMON}\n#line 1 \"{file}.cu\"\n{src}"))
}

/// Whether libnvrtc can be opened (cudarc panics on first use otherwise).
pub fn nvrtc_present() -> bool {
    unsafe { nvrtc_sys::is_culib_present() }
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(missing("nvrtc"));
    }
    let (mut major, mut minor) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::invalid(format!("NVRTC version query failed: {e:?}")))?;
    Ok((major, minor))
}

pub(crate) fn missing(lib: &str) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: format!(
            "lib{lib} could not be loaded; install the NVIDIA driver / CUDA toolkit, or put the directory holding lib{lib}.so on LD_LIBRARY_PATH (pip's nvidia/cu13/lib works for NVRTC)"
        ),
    }
}

/// `sm_90a` for compute capability 9.0 (and the `a` variants of 10.0 and 12.0); `sm_XY` otherwise.
pub fn arch_for(major: i32, minor: i32) -> String {
    match (major, minor) {
        (9, 0) | (10, 0) | (10, 3) | (12, 0) | (12, 1) => format!("sm_{major}{minor}a"),
        _ => format!("sm_{major}{minor}"),
    }
}

/// CUDA include directories, if any are present (the kernels themselves need no CUDA headers).
fn include_paths() -> Vec<String> {
    let mut dirs = Vec::new();
    let root = std::env::var("CUDA_PATH").unwrap_or_else(|_| "/usr/local/cuda".into());
    for d in [format!("{root}/include"), format!("{root}/include/cccl")] {
        if std::path::Path::new(&d).is_dir() {
            dirs.push(d);
        }
    }
    dirs
}

pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn options(arch: &str, verbose: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    if verbose {
        o.push("--ptxas-options=-v".to_string());
    }
    o.extend(
        include_paths()
            .into_iter()
            .map(|d| format!("--include-path={d}")),
    );
    o
}

/// Compile one kernel file to a CUBIN for `arch`. A compile error names the file and carries NVRTC's log.
pub fn compile(file: &str, arch: &str, verbose: bool) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(missing("nvrtc"));
    }
    let src = source(file).ok_or_else(|| Error::invalid(format!("no kernel file `{file}`")))?;
    let csrc = CString::new(src).map_err(|_| Error::invalid("kernel source holds a NUL byte"))?;
    let name = CString::new(format!("{file}.cu")).expect("no NUL");
    let opts = options(arch, verbose);
    unsafe {
        let prog = nvrtc::create_program(&csrc, Some(&name)).map_err(|e| {
            Error::invalid(format!("NVRTC could not create program {file}.cu: {e:?}"))
        })?;
        let status = nvrtc::compile_program(prog, &opts);
        let log = nvrtc::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        if let Err(e) = status {
            let _ = nvrtc::destroy_program(prog);
            return Err(Error::invalid(format!(
                "NVRTC failed to compile kernel file {file}.cu for {arch} ({e:?}):\n{log}"
            )));
        }
        let mut size = 0usize;
        let r = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            let _ = nvrtc::destroy_program(prog);
            return Err(Error::invalid(format!(
                "NVRTC produced no CUBIN for {file}.cu ({arch}): {r:?}"
            )));
        }
        let mut cubin = vec![0u8; size];
        let r = nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        let _ = nvrtc::destroy_program(prog);
        if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::invalid(format!(
                "NVRTC could not return the CUBIN of {file}.cu: {r:?}"
            )));
        }
        Ok(Compiled { cubin, log })
    }
}

/// FNV-1a, 64 bits: a stable hash for cache keys.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `$E4M3_KERNEL_CACHE`, else `$XDG_CACHE_HOME/e4m3/kernels`, else `~/.cache/e4m3/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("E4M3_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("e4m3").join("kernels"))
}

/// The CUBIN of `file` for `arch`, from the disk cache when the same source was compiled before by the
/// same NVRTC version. Returns (cubin, whether it came from the cache).
pub fn compile_cached(file: &str, arch: &str) -> Result<(Vec<u8>, bool)> {
    let (maj, min) = nvrtc_version()?;
    let src = source(file).ok_or_else(|| Error::invalid(format!("no kernel file `{file}`")))?;
    let opts = options(arch, false).join(" ");
    let key = fnv(&[
        src.as_bytes(),
        opts.as_bytes(),
        format!("{maj}.{min}").as_bytes(),
    ]);
    let path =
        cache_dir().map(|d| d.join(format!("{file}-{arch}-nvrtc{maj}.{min}-{key:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return Ok((b, true));
            }
        }
    }
    let c = compile(file, arch, false)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok((c.cubin, false))
}

/// What ptxas reported for one kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelReport {
    pub file: String,
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
}

fn num_before(s: &str, word: &str) -> Option<u32> {
    let i = s.find(word)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parse `ptxas -v` output: per entry function, registers, spills and stack frame.
pub fn parse_ptxas_log(log: &str, file: &str, arch: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelReport {
                file: file.into(),
                kernel: name,
                arch: arch.into(),
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_bytes: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
            }
        }
    }
    out
}

/// Compile every kernel file for `arch` (no GPU needed, only libnvrtc) and report each kernel's
/// registers and spills. The first compile error is returned with NVRTC's log.
pub fn compile_check(arch: &str) -> Result<Vec<KernelReport>> {
    let mut all = Vec::new();
    for (file, _) in KERNEL_FILES {
        let c = compile(file, arch, true)?;
        let reports = parse_ptxas_log(&c.log, file, arch);
        if reports.is_empty() {
            return Err(Error::invalid(format!(
                "ptxas reported no entry function for {file}.cu ({arch}); log:\n{}",
                c.log
            )));
        }
        all.extend(reports);
    }
    Ok(all)
}
