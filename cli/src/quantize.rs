//! `e4m3 quantize`: write an FP8 (E4M3) checkpoint from a BF16/F32 one (see e4m3_core::quantize).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::ValueEnum;
use e4m3_core::quantize::{quantize, CalibSource, QuantizeOptions, Scheme, WeightCalib};

/// The FP8 schemes, named as the CLI spells them (every one is FP8).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SchemeArg {
    /// ModelOpt FP8 per-tensor W8A8 with static (calibrated) input scales.
    #[value(name = "fp8-static")]
    Fp8Static,
    /// compressed-tensors FP8_DYNAMIC: per-channel weights, dynamic per-token activations.
    #[value(name = "fp8-dynamic")]
    Fp8Dynamic,
    /// ModelOpt fp8_pb_wo: block weights, activations unquantized.
    #[value(name = "fp8-block-wo")]
    Fp8BlockWo,
    /// transformers FineGrainedFP8: block weights (weight_scale_inv), dynamic 1 x block activations.
    #[value(name = "fp8-block")]
    Fp8Block,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CalibArg {
    Max,
    Mse,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvCacheArg {
    Fp8,
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Source checkpoint (BF16 or F32 safetensors + config.json + tokenizer).
    #[arg(long)]
    pub from: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub to: PathBuf,
    #[arg(long, value_enum)]
    pub scheme: SchemeArg,
    /// Block edge of the block schemes (64 or 128).
    #[arg(long, default_value_t = 128)]
    pub block: usize,
    /// How weight scales are chosen: amax/448, or the MSE-optimal scale per group.
    #[arg(long, value_enum, default_value = "max")]
    pub weight_calib: CalibArg,
    /// Calibration text file (default: the text shipped with e4m3).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Number of calibration sequences.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Also write calibrated FP8 KV-cache scales.
    #[arg(long, value_enum)]
    pub kv_cache: Option<KvCacheArg>,
    /// Leave matching modules (glob, e.g. `*down_proj` or `model.layers.0.*`) in BF16.
    #[arg(long, num_args = 1..)]
    pub ignore: Vec<String>,
}

pub fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let scheme = match a.scheme {
        SchemeArg::Fp8Static => Scheme::Fp8Static,
        SchemeArg::Fp8Dynamic => Scheme::Fp8Dynamic,
        SchemeArg::Fp8BlockWo => Scheme::Fp8BlockWo,
        SchemeArg::Fp8Block => Scheme::Fp8Block,
    };
    if scheme.is_block() && a.block != 64 && a.block != 128 {
        bail!("--block must be 64 or 128, got {}", a.block);
    }
    if scheme == Scheme::Fp8BlockWo && a.block != 128 {
        bail!(
            "--block {} with fp8-block-wo: ModelOpt's fp8_pb_wo format records no block size and every loader \
             (vLLM, e4m3) assumes 128x128",
            a.block
        );
    }
    if a.samples == 0 || a.seq_len == 0 {
        bail!(
            "--samples and --seq-len must be at least 1 (got {} and {})",
            a.samples,
            a.seq_len
        );
    }
    let mut opts = QuantizeOptions::new(scheme);
    opts.block = a.block;
    opts.weight_calib = match a.weight_calib {
        CalibArg::Max => WeightCalib::Max,
        CalibArg::Mse => WeightCalib::Mse,
    };
    opts.kv_cache_fp8 = a.kv_cache.is_some();
    opts.ignore = a.ignore;
    opts.calib = match a.calib {
        Some(p) => CalibSource::File(p),
        None => CalibSource::Default,
    };
    opts.samples = a.samples;
    opts.seq_len = a.seq_len;
    opts.progress = true;
    let t = Instant::now();
    let r = quantize(&a.from, &a.to, &opts)?;
    if r.calib_sequences > 0 {
        eprintln!(
            "calibration: {} sequences, {} tokens in {:.1}s",
            r.calib_sequences, r.calib_tokens, r.calib_seconds
        );
        if r.calib_sequences < a.samples {
            eprintln!(
                "note: the calibration text gave {} sequences of at most {} tokens (asked for {})",
                r.calib_sequences, a.seq_len, a.samples
            );
        }
    }
    eprintln!(
        "wrote {} ({}): {} modules quantized, {} ignored, {} tensors, {:.1} MB in {:.1}s",
        r.out_dir.display(),
        scheme.name(),
        r.quantized.len(),
        r.ignored.len(),
        r.tensors,
        r.bytes_written as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
