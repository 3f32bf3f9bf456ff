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
