//! Benchmark (not a test): encode one image with a SigLIP tower of the real Gemma 3 shapes (896x896, 4096
//! patches of 588 values, hidden 1152, 16 heads of 72, MLP 4304, pooled to 256 tokens) and random weights,
//! on the CPU reference and on wgpu, with `LAYERS` encoder layers (the real tower has 27): prints each
//! backend's encode time and the NMSE of wgpu's image features against the CPU's.
//!
//! `cargo run --release -p e4m3-tests --example siglip_bench -- [LAYERS] [IMAGE_SIZE]`

use std::collections::BTreeMap;
use std::time::Instant;

use e4m3_core::backend::Backend;
use e4m3_core::checkpoint::Weight;
use e4m3_core::conformance::nmse;
use e4m3_core::cpu::CpuBackend;
use e4m3_core::vision::{VisionConfig, VisionModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("LAYERS and IMAGE_SIZE are numbers"))
        .collect();
    let layers = args.first().copied().unwrap_or(1);
    let image_size = args.get(1).copied().unwrap_or(896);
    let c = VisionConfig {
        hidden_size: 1152,
        intermediate_size: 4304,
        num_hidden_layers: layers,
        num_attention_heads: 16,
        num_channels: 3,
        image_size,
        patch_size: 14,
        layer_norm_eps: 1e-6,
        mm_tokens_per_image: 256,
        image_token_id: 262_144,
        boi_token_id: 255_999,
        eoi_token_id: 256_000,
        text_hidden_size: 2560,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut rand = |n: usize, base: f32, amp: f32| -> Vec<f32> {
        (0..n).map(|_| base + rng.random_range(-amp..amp)).collect()
    };
    let (h, i, p) = (c.hidden_size, c.intermediate_size, c.patch_size);
    let t = "vision_tower.vision_model.";
    let mut shapes: Vec<(String, Vec<usize>, f32, f32)> = vec![
        (
            format!("{t}embeddings.patch_embedding.weight"),
            vec![h, 3, p, p],
            0.0,
            0.04,
        ),
        (
            format!("{t}embeddings.patch_embedding.bias"),
            vec![h],
            0.0,
            0.1,
        ),
        (
            format!("{t}embeddings.position_embedding.weight"),
            vec![c.num_patches(), h],
            0.0,
            0.5,
        ),
        (format!("{t}post_layernorm.weight"), vec![h], 1.0, 0.1),
        (format!("{t}post_layernorm.bias"), vec![h], 0.0, 0.1),
        (
            "multi_modal_projector.mm_soft_emb_norm.weight".into(),
            vec![h],
            0.0,
            0.1,
        ),
        (
            "multi_modal_projector.mm_input_projection_weight".into(),
            vec![h, c.text_hidden_size],
            0.0,
            0.03,
        ),
    ];
    for l in 0..layers {
        let e = format!("{t}encoder.layers.{l}.");
        for n in ["layer_norm1", "layer_norm2"] {
            shapes.push((format!("{e}{n}.weight"), vec![h], 1.0, 0.1));
            shapes.push((format!("{e}{n}.bias"), vec![h], 0.0, 0.1));
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((format!("{e}self_attn.{n}.weight"), vec![h, h], 0.0, 0.03));
            shapes.push((format!("{e}self_attn.{n}.bias"), vec![h], 0.0, 0.1));
        }
        shapes.push((format!("{e}mlp.fc1.weight"), vec![i, h], 0.0, 0.03));
        shapes.push((format!("{e}mlp.fc1.bias"), vec![i], 0.0, 0.1));
        shapes.push((format!("{e}mlp.fc2.weight"), vec![h, i], 0.0, 0.015));
        shapes.push((format!("{e}mlp.fc2.bias"), vec![h], 0.0, 0.1));
    }
    let mut tensors = BTreeMap::new();
    for (name, shape, base, amp) in shapes {
        let v = rand(shape.iter().product(), base, amp);
        tensors.insert(name.clone(), Weight::from_f32(&name, shape, &v));
    }
    let vision = VisionModel::from_tensors(c.clone(), tensors).expect("tower");
    let pixels = vec![rand(3 * image_size * image_size, 0.0, 1.0)];
    println!(
        "SigLIP {image_size}x{image_size}: {} patches of {}, hidden {h}, {layers} layer(s), random weights",
        c.num_patches(),
        c.patch_dim()
    );
    let wgpu = e4m3_backend_wgpu::open(None).expect("a wgpu adapter");
    let backends: [(&str, &dyn Backend); 2] = [("cpu", &CpuBackend), ("wgpu", wgpu.as_ref())];
    let mut feats = Vec::new();
    for (name, b) in backends {
        let t0 = Instant::now();
        let mut r = vision.runner(b, 1).expect("runner");
        let load = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (f, _) = vision.encode(r.as_mut(), &pixels, &[]).expect("encode");
        println!(
            "{name}: tower loaded in {load:.2} s, one image encoded in {:.2} s ({}: {})",
            t0.elapsed().as_secs_f64(),
            b.name(),
            b.describe()
        );
        feats.push(f);
    }
    println!(
        "image features {}x{}: wgpu vs CPU NMSE {:.2e}",
        feats[1].rows,
        feats[1].cols,
        nmse(&feats[1], &feats[0])
    );
}
