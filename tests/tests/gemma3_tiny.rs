//! Tiny random Gemma 3 checkpoints written by the tests: every prefix, sparse and 4.x/5.x configs,
//! sliding and global layers, GQA, the KV cache, batching, and bad inputs.

use e4m3_core::backend::{Batch, LogitsFor, SeqStep};
use e4m3_core::model::Model;
use e4m3_tests::*;
use serde_json::json;

fn ids(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 11 + 5) % vocab) as u32)
        .collect()
}

fn load(t: &Tiny, seed: u64) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), t, seed);
    let m = Model::load(dir.path()).unwrap();
    (dir, m)
}

#[test]
fn every_prefix_and_wrapper_gives_the_same_logits() {
    let t = Tiny::default();
    let tensors = tiny_tensors(&t, 1);
    let text = tiny_text_config(&t);
    let mm = json!({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text});
    let tokens = ids(9, t.vocab, 0);
    let mut reference = None;
    for (config, prefix) in [
        (&text, "model."),
        (&mm, "language_model.model."),
        (&mm, "model.language_model."),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), config, &tensors, prefix, false);
        let m = Model::load(dir.path()).unwrap_or_else(|e| panic!("prefix {prefix}: {e}"));
        let l = all_logits(&m, &tokens);
        match &reference {
            None => reference = Some(l),
            Some(r) => assert_eq!(r.data, l.data, "prefix {prefix}"),
        }
    }
}

#[test]
fn explicit_lm_head_is_used_and_vision_tensors_are_ignored() {
    let t = Tiny::default();
    let mut tensors = tiny_tensors(&t, 2);
    let embed = tensors[0].2.clone();
    let tokens = ids(5, t.vocab, 1);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &tiny_text_config(&t), &tensors, "model.", false);
    let tied = all_logits(&Model::load(dir.path()).unwrap(), &tokens);
    // An explicit lm_head equal to the embedding gives the same logits; a different one changes them.
    let mut with_head = tensors.clone();
    with_head.push((
        "__lm_head".into(),
        vec![t.vocab, t.hidden],
        embed.iter().map(|x| x * 2.0).collect(),
    ));
    let d2 = tempfile::tempdir().unwrap();
    let mut cfg = tiny_text_config(&t);
    cfg["tie_word_embeddings"] = json!(false);
    write_checkpoint(
        d2.path(),
        &cfg,
        &with_head[..with_head.len() - 1],
        "model.",
        false,
    );
    let e = Model::load(d2.path())
        .err()
        .expect("untied without lm_head must fail")
        .to_string();
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
    // Write lm_head at the top level as transformers does.
    tensors.push((
        "lm_head.weight".into(),
        vec![t.vocab, t.hidden],
        embed.iter().map(|x| x * 2.0).collect(),
    ));
    let named: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                if n == "lm_head.weight" {
                    n.clone()
                } else {
                    format!("model.{n}")
                },
                s.clone(),
                v.clone(),
            )
        })
        .collect();
    let mut with_vision = named.clone();
    with_vision.push((
        "vision_tower.vision_model.post_layernorm.weight".into(),
        vec![4],
        vec![0.0; 4],
    ));
    write_checkpoint(d2.path(), &cfg, &with_vision, "", false);
    let m = Model::load(d2.path()).unwrap();
    assert!(!m.tied_lm_head);
    let untied = all_logits(&m, &tokens);
    for (a, b) in untied.data.iter().zip(&tied.data) {
        assert!(
            (a - 2.0 * b).abs() <= 1e-4 * b.abs().max(1.0),
            "{a} vs 2*{b}"
        );
    }
}

#[test]
fn sparse_and_v4_configs_equal_the_explicit_one() {
    // A config that spells out only what differs from transformers' defaults, in the 4.x keys.
    let t = Tiny {
        heads: 8,
        kv_heads: 4,
        head_dim: 256,
        hidden: 16,
        inter: 16,
        vocab: 32,
        window: 3,
        qpas: 256.0,
        full: vec![false, false, false, false, false, true, false],
        rope_linear: None,
        bf16: false,
    };
    let tensors = tiny_tensors(&t, 3);
    let tokens = ids(7, t.vocab, 2);
    let explicit = tempfile::tempdir().unwrap();
    write_checkpoint(
        explicit.path(),
        &tiny_text_config(&t),
        &tensors,
        "model.",
        false,
    );
    let sparse = tempfile::tempdir().unwrap();
    let cfg = json!({"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 16,
        "num_hidden_layers": 7, "sliding_window": 3, "max_position_embeddings": 256});
    write_checkpoint(sparse.path(), &cfg, &tensors, "model.", false);
    let a = all_logits(&Model::load(explicit.path()).unwrap(), &tokens);
    let m = Model::load(sparse.path()).unwrap();
    assert_eq!(m.config.layer_types[5], e4m3_core::config::LayerType::Full);
    assert_eq!(a.data, all_logits(&m, &tokens).data);

    // 4.x keys with rope scaling on the global layers equal the 5.x rope_parameters form.
    let t = Tiny::default();
    let tensors = tiny_tensors(&t, 4);
    let v5 = tempfile::tempdir().unwrap();
    write_checkpoint(v5.path(), &tiny_text_config(&t), &tensors, "model.", false);
    let mut v4cfg = tiny_text_config(&t);
    let o = v4cfg.as_object_mut().unwrap();
    o.remove("layer_types");
    o.remove("rope_parameters");
    o.insert("sliding_window_pattern".into(), json!(3));
    o.insert("rope_theta".into(), json!(1e6));
    o.insert("rope_local_base_freq".into(), json!(1e4));
    o.insert(
        "rope_scaling".into(),
        json!({"type": "linear", "factor": 4.0}),
    );
    let v4 = tempfile::tempdir().unwrap();
    write_checkpoint(v4.path(), &v4cfg, &tensors, "model.", false);
    let tokens = ids(10, t.vocab, 3);
    assert_eq!(
        all_logits(&Model::load(v5.path()).unwrap(), &tokens).data,
        all_logits(&Model::load(v4.path()).unwrap(), &tokens).data
    );
}

#[test]
fn rope_scaling_changes_only_what_it_should() {
    // Linear scaling applies to full layers only: a model with only sliding layers ignores it.
    let mut t = Tiny {
        full: vec![false, false],
        ..Tiny::default()
    };
    let tokens = ids(8, t.vocab, 4);
    let (_d1, a) = load(&t, 5);
    t.rope_linear = Some(16.0);
    let (_d2, b) = load(&t, 5);
    assert_eq!(all_logits(&a, &tokens).data, all_logits(&b, &tokens).data);
    // ... and it does change a model with a full layer.
    let mut t = Tiny {
        full: vec![false, true],
        rope_linear: None,
        ..Tiny::default()
    };
    let (_d3, c) = load(&t, 6);
    t.rope_linear = Some(16.0);
    let (_d4, d) = load(&t, 6);
    assert!(max_abs_diff(&all_logits(&c, &tokens).data, &all_logits(&d, &tokens).data) > 1e-3);
}

#[test]
fn sliding_window_sees_exactly_w_keys_including_itself() {
    // One sliding layer with W = 4: position p sees p-3..=p.
    let t = Tiny {
        full: vec![false],
        window: 4,
        ..Tiny::default()
    };
    let (_d, m) = load(&t, 7);
    let base = ids(10, t.vocab, 5);
    let l0 = all_logits(&m, &base);
    let p = 8;
    let mut outside = base.clone();
    outside[p - 4] = (outside[p - 4] + 1) % t.vocab as u32;
    let l1 = all_logits(&m, &outside);
    assert_eq!(l0.row(p), l1.row(p), "key p-W must be invisible");
    let mut inside = base.clone();
    inside[p - 3] = (inside[p - 3] + 1) % t.vocab as u32;
    let l2 = all_logits(&m, &inside);
    assert!(
        max_abs_diff(l0.row(p), l2.row(p)) > 1e-4,
        "key p-W+1 must be visible"
    );
    // A full layer sees everything.
    let t = Tiny {
        full: vec![true],
        ..Tiny::default()
    };
    let (_d, m) = load(&t, 7);
    assert!(
        max_abs_diff(
            all_logits(&m, &base).row(p),
            all_logits(&m, &outside).row(p)
        ) > 1e-4
    );
}

#[test]
fn gqa_equals_duplicated_kv_heads() {
    let t = Tiny {
        kv_heads: 2,
        heads: 4,
        ..Tiny::default()
    };
    let tensors = tiny_tensors(&t, 8);
    let d = t.head_dim;
    // kv heads [0, 1] shared by query heads [0,1] and [2,3]  ==  four kv heads [0, 0, 1, 1].
    let dup: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            if n.ends_with("k_proj.weight") || n.ends_with("v_proj.weight") {
                let h = s[1];
                let mut out = Vec::new();
                for kvh in 0..2 {
                    for _ in 0..2 {
                        out.extend_from_slice(&v[kvh * d * h..(kvh + 1) * d * h]);
                    }
                }
                (n.clone(), vec![4 * d, h], out)
            } else {
                (n.clone(), s.clone(), v.clone())
            }
        })
        .collect();
    let a = tempfile::tempdir().unwrap();
    write_checkpoint(a.path(), &tiny_text_config(&t), &tensors, "model.", false);
    let t4 = Tiny {
        kv_heads: 4,
        ..t.clone()
    };
    let b = tempfile::tempdir().unwrap();
    write_checkpoint(b.path(), &tiny_text_config(&t4), &dup, "model.", false);
    let tokens = ids(9, t.vocab, 6);
    let la = all_logits(&Model::load(a.path()).unwrap(), &tokens);
    let lb = all_logits(&Model::load(b.path()).unwrap(), &tokens);
    assert!(max_abs_diff(&la.data, &lb.data) < 1e-5);
}

#[test]
fn incremental_chunked_and_batched_decode_equal_one_prefill() {
    let t = Tiny::default(); // window 4, sequences of 13 wrap the sliding ring several times
    let (_d, m) = load(&t, 9);
    let a = ids(13, t.vocab, 7);
    let b = ids(11, t.vocab, 8);
    let full_a = all_logits(&m, &a);
    let full_b = all_logits(&m, &b);
    // Token by token through the cache.
    let mut r = cpu_runner(&m, 2, 16);
    for (i, &tok) in a.iter().enumerate() {
        let out = r
            .step(&Batch::single(0, i, vec![tok], LogitsFor::Last), &[])
            .unwrap();
        assert!(
            max_abs_diff(out.logits.row(0), full_a.row(i)) < 1e-5,
            "position {i}"
        );
    }
    assert_eq!(r.seq_len(0), 13);
    // Chunks of 5 (longer than the window) interleaved with another sequence in the same steps.
    let mut r = cpu_runner(&m, 2, 16);
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for c in 0..3 {
        let pa = &a[(c * 5).min(13)..((c + 1) * 5).min(13)];
        let pb = &b[(c * 5).min(11)..((c + 1) * 5).min(11)];
        let batch = Batch {
            seqs: vec![
                SeqStep {
                    slot: 1,
                    start_pos: c * 5,
                    tokens: pa.to_vec(),
                    logits: LogitsFor::All,
                },
                SeqStep {
                    slot: 0,
                    start_pos: c * 5,
                    tokens: pb.to_vec(),
                    logits: LogitsFor::All,
                },
            ],
        };
        let out = r.step(&batch, &[]).unwrap();
        for (row, &(seq, pos)) in out.rows.iter().enumerate() {
            if seq == 0 {
                got_a.push((pos, out.logits.row(row).to_vec()));
            } else {
                got_b.push((pos, out.logits.row(row).to_vec()));
            }
        }
    }
    assert_eq!(got_a.len(), 13);
    assert_eq!(got_b.len(), 11);
    for (pos, row) in got_a {
        assert!(max_abs_diff(&row, full_a.row(pos)) < 1e-5, "a {pos}");
    }
    for (pos, row) in got_b {
        assert!(max_abs_diff(&row, full_b.row(pos)) < 1e-5, "b {pos}");
    }
    // A step may ask for no logits at all (a prefill chunk of a longer prompt).
    let mut r2 = cpu_runner(&m, 1, 16);
    let none = r2
        .step(&Batch::single(0, 0, a[..5].to_vec(), LogitsFor::None), &[])
        .unwrap();
    assert_eq!((none.logits.rows, none.rows.len()), (0, 0));
    let rest = r2
        .step(&Batch::single(0, 5, a[5..].to_vec(), LogitsFor::Last), &[])
        .unwrap();
    assert!(max_abs_diff(rest.logits.row(0), full_a.row(12)) < 1e-5);
    // Restarting a slot at 0 forgets the old tokens.
    let out = r
        .step(&Batch::single(0, 0, a.clone(), LogitsFor::Last), &[])
        .unwrap();
    assert!(max_abs_diff(out.logits.row(0), full_a.row(12)) < 1e-5);
}

#[test]
fn taps_read_back_layer_values() {
    let t = Tiny::default();
    let (_d, m) = load(&t, 10);
    let mut r = cpu_runner(&m, 1, 8);
    let taps = vec![
        "embed".to_string(),
        "layers.0.residual".to_string(),
        "layers.2.mlp_out".to_string(),
    ];
    let tokens = ids(3, t.vocab, 9);
    let out = r
        .step(&Batch::single(0, 0, tokens.clone(), LogitsFor::Last), &taps)
        .unwrap();
    let embed = &out.taps["embed"];
    assert_eq!((embed.rows, embed.cols), (3, t.hidden));
    // The embedding tap is the table row times sqrt(hidden) (f32 table: unrounded scale).
    let table = m.weights["embed_tokens.weight"].to_f32();
    let s = (t.hidden as f32).sqrt();
    for (c, v) in embed.row(1).iter().enumerate() {
        assert_eq!(*v, table[tokens[1] as usize * t.hidden + c] * s);
    }
    assert_eq!(out.taps["layers.0.residual"].rows, 3);
    let e = r
        .step(
            &Batch::single(0, 0, tokens, LogitsFor::Last),
            &["nope".into()],
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn bf16_checkpoints_round_the_embedding_scale() {
    let t = Tiny {
        bf16: true,
        hidden: 40,
        ..Tiny::default()
    }; // sqrt(40) = 6.3246 -> bf16 6.3125
    let (_d, m) = load(&t, 11);
    let mut r = cpu_runner(&m, 1, 4);
    let out = r
        .step(
            &Batch::single(0, 0, vec![3], LogitsFor::Last),
            &["embed".to_string()],
        )
        .unwrap();
    let table = m.weights["embed_tokens.weight"].to_f32();
    assert_eq!(out.taps["embed"].row(0)[0], table[3 * 40] * 6.3125);
}

#[test]
fn bad_checkpoints_are_errors_naming_the_tensor_or_file() {
    let t = Tiny::default();
    let tensors = tiny_tensors(&t, 12);
    let cfg = tiny_text_config(&t);
    let check =
        |tensors: &[(String, Vec<usize>, Vec<f32>)], cfg: &serde_json::Value, want: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), cfg, tensors, "model.", false);
            let e = Model::load(dir.path())
                .err()
                .expect("must fail")
                .to_string();
            for w in want {
                assert!(e.contains(w), "expected `{w}` in: {e}");
            }
        };
    // Missing tensor.
    let missing: Vec<_> = tensors
        .iter()
        .filter(|(n, _, _)| n != "layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    check(&missing, &cfg, &["layers.1.mlp.up_proj.weight", "missing"]);
    // Misshaped tensor.
    let mut bad = tensors.clone();
    let i = bad
        .iter()
        .position(|(n, _, _)| n == "layers.0.self_attn.k_proj.weight")
        .unwrap();
    bad[i].1 = vec![t.hidden, t.kv_heads * t.head_dim];
    check(
        &bad,
        &cfg,
        &[
            "layers.0.self_attn.k_proj.weight",
            "expected shape [16, 32]",
            "found [32, 16]",
        ],
    );
    // Extra tensor.
    let mut extra = tensors.clone();
    extra.push((
        "layers.0.self_attn.q_proj.bias".into(),
        vec![32],
        vec![0.0; 32],
    ));
    check(
        &extra,
        &cfg,
        &["model.layers.0.self_attn.q_proj.bias", "unexpected"],
    );
    // Config that does not match the tensors.
    let mut wrong = cfg.clone();
    wrong["intermediate_size"] = json!(50);
    check(
        &tensors,
        &wrong,
        &["layers.0.mlp.down_proj.weight", "expected shape [32, 50]"],
    );

    // Wrong dtype: an I32 tensor where a float weight belongs.
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg, &tensors, "model.", false);
    let data = vec![0u8; 4 * t.hidden];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    for (n, v) in parsed.tensors() {
        if n == "model.norm.weight" {
            views.push((
                n,
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I32,
                    vec![t.hidden],
                    &data,
                )
                .unwrap(),
            ));
        } else {
            views.push((n, v));
        }
    }
    let out = tempfile::tempdir().unwrap();
    safetensors::serialize_to_file(views, None, &out.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        out.path().join("config.json"),
    )
    .unwrap();
    let e = Model::load(out.path()).err().unwrap().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");

    // Truncated safetensors.
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = Model::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // Missing and malformed config.json.
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 32,").unwrap();
    let e = Model::load(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = Model::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn bad_steps_are_errors_not_panics() {
    let t = Tiny::default();
    let (_d, m) = load(&t, 13);
    let mut r = cpu_runner(&m, 1, 8);
    let cases: Vec<(Batch, &str)> = vec![
        (
            Batch::single(1, 0, vec![1], LogitsFor::Last),
            "slot 1 does not exist",
        ),
        (
            Batch::single(0, 0, vec![999], LogitsFor::Last),
            "token id 999",
        ),
        (
            Batch::single(0, 0, vec![1; 9], LogitsFor::Last),
            "longer than the maximum length 8",
        ),
        (
            Batch::single(0, 3, vec![1], LogitsFor::Last),
            "must start at 0",
        ),
    ];
    for (b, want) in cases {
        let e = r.step(&b, &[]).expect_err("must fail").to_string();
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

#[test]
fn fp8_and_bf16_kv_caches_round_what_attention_reads() {
    use e4m3_core::backend::{Backend, CacheConfig, KvCacheDtype};
    use e4m3_core::checkpoint::Weight;
    use e4m3_core::cpu::CpuBackend;
    let t = Tiny::default();
    let (_d, mut m) = load(&t, 14);
    let tokens = ids(11, t.vocab, 10);
    let run = |m: &Model, kv: KvCacheDtype, incremental: bool| -> Vec<f32> {
        let mut r = CpuBackend
            .load(
                &m.graph,
                &m.weights,
                CacheConfig::new(1, 16).with_kv_dtype(kv),
            )
            .unwrap();
        if incremental {
            let mut out = Vec::new();
            for (i, &tok) in tokens.iter().enumerate() {
                out.extend(
                    r.step(&Batch::single(0, i, vec![tok], LogitsFor::Last), &[])
                        .unwrap()
                        .logits
                        .data,
                );
            }
            out
        } else {
            r.step(&Batch::single(0, 0, tokens.clone(), LogitsFor::All), &[])
                .unwrap()
                .logits
                .data
        }
    };
    let exact = run(&m, KvCacheDtype::Auto, false);
    for kv in [KvCacheDtype::Bf16, KvCacheDtype::Fp8] {
        let full = run(&m, kv, false);
        // The current token's k/v are rounded as the cache stores them, so decode equals prefill.
        assert!(max_abs_diff(&full, &run(&m, kv, true)) < 1e-5, "{kv:?}");
        let d = max_abs_diff(&full, &exact);
        assert!(
            d > 0.0 && d < 0.5,
            "{kv:?}: rounding the cache moves logits by {d}"
        );
    }
    // The checkpoint's per-tensor scales are used: a tiny k_scale saturates keys at 448 * scale.
    let fp8_default = run(&m, KvCacheDtype::Fp8, false);
    for (l, layer) in m.graph.cache_layers.iter_mut().enumerate() {
        let name = format!("layers.{l}.self_attn.k_scale");
        layer.k_scale = Some(name.clone());
        m.weights
            .insert(name.clone(), Weight::from_f32(&name, vec![], &[1e-3]));
    }
    assert!(max_abs_diff(&fp8_default, &run(&m, KvCacheDtype::Fp8, false)) > 1e-3);
    // A bad scale is an error naming the tensor.
    m.weights.insert(
        "layers.0.self_attn.k_scale".into(),
        Weight::from_f32("layers.0.self_attn.k_scale", vec![], &[0.0]),
    );
    let e = CpuBackend
        .load(
            &m.graph,
            &m.weights,
            CacheConfig::new(1, 16).with_kv_dtype(KvCacheDtype::Fp8),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layers.0.self_attn.k_scale"), "{e}");
}
