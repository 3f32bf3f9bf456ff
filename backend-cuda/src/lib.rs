//! CUDA backend for Hopper/Blackwell: kernels from `kernels/` compiled at run time with NVRTC for the
//! device's own architecture, cuBLASLt FP8 GEMMs for the per-tensor and per-channel/per-token schemes.
//!
//! cudarc is built with dynamic loading, so this crate builds and links on a machine with no CUDA at all;
//! at run time the driver, NVRTC and cuBLASLt are looked up before any call that would panic, and
//! [`open`] names the library that is missing.

mod compile;
mod lt;
mod runner;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaModule, CudaStream,
};
use e4m3_core::backend::{
    check_supported, Backend, CacheConfig, DeviceMemory, KvCacheDtype, Runner,
};
use e4m3_core::error::{Error, Result};
use e4m3_core::graph::{Graph, Op, WeightMap};

pub use compile::{
    arch_for, cache_dir, compile, compile_check, nvrtc_present, nvrtc_version, parse_ptxas_log,
    KernelReport, KERNEL_FILES,
};

/// Every kernel the runner launches, by file.
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "embed",
        &["embed_f32", "embed_bf16", "embed_f16", "embed_e4m3"],
    ),
    ("norm", &["rms_norm"]),
    ("rope", &["rope"]),
    (
        "elementwise",
        &["add", "scale", "softcap", "gelu_tanh_mul", "select_rows"],
    ),
    ("quant", &["quant_static", "quant_group"]),
    (
        "linear",
        &[
            "linear_dense_f32",
            "linear_dense_bf16",
            "linear_dense_f16",
            "linear_fp8_static",
            "linear_fp8_dynamic",
            "linear_fp8_block_wo",
            "linear_fp8_block",
            "linear_vec_dense_f32",
            "linear_vec_dense_bf16",
            "linear_vec_dense_f16",
            "linear_vec_fp8_static",
            "linear_vec_fp8_dynamic",
            "linear_vec_fp8_block_wo",
            "linear_vec_fp8_block",
            "fp8_gemm_epilogue",
        ],
    ),
    (
        "attention",
        &[
            "attention_f32",
            "attention_split_f32",
            "kv_write_f32",
            "attention_bf16",
            "attention_split_bf16",
            "kv_write_bf16",
            "attention_fp8",
            "attention_split_fp8",
            "kv_write_fp8",
            "attention_combine",
        ],
    ),
    ("topk", &["top_k_partial", "top_k_merge"]),
    (
        "gemma4",
        &["slice_cols", "gelu_split", "moe_acc", "router_topk"],
    ),
    (
        "vision",
        &[
            "bias_add",
            "gelu_tanh",
            "layer_norm",
            "avg_pool2d",
            "encoder_attention",
        ],
    ),
];

/// The CUDA libraries that cannot be loaded here (empty when all are present).
pub fn missing_libraries() -> Vec<&'static str> {
    let mut m = Vec::new();
    unsafe {
        if !drv_sys::is_culib_present() {
            m.push("libcuda (the NVIDIA driver)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            m.push("libnvrtc (CUDA NVRTC)");
        }
        if !cudarc::cublaslt::sys::is_culib_present() {
            m.push("libcublasLt (cuBLASLt)");
        }
    }
    m
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: reason.into(),
    }
}

fn drv_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::invalid(format!("CUDA {what}: {e}"))
}

/// One CUDA device, as `e4m3 devices` lists it.
#[derive(Debug, Clone)]
pub struct DeviceSummary {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub arch: String,
    pub memory_bytes: usize,
    pub multiprocessors: i32,
}

fn ensure_libraries() -> Result<()> {
    let m = missing_libraries();
    if m.is_empty() {
        return Ok(());
    }
    Err(unavailable(format!(
        "{} could not be loaded (searched the system library path and LD_LIBRARY_PATH; the CUDA toolkit's lib64 and pip's nvidia/*/lib directories work)",
        m.join(", ")
    )))
}

/// Run a cudarc call that may panic (a symbol missing from an old driver) as a Result.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(unavailable(format!("{what} failed: {msg}")))
        }
    }
}

/// Every CUDA device.
pub fn devices() -> Result<Vec<DeviceSummary>> {
    ensure_libraries()?;
    guarded("listing CUDA devices", || {
        let n = CudaContext::device_count()
            .map_err(|e| unavailable(format!("no usable CUDA device: {e}")))?;
        let mut out = Vec::new();
        for i in 0..n.max(0) as usize {
            let ctx = CudaContext::new(i).map_err(drv_err("context"))?;
            let cc = ctx.compute_capability().map_err(drv_err("attribute"))?;
            out.push(DeviceSummary {
                ordinal: i,
                name: ctx.name().map_err(drv_err("name"))?,
                compute_capability: cc,
                arch: arch_for(cc.0, cc.1),
                memory_bytes: ctx.total_mem().map_err(drv_err("memory"))?,
                multiprocessors: ctx
                    .attribute(
                        drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                    )
                    .map_err(drv_err("attribute"))?,
            });
        }
        Ok(out)
    })
}

/// Device memory owned by the backend (raw driver allocation, freed on drop).
pub(crate) struct Mem {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
    used: Arc<Usage>,
}

/// Bytes the backend holds on the device, and the most it held at once.
#[derive(Default)]
pub(crate) struct Usage {
    in_use: AtomicU64,
    peak: AtomicU64,
}

impl Drop for Mem {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind_to_thread();
            let _ = drv::free_sync(self.ptr);
        }
        self.used
            .in_use
            .fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

/// Page-locked host memory (freed on drop).
pub(crate) struct Pinned {
    ptr: *mut u8,
    bytes: usize,
}

unsafe impl Send for Pinned {}

impl Pinned {
    fn new(bytes: usize) -> Result<Pinned> {
        let ptr = unsafe { drv::malloc_host(bytes, 0) }.map_err(|e| {
            Error::invalid(format!(
                "CUDA could not allocate {bytes} bytes of page-locked memory: {e}"
            ))
        })?;
        Ok(Pinned {
            ptr: ptr as *mut u8,
            bytes,
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

/// Upload staging: a bump region reset whenever the stream is known to be idle.
pub(crate) struct Staging {
    buf: Pinned,
    used: usize,
}

/// A kernel argument.
pub(crate) enum A {
    /// A device pointer (0 for an unused one).
    P(u64),
    U(u32),
    L(u64),
    F(f32),
    /// A struct passed by value, as its bytes.
    S(Vec<u8>),
}

pub(crate) struct Dev {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    funcs: HashMap<&'static str, CudaFunction>,
    pub lt: Option<lt::Lt>,
    pub lt_note: String,
    pub summary: String,
    _workspace: Option<Mem>,
    used: Arc<Usage>,
    total_mem: u64,
    upload_staging: std::sync::Mutex<Staging>,
    download_staging: std::sync::Mutex<Pinned>,
}

// The context and functions are plain driver handles; every use binds the context to the calling thread.
unsafe impl Send for Dev {}
unsafe impl Sync for Dev {}

impl Dev {
    pub fn alloc(&self, bytes: usize) -> Result<Mem> {
        let bytes = bytes.max(16);
        unsafe {
            let ptr = drv::malloc_sync(bytes).map_err(|e| {
                Error::invalid(format!(
                    "CUDA could not allocate {} MiB of device memory: {e}",
                    bytes >> 20
                ))
            })?;
            drv::memset_d8_sync(ptr, 0, bytes).map_err(drv_err("memset"))?;
            let now = self.used.in_use.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
            self.used.peak.fetch_max(now, Ordering::Relaxed);
            Ok(Mem {
                ptr,
                bytes,
                ctx: self.ctx.clone(),
                used: self.used.clone(),
            })
        }
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<Mem> {
        let m = self.alloc(std::mem::size_of_val(data))?;
        if !data.is_empty() {
            unsafe { drv::memcpy_htod_sync(m.ptr, data) }.map_err(drv_err("copy to device"))?;
        }
        Ok(m)
    }

    /// Copy `bytes` bytes from device address `src` to `dst`, stream-ordered.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(drv_err("device copy"))
    }

    /// Copy `data` to `dst` (stream-ordered) through page-locked staging memory, so the copy is a true
    /// asynchronous DMA and the host does not wait for it.
    pub fn write<T: Copy>(&self, dst: &Mem, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return Ok(());
        }
        assert!(bytes <= dst.bytes, "device write past the buffer");
        let mut st = self.upload_staging.lock().expect("staging lock");
        let at = st.used.next_multiple_of(64);
        if at + bytes > st.buf.bytes {
            // Earlier copies may still read the staging memory: wait for them before reusing or growing it.
            self.stream
                .synchronize()
                .map_err(drv_err("copy to device"))?;
            st.used = 0;
            if bytes > st.buf.bytes {
                st.buf = Pinned::new((bytes * 2).max(1 << 20))?;
            }
        }
        let at = st.used.next_multiple_of(64);
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, st.buf.ptr.add(at), bytes);
            drv_sys::cuMemcpyHtoDAsync_v2(
                dst.ptr,
                st.buf.ptr.add(at) as *const std::ffi::c_void,
                bytes,
                self.stream.cu_stream(),
            )
            .result()
            .map_err(drv_err("copy to device"))?;
        }
        st.used = at + bytes;
        Ok(())
    }

    /// Copy `n` values from device address `src` (waits for the stream), through page-locked memory.
    pub fn read<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let bytes = n * std::mem::size_of::<T>();
        let mut out = vec![T::default(); n];
        let mut rd = self.download_staging.lock().expect("staging lock");
        if bytes > rd.bytes {
            *rd = Pinned::new(bytes.next_power_of_two().max(1 << 20))?;
        }
        if bytes > 0 {
            unsafe {
                drv_sys::cuMemcpyDtoHAsync_v2(
                    rd.ptr as *mut std::ffi::c_void,
                    src,
                    bytes,
                    self.stream.cu_stream(),
                )
                .result()
                .map_err(drv_err("copy to host"))?;
            }
        }
        self.stream
            .synchronize()
            .map_err(drv_err("kernel execution"))?;
        // Every earlier upload has completed: its staging memory can be reused.
        self.upload_staging.lock().expect("staging lock").used = 0;
        if bytes > 0 {
            unsafe { std::ptr::copy_nonoverlapping(rd.ptr, out.as_mut_ptr() as *mut u8, bytes) };
        }
        Ok(out)
    }

    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[A]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| Error::invalid(format!("CUDA kernel `{name}` was not loaded")))?;
        let mut store: Vec<Vec<u8>> = args
            .iter()
            .map(|a| match a {
                A::P(x) | A::L(x) => x.to_le_bytes().to_vec(),
                A::U(x) => x.to_le_bytes().to_vec(),
                A::F(x) => x.to_le_bytes().to_vec(),
                A::S(v) => v.clone(),
            })
            .collect();
        let mut ptrs: Vec<*mut std::ffi::c_void> = store
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut std::ffi::c_void)
            .collect();
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                0,
                self.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| Error::invalid(format!("CUDA launch of `{name}` {grid:?}x{block}: {e}")))
    }
}

pub struct CudaBackend {
    dev: Arc<Dev>,
}

const LT_WORKSPACE: usize = 32 << 20;

impl CudaBackend {
    fn new(ordinal: usize) -> Result<CudaBackend> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("no usable CUDA device {ordinal}: {e}")))?;
        // One stream: the per-slice event tracking of cudarc is not needed.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(drv_err("stream"))?;
        let total_mem = ctx.total_mem().map_err(drv_err("memory"))? as u64;
        let (maj, min) = ctx.compute_capability().map_err(drv_err("attribute"))?;
        let arch = arch_for(maj, min);
        let name = ctx.name().map_err(drv_err("name"))?;
        let (nv_maj, nv_min) = nvrtc_version()?;
        let mut modules = Vec::new();
        let mut funcs = HashMap::new();
        let mut cached = 0;
        let t0 = std::time::Instant::now();
        for (file, names) in KERNELS {
            let (cubin, hit) = compile::compile_cached(file, &arch)?;
            cached += hit as usize;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(|e| {
                    Error::invalid(format!(
                        "CUDA could not load kernels {file}.cu for {arch}: {e}"
                    ))
                })?;
            for n in *names {
                let f = module.load_function(n).map_err(|e| {
                    Error::invalid(format!("kernel `{n}` missing from {file}.cu: {e}"))
                })?;
                funcs.insert(*n, f);
            }
            modules.push(module);
        }
        let compile_secs = t0.elapsed().as_secs_f64();
        let mut dev = Dev {
            ctx: ctx.clone(),
            stream,
            _modules: modules,
            funcs,
            lt: None,
            lt_note: String::new(),
            summary: String::new(),
            _workspace: None,
            used: Arc::new(Usage::default()),
            total_mem,
            upload_staging: std::sync::Mutex::new(Staging {
                buf: Pinned::new(1 << 20)?,
                used: 0,
            }),
            download_staging: std::sync::Mutex::new(Pinned::new(1 << 20)?),
        };
        if std::env::var_os("E4M3_CUDA_NO_CUBLASLT").is_some() {
            dev.lt_note = "cuBLASLt FP8 GEMM off (E4M3_CUDA_NO_CUBLASLT)".into();
        } else {
            let ws = dev.alloc(LT_WORKSPACE)?;
            match lt::Lt::new(ws.ptr, ws.bytes) {
                Ok(l) => {
                    dev.lt = Some(l);
                    dev.lt_note = "cuBLASLt FP8 GEMM for prefill of fp8-static/fp8-dynamic".into();
                }
                Err(e) => {
                    dev.lt_note = format!("cuBLASLt unusable ({e}); FP8 GEMMs use e4m3 kernels")
                }
            }
            dev._workspace = Some(ws);
        }
        dev.summary = format!(
            "{name} ({arch}), NVRTC {nv_maj}.{nv_min}, kernels {} in {compile_secs:.2} s ({cached}/{} files from the cache), {}",
            if cached == KERNELS.len() { "loaded" } else { "compiled" },
            KERNELS.len(),
            dev.lt_note
        );
        Ok(CudaBackend { dev: Arc::new(dev) })
    }

    /// Device, architecture, NVRTC version and kernel-cache use, in one line.
    pub fn describe(&self) -> String {
        self.dev.summary.clone()
    }

    /// Time `reps` device-to-device copies of `bytes` bytes; bytes read plus written per second.
    fn measure_copy(&self, bytes: usize, reps: usize) -> Result<f64> {
        let dev = &self.dev;
        dev.ctx.bind_to_thread().map_err(drv_err("bind"))?;
        let (src, dst) = (dev.alloc(bytes)?, dev.alloc(bytes)?);
        let s = dev.stream.cu_stream();
        let copy = || {
            unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, s) }.map_err(drv_err("copy"))
        };
        copy()?;
        let start = dev
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv_err("event"))?;
        let end = dev
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv_err("event"))?;
        start.record(&dev.stream).map_err(drv_err("event"))?;
        for _ in 0..reps {
            copy()?;
        }
        end.record(&dev.stream).map_err(drv_err("event"))?;
        end.synchronize().map_err(drv_err("event"))?;
        let ms = start.elapsed_ms(&end).map_err(drv_err("event"))? as f64;
        Ok(2.0 * bytes as f64 * reps as f64 / (ms / 1e3))
    }
}

/// Open the CUDA backend on device `ordinal`.
pub fn open(ordinal: usize) -> Result<Box<dyn Backend>> {
    Ok(Box::new(open_cuda(ordinal)?))
}

pub fn open_cuda(ordinal: usize) -> Result<CudaBackend> {
    ensure_libraries()?;
    guarded("opening the CUDA backend", || CudaBackend::new(ordinal))
}

pub(crate) const MAX_HEAD_DIM: usize = 512;

impl Backend for CudaBackend {
    fn name(&self) -> String {
        "cuda".to_string()
    }

    fn supports(&self, op: &Op) -> bool {
        // Gemma 4 ops: kernels/gemma4.cu, not yet run on a GPU (issue #8).
        e4m3_core::prepare::gpu_supports(op, MAX_HEAD_DIM, true, true, false)
    }

    fn describe(&self) -> String {
        self.dev.summary.clone()
    }

    fn memory(&self) -> Option<DeviceMemory> {
        Some(DeviceMemory {
            in_use: self.dev.used.in_use.load(Ordering::Relaxed),
            peak: self.dev.used.peak.load(Ordering::Relaxed),
            total: self.dev.total_mem,
        })
    }

    fn kv_bytes_per_element(&self, dtype: KvCacheDtype) -> usize {
        // As runner.rs stores them: f32, BF16 or E4M3 codes.
        match dtype {
            KvCacheDtype::Auto => 4,
            KvCacheDtype::Bf16 => 2,
            KvCacheDtype::Fp8 => 1,
        }
    }

    fn copy_bandwidth(&self, bytes: usize) -> Option<f64> {
        self.measure_copy(bytes.max(1 << 20), 20).ok()
    }

    fn load(
        &self,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<Box<dyn Runner>> {
        check_supported(self, graph)?;
        self.dev.ctx.bind_to_thread().map_err(drv_err("bind"))?;
        Ok(Box::new(runner::CudaRunner::new(
            self.dev.clone(),
            graph,
            weights,
            cache,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_answers_with_a_backend_or_names_the_missing_library() {
        match open(0) {
            Ok(b) => assert_eq!(b.name(), "cuda"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("backend `cuda` is not available"), "{e}");
                if !missing_libraries().is_empty() {
                    assert!(e.contains("could not be loaded"), "{e}");
                }
            }
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(10, 0), "sm_100a");
        assert_eq!(arch_for(12, 0), "sm_120a");
        assert_eq!(arch_for(8, 9), "sm_89");
    }

    #[test]
    fn ptxas_log_is_parsed_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k1' for 'sm_90a'\nptxas info    : Function properties for k1\nptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 40 registers, used 0 barriers\nptxas info    : Compiling entry function 'k2' for 'sm_90a'\nptxas info    : Used 7 registers\n";
        let r = parse_ptxas_log(log, "f", "sm_90a");
        assert_eq!(r.len(), 2);
        assert_eq!(
            (
                r[0].kernel.as_str(),
                r[0].registers,
                r[0].spill_stores,
                r[0].spill_loads,
                r[0].stack_bytes
            ),
            ("k1", 40, 4, 12, 8)
        );
        assert_eq!(
            (r[1].kernel.as_str(), r[1].registers, r[1].spill_stores),
            ("k2", 7, 0)
        );
    }
}
