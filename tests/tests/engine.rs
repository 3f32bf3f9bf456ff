//! The serving engine (core::engine) on the CPU backend with a tiny random Gemma 3: every request's
//! greedy output equals the same request generated alone, whatever else runs beside it, however its
//! prompt is chunked, and when the KV blocks run out (preemption and recompute); cancelled requests free
//! their slot and blocks; bad requests are refused with the numbers that make them bad.

use e4m3_core::engine::{Engine, EngineConfig, EngineRequest, Event, FinishReason};
use e4m3_core::generate::{generate, GenerateRequest};
use e4m3_core::model::Model;
use e4m3_core::sampling::SamplingParams;
use e4m3_tests::{cpu_runner, write_tiny, Tiny};

const MAX_LEN: usize = 48;

fn model() -> (tempfile::TempDir, Model, Tiny) {
    let dir = tempfile::tempdir().unwrap();
    let t = Tiny::default();
    write_tiny(dir.path(), &t, 11);
    let m = Model::load(dir.path()).unwrap();
    (dir, m, t)
}

fn prompt(len: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7 + salt * 13 + 1) % vocab as u32)
        .collect()
}

fn alone(m: &Model, ids: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut r = cpu_runner(m, 1, MAX_LEN);
    let req = GenerateRequest {
        prompt_ids: ids.to_vec(),
        max_new_tokens: max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        top_logits: 0,
    };
    generate(r.as_mut(), 0, &req, |_| true).unwrap().generated
}

fn request(ids: Vec<u32>, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt_ids: ids,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        logprobs: None,
        inputs: None,
    }
}

fn engine(m: &Model, t: &Tiny, seqs: usize, chunk: usize, blocks: Option<usize>) -> Engine {
    let mut cfg = EngineConfig::new(seqs, MAX_LEN, t.vocab);
    cfg.prefill_chunk = chunk;
    cfg.kv_blocks = blocks;
    Engine::start(cpu_runner(m, seqs, MAX_LEN), cfg).unwrap()
}

/// Prompts of mixed lengths (1 to 30 tokens) and lengths of completion.
fn workload(t: &Tiny) -> Vec<(Vec<u32>, usize)> {
    (0..12)
        .map(|i| {
            (
                prompt([1, 5, 17, 30, 9, 2][i % 6], i as u32, t.vocab),
                3 + (i * 5) % 14,
            )
        })
        .collect()
}

fn check_all_equal_alone(e: &Engine, m: &Model, t: &Tiny) {
    let work = workload(t);
    let handles: Vec<_> = work
        .iter()
        .map(|(ids, n)| e.submit(request(ids.clone(), *n)).unwrap())
        .collect();
    for ((ids, n), h) in work.iter().zip(handles) {
        let (got, reason) = h.collect().unwrap();
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(got.len(), *n);
        assert_eq!(got, alone(m, ids, *n), "prompt {ids:?}");
    }
    let mt = wait_idle(e);
    assert_eq!((mt.running, mt.waiting, mt.kv_blocks_used), (0, 0, 0));
    // Every block is back in the pool.
    assert_eq!(mt.kv_blocks_total, e.config().total_blocks());
    assert_eq!(mt.kv_blocks_free, mt.kv_blocks_total);
    assert_eq!(mt.finished_length, work.len() as u64);
    assert_eq!(
        mt.generated_tokens,
        work.iter().map(|w| w.1 as u64).sum::<u64>()
    );
    // Every prompt token is fed once; a preempted request feeds its prompt again when it is recomputed.
    let prompts = work.iter().map(|w| w.0.len() as u64).sum::<u64>();
    if mt.preemptions == 0 {
        assert_eq!(mt.prompt_tokens, prompts);
    } else {
        assert!(
            mt.prompt_tokens > prompts,
            "{} <= {prompts}",
            mt.prompt_tokens
        );
    }
}

fn wait_idle(e: &Engine) -> e4m3_core::engine::MetricsSnapshot {
    for _ in 0..200 {
        let m = e.metrics();
        if m.running == 0 && m.waiting == 0 {
            return m;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    e.metrics()
}

#[test]
fn batched_requests_equal_each_request_alone() {
    let (_d, m, t) = model();
    let e = engine(&m, &t, 4, 512, None);
    check_all_equal_alone(&e, &m, &t);
    assert_eq!(e.metrics().preemptions, 0);
    assert_eq!(e.metrics().ttft.count, 12);
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    let (_d, m, t) = model();
    // 3 prompt tokens a step in all: the 30-token prompts take ten steps while others decode.
    let e = engine(&m, &t, 3, 3, None);
    check_all_equal_alone(&e, &m, &t);
}

#[test]
fn preemption_when_blocks_run_out_still_completes_every_request() {
    let (_d, m, t) = model();
    // 4 slots but 5 blocks of 16 positions: the longer requests cannot all hold their blocks at once.
    let e = engine(&m, &t, 4, 8, Some(5));
    check_all_equal_alone(&e, &m, &t);
    assert_eq!(e.metrics().kv_blocks_total, 5);
    assert!(e.metrics().preemptions > 0, "this workload must preempt");
}

#[test]
fn cancelled_requests_free_their_slot_and_blocks() {
    let (_d, m, t) = model();
    let e = engine(&m, &t, 2, 512, None);
    let long = e.submit(request(prompt(10, 1, t.vocab), 30)).unwrap();
    // Wait for the first token, then drop the handle.
    match long.events.recv().unwrap() {
        Event::Token { .. } => {}
        other => panic!("expected a token, got {other:?}"),
    }
    drop(long);
    let kept = e.submit(request(prompt(4, 2, t.vocab), 5)).unwrap();
    let queued = e.submit(request(prompt(3, 3, t.vocab), 5)).unwrap();
    queued.cancel();
    let (ids, _) = kept.collect().unwrap();
    assert_eq!(ids, alone(&m, &prompt(4, 2, t.vocab), 5));
    let mt = wait_idle(&e);
    assert_eq!((mt.running, mt.waiting, mt.kv_blocks_used), (0, 0, 0));
    assert_eq!(mt.finished_cancelled, 2);
    assert_eq!(mt.finished_length, 1);
}

#[test]
fn stop_ids_and_logprobs() {
    let (_d, m, t) = model();
    let e = engine(&m, &t, 2, 512, None);
    let ids = prompt(6, 4, t.vocab);
    let want = alone(&m, &ids, 8);
    let mut req = request(ids.clone(), 8);
    req.stop_ids = vec![want[2]];
    req.logprobs = Some(3);
    let h = e.submit(req).unwrap();
    let mut got = Vec::new();
    loop {
        match h.events.recv().unwrap() {
            Event::Token {
                id,
                logprob,
                top_logprobs,
            } => {
                let lp = logprob.expect("asked for logprobs");
                assert!(lp <= 0.0 && lp.is_finite());
                assert_eq!(top_logprobs.len(), 3);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(top_logprobs[0].0, id);
                assert!((top_logprobs[0].1 - lp).abs() < 1e-6);
                assert!(top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
                got.push(id);
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                assert_eq!(reason, FinishReason::Stop);
                assert_eq!(prompt_tokens, 6);
                assert_eq!(completion_tokens, got.len());
                break;
            }
            Event::Error(e) => panic!("{e}"),
        }
    }
    let first_stop = want.iter().position(|&x| x == want[2]).unwrap();
    assert_eq!(got, want[..=first_stop].to_vec());
}

#[test]
fn bad_requests_are_refused_with_their_numbers() {
    let (_d, m, t) = model();
    let e = engine(&m, &t, 2, 512, Some(2));
    let err = |r: EngineRequest| e.submit(r).err().expect("refused").to_string();
    let msg = err(request(prompt(40, 0, t.vocab), 10));
    assert!(
        msg.contains("40") && msg.contains("10") && msg.contains("48"),
        "{msg}"
    );
    assert!(err(request(vec![], 3)).contains("empty"));
    assert!(err(request(prompt(3, 0, t.vocab), 0)).contains("max_tokens"));
    let msg = err(request(vec![1, 64], 3));
    assert!(msg.contains("64") && msg.contains("vocabulary"), "{msg}");
    // 2 blocks of 16 positions cannot hold 20 + 20.
    let msg = err(request(prompt(20, 0, t.vocab), 20));
    assert!(msg.contains("KV blocks"), "{msg}");
    let mut bad = request(prompt(3, 0, t.vocab), 3);
    bad.sampling.top_p = 2.0;
    assert!(err(bad).contains("top_p"));
    // The engine still serves after refusals.
    let (ids, _) = e
        .submit(request(prompt(3, 0, t.vocab), 3))
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(ids, alone(&m, &prompt(3, 0, t.vocab), 3));
}

#[test]
fn a_caller_stop_finishes_the_request_as_stopped() {
    let (_d, m, t) = model();
    let e = engine(&m, &t, 2, 512, None);
    let h = e.submit(request(prompt(5, 7, t.vocab), 30)).unwrap();
    assert!(matches!(h.events.recv().unwrap(), Event::Token { .. }));
    h.stop();
    let finished = h
        .events
        .iter()
        .find_map(|ev| match ev {
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => Some((reason, completion_tokens)),
            _ => None,
        })
        .expect("a Finished event");
    assert_eq!(finished.0, FinishReason::Stop);
    assert!(finished.1 >= 1 && finished.1 < 30, "{finished:?}");
    let mt = wait_idle(&e);
    assert_eq!(
        (mt.finished_stop, mt.finished_cancelled, mt.kv_blocks_used),
        (1, 0, 0)
    );
}

/// Requests with images (the tiny transformers Gemma 3 with a vision tower, tests/fixtures/tiny-gemma3-vision)
/// batched with text requests, chunked finer than an image and preempted: each gives the tokens and
/// log-probabilities of the same request generated alone with its images.
mod images {
    use e4m3_core::cpu::CpuBackend;
    use e4m3_core::engine::{Engine, EngineConfig, EngineRequest, Event};
    use e4m3_core::generate::{generate_with_inputs, GenerateRequest};
    use e4m3_core::model::Model;
    use e4m3_core::multimodal::{ImageEncoder, ImagePrompt};
    use e4m3_core::sampling::SamplingParams;
    use e4m3_tests::{cpu_runner, fixture, json_u32s, read_json};

    const MAX_LEN: usize = 48;

    /// Word ids `wN` and the image tokens of the tiny model (boi 58, eoi 59, image 60).
    fn tokenize(text: &str) -> e4m3_core::Result<Vec<u32>> {
        Ok(text
            .replace("<start_of_image>", " w58 ")
            .replace("<end_of_image>", " w59 ")
            .replace("<image_soft_token>", " w60 ")
            .split_whitespace()
            .map(|w| w.strip_prefix('w').unwrap().parse().unwrap())
            .collect())
    }

    fn image(name: &str) -> Vec<u8> {
        std::fs::read(fixture("images").join(name)).unwrap()
    }

    /// Text with image markers, its images, max tokens, logprobs.
    type Case<'a> = (&'a str, Vec<&'a [u8]>, usize, Option<usize>);

    /// The prompts of the workload, max tokens and logprobs; the first is the reference prompt.
    fn workload(enc: &ImageEncoder) -> Vec<(ImagePrompt, usize, Option<usize>)> {
        let (grad, alpha, gray) = (
            image("grad_160x120.png"),
            image("alpha_96x64.png"),
            image("gray_200x200.png"),
        );
        let cases: Vec<Case> = vec![
            (
                "w2 w5 w17 <start_of_image> w9 w33 w41 <start_of_image> w7 w21 w3",
                vec![&grad, &alpha],
                8,
                None,
            ),
            ("w2 w11 <start_of_image> w12 w13", vec![&gray], 10, Some(3)),
            ("w2 w4 w8 w15 w16 w23 w42", vec![], 9, None),
            (
                "w2 <start_of_image><start_of_image> w40",
                vec![&alpha, &grad],
                7,
                Some(2),
            ),
            (
                "w2 w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41 w42 w43 w44",
                vec![],
                12,
                Some(1),
            ),
            (
                "w2 w5 w17 <start_of_image> w9 w33 w41 <start_of_image> w7 w21 w3",
                vec![&gray, &grad],
                8,
                None,
            ),
        ];
        cases
            .into_iter()
            .map(|(text, imgs, n, lp)| (enc.prompt(text, &imgs, &mut tokenize).unwrap(), n, lp))
            .collect()
    }

    /// Greedy tokens and the log-softmax of every step's logits, generated alone.
    fn alone(m: &Model, p: &ImagePrompt, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut r = cpu_runner(m, 1, MAX_LEN);
        let req = GenerateRequest {
            prompt_ids: p.ids.clone(),
            max_new_tokens: n,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            top_logits: m.config.vocab_size,
        };
        let out = generate_with_inputs(r.as_mut(), 0, &req, Some(&p.inputs), |_| true).unwrap();
        let lps = out
            .top_logits
            .iter()
            .map(|step| {
                let mut row = vec![0f32; m.config.vocab_size];
                for &(id, x) in step {
                    row[id as usize] = x;
                }
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                row.iter().map(|&x| x - max - sum.ln() as f32).collect()
            })
            .collect();
        (out.generated, lps)
    }

    fn check(chunk: usize, blocks: Option<usize>) -> u64 {
        let dir = fixture("tiny-gemma3-vision");
        let m = Model::load(&dir).unwrap();
        let c = &m.config;
        let enc = ImageEncoder::load(&dir, c, &CpuBackend).unwrap().unwrap();
        let work = workload(&enc);
        let reference = read_json(&dir.join("reference.json"));
        assert_eq!(work[0].0.ids, json_u32s(&reference["input_ids"]));
        let mut cfg = EngineConfig::new(4, MAX_LEN, c.vocab_size);
        cfg.prefill_chunk = chunk;
        cfg.kv_blocks = blocks;
        let e = Engine::start(cpu_runner(&m, 4, MAX_LEN), cfg).unwrap();
        assert!(e.supports_inputs());
        let handles: Vec<_> = work
            .iter()
            .map(|(p, n, lp)| {
                let has_images = !p.inputs.embed_rows.is_empty();
                e.submit(EngineRequest {
                    prompt_ids: p.ids.clone(),
                    max_tokens: *n,
                    sampling: SamplingParams::greedy(),
                    stop_ids: vec![],
                    logprobs: *lp,
                    inputs: has_images.then(|| p.inputs.clone()),
                })
                .unwrap()
            })
            .collect();
        for (k, ((p, n, lp), h)) in work.iter().zip(handles).enumerate() {
            let (want, want_lps) = alone(&m, p, *n);
            let mut got = Vec::new();
            for ev in h.events.iter() {
                match ev {
                    Event::Token { id, logprob, .. } => {
                        if lp.is_some() {
                            let (l, w) = (logprob.unwrap(), want_lps[got.len()][id as usize]);
                            assert!(
                                (l - w).abs() < 1e-4,
                                "request {k} token {}: logprob {l} vs alone {w}",
                                got.len()
                            );
                        }
                        got.push(id);
                    }
                    Event::Finished { .. } => break,
                    Event::Error(e) => panic!("request {k}: {e}"),
                }
            }
            assert_eq!(got, want, "request {k}");
            if k == 0 {
                // The reference prompt and images give transformers' greedy tokens.
                assert_eq!(got, json_u32s(&reference["greedy"]));
            }
        }
        e.metrics().preemptions
    }

    #[test]
    fn image_requests_chunked_finer_than_an_image_equal_each_alone() {
        // 3 prompt tokens a step, an image is 4: a chunk that would cut an image stops before it, and one
        // that starts at an image takes it whole.
        check(3, None);
    }

    #[test]
    fn preempted_image_requests_are_recomputed_with_their_images() {
        // 4 slots, 5 blocks of 16 positions; the image prompts take 2 blocks each with their completions.
        let preemptions = check(5, Some(5));
        assert!(preemptions > 0, "this workload must preempt");
    }

    #[test]
    fn image_inputs_are_checked_at_submit() {
        let dir = fixture("tiny-gemma3-vision");
        let m = Model::load(&dir).unwrap();
        let c = &m.config;
        let enc = ImageEncoder::load(&dir, c, &CpuBackend).unwrap().unwrap();
        let img = image("alpha_96x64.png");
        let p = enc
            .prompt("w2 w7 <start_of_image> w9", &[&img], &mut tokenize)
            .unwrap();
        let e = Engine::start(
            cpu_runner(&m, 1, MAX_LEN),
            EngineConfig::new(1, MAX_LEN, c.vocab_size),
        )
        .unwrap();
        let submit = |inputs| {
            e.submit(EngineRequest {
                prompt_ids: p.ids.clone(),
                max_tokens: 2,
                sampling: SamplingParams::greedy(),
                stop_ids: vec![],
                logprobs: None,
                inputs: Some(inputs),
            })
            .err()
            .map(|e| e.to_string())
        };
        let mut bad = p.inputs.clone();
        bad.groups.pop();
        assert!(submit(bad).unwrap().contains("attention groups"));
        let mut bad = p.inputs.clone();
        bad.embed_rows.reverse();
        assert!(submit(bad).unwrap().contains("increasing"));
        let mut bad = p.inputs.clone();
        bad.embeds.rows -= 1;
        assert!(submit(bad).unwrap().contains("embeddings"));
        assert_eq!(submit(p.inputs.clone()), None);
    }
}
