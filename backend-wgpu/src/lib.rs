//! wgpu backend: the portable cross-check path (WGSL shaders in `shaders/`, FP8 decoded from bits).
//!
//! Weights are uploaded once, packed as stored (F32 1, BF16/F16 2, E4M3 4 per u32 word) and decoded in
//! the shaders bit-exactly like the CPU; every product is accumulated in f32. Linear weights live in
//! Rgba32Uint textures, row-major, and linear.wgsl reads the activations through a 64 KiB uniform window:
//! on lavapipe a storage-buffer load is a per-lane scalar loop, a texel fetch a vector gather and a
//! uniform load at a uniform index one scalar load, which makes decode about 7x faster than storage
//! buffers. Embedding tables stay in storage buffers. A tensor larger than the device's binding or
//! texture limits is split by rows; activations that outgrow one binding are bound by offset in windows.
//! Activation buffers are pooled by liveness and reused across steps (they grow only when a step has more
//! rows than any before). The KV cache lives on the GPU (f32, rounded to BF16 or E4M3 on the way in like
//! the CPU's `round_kv`). With `Runner::enable_guards` (the conformance suite) activation and scratch
//! buffers get guard regions of `GUARD_WORD` before and after their data, checked after every step; the
//! KV cache and the weights are not guarded. `E4M3_WGPU_PROFILE=1` times every dispatch alone and prints
//! the time per op and shape when the runner is dropped. Images (`Runner::step_with_inputs`): given rows
//! are uploaded once per step and copied into the Embed (or Input) node's buffer; the attention kernel
//! reads per row the first and last positions it sees besides the window (by the node's `ImageGroups`); EncoderAttention has its own entry
//! point there, one dispatch per image.

use std::collections::BTreeMap;
use std::sync::Arc;

use e4m3_core::backend::{
    attention_spans, check_step_inputs, check_supported, guard_damage, guard_fill, validate_batch,
    Backend, Batch, CacheConfig, Runner, StepInputs, StepOutput,
};
use e4m3_core::checkpoint::Weight;
use e4m3_core::cpu::fp8_linear::Fp8Scales;
use e4m3_core::cpu::{kv_rounding, KvRounding};
use e4m3_core::error::{Error, Result};
use e4m3_core::graph::{Graph, ImageGroups, Op, QuantScheme, WeightMap};
use e4m3_core::prepare::{
    dtype_code, node_weights, scheme_code, ExpertLinear, KernelScales, NodeWeights,
};
use e4m3_core::tensor::Mat;
use wgpu::util::DeviceExt;

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");
const NORM: &str = include_str!("../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../shaders/rope.wgsl");
const GATHER: &str = include_str!("../../shaders/gather.wgsl");
const LINEAR: &str = include_str!("../../shaders/linear.wgsl");
const QUANT: &str = include_str!("../../shaders/quant.wgsl");
const ATTENTION: &str = include_str!("../../shaders/attention.wgsl");
const GEMMA4: &str = include_str!("../../shaders/gemma4.wgsl");
const POOL: &str = include_str!("../../shaders/pool.wgsl");
/// The activations of linear.wgsl: a 64 KiB uniform window (one scalar load per element on lavapipe) or,
/// for rows longer than that, a storage buffer.
const LINEAR_X_UNIFORM: &str = "@group(0) @binding(1) var<uniform> xu: array<vec4<f32>, 4096>;
fn xat(i: u32) -> f32 { return xu[i >> 2u][i & 3u]; }";
const LINEAR_X_STORAGE: &str = "@group(0) @binding(1) var<storage, read> xv: array<f32>;
fn xat(i: u32) -> f32 { return xv[i]; }";
/// Bytes of the uniform window of linear.wgsl.
const XU_BYTES: u64 = 65536;

/// Largest head_dim the attention shader handles (8 values per thread of a 64-thread workgroup).
pub const MAX_HEAD_DIM: usize = 512;
/// Query rows per workgroup of attention.wgsl's encoder_attention (`ER`).
/// The `ImageGroups` modes in the order of `WgpuRunner::spans`.
const GROUP_MODES: [ImageGroups; 3] = [
    ImageGroups::Off,
    ImageGroups::Windowed,
    ImageGroups::WholeGroup,
];
const ENCODER_ROWS: usize = 4;

/// One adapter as `e4m3 devices` lists it.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// A software rasterizer (lavapipe, llvmpipe, WARP): `DeviceType::Cpu`.
    pub is_cpu: bool,
    pub driver: String,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle())
}

fn all_adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

fn summary(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    let f = a.features();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        is_cpu: info.device_type == wgpu::DeviceType::Cpu,
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_buffer_size: l.max_buffer_size,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
    }
}

/// Every adapter wgpu finds, with its key limits.
pub fn adapters() -> Vec<AdapterSummary> {
    all_adapters().iter().map(summary).collect()
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

/// Open the wgpu backend on the adapter whose name contains `adapter` (case-insensitive; the first
/// adapter if None, hardware adapters before software ones).
pub fn open(adapter: Option<&str>) -> Result<Box<dyn Backend>> {
    let mut list = all_adapters();
    list.sort_by_key(|a| a.get_info().device_type == wgpu::DeviceType::Cpu);
    let chosen = match adapter {
        None => list.into_iter().next(),
        Some(name) => {
            let n = name.to_lowercase();
            list.into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&n))
        }
    };
    let a = chosen.ok_or_else(|| {
        unavailable(match adapter {
            None => "no wgpu adapter found (install a Vulkan/Metal/DX12 driver, e.g. mesa-vulkan-drivers for lavapipe)".to_string(),
            Some(n) => format!("no wgpu adapter whose name contains `{n}`"),
        })
    })?;
    Ok(Box::new(WgpuBackend::new(a, None)?))
}

/// Like [`open`] with the binding limit lowered to `max_binding` bytes (at least 1 KiB), so that tests
/// exercise weights split across buffers and activations bound in windows on any adapter.
pub fn open_with_binding_limit(
    adapter: Option<&str>,
    max_binding: u64,
) -> Result<Box<dyn Backend>> {
    let list = all_adapters();
    let a = match adapter {
        None => list.into_iter().next(),
        Some(n) => list
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&n.to_lowercase())),
    }
    .ok_or_else(|| unavailable("no wgpu adapter found"))?;
    Ok(Box::new(WgpuBackend::new(a, Some(max_binding))?))
}

/// Open the wgpu backend on a hardware adapter only (not lavapipe/llvmpipe: `DeviceType::Cpu`), as
/// `--backend auto` wants it.
pub fn open_hardware() -> Result<Box<dyn Backend>> {
    let a = all_adapters()
        .into_iter()
        .find(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
        .ok_or_else(|| unavailable("no hardware wgpu adapter found"))?;
    Ok(Box::new(WgpuBackend::new(a, None)?))
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ro,
    Rw,
    Uniform,
    Tex,
}

struct Pipes {
    el_layout: wgpu::BindGroupLayout,
    /// Linear with the activations in a 64 KiB uniform window (`lin_layout_s`: in a storage buffer).
    lin_layout: wgpu::BindGroupLayout,
    lin_layout_s: wgpu::BindGroupLayout,
    quant_layout: wgpu::BindGroupLayout,
    attn_layout: wgpu::BindGroupLayout,
    add: wgpu::ComputePipeline,
    scale: wgpu::ComputePipeline,
    softcap: wgpu::ComputePipeline,
    gelu: wgpu::ComputePipeline,
    rms_norm: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    embed: Vec<wgpu::ComputePipeline>,
    select_rows: wgpu::ComputePipeline,
    /// (dtype code, scheme code, activations in a uniform window) -> pipeline.
    linear: BTreeMap<(u32, u32, bool), wgpu::ComputePipeline>,
    quant_static: wgpu::ComputePipeline,
    quant_group: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    encoder_attention: wgpu::ComputePipeline,
    kv_write: wgpu::ComputePipeline,
    slice_cols: wgpu::ComputePipeline,
    gelu_split: wgpu::ComputePipeline,
    moe_acc: wgpu::ComputePipeline,
    router_topk: wgpu::ComputePipeline,
    gelu_only: wgpu::ComputePipeline,
    bias_add: wgpu::ComputePipeline,
    layer_norm: wgpu::ComputePipeline,
    avg_pool2d: wgpu::ComputePipeline,
    pos_embed2d: Vec<wgpu::ComputePipeline>,
    pool_positions: wgpu::ComputePipeline,
    clamp: wgpu::ComputePipeline,
    channel_scale: wgpu::ComputePipeline,
}

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    binding_cap: u64,
    pipes: Pipes,
}

impl Gpu {
    /// The largest range one binding may cover (`E4M3_WGPU_MAX_BINDING` lowers it, to test splitting).
    fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            .min(self.binding_cap)
    }
}

fn layout(device: &wgpu::Device, kinds: &[Kind]) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: match k {
                Kind::Tex => wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Uint,
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                _ => wgpu::BindingType::Buffer {
                    ty: match k {
                        Kind::Ro => wgpu::BufferBindingType::Storage { read_only: true },
                        Kind::Rw => wgpu::BufferBindingType::Storage { read_only: false },
                        _ => wgpu::BufferBindingType::Uniform,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: None,
        entries: &entries,
    })
}

fn pipeline(
    device: &wgpu::Device,
    module: &wgpu::ShaderModule,
    bgl: &wgpu::BindGroupLayout,
    entry: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: None,
        bind_group_layouts: &[Some(bgl)],
        immediate_size: 0,
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry),
        layout: Some(&pl),
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    })
}

fn module(device: &wgpu::Device, name: &str, src: &str) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(format!("{COMMON}\n{src}").into()),
    })
}

impl Pipes {
    fn new(device: &wgpu::Device) -> Pipes {
        use Kind::*;
        let el_layout = layout(device, &[Ro, Ro, Rw, Uniform]);
        let lin_layout = layout(device, &[Tex, Uniform, Rw, Uniform, Ro, Ro, Ro]);
        let lin_layout_s = layout(device, &[Tex, Ro, Rw, Uniform, Ro, Ro, Ro]);
        let quant_layout = layout(device, &[Ro, Rw, Uniform, Rw]);
        let attn_layout = layout(device, &[Ro, Ro, Ro, Rw, Uniform, Rw, Rw, Ro, Ro]);
        let el = module(device, "elementwise", ELEMENTWISE);
        let norm = module(device, "norm", NORM);
        let rope = module(device, "rope", ROPE);
        let gather = module(device, "gather", GATHER);
        let lin_u = module(
            device,
            "linear",
            &LINEAR.replace("//XDECL", LINEAR_X_UNIFORM),
        );
        let lin_s = module(
            device,
            "linear",
            &LINEAR.replace("//XDECL", LINEAR_X_STORAGE),
        );
        let quant = module(device, "quant", QUANT);
        let attn = module(device, "attention", ATTENTION);
        let g4 = module(device, "gemma4", GEMMA4);
        let pool = module(device, "pool", POOL);
        let mut linear = BTreeMap::new();
        for (dt, scheme) in [(0, 0), (1, 0), (2, 0), (3, 1), (3, 2), (3, 3), (3, 4)] {
            for (uni, module, bgl) in [(true, &lin_u, &lin_layout), (false, &lin_s, &lin_layout_s)]
            {
                linear.insert(
                    (dt, scheme, uni),
                    pipeline(
                        device,
                        module,
                        bgl,
                        "linear",
                        &[("DT", dt as f64), ("SCHEME", scheme as f64)],
                    ),
                );
            }
        }
        Pipes {
            add: pipeline(device, &el, &el_layout, "add", &[]),
            scale: pipeline(device, &el, &el_layout, "scale", &[]),
            softcap: pipeline(device, &el, &el_layout, "softcap", &[]),
            gelu: pipeline(device, &el, &el_layout, "gelu_tanh_mul", &[]),
            rms_norm: pipeline(device, &norm, &el_layout, "rms_norm", &[]),
            rope: pipeline(device, &rope, &el_layout, "rope", &[]),
            embed: (0..4)
                .map(|dt| pipeline(device, &gather, &el_layout, "embed", &[("DT", dt as f64)]))
                .collect(),
            select_rows: pipeline(device, &gather, &el_layout, "select_rows", &[]),
            linear,
            quant_static: pipeline(device, &quant, &quant_layout, "quant_static", &[]),
            quant_group: pipeline(device, &quant, &quant_layout, "quant_group", &[]),
            attention: pipeline(device, &attn, &attn_layout, "attention", &[]),
            encoder_attention: pipeline(device, &attn, &attn_layout, "encoder_attention", &[]),
            kv_write: pipeline(device, &attn, &attn_layout, "kv_write", &[]),
            slice_cols: pipeline(device, &g4, &el_layout, "slice_cols", &[]),
            gelu_split: pipeline(device, &g4, &el_layout, "gelu_split", &[]),
            moe_acc: pipeline(device, &g4, &el_layout, "moe_acc", &[]),
            router_topk: pipeline(device, &g4, &el_layout, "router_topk", &[]),
            gelu_only: pipeline(device, &el, &el_layout, "gelu_tanh_only", &[]),
            bias_add: pipeline(device, &el, &el_layout, "bias_add", &[]),
            layer_norm: pipeline(device, &norm, &el_layout, "layer_norm", &[]),
            avg_pool2d: pipeline(device, &pool, &el_layout, "avg_pool2d", &[]),
            pos_embed2d: (0..4)
                .map(|dt| {
                    pipeline(
                        device,
                        &gather,
                        &el_layout,
                        "pos_embed2d",
                        &[("DT", dt as f64)],
                    )
                })
                .collect(),
            pool_positions: pipeline(device, &pool, &el_layout, "pool_positions", &[]),
            clamp: pipeline(device, &el, &el_layout, "clamp_op", &[]),
            channel_scale: pipeline(device, &el, &el_layout, "channel_scale", &[]),
            el_layout,
            lin_layout,
            lin_layout_s,
            quant_layout,
            attn_layout,
        }
    }
}

pub struct WgpuBackend {
    gpu: Arc<Gpu>,
}

impl WgpuBackend {
    fn new(adapter: wgpu::Adapter, cap: Option<u64>) -> Result<WgpuBackend> {
        let info = adapter.get_info();
        // Ask for exactly what the adapter offers: the storage-binding and buffer limits matter here.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("e4m3"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("adapter `{}`: {e}", info.name)))?;
        let pipes = Pipes::new(&device);
        Ok(WgpuBackend {
            gpu: Arc::new(Gpu {
                device,
                queue,
                info,
                limits,
                binding_cap: std::env::var("E4M3_WGPU_MAX_BINDING")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .or(cap)
                    .map_or(u64::MAX, |v| v.max(1024)),
                pipes,
            }),
        })
    }

    /// The adapter's name, device type and the storage binding limit in use.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}), max storage binding {} MiB",
            self.gpu.info.name,
            self.gpu.info.backend,
            self.gpu.info.device_type,
            self.gpu.limits.max_storage_buffer_binding_size >> 20
        )
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> String {
        "wgpu".to_string()
    }

    fn supports(&self, op: &Op) -> bool {
        e4m3_core::prepare::gpu_supports(op, MAX_HEAD_DIM, true, true, true)
    }

    fn load(
        &self,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<Box<dyn Runner>> {
        check_supported(self, graph)?;
        Ok(Box::new(WgpuRunner::new(
            self.gpu.clone(),
            graph,
            weights,
            cache,
        )?))
    }
}

/// Rows `[row0, row0 + rows)` of a weight, in their own buffer.
struct WChunk {
    buf: wgpu::Buffer,
    row0: usize,
    rows: usize,
}

fn padded(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len().is_multiple_of(4) && !bytes.is_empty() {
        bytes.into()
    } else {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        v.into()
    }
}

fn upload_f32(gpu: &Gpu, label: &str, v: &[f32]) -> wgpu::Buffer {
    gpu.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &padded(bytemuck::cast_slice(v)),
            usage: wgpu::BufferUsages::STORAGE,
        })
}

/// Rows `[row0, row0 + rows)` of a linear weight in an Rgba32Uint texture for `linear.wgsl`: row-major,
/// each row padded to `kt` whole 16-byte texels, `TEX_W` texels per texture row.
struct TChunk {
    view: wgpu::TextureView,
    row0: usize,
    rows: usize,
    kt: usize,
}

/// Texels per texture row of a weight texture (`TW_SHIFT` in linear.wgsl).
const TEX_W: usize = 4096;

/// Upload a linear weight as textures split by rows, each within the device's texture size (and the
/// binding limit, so tests that lower it exercise the split).
fn upload_tex(gpu: &Gpu, w: &Weight) -> Result<Vec<TChunk>> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let esz = w.dtype.size();
    let bytes = w.bytes();
    if bytes.len() != rows * cols * esz {
        return Err(Error::tensor(
            &w.name,
            format!("holds {} bytes for shape {:?}", bytes.len(), w.shape),
        ));
    }
    let row_bytes = cols * esz;
    let kt = row_bytes.div_ceil(16).max(1);
    let max_h = gpu.limits.max_texture_dimension_2d as usize;
    let max_texels = (max_h * TEX_W).min((gpu.max_binding() / 16) as usize);
    let per = max_texels / kt;
    if per == 0 || max_h == 0 {
        return Err(Error::tensor(
            &w.name,
            format!(
                "one row of {row_bytes} bytes exceeds the adapter's texture limit of {} texels",
                max_texels
            ),
        ));
    }
    let mut out = Vec::new();
    let mut r0 = 0;
    loop {
        let n = per.min(rows - r0);
        let height = (n * kt).div_ceil(TEX_W).max(1);
        let mut data = vec![0u8; height * TEX_W * 16];
        for r in 0..n {
            let src = &bytes[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
            data[r * kt * 16..r * kt * 16 + row_bytes].copy_from_slice(src);
        }
        let size = wgpu::Extent3d {
            width: TEX_W as u32,
            height: height as u32,
            depth_or_array_layers: 1,
        };
        let tex = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(&w.name),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Uint,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        gpu.queue.write_texture(
            wgpu::TexelCopyTextureInfo {
                texture: &tex,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            &data,
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some((TEX_W * 16) as u32),
                rows_per_image: None,
            },
            size,
        );
        out.push(TChunk {
            view: tex.create_view(&Default::default()),
            row0: r0,
            rows: n,
            kt,
        });
        r0 += n;
        if r0 >= rows {
            break;
        }
    }
    Ok(out)
}

/// Upload a 2-D weight split by rows so that no buffer exceeds the binding limit.
fn upload_rows(gpu: &Gpu, w: &Weight) -> Result<Vec<WChunk>> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let esz = w.dtype.size();
    let row_bytes = (cols * esz) as u64;
    let bytes = w.bytes();
    if bytes.len() != rows * cols * esz {
        return Err(Error::tensor(
            &w.name,
            format!("holds {} bytes for shape {:?}", bytes.len(), w.shape),
        ));
    }
    // Keep chunks a multiple of 4 rows so every chunk starts on a word for any packing.
    let per = ((gpu.max_binding() - 4) / row_bytes.max(1)) as usize / 4 * 4;
    if per == 0 {
        return Err(Error::tensor(
            &w.name,
            format!(
                "one row of {row_bytes} bytes exceeds the adapter's storage binding limit of {} bytes",
                gpu.max_binding()
            ),
        ));
    }
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows.max(1) {
        let n = per.min(rows - r0.min(rows));
        let data = &bytes[r0 * cols * esz..(r0 + n) * cols * esz];
        let buf = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(&w.name),
                contents: &padded(data),
                usage: wgpu::BufferUsages::STORAGE,
            });
        out.push(WChunk {
            buf,
            row0: r0,
            rows: n,
        });
        r0 += n.max(1);
        if rows == 0 {
            break;
        }
    }
    Ok(out)
}

enum Plan {
    None,
    Embed {
        chunks: Vec<WChunk>,
        dt: u32,
        cols: usize,
    },
    Norm {
        w: Option<wgpu::Buffer>,
    },
    Linear(Lin),
    /// Index into the runner's RoPE tables.
    Rope(usize),
    /// Index into the runner's Rope2d tables.
    Rope2d(usize),
    /// RouterTopK: the per-expert scales.
    Router(wgpu::Buffer),
    /// MoeExperts: per expert, gate_up `[2I, H]` and down `[H, I]`.
    Moe(Vec<[Lin; 2]>),
    /// BiasAdd: the bias; LayerNorm: the weight then the bias, in one buffer.
    Vector(wgpu::Buffer),
}

/// A Rope2d node's per-step cos/sin table: its values read as heads of `head_dim / 2` (rope.wgsl's rows),
/// alternately at the row's x and y (core/src/cpu/vision.rs rope2d).
struct Rope2dTable {
    inv_freq: Vec<f32>,
    head_dim: usize,
    size: usize,
    cols: usize,
    buf: wgpu::Buffer,
}

impl Rope2dTable {
    /// `[rows * halves, head_dim / 2]`: per half-head, cos then sin at its position, as the CPU computes them.
    fn table(&self, ids: &[u32]) -> Vec<f32> {
        let (hd, q) = (self.head_dim / 2, self.head_dim / 4);
        let halves = self.cols / hd;
        let mut tab = vec![0f32; ids.len() * self.cols];
        for (r, &id) in ids.iter().enumerate() {
            let (px, py) = ((id as usize) % self.size, (id as usize) / self.size);
            for h in 0..halves {
                let pos = if h % 2 == 0 { px } else { py };
                let row = &mut tab[(r * halves + h) * hd..(r * halves + h + 1) * hd];
                for (i, &fr) in self.inv_freq.iter().enumerate() {
                    let a = pos as f32 * fr;
                    row[i] = a.cos();
                    row[q + i] = a.sin();
                }
            }
        }
        tab
    }
}

/// A linear weight as linear.wgsl reads it.
struct Lin {
    chunks: Vec<TChunk>,
    dt: u32,
    scheme: u32,
    k: usize,
    n: usize,
    ws: Option<wgpu::Buffer>,
    sw: f32,
    sx: f32,
    block: [usize; 2],
}

impl Lin {
    /// Upload weight `w` (`[n, k]`) with its checked scales; `max_k`/`max_groups` grow to what the
    /// activation quantization scratch must hold.
    fn new(
        gpu: &Gpu,
        w: &Weight,
        scheme: &QuantScheme,
        scales: Option<Fp8Scales>,
        max_k: &mut usize,
        max_groups: &mut usize,
    ) -> Result<Lin> {
        let (n, k) = (w.shape[0], w.shape[1]);
        *max_k = (*max_k).max(k);
        let ks = KernelScales::new(scales);
        if ks.block != [1, 1] {
            *max_groups = (*max_groups).max(ks.groups(k));
        }
        Ok(Lin {
            chunks: upload_tex(gpu, w)?,
            dt: dtype_code(w.dtype),
            scheme: scheme_code(scheme),
            k,
            n,
            ws: ks.array.as_deref().map(|a| upload_f32(gpu, &w.name, a)),
            sw: ks.sw,
            sx: ks.sx,
            block: ks.block,
        })
    }
}

struct KvBufs {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    cap: usize,
    width: usize,
    mode: u32,
    k_scale: f32,
    v_scale: f32,
}

struct WgpuRunner {
    gpu: Arc<Gpu>,
    graph: Graph,
    cache: CacheConfig,
    plans: Vec<Plan>,
    slot_of: Vec<usize>,
    slot_cols: Vec<usize>,
    pool: Vec<wgpu::Buffer>,
    cap_rows: usize,
    ids: wgpu::Buffer,
    info: wgpu::Buffer,
    /// Per `ImageGroups` mode (Off, Windowed, WholeGroup), per row: the (first, last) positions its
    /// attention sees besides the window (`attention_spans`).
    spans: [wgpu::Buffer; 3],
    sel: wgpu::Buffer,
    /// (inv_freq, head_dim, table of [rows, head_dim] cos|sin).
    rope: Vec<(Vec<f32>, usize, wgpu::Buffer)>,
    rope2d: Vec<Rope2dTable>,
    max_k: usize,
    max_groups: usize,
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
    /// MoE scratch (gate_up output, hidden activation, one expert's output) and their columns.
    moe: [wgpu::Buffer; 3],
    moe_cols: [usize; 3],
    uniform: wgpu::Buffer,
    uniform_slots: usize,
    staging: wgpu::Buffer,
    dummy: wgpu::Buffer,
    kv: Vec<KvBufs>,
    lens: Vec<Option<usize>>,
    /// `E4M3_WGPU_PROFILE`: (dispatches, seconds) by op and shape, each dispatch submitted and waited
    /// for alone; printed when the runner is dropped.
    prof: BTreeMap<String, (usize, f64)>,
    /// Bytes of the front guard of activation and scratch buffers (0: no guards).
    front: u64,
    /// The guarded buffers: name, buffer, bytes of data after the front guard.
    guarded: Vec<(String, wgpu::Buffer, u64)>,
}

/// A buffer that linear.wgsl may also read through its uniform window: usable as a uniform, and
/// `XU_BYTES` longer so that a window at any row's offset fits. With guards (`front` > 0) its data
/// starts at `front` and everything around the data (front guard, tail) is filled with `GUARD_WORD`.
fn storage_x(gpu: &Gpu, label: &str, bytes: u64, front: u64) -> wgpu::Buffer {
    let bytes = bytes.div_ceil(4) * 4;
    let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: front + bytes + XU_BYTES + front,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    if front > 0 {
        gpu.queue.write_buffer(&buf, 0, &guard_fill(front as usize));
        gpu.queue.write_buffer(
            &buf,
            front + bytes,
            &guard_fill((XU_BYTES + front) as usize),
        );
    }
    buf
}

fn storage(gpu: &Gpu, label: &str, bytes: u64) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16).div_ceil(4) * 4,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

const UNIFORM_STRIDE: u64 = 256;

impl WgpuRunner {
    fn new(
        gpu: Arc<Gpu>,
        graph: &Graph,
        weights: &WeightMap,
        cache: CacheConfig,
    ) -> Result<WgpuRunner> {
        let mut plans = Vec::with_capacity(graph.nodes.len());
        let mut rope: Vec<(Vec<f32>, usize, wgpu::Buffer)> = Vec::new();
        let mut rope2d: Vec<Rope2dTable> = Vec::new();
        let (mut max_k, mut max_groups) = (1usize, 1usize);
        // Widest MoE scratch rows: gate_up output, hidden activation, one expert's output.
        let mut moe_cols = [0usize; 3];
        for n in &graph.nodes {
            let plan = match (&n.op, node_weights(graph, n, weights)?) {
                (Op::Embed { .. }, NodeWeights::Embed(w)) => Plan::Embed {
                    chunks: upload_rows(&gpu, w)?,
                    dt: dtype_code(w.dtype),
                    cols: n.cols,
                },
                (Op::PosEmbed2d { .. }, NodeWeights::Embed(w)) => Plan::Embed {
                    chunks: upload_rows(&gpu, w)?,
                    dt: dtype_code(w.dtype),
                    cols: n.cols,
                },
                (Op::RmsNorm { weight, .. }, NodeWeights::Norm(w)) => Plan::Norm {
                    w: w.map(|v| upload_f32(&gpu, weight.as_deref().unwrap_or("norm"), &v)),
                },
                (
                    Op::Linear { scheme, .. },
                    NodeWeights::Linear {
                        weight: w, scales, ..
                    },
                ) => Plan::Linear(Lin::new(
                    &gpu,
                    w,
                    scheme,
                    scales,
                    &mut max_k,
                    &mut max_groups,
                )?),
                (
                    Op::RouterTopK {
                        per_expert_scale, ..
                    },
                    NodeWeights::Router(v),
                ) => Plan::Router(upload_f32(&gpu, per_expert_scale, &v)),
                (Op::MoeExperts { intermediate, .. }, NodeWeights::Experts(ex)) => {
                    let mut per = Vec::with_capacity(ex.len());
                    for pair in ex {
                        let mut lin = |e: ExpertLinear| {
                            Lin::new(
                                &gpu,
                                &e.weight,
                                &e.scheme,
                                e.scales,
                                &mut max_k,
                                &mut max_groups,
                            )
                        };
                        let [gu, d] = pair;
                        per.push([lin(gu)?, lin(d)?]);
                    }
                    moe_cols[0] = moe_cols[0].max(2 * intermediate);
                    moe_cols[1] = moe_cols[1].max(*intermediate);
                    moe_cols[2] = moe_cols[2].max(n.cols);
                    Plan::Moe(per)
                }
                (_, NodeWeights::Vectors(v)) => {
                    Plan::Vector(upload_f32(&gpu, &n.name, &v.concat()))
                }
                (Op::Rope { head_dim, inv_freq }, _) => {
                    let idx = match rope
                        .iter()
                        .position(|(f, d, _)| f == inv_freq && d == head_dim)
                    {
                        Some(i) => i,
                        None => {
                            rope.push((inv_freq.clone(), *head_dim, storage(&gpu, "rope", 16)));
                            rope.len() - 1
                        }
                    };
                    Plan::Rope(idx)
                }
                (
                    Op::Rope2d {
                        head_dim,
                        inv_freq,
                        size,
                    },
                    _,
                ) => {
                    rope2d.push(Rope2dTable {
                        inv_freq: inv_freq.clone(),
                        head_dim: *head_dim,
                        size: *size,
                        cols: n.cols,
                        buf: storage(&gpu, "rope2d", 16),
                    });
                    Plan::Rope2d(rope2d.len() - 1)
                }
                _ => Plan::None,
            };
            plans.push(plan);
        }
        let mut kv = Vec::new();
        for (i, l) in graph.cache_layers.iter().enumerate() {
            let cap = graph.cache_capacity(i, cache.max_seq_len);
            let width = l.n_kv_heads * l.head_dim;
            let bytes = (cache.slots * cap * width * 4) as u64;
            if bytes > gpu.max_binding() {
                return Err(Error::invalid(format!(
                    "a KV cache layer of {} MiB exceeds the adapter's storage binding limit of {} MiB; lower the slots or the maximum length",
                    bytes >> 20,
                    gpu.max_binding() >> 20
                )));
            }
            let (mode, k_scale, v_scale) = match kv_rounding(cache.kv_dtype, l, weights)? {
                KvRounding::Exact => (0, 1.0, 1.0),
                KvRounding::Bf16 => (1, 1.0, 1.0),
                KvRounding::Fp8 { k_scale, v_scale } => (2, k_scale, v_scale),
            };
            kv.push(KvBufs {
                k: storage(&gpu, "k cache", bytes),
                v: storage(&gpu, "v cache", bytes),
                cap,
                width,
                mode,
                k_scale,
                v_scale,
            });
        }
        let (slot_of, slot_cols) = graph.buffer_slots();
        let dummy = storage(&gpu, "dummy", 16);
        let mut r = WgpuRunner {
            pool: Vec::new(),
            cap_rows: 0,
            ids: dummy.clone(),
            info: dummy.clone(),
            spans: [dummy.clone(), dummy.clone(), dummy.clone()],
            sel: dummy.clone(),
            xq: dummy.clone(),
            xs: dummy.clone(),
            moe: [dummy.clone(), dummy.clone(), dummy.clone()],
            moe_cols,
            uniform: dummy.clone(),
            uniform_slots: 0,
            // Mappable from the start: outputs of 16 bytes or less never grow it.
            staging: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("staging"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            dummy,
            gpu,
            graph: graph.clone(),
            cache,
            plans,
            slot_of,
            slot_cols,
            rope,
            rope2d,
            max_k,
            max_groups,
            kv,
            lens: vec![None; cache.slots],
            prof: BTreeMap::new(),
            front: 0,
            guarded: Vec::new(),
        };
        r.ensure_rows(cache.max_seq_len.clamp(1, 16))?;
        Ok(r)
    }

    /// Grow every per-row buffer to hold `rows` rows (only when a step has more rows than any before).
    /// With guards, buffers hold exactly the step's rows, so the guard follows the data directly.
    fn ensure_rows(&mut self, rows: usize) -> Result<()> {
        let front = self.front;
        if rows <= self.cap_rows && (front == 0 || rows == self.cap_rows) {
            return Ok(());
        }
        let limit = (self.cache.slots * self.cache.max_seq_len).max(1);
        let cap = if front > 0 {
            rows
        } else {
            rows.next_power_of_two().min(limit).max(rows)
        };
        let gpu = self.gpu.clone();
        let max_buf = gpu.limits.max_buffer_size;
        self.pool = Vec::with_capacity(self.slot_cols.len());
        for &c in &self.slot_cols {
            let bytes = (cap * c * 4) as u64;
            if bytes > max_buf {
                return Err(Error::invalid(format!(
                    "a step of {rows} rows needs an activation buffer of {} MiB, over the adapter's max_buffer_size of {} MiB",
                    bytes >> 20,
                    max_buf >> 20
                )));
            }
            self.pool.push(storage_x(&gpu, "activation", bytes, front));
        }
        self.guarded.clear();
        if front > 0 {
            for (i, (b, &c)) in self.pool.iter().zip(&self.slot_cols).enumerate() {
                let users: Vec<&str> = (self.slot_of.iter().enumerate())
                    .filter(|(_, &s)| s == i)
                    .map(|(n, _)| self.graph.nodes[n].name.as_str())
                    .collect();
                self.guarded.push((
                    format!("activation buffer {i} (`{}`)", users.join("`, `")),
                    b.clone(),
                    (cap * c * 4) as u64,
                ));
            }
        }
        self.ids = storage(&gpu, "ids", (cap * 4) as u64);
        self.sel = storage(&gpu, "select", (cap * 4) as u64);
        self.info = storage(&gpu, "rows", (cap * 16) as u64);
        self.spans = [0, 1, 2].map(|_| storage(&gpu, "attention spans", (cap * 8) as u64));
        for t in &mut self.rope {
            t.2 = storage(&gpu, "rope", (cap * t.1 * 4) as u64);
        }
        for t in &mut self.rope2d {
            t.buf = storage(&gpu, "rope2d", (cap * t.cols * 4) as u64);
        }
        let (xq_bytes, xs_bytes) = (
            (cap * self.max_k * 4) as u64,
            (cap * self.max_groups * 4) as u64,
        );
        self.xq = storage_x(&gpu, "xq", xq_bytes, front);
        self.xs = storage_x(&gpu, "xs", xs_bytes, front);
        if front > 0 {
            self.guarded.push((
                "quantized activations (xq)".into(),
                self.xq.clone(),
                xq_bytes,
            ));
            self.guarded
                .push(("activation scales (xs)".into(), self.xs.clone(), xs_bytes));
        }
        if self.moe_cols[0] > 0 {
            for (i, what) in ["gate_up", "hidden", "output"].iter().enumerate() {
                let bytes = (cap * self.moe_cols[i] * 4) as u64;
                self.moe[i] = storage_x(&gpu, "moe", bytes, front);
                if front > 0 {
                    self.guarded.push((
                        format!("MoE expert {what} scratch"),
                        self.moe[i].clone(),
                        bytes,
                    ));
                }
            }
        }
        self.cap_rows = cap;
        Ok(())
    }
}

impl Drop for WgpuRunner {
    fn drop(&mut self) {
        if self.prof.is_empty() {
            return;
        }
        let mut v: Vec<_> = self.prof.iter().collect();
        v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        eprintln!("wgpu profile (E4M3_WGPU_PROFILE): seconds, dispatches, op");
        for (k, (n, t)) in v {
            eprintln!("{t:10.4} {n:7} {k}");
        }
    }
}

/// A buffer range bound to one binding.
#[derive(Clone)]
struct B {
    buf: wgpu::Buffer,
    off: u64,
    size: u64,
}

fn whole(buf: &wgpu::Buffer, bytes: u64) -> B {
    B {
        buf: buf.clone(),
        off: 0,
        size: bytes.max(4).min(buf.size()),
    }
}

enum Cmd {
    Dispatch {
        /// A texture bound at binding 0 before `binds` (the weights of a linear).
        tex: Option<wgpu::TextureView>,
        pipe: wgpu::ComputePipeline,
        layout: wgpu::BindGroupLayout,
        binds: Vec<B>,
        params: [u32; 16],
        groups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        src_off: u64,
        dst: wgpu::Buffer,
        dst_off: u64,
        size: u64,
    },
}

/// Workgroups for `n` threads of workgroups of `wg`, spread over x and y when x alone would be too many.
fn grid(n: usize, wg: usize) -> [u32; 3] {
    let groups = n.div_ceil(wg).max(1);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

fn params(v: &[u32]) -> [u32; 16] {
    let mut p = [0u32; 16];
    p[..v.len()].copy_from_slice(v);
    p
}

fn f(x: f32) -> u32 {
    x.to_bits()
}

impl WgpuRunner {
    fn act(&self, node: usize, rows: usize) -> B {
        let cols = self.graph.nodes[node].cols;
        self.scratch(&self.pool[self.slot_of[node]], (rows * cols * 4) as u64)
    }

    /// `bytes` bytes of an activation or scratch buffer, after its front guard.
    fn scratch(&self, buf: &wgpu::Buffer, bytes: u64) -> B {
        B {
            buf: buf.clone(),
            off: self.front,
            size: bytes.max(4).min(buf.size() - self.front),
        }
    }

    /// `len` bytes of `buf` from `off`, read back.
    fn read_back(&self, buf: &wgpu::Buffer, off: u64, len: u64) -> Result<Vec<u8>> {
        let gpu = &self.gpu;
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("guard check"),
            size: len.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(buf, off, &staging, 0, len);
        gpu.queue.submit([enc.finish()]);
        let slice = staging.slice(0..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::invalid(format!("wgpu: {e}")))?;
        rx.recv()
            .map_err(|e| Error::invalid(format!("wgpu: {e}")))?
            .map_err(|e| Error::invalid(format!("wgpu: mapping a buffer failed: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::invalid(format!("wgpu: {e:?}")))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    /// The dispatches of one linear `y = x W^T` over `r` rows (with the activation quantization of the
    /// W8A8 schemes first). `route`: the MoE routing weights, their columns and this expert's column;
    /// rows routed elsewhere are skipped.
    fn linear_cmds(
        &self,
        cmds: &mut Vec<Cmd>,
        lin: &Lin,
        x: &B,
        out: &B,
        r: usize,
        route: Option<(&B, usize, usize)>,
    ) {
        let gpu = &self.gpu;
        let p = &gpu.pipes;
        let maxb = gpu.max_binding();
        let align = gpu.limits.min_storage_buffer_offset_alignment as u64;
        let ualign = gpu.limits.min_uniform_buffer_offset_alignment as u64;
        let max_ubo = gpu.limits.max_uniform_buffer_binding_size;
        let Lin {
            chunks,
            dt,
            scheme,
            ws,
            sw,
            sx,
            block,
            ..
        } = lin;
        let (k, n) = (lin.k, lin.n);
        let x = x.clone();
        let ib = k.div_ceil(block[1]);
        // Activation quantization (W8A8 schemes) into the xq scratch buffer.
        let xin = match scheme {
            1 | 2 | 4 => {
                let xq = self.scratch(&self.xq, (r * k * 4) as u64);
                let xs = self.scratch(&self.xs, (r * self.max_groups * 4) as u64);
                if *scheme == 1 {
                    cmds.push(Cmd::Dispatch {
                        tex: None,
                        pipe: p.quant_static.clone(),
                        layout: p.quant_layout.clone(),
                        binds: vec![x.clone(), xq.clone(), xs],
                        params: params(&[(r * k) as u32, k as u32, 0, 0, 0, f(1.0 / sx)]),
                        groups: grid(r * k, 256),
                    });
                } else {
                    let (group, ng, mode) = if *scheme == 2 {
                        (k, 1, 0)
                    } else {
                        (block[1], ib, 1)
                    };
                    cmds.push(Cmd::Dispatch {
                        tex: None,
                        pipe: p.quant_group.clone(),
                        layout: p.quant_layout.clone(),
                        binds: vec![x.clone(), xq.clone(), xs],
                        params: params(&[(r * ng) as u32, k as u32, group as u32, ng as u32, mode]),
                        groups: grid(r * ng, 1),
                    });
                }
                xq
            }
            _ => x,
        };
        // Token windows so that x and y windows each fit one binding (x: the 64 KiB
        // uniform window where a row fits it), at aligned offsets.
        let (rb, rcols, re) = match route {
            Some((b, cols, e)) => (b.clone(), cols, e),
            None => (whole(&self.dummy, 16), 0, 0),
        };
        let uni = (k * 4) as u64 <= XU_BYTES.min(max_ubo);
        let (xmax, xalign) = if uni {
            (XU_BYTES, ualign)
        } else {
            (maxb, align)
        };
        let mut tc = ((xmax / (k * 4) as u64).min(maxb / (n * 4) as u64) as usize)
            .clamp(1, 65535)
            .min(r);
        if tc < r {
            let ra = |c: usize, a: u64| a / gcd((c * 4) as u64, a);
            let (sk, sn) = (ra(k, xalign), ra(n, align));
            let step = (sk * sn / gcd(sk, sn)) as usize;
            tc = (tc / step * step).max(step);
        }
        let mut t0 = 0;
        while t0 < r {
            let tn = tc.min(r - t0);
            let xw = B {
                buf: xin.buf.clone(),
                off: xin.off + (t0 * k * 4) as u64,
                size: if uni { XU_BYTES } else { (tn * k * 4) as u64 },
            };
            let ow = B {
                buf: out.buf.clone(),
                off: out.off + (t0 * n * 4) as u64,
                size: (tn * n * 4) as u64,
            };
            for c in chunks {
                let wsb = match ws {
                    Some(b) => whole(b, b.size()),
                    None => whole(&self.dummy, 16),
                };
                let xsb = self.scratch(&self.xs, self.xs.size());
                let pipe = p.linear[&(*dt, *scheme, uni)].clone();
                cmds.push(Cmd::Dispatch {
                    tex: Some(c.view.clone()),
                    pipe,
                    layout: if uni {
                        p.lin_layout.clone()
                    } else {
                        p.lin_layout_s.clone()
                    },
                    binds: vec![xw.clone(), ow.clone(), wsb, xsb, rb.clone()],
                    params: params(&[
                        c.rows as u32,
                        k as u32,
                        tn as u32,
                        c.row0 as u32,
                        n as u32,
                        ib as u32,
                        block[0] as u32,
                        block[1] as u32,
                        f(*sw),
                        f(*sx),
                        t0 as u32,
                        c.kt as u32,
                        rcols as u32,
                        re as u32,
                    ]),
                    // One invocation per two output rows and one token row.
                    groups: [c.rows.div_ceil(128).max(1) as u32, tn as u32, 1],
                });
            }
            t0 += tn;
        }
    }

    /// Elementwise op over `n` values, in windows no larger than one binding.
    #[allow(clippy::too_many_arguments)]
    fn elementwise(
        &self,
        cmds: &mut Vec<Cmd>,
        pipe: &wgpu::ComputePipeline,
        a: &B,
        b: Option<&B>,
        o: &B,
        n: usize,
        factor: f32,
    ) {
        self.elementwise_v(cmds, pipe, a, b, o, n, [factor, 0.0], 0)
    }

    /// [`Self::elementwise`]; with `bias_cols` > 0, `b` is a vector of that many values (one per column of
    /// rows of `bias_cols`), bound whole; `factor` holds the op's two scalars (Clamp: min, max).
    #[allow(clippy::too_many_arguments)]
    fn elementwise_v(
        &self,
        cmds: &mut Vec<Cmd>,
        pipe: &wgpu::ComputePipeline,
        a: &B,
        b: Option<&B>,
        o: &B,
        n: usize,
        factor: [f32; 2],
        bias_cols: usize,
    ) {
        let chunk = ((self.gpu.max_binding() / 4) as usize / 64 * 64).max(64);
        let mut e0 = 0;
        while e0 < n {
            let len = chunk.min(n - e0);
            let win = |x: &B| B {
                buf: x.buf.clone(),
                off: x.off + (e0 * 4) as u64,
                size: (len * 4) as u64,
            };
            let bb = match b {
                Some(b) if bias_cols > 0 => b.clone(),
                Some(b) => win(b),
                None => whole(&self.dummy, 16),
            };
            cmds.push(Cmd::Dispatch {
                tex: None,
                pipe: pipe.clone(),
                layout: self.gpu.pipes.el_layout.clone(),
                binds: vec![win(a), bb, win(o)],
                params: params(&[
                    len as u32,
                    f(factor[0]),
                    bias_cols as u32,
                    (e0 % bias_cols.max(1)) as u32,
                    f(factor[1]),
                ]),
                groups: grid(len, 256),
            });
            e0 += len;
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl WgpuRunner {
    /// One step; `inputs`: given embedding rows and image groups ([`Runner::step_with_inputs`]).
    fn run_step(
        &mut self,
        batch: &Batch,
        inputs: Option<&StepInputs>,
        taps: &[String],
    ) -> Result<StepOutput> {
        validate_batch(batch, &self.cache, self.graph.vocab_size, |s| {
            self.lens[s].unwrap_or(0)
        })?;
        for t in taps {
            if self.graph.find(t).is_none() {
                return Err(Error::invalid(format!("no node named `{t}` to tap")));
            }
        }
        let (ids, positions) = batch.flat_tokens();
        let logit_rows = batch.logit_rows();
        let t = ids.len();
        check_step_inputs(inputs, &self.graph, t)?;
        let nsel = logit_rows.len();
        self.ensure_rows(t.max(1))?;
        let gpu = self.gpu.clone();
        let p = &gpu.pipes;
        let q = &gpu.queue;

        // Rows of every node's value this step, and the input rows of each PoolPositions node's rows.
        let mut rows = vec![0usize; self.graph.nodes.len()];
        let mut pool_src: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (i, n) in self.graph.nodes.iter().enumerate() {
            rows[i] = match n.op {
                Op::Embed { .. } | Op::Input => t,
                Op::SelectRows => nsel,
                Op::AvgPool2d { side, kernel } => {
                    if let Some(s) = batch.seqs.iter().find(|s| s.tokens.len() != side * side) {
                        return Err(Error::invalid(format!(
                            "node `{}` pools a {side}x{side} grid; a sequence has {} rows",
                            n.name,
                            s.tokens.len()
                        )));
                    }
                    batch.seqs.len() * (side / kernel) * (side / kernel)
                }
                Op::PoolPositions { kernel, size } => {
                    if n.inputs.first().map(|v| rows[v.0]) != Some(t) {
                        return Err(Error::invalid(format!(
                            "node `{}` pools the step's {t} rows by position; its input has other rows",
                            n.name
                        )));
                    }
                    let spans = batch.seq_spans();
                    let (cells, total) =
                        e4m3_core::cpu::vision::pool_cells(&ids, &spans, kernel, size)
                            .map_err(|e| Error::invalid(format!("node `{}`: {e}", n.name)))?;
                    // Per pooled row, its kernel^2 input rows in row order.
                    let mut src = vec![Vec::with_capacity(kernel * kernel); total];
                    for (r, &c) in cells.iter().enumerate() {
                        src[c].push(r as u32);
                    }
                    pool_src.insert(i, src.concat());
                    total
                }
                _ => n.inputs.first().map_or(t, |v| rows[v.0]),
            };
        }

        // Per-step inputs.
        if t > 0 {
            q.write_buffer(&self.ids, 0, bytemuck::cast_slice(&ids));
            let mut info = Vec::with_capacity(t * 4);
            let mut base = 0u32;
            for s in &batch.seqs {
                for _ in 0..s.tokens.len() {
                    info.extend_from_slice(&[
                        s.slot as u32,
                        s.start_pos as u32,
                        s.tokens.len() as u32,
                        base,
                    ]);
                }
                base += s.tokens.len() as u32;
            }
            q.write_buffer(&self.info, 0, bytemuck::cast_slice(&info));
            let groups = inputs.map_or(&[][..], |i| &i.groups);
            for (buf, mode) in self.spans.iter().zip(GROUP_MODES) {
                let spans = attention_spans(batch, groups, mode);
                q.write_buffer(buf, 0, bytemuck::cast_slice(&spans));
            }
            for (inv_freq, hd, buf) in &self.rope {
                let half = hd / 2;
                let mut tab = vec![0f32; t * hd];
                for (r, &pos) in positions.iter().enumerate() {
                    for (i, &fr) in inv_freq.iter().enumerate() {
                        let a = pos as f32 * fr;
                        tab[r * hd + i] = a.cos();
                        tab[r * hd + half + i] = a.sin();
                    }
                }
                q.write_buffer(buf, 0, bytemuck::cast_slice(&tab));
            }
            for t in &self.rope2d {
                q.write_buffer(&t.buf, 0, bytemuck::cast_slice(&t.table(&ids)));
            }
        }
        if nsel > 0 {
            let sel: Vec<u32> = logit_rows.iter().map(|r| r.0 as u32).collect();
            q.write_buffer(&self.sel, 0, bytemuck::cast_slice(&sel));
        }

        // Given rows (Op::Input, or replacing the Embed rows of a text step), as (row, index of the given
        // row) runs of consecutive rows, copied from one upload.
        let given_node = self.graph.given_rows_node();
        let given = inputs.filter(|i| !i.embed_rows.is_empty()).map(|inp| {
            let buf = gpu
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("given embeddings"),
                    contents: bytemuck::cast_slice(&inp.embeds.data),
                    usage: wgpu::BufferUsages::COPY_SRC,
                });
            (buf, inp.given_runs(), inp.embeds.cols)
        });
        let copy_given = |cmds: &mut Vec<Cmd>, out: &B| {
            if let Some((buf, runs, cols)) = &given {
                for &(r0, i0, n) in runs {
                    cmds.push(Cmd::Copy {
                        src: buf.clone(),
                        src_off: (i0 * cols * 4) as u64,
                        dst: out.buf.clone(),
                        dst_off: out.off + (r0 * cols * 4) as u64,
                        size: (n * cols * 4) as u64,
                    });
                }
            }
        };
        let mut cmds: Vec<Cmd> = Vec::new();
        let profile = std::env::var_os("E4M3_WGPU_PROFILE").is_some();
        let mut tap_bufs: Vec<(String, usize, usize, wgpu::Buffer)> = Vec::new();
        let el = || p.el_layout.clone();
        let mut labels: Vec<String> = Vec::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let r = rows[i];
            let out = self.act(i, r);
            let inp = |k: usize| self.act(node.inputs[k].0, rows[node.inputs[k].0]);
            if r > 0 {
                match (&node.op, &self.plans[i]) {
                    (Op::Embed { scale, .. }, Plan::Embed { chunks, dt, cols }) => {
                        for c in chunks {
                            cmds.push(Cmd::Dispatch {
                                tex: None,
                                pipe: p.embed[*dt as usize].clone(),
                                layout: el(),
                                binds: vec![
                                    whole(&c.buf, c.buf.size()),
                                    whole(&self.ids, (t * 4) as u64),
                                    out.clone(),
                                ],
                                params: params(&[
                                    t as u32,
                                    *cols as u32,
                                    c.row0 as u32,
                                    c.rows as u32,
                                    f(*scale),
                                ]),
                                groups: grid(t * cols, 256),
                            });
                        }
                        if given_node == Some(i) {
                            copy_given(&mut cmds, &out);
                        }
                    }
                    (Op::Input, _) => copy_given(&mut cmds, &out),
                    (
                        Op::RmsNorm {
                            group,
                            eps,
                            add_one,
                            ..
                        },
                        Plan::Norm { w },
                    ) => {
                        let ng = r * node.cols / group;
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.rms_norm.clone(),
                            layout: el(),
                            binds: vec![
                                inp(0),
                                w.as_ref()
                                    .map_or_else(|| whole(&self.dummy, 16), |b| whole(b, b.size())),
                                out.clone(),
                            ],
                            params: params(&[
                                *group as u32,
                                ng as u32,
                                f(*eps),
                                *add_one as u32,
                                w.is_some() as u32,
                            ]),
                            groups: grid(ng, 1),
                        });
                    }
                    (Op::Linear { .. }, Plan::Linear(lin)) => {
                        self.linear_cmds(&mut cmds, lin, &inp(0), &out, r, None)
                    }
                    (Op::Rope { head_dim, .. }, Plan::Rope(ti)) => {
                        let half = head_dim / 2;
                        let heads = node.cols / head_dim;
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.rope.clone(),
                            layout: el(),
                            binds: vec![
                                inp(0),
                                whole(&self.rope[*ti].2, (r * head_dim * 4) as u64),
                                out.clone(),
                            ],
                            params: params(&[
                                r as u32,
                                node.cols as u32,
                                *head_dim as u32,
                                half as u32,
                            ]),
                            groups: grid(r * heads * half, 256),
                        });
                    }
                    (
                        Op::Attention {
                            cache_layer,
                            n_heads,
                            n_kv_heads,
                            head_dim,
                            scale,
                            window,
                            softcap,
                            image_groups,
                        }
                        | Op::AttentionShared {
                            cache_layer,
                            n_heads,
                            n_kv_heads,
                            head_dim,
                            scale,
                            window,
                            softcap,
                            image_groups,
                        },
                        _,
                    ) => {
                        let mode = GROUP_MODES.iter().position(|m| m == image_groups);
                        let spans = &self.spans[mode.expect("every mode")];
                        let kvb = &self.kv[*cache_layer];
                        let binds = vec![
                            inp(0),
                            inp(1),
                            inp(2),
                            out.clone(),
                            whole(&kvb.k, kvb.k.size()),
                            whole(&kvb.v, kvb.v.size()),
                            whole(&self.info, (t * 16) as u64),
                            whole(spans, (t * 8) as u64),
                        ];
                        let prm = params(&[
                            *n_heads as u32,
                            *n_kv_heads as u32,
                            *head_dim as u32,
                            node.cols as u32,
                            kvb.width as u32,
                            kvb.cap as u32,
                            window.unwrap_or(0) as u32,
                            softcap.is_some() as u32,
                            f(*scale),
                            f(softcap.unwrap_or(1.0)),
                            kvb.mode,
                            f(kvb.k_scale),
                            f(kvb.v_scale),
                            (kvb.cap * kvb.width) as u32,
                            r as u32,
                            0,
                        ]);
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.attention.clone(),
                            layout: p.attn_layout.clone(),
                            binds: binds.clone(),
                            params: prm,
                            groups: [r as u32, *n_heads as u32, 1],
                        });
                        // AttentionShared reads the owner's cache and leaves it alone.
                        if matches!(node.op, Op::Attention { .. }) {
                            cmds.push(Cmd::Dispatch {
                                tex: None,
                                pipe: p.kv_write.clone(),
                                layout: p.attn_layout.clone(),
                                binds,
                                params: prm,
                                groups: grid(r * kvb.width, 256),
                            });
                        }
                    }
                    (Op::GeluTanhMul, _) => {
                        self.elementwise(
                            &mut cmds,
                            &p.gelu,
                            &inp(0),
                            Some(&inp(1)),
                            &out,
                            r * node.cols,
                            0.0,
                        );
                    }
                    (Op::Add, _) => self.elementwise(
                        &mut cmds,
                        &p.add,
                        &inp(0),
                        Some(&inp(1)),
                        &out,
                        r * node.cols,
                        0.0,
                    ),
                    (Op::Scale { factor }, _) => self.elementwise(
                        &mut cmds,
                        &p.scale,
                        &inp(0),
                        None,
                        &out,
                        r * node.cols,
                        *factor,
                    ),
                    (Op::Softcap { cap }, _) => self.elementwise(
                        &mut cmds,
                        &p.softcap,
                        &inp(0),
                        None,
                        &out,
                        r * node.cols,
                        *cap,
                    ),
                    (Op::SliceCols { start }, _) => {
                        let src = self.graph.nodes[node.inputs[0].0].cols;
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.slice_cols.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(&self.dummy, 16), out.clone()],
                            params: params(&[
                                (r * node.cols) as u32,
                                src as u32,
                                *start as u32,
                                node.cols as u32,
                            ]),
                            groups: grid(r * node.cols, 256),
                        });
                    }
                    (Op::RouterTopK { top_k, .. }, Plan::Router(pes)) => {
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.router_topk.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(pes, pes.size()), out.clone()],
                            params: params(&[r as u32, node.cols as u32, *top_k as u32]),
                            groups: grid(r, 64),
                        });
                    }
                    (Op::MoeExperts { intermediate, .. }, Plan::Moe(experts)) => {
                        // Per expert: gate_up, gelu(gate) * up, down over the rows routed to it
                        // (linear.wgsl skips the others), then weighted into the output.
                        let (x, route) = (inp(0), inp(1));
                        let ne = experts.len();
                        let im = *intermediate;
                        let gu = self.scratch(&self.moe[0], (r * 2 * im * 4) as u64);
                        let h = self.scratch(&self.moe[1], (r * im * 4) as u64);
                        let y = self.scratch(&self.moe[2], (r * node.cols * 4) as u64);
                        for (e, [gate_up, down]) in experts.iter().enumerate() {
                            let rt = Some((&route, ne, e));
                            self.linear_cmds(&mut cmds, gate_up, &x, &gu, r, rt);
                            cmds.push(Cmd::Dispatch {
                                tex: None,
                                pipe: p.gelu_split.clone(),
                                layout: el(),
                                binds: vec![gu.clone(), whole(&self.dummy, 16), h.clone()],
                                params: params(&[(r * im) as u32, im as u32]),
                                groups: grid(r * im, 256),
                            });
                            self.linear_cmds(&mut cmds, down, &h, &y, r, rt);
                            cmds.push(Cmd::Dispatch {
                                tex: None,
                                pipe: p.moe_acc.clone(),
                                layout: el(),
                                binds: vec![y.clone(), route.clone(), out.clone()],
                                params: params(&[
                                    (r * node.cols) as u32,
                                    node.cols as u32,
                                    ne as u32,
                                    e as u32,
                                    (e == 0) as u32,
                                ]),
                                groups: grid(r * node.cols, 256),
                            });
                        }
                    }
                    (Op::BiasAdd { .. }, Plan::Vector(b)) => self.elementwise_v(
                        &mut cmds,
                        &p.bias_add,
                        &inp(0),
                        Some(&whole(b, b.size())),
                        &out,
                        r * node.cols,
                        [0.0; 2],
                        node.cols,
                    ),
                    (Op::GeluTanh, _) => self.elementwise(
                        &mut cmds,
                        &p.gelu_only,
                        &inp(0),
                        None,
                        &out,
                        r * node.cols,
                        0.0,
                    ),
                    (Op::LayerNorm { eps, .. }, Plan::Vector(wb)) => {
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.layer_norm.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(wb, wb.size()), out.clone()],
                            params: params(&[node.cols as u32, r as u32, f(*eps)]),
                            groups: grid(r, 1),
                        });
                    }
                    (
                        Op::EncoderAttention {
                            n_heads,
                            head_dim,
                            scale,
                        },
                        _,
                    ) => {
                        if r != t {
                            return Err(Error::invalid(format!(
                                "node `{}` attends among a step's {t} rows, its input has {r}",
                                node.name
                            )));
                        }
                        // One dispatch per sequence (an image), ER query rows a workgroup.
                        let none = whole(&self.dummy, 16);
                        let mut row0 = 0;
                        for s in &batch.seqs {
                            let n = s.tokens.len();
                            if n > 0 {
                                cmds.push(Cmd::Dispatch {
                                    tex: None,
                                    pipe: p.encoder_attention.clone(),
                                    layout: p.attn_layout.clone(),
                                    binds: vec![
                                        inp(0),
                                        inp(1),
                                        inp(2),
                                        out.clone(),
                                        none.clone(),
                                        none.clone(),
                                        whole(&self.info, (t * 16) as u64),
                                        whole(&self.spans[0], (t * 8) as u64),
                                    ],
                                    params: params(&[
                                        *n_heads as u32,
                                        *n_heads as u32,
                                        *head_dim as u32,
                                        node.cols as u32,
                                        node.cols as u32,
                                        1,
                                        0,
                                        0,
                                        f(*scale),
                                        f(1.0),
                                        0,
                                        f(1.0),
                                        f(1.0),
                                        0,
                                        n as u32,
                                        row0 as u32,
                                    ]),
                                    groups: [n.div_ceil(ENCODER_ROWS) as u32, *n_heads as u32, 1],
                                });
                            }
                            row0 += n;
                        }
                    }
                    (Op::PosEmbed2d { size, .. }, Plan::Embed { chunks, dt, cols }) => {
                        for phase in 0..2 {
                            for c in chunks {
                                cmds.push(Cmd::Dispatch {
                                    tex: None,
                                    pipe: p.pos_embed2d[*dt as usize].clone(),
                                    layout: el(),
                                    binds: vec![
                                        whole(&c.buf, c.buf.size()),
                                        whole(&self.ids, (t * 4) as u64),
                                        out.clone(),
                                    ],
                                    params: params(&[
                                        t as u32,
                                        *cols as u32,
                                        c.row0 as u32,
                                        c.rows as u32,
                                        f(1.0),
                                        *size as u32,
                                        phase,
                                    ]),
                                    groups: grid(t * cols, 256),
                                });
                            }
                        }
                    }
                    (Op::Rope2d { head_dim, .. }, Plan::Rope2d(ti)) => {
                        // rope.wgsl over the values read as rows of one head of head_dim / 2.
                        let hd = head_dim / 2;
                        let rr = r * node.cols / hd;
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.rope.clone(),
                            layout: el(),
                            binds: vec![
                                inp(0),
                                whole(&self.rope2d[*ti].buf, (r * node.cols * 4) as u64),
                                out.clone(),
                            ],
                            params: params(&[rr as u32, hd as u32, hd as u32, (hd / 2) as u32]),
                            groups: grid(rr * hd / 2, 256),
                        });
                    }
                    (Op::PoolPositions { kernel, .. }, _) => {
                        let src =
                            gpu.device
                                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                                    label: Some("pool sources"),
                                    contents: bytemuck::cast_slice(&pool_src[&i]),
                                    usage: wgpu::BufferUsages::STORAGE,
                                });
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.pool_positions.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(&src, src.size()), out.clone()],
                            params: params(&[
                                (r * node.cols) as u32,
                                node.cols as u32,
                                (kernel * kernel) as u32,
                            ]),
                            groups: grid(r * node.cols, 256),
                        });
                    }
                    (Op::Clamp { min, max }, _) => self.elementwise_v(
                        &mut cmds,
                        &p.clamp,
                        &inp(0),
                        None,
                        &out,
                        r * node.cols,
                        [*min, *max],
                        0,
                    ),
                    (Op::ChannelScale { .. }, Plan::Vector(w)) => self.elementwise_v(
                        &mut cmds,
                        &p.channel_scale,
                        &inp(0),
                        Some(&whole(w, w.size())),
                        &out,
                        r * node.cols,
                        [0.0; 2],
                        node.cols,
                    ),
                    (Op::AvgPool2d { side, kernel }, _) => {
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.avg_pool2d.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(&self.dummy, 16), out.clone()],
                            params: params(&[
                                (r * node.cols) as u32,
                                node.cols as u32,
                                *side as u32,
                                *kernel as u32,
                            ]),
                            groups: grid(r * node.cols, 256),
                        });
                    }
                    (Op::SelectRows, _) => {
                        let src = self.graph.nodes[node.inputs[0].0].cols;
                        cmds.push(Cmd::Dispatch {
                            tex: None,
                            pipe: p.select_rows.clone(),
                            layout: el(),
                            binds: vec![inp(0), whole(&self.sel, (r * 4) as u64), out.clone()],
                            params: params(&[r as u32, src as u32]),
                            groups: grid(r * src, 256),
                        });
                    }
                    _ => {
                        return Err(Error::Unsupported {
                            backend: "wgpu".into(),
                            op: node.op.kind().into(),
                            node: node.name.clone(),
                        })
                    }
                }
            }
            if profile {
                let lab = match &self.plans[i] {
                    Plan::Linear(Lin {
                        k, n, dt, scheme, ..
                    }) => format!("linear k={k} n={n} dtype={dt} scheme={scheme} rows={r}"),
                    _ => format!("{} cols={} rows={r}", node.op.kind(), node.cols),
                };
                labels.resize(cmds.len(), lab);
            }
            if taps.contains(&node.name) {
                let size = (r * node.cols * 4) as u64;
                let dst = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tap"),
                    size: size.max(4),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                if size > 0 {
                    cmds.push(Cmd::Copy {
                        src: out.buf.clone(),
                        src_off: out.off,
                        dst: dst.clone(),
                        dst_off: 0,
                        size,
                    });
                }
                tap_bufs.push((node.name.clone(), r, node.cols, dst));
            }
        }
        // Logits readback.
        let out_id = self.graph.output.0;
        let (orows, ocols) = (rows[out_id], self.graph.nodes[out_id].cols);
        let obytes = (orows * ocols * 4) as u64;
        if self.staging.size() < obytes {
            self.staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("staging"),
                size: obytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        }
        if obytes > 0 {
            cmds.push(Cmd::Copy {
                src: self.pool[self.slot_of[out_id]].clone(),
                src_off: self.front,
                dst: self.staging.clone(),
                dst_off: 0,
                size: obytes,
            });
        }

        // Uniforms: one 256-byte slot per dispatch, written once.
        let nd = cmds
            .iter()
            .filter(|c| matches!(c, Cmd::Dispatch { .. }))
            .count();
        if nd > self.uniform_slots {
            self.uniform_slots = nd.next_power_of_two();
            self.uniform = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: self.uniform_slots as u64 * UNIFORM_STRIDE,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
        }
        let mut ubytes = vec![0u8; nd.max(1) * UNIFORM_STRIDE as usize];
        let mut groups_bg = Vec::with_capacity(nd);
        let mut di = 0;
        for c in &cmds {
            if let Cmd::Dispatch {
                layout,
                binds,
                params,
                pipe,
                tex,
                ..
            } = c
            {
                let _ = pipe;
                let off = di * UNIFORM_STRIDE as usize;
                ubytes[off..off + 64].copy_from_slice(bytemuck::cast_slice(params));
                // The uniform sits at binding 2 (quant), 4 (attention) or 3 (all others).
                let uslot = if *layout == p.quant_layout {
                    2
                } else if *layout == p.attn_layout {
                    4
                } else {
                    3
                };
                let mut entries = Vec::with_capacity(binds.len() + 2);
                let mut it = binds.iter();
                if let Some(view) = tex {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::TextureView(view),
                    });
                }
                let first = tex.is_some() as u32;
                for bi in first..=binds.len() as u32 + first {
                    let resource = if bi == uslot {
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &self.uniform,
                            offset: off as u64,
                            size: std::num::NonZeroU64::new(64),
                        })
                    } else {
                        let b = it.next().expect("binding");
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &b.buf,
                            offset: b.off,
                            size: std::num::NonZeroU64::new(b.size.max(4)),
                        })
                    };
                    entries.push(wgpu::BindGroupEntry {
                        binding: bi,
                        resource,
                    });
                }
                groups_bg.push(gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout,
                    entries: &entries,
                }));
                di += 1;
            }
        }
        if nd > 0 {
            q.write_buffer(&self.uniform, 0, &ubytes);
        }
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let mut di = 0;
        let mut ci = 0;
        while ci < cmds.len() {
            let first = ci;
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                while let Some(Cmd::Dispatch { pipe, groups, .. }) = cmds.get(ci) {
                    pass.set_pipeline(pipe);
                    pass.set_bind_group(0, &groups_bg[di], &[]);
                    pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                    di += 1;
                    ci += 1;
                    if profile {
                        break;
                    }
                }
            }
            while let Some(Cmd::Copy {
                src,
                src_off,
                dst,
                dst_off,
                size,
            }) = cmds.get(ci)
            {
                enc.copy_buffer_to_buffer(src, *src_off, dst, *dst_off, *size);
                ci += 1;
            }
            if profile {
                let t0 = std::time::Instant::now();
                q.submit([std::mem::replace(
                    &mut enc,
                    gpu.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }),
                )
                .finish()]);
                let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
                let label = labels.get(first).map_or("copy", |l| l.as_str());
                let e = self.prof.entry(label.to_string()).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += t0.elapsed().as_secs_f64();
            }
        }
        q.submit([enc.finish()]);

        let read = |buf: &wgpu::Buffer, bytes: u64, rows: usize, cols: usize| -> Result<Mat> {
            if bytes == 0 {
                return Ok(Mat::zeros(rows, cols));
            }
            let slice = buf.slice(0..bytes);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            gpu.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::invalid(format!("wgpu: {e}")))?;
            rx.recv()
                .map_err(|e| Error::invalid(format!("wgpu: {e}")))?
                .map_err(|e| Error::invalid(format!("wgpu: mapping a buffer failed: {e}")))?;
            let data = {
                let view = slice
                    .get_mapped_range()
                    .map_err(|e| Error::invalid(format!("wgpu: {e:?}")))?;
                bytemuck::cast_slice::<u8, f32>(&view).to_vec()
            };
            buf.unmap();
            Mat::from_vec(rows, cols, data)
        };
        let logits = read(&self.staging, obytes, orows, ocols)?;
        let mut tapped = BTreeMap::new();
        for (name, r, c, buf) in &tap_bufs {
            tapped.insert(name.clone(), read(buf, (r * c * 4) as u64, *r, *c)?);
        }
        for s in &batch.seqs {
            self.lens[s.slot] = Some(s.start_pos + s.tokens.len());
        }
        Ok(StepOutput {
            logits,
            rows: logit_rows.iter().map(|r| (r.1, r.2)).collect(),
            taps: tapped,
        })
    }
}

impl Runner for WgpuRunner {
    fn step(&mut self, batch: &Batch, taps: &[String]) -> Result<StepOutput> {
        self.run_step(batch, None, taps)
    }

    fn supports_step_inputs(&self) -> bool {
        true
    }

    fn step_with_inputs(
        &mut self,
        batch: &Batch,
        inputs: &StepInputs,
        taps: &[String],
    ) -> Result<StepOutput> {
        self.run_step(batch, Some(inputs), taps)
    }

    fn enable_guards(&mut self) -> bool {
        let l = &self.gpu.limits;
        self.front = 256
            .max(l.min_storage_buffer_offset_alignment as u64)
            .max(l.min_uniform_buffer_offset_alignment as u64);
        // Reallocated with guards by the next step.
        self.cap_rows = 0;
        true
    }

    fn check_guards(&mut self) -> Result<()> {
        for (name, buf, bytes) in &self.guarded {
            let all = self.read_back(buf, 0, buf.size())?;
            let tail = (self.front + bytes) as usize;
            for (side, base, region) in [
                ("front", 0, &all[..self.front as usize]),
                ("back", tail, &all[tail..]),
            ] {
                if let Some((off, w)) = guard_damage(region) {
                    return Err(Error::invalid(format!(
                        "{side} guard of the {name} overwritten at byte {} of the buffer (data at bytes {}..{tail}): 0x{w:08x}",
                        base + off,
                        self.front
                    )));
                }
            }
        }
        Ok(())
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        let s = self
            .lens
            .get_mut(slot)
            .ok_or_else(|| Error::invalid(format!("slot {slot} does not exist")))?;
        *s = None;
        Ok(())
    }

    fn seq_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().flatten().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use e4m3_core::backend::LogitsFor;

    /// Guards around activation buffers: intact after real steps, and a word written past a buffer's data
    /// or before it (what a wrong binding offset or size in the host code would do) is reported with the
    /// buffer's name and the byte offset.
    #[test]
    fn guard_regions_catch_writes_outside_the_data() {
        let adapter = all_adapters()
            .into_iter()
            .next()
            .expect("no wgpu adapter (install mesa-vulkan-drivers for lavapipe: scripts/setup.sh)");
        let backend = WgpuBackend::new(adapter, None).unwrap();
        let (vocab, cols) = (11, 13);
        let table: Vec<f32> = (0..vocab * cols).map(|i| i as f32 * 0.25 - 7.0).collect();
        let mut weights = WeightMap::new();
        weights.insert("t".into(), Weight::from_f32("t", vec![vocab, cols], &table));
        let mut g = Graph::new(vocab);
        let x = g.add(
            "x",
            Op::Embed {
                table: "t".into(),
                scale: 1.0,
            },
            &[],
            cols,
        );
        g.output = g.add("y", Op::Scale { factor: 2.0 }, &[x], cols);
        let mut r =
            WgpuRunner::new(backend.gpu.clone(), &g, &weights, CacheConfig::new(1, 8)).unwrap();
        assert!(r.enable_guards());
        let out = r
            .step(&Batch::single(0, 0, vec![3, 5, 7], LogitsFor::All), &[])
            .unwrap();
        assert_eq!(out.logits.row(1)[2], 2.0 * table[5 * cols + 2]);
        r.check_guards().unwrap();
        assert!(!r.guarded.is_empty());
        // One word right after the data of the buffer holding `y` (3 rows x 13 values).
        let slot = r.slot_of[g.output.0];
        let end = r.front + 3 * 13 * 4;
        r.gpu
            .queue
            .write_buffer(&r.pool[slot], end, &1.0f32.to_le_bytes());
        let e = r.check_guards().unwrap_err().to_string();
        assert!(
            e.contains(&format!("back guard of the activation buffer {slot} (`"))
                && e.contains("`y`")
                && e.contains(&format!("overwritten at byte {end} "))
                && e.contains("0x3f800000"),
            "{e}"
        );
        // Restored, the guards pass again; then a word inside the front guard.
        r.gpu.queue.write_buffer(&r.pool[slot], end, &guard_fill(4));
        r.check_guards().unwrap();
        r.gpu.queue.write_buffer(&r.pool[slot], 8, &[0u8; 4]);
        let e = r.check_guards().unwrap_err().to_string();
        assert!(e.contains("front guard") && e.contains("at byte 8 "), "{e}");
    }

    #[test]
    fn open_answers_with_a_backend_or_a_clear_error() {
        match super::open(None) {
            Ok(b) => assert_eq!(b.name(), "wgpu"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("backend `wgpu` is not available"), "{e}");
            }
        }
        let e = super::open(Some("no such adapter 12345"))
            .err()
            .expect("no adapter has that name")
            .to_string();
        assert!(e.contains("no wgpu adapter whose name contains"), "{e}");
    }
}
