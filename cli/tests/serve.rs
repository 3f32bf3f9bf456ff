//! `e4m3 serve` over raw HTTP on a tiny checkpoint (CPU backend): endpoints, streaming, stop strings,
//! error statuses, metrics, concurrency; and the official `openai` client on the real 270M
//! (`scripts/test-openai-client.sh`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fails_with, root, tiny_gemma4_chat_model};
use e4m3_tests::{write_tiny, write_word_tokenizer, Tiny};
use serde_json::{json, Value};

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}w4 {% elif m.role == 'user' %}w5 {% else %}w6 {% endif %}{{ m.content }} w7 {% endfor %}{% if add_generation_prompt %}w6{% endif %}";

/// A tiny Gemma 3 with a word tokenizer, a chat template and `<pad>` (0) as its only EOS id.
fn tiny_model(dir: &Path) {
    let t = Tiny::default();
    write_tiny(dir, &t, 7);
    write_word_tokenizer(dir, t.vocab);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>", "chat_template": TEMPLATE})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [0], "do_sample": false}"#,
    )
    .unwrap();
}

struct Server {
    child: Child,
    addr: String,
    /// What the server printed to stdout before the address line (the KV-cache line).
    banner: Vec<String>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_e4m3"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--backend",
                "cpu",
            ])
            .args(["--port", "0", "--served-model-name", "tiny"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("e4m3 serve starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut banner = Vec::new();
        let addr = loop {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            if line.is_empty() {
                panic!("no address line; the server printed {banner:?}");
            }
            match line.split_once("http://") {
                Some((_, a)) => break a.trim().to_string(),
                None => banner.push(line.trim_end().to_string()),
            }
        };
        Server {
            child,
            addr,
            banner,
        }
    }

    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        // A server may answer (413) before reading the whole body and close; ignore write errors then.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, rest) = text.split_once("\r\n\r\n").expect("a complete response");
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(rest)
            } else {
                rest.to_string()
            },
        )
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"")
    }

    /// The SSE `data:` payloads of a streamed request.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        text.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

impl Server {
    /// Ctrl-C: the server stops by itself with status 0.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let t = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not stop on SIGINT"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn assert_error(status: u16, body: &Value, want_status: u16, want: &[&str]) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    let msg = e["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(
        e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    for w in want {
        assert!(msg.contains(w), "expected `{w}` in {msg}");
    }
}

#[test]
fn serve_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let srv = Server::start(
        dir.path(),
        &["--max-model-len", "128", "--max-num-seqs", "4"],
    );

    // health, models, unknown route
    assert_eq!(srv.get("/health"), (200, String::new()));
    let (status, text) = srv.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["owned_by"], "e4m3");
    assert_eq!(srv.get("/v1/nothing").0, 404);

    // chat, non-streaming
    let (status, r) = srv.post(
        "/v1/chat/completions",
        &chat("w8 w9 w10", json!({"max_tokens": 12})),
    );
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "tiny");
    assert!(r["created"].as_u64().unwrap() > 0);
    let msg = &r["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let text = msg["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty(), "{r}");
    let u = &r["usage"];
    // <bos> w5 w8 w9 w10 w7 w6
    assert_eq!(u["prompt_tokens"], 7, "{r}");
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), 7 + completion);
    let finish = r["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    if finish == "length" {
        assert_eq!(completion, 12);
        assert_eq!(text.split_whitespace().count(), 12, "{text}");
    } else {
        assert_eq!(finish, "stop");
    }
    // Content as a list of text parts renders the same prompt.
    let parts = json!({"model": "tiny", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "w8 w9 w10"}]}]});
    let (status, r2) = srv.post("/v1/chat/completions", &parts);
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["choices"][0]["message"]["content"], text.as_str());

    // chat, streaming: role chunk, deltas, finish chunk, usage chunk, [DONE]
    let events = srv.stream(
        "/v1/chat/completions",
        &chat(
            "w8 w9 w10",
            json!({"max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let n = chunks.len();
    assert_eq!(
        chunks[n - 2]["choices"][0]["finish_reason"],
        finish.as_str()
    );
    assert_eq!(chunks[n - 1]["choices"].as_array().unwrap().len(), 0);
    assert_eq!(chunks[n - 1]["usage"], *u);
    // Without include_usage there is no usage chunk.
    let events = srv.stream(
        "/v1/chat/completions",
        &chat("w8 w9 w10", json!({"max_tokens": 12, "stream": true})),
    );
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));

    // logprobs
    let (status, r) = srv.post(
        "/v1/chat/completions",
        &chat(
            "w8 w9 w10",
            json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 3}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in lp {
        let tops = t["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), 3);
        // greedy: the chosen token is the most likely one
        assert_eq!(t["token"], tops[0]["token"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(
            t["bytes"].as_array().unwrap().len(),
            t["token"].as_str().unwrap().len()
        );
    }
    assert_eq!(
        r["choices"][0]["message"]["content"].as_str().unwrap(),
        text.split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ")
            .as_str()
    );

    // completions: string prompt, token ids, streaming
    let (status, c) = srv.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "w11 w12 w13", "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(status, 200, "{c}");
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(c["object"], "text_completion");
    let ctext = c["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!ctext.is_empty());
    assert_eq!(c["usage"]["prompt_tokens"], 4); // <bos> w11 w12 w13
    let (_, c_ids) = srv.post(
        "/v1/completions",
        &json!({"prompt": [2, 11, 12, 13], "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(c_ids["choices"][0]["text"], ctext.as_str());
    let (_, c_list) = srv.post(
        "/v1/completions",
        &json!({"prompt": ["w11 w12 w13"], "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(c_list["choices"][0]["text"], ctext.as_str());
    let events = srv.stream(
        "/v1/completions",
        &json!({"prompt": "w11 w12 w13", "max_tokens": 10, "temperature": 0, "stream": true}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, ctext);
    let (_, c_lp) = srv.post(
        "/v1/completions",
        &json!({"prompt": "w11 w12 w13", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    );
    let l = &c_lp["choices"][0]["logprobs"];
    assert_eq!(l["tokens"].as_array().unwrap().len(), 3, "{c_lp}");
    assert_eq!(l["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(l["top_logprobs"][0].as_object().unwrap().len(), 2);

    // stop strings: the output ends before the first stop string, finish_reason "stop"; streamed the same
    let words: Vec<&str> = ctext.split_whitespace().collect();
    if words.len() >= 3 {
        let stop = words[2];
        let want = &ctext[..ctext.find(stop).unwrap()];
        let body = json!({"prompt": "w11 w12 w13", "max_tokens": 10, "temperature": 0, "stop": [stop, "zzz"]});
        let (status, s) = srv.post("/v1/completions", &body);
        assert_eq!(status, 200, "{s}");
        assert_eq!(s["choices"][0]["text"], want, "{s}");
        assert_eq!(s["choices"][0]["finish_reason"], "stop");
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let events = srv.stream("/v1/completions", &sb);
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let streamed: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(streamed, want);
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        // a single string works too
        let (_, s1) = srv.post(
            "/v1/completions",
            &json!({"prompt": "w11 w12 w13", "max_tokens": 10, "temperature": 0, "stop": stop}),
        );
        assert_eq!(s1["choices"][0]["text"], want);
    } else {
        panic!("the tiny model should generate at least 3 words: {ctext:?}");
    }
    // stop_token_ids: the first generated id stops generation at once
    let first_id: u32 = words[0].trim_start_matches('w').parse().unwrap();
    let (_, st) = srv.post("/v1/completions", &json!({"prompt": "w11 w12 w13", "max_tokens": 10, "temperature": 0, "stop_token_ids": [first_id]}));
    assert_eq!(st["choices"][0]["finish_reason"], "stop", "{st}");
    assert_eq!(st["usage"]["completion_tokens"], 1);
    assert_eq!(st["choices"][0]["text"], "");

    // errors
    let (status, text) = srv.request("POST", "/v1/chat/completions", &[], b"{not json");
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        400,
        &["JSON"],
    );
    let (s, e) = srv.post(
        "/v1/chat/completions",
        &chat("w8", json!({"temperature": "hot"})),
    );
    assert_error(s, &e, 400, &["temperature"]);
    assert_eq!(e["error"]["param"], "temperature");
    let (s, e) = srv.post("/v1/chat/completions", &json!({"messages": "hi"}));
    assert_error(s, &e, 400, &["messages"]);
    let (s, e) = srv.post(
        "/v1/chat/completions",
        &chat("w8", json!({"max_tokens": 500})),
    );
    assert_error(s, &e, 400, &["500", "128"]);
    let (s, e) = srv.post(
        "/v1/completions",
        &json!({"prompt": "w8", "max_tokens": 127}),
    );
    assert_error(s, &e, 400, &["127", "128"]);
    let (s, e) = srv.post(
        "/v1/chat/completions",
        &chat("w8", json!({"model": "gpt-4"})),
    );
    assert_error(s, &e, 404, &["gpt-4"]);
    for (extra, field) in [
        (json!({"n": 2}), "n"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"min_p": 2}), "min_p"),
        (json!({"stop": 5}), "stop"),
        (
            json!({"logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
    ] {
        let (s, e) = srv.post("/v1/chat/completions", &chat("w8", extra.clone()));
        assert_error(s, &e, 400, &[field]);
        assert_eq!(e["error"]["param"], field, "{extra}");
    }
    let (s, e) = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "robot", "content": "w8"}]}),
    );
    assert_error(s, &e, 400, &["role"]);
    let (s, e) = srv.post("/v1/completions", &json!({"prompt": [999999]}));
    assert_error(s, &e, 400, &["999999"]);
    let big = format!("{{\"prompt\": \"{}\"}}", "w8 ".repeat(2 << 20));
    let (status, text) = srv.request("POST", "/v1/completions", &[], big.as_bytes());
    assert_eq!(status, 413, "{text}");
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        413,
        &["limit"],
    );

    // 8 concurrent greedy requests (more than the 4 slots) each equal the request run alone
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("w{} w{} w{}", 20 + i, 30 + i, 40 + i))
        .collect();
    let body = |p: &str, i: usize| json!({"prompt": p, "max_tokens": 8 + i, "temperature": 0});
    let alone: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| srv.post("/v1/completions", &body(p, i)).1)
        .collect();
    let together: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let srv = &srv;
                let b = body(p, i);
                sc.spawn(move || srv.post("/v1/completions", &b).1)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(
            a["choices"][0]["text"], t["choices"][0]["text"],
            "{a} vs {t}"
        );
        assert_eq!(a["usage"], t["usage"]);
    }

    // metrics: nothing running, counters and histograms filled
    let (status, m) = srv.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&m, "e4m3_num_requests_running"), 0.0, "{m}");
    assert_eq!(metric(&m, "e4m3_num_requests_waiting"), 0.0);
    let finished = metric(&m, "e4m3_requests_total{finish_reason=\"stop\"}")
        + metric(&m, "e4m3_requests_total{finish_reason=\"length\"}")
        + metric(&m, "e4m3_requests_total{finish_reason=\"cancelled\"}");
    assert!(finished >= 30.0, "{m}");
    assert_eq!(metric(&m, "e4m3_requests_failed_total"), 0.0);
    assert!(metric(&m, "e4m3_generation_tokens_total") >= 100.0);
    // Tokens of the last 10 s over 10 s: some (the requests just ran), at most all of them.
    let rate = metric(&m, "e4m3_generation_tokens_per_second");
    assert!(
        rate > 0.0 && rate <= metric(&m, "e4m3_generation_tokens_total") / 10.0,
        "{m}"
    );
    assert!(metric(&m, "e4m3_prompt_tokens_total") >= 100.0);
    assert_eq!(metric(&m, "e4m3_kv_blocks_used"), 0.0);
    assert_eq!(metric(&m, "e4m3_kv_blocks_free"), 4.0 * 8.0);
    // The cache holds every slot at full length: nothing is preempted.
    assert_eq!(metric(&m, "e4m3_preemptions_total"), 0.0);
    assert_eq!(
        metric(&m, "e4m3_time_to_first_token_seconds_count"),
        metric(&m, "e4m3_time_to_first_token_seconds_bucket{le=\"+Inf\"}")
    );
    assert!(metric(&m, "e4m3_time_to_first_token_seconds_count") >= 30.0);
    assert!(metric(&m, "e4m3_inter_token_latency_seconds_count") >= 30.0);
    assert!(m.contains("e4m3_inter_token_latency_seconds_bucket{le=\"0.001\"}"));
    assert!(m.contains("# TYPE e4m3_time_to_first_token_seconds histogram"));
}

#[test]
fn serve_api_key() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let srv = Server::start(
        dir.path(),
        &[
            "--max-model-len",
            "64",
            "--max-num-seqs",
            "1",
            "--api-key",
            "sekrit",
        ],
    );
    assert_eq!(srv.get("/health").0, 200);
    let (s, text) = srv.get("/v1/models");
    assert_error(s, &serde_json::from_str(&text).unwrap(), 401, &["API key"]);
    let (s, text) = srv.request("GET", "/v1/models", &["Authorization: Bearer wrong"], b"");
    assert_error(s, &serde_json::from_str(&text).unwrap(), 401, &["API key"]);
    let (s, _) = srv.request("GET", "/v1/models", &["Authorization: Bearer sekrit"], b"");
    assert_eq!(s, 200);
    let body = json!({"prompt": "w8", "max_tokens": 2}).to_string();
    let (s, text) = srv.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sekrit"],
        body.as_bytes(),
    );
    assert_eq!(s, 200, "{text}");
    let (s, _) = srv.request("POST", "/v1/completions", &[], body.as_bytes());
    assert_eq!(s, 401);
    let mut srv = srv;
    assert!(srv.interrupt().success());
}

/// The official `openai` Python client against the real 270M. Fails when the client cannot be installed,
/// without pip or a package index.
#[test]
fn serve_openai_client() {
    let out = Command::new(root().join("scripts/test-openai-client.sh"))
        .env("E4M3_BIN", env!("CARGO_BIN_EXE_e4m3"))
        .output()
        .expect("the script runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/test-openai-client.sh failed ({:?}; exit 3: the openai client could not be installed)\nstdout: {}\nstderr: {err}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("checks passed"));
}

/// A client that goes away mid-stream cancels its engine request (real 270M on the CPU, slow enough that
/// the request is still running when the client leaves).
#[test]
fn serve_disconnect_cancels() {
    let model = root().join("models/gemma-3-270m");
    assert!(
        model.join("model.safetensors").is_file(),
        "the real model is not at {} — run `scripts/setup.sh` first",
        model.display()
    );
    let srv = Server::start(&model, &["--max-model-len", "512", "--max-num-seqs", "2"]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true, "stop_token_ids": []})
        .to_string();
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read until the first text chunk has arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let t = std::time::Instant::now();
    loop {
        let (_, m) = srv.get("/metrics");
        if metric(&m, "e4m3_requests_total{finish_reason=\"cancelled\"}") == 1.0 {
            assert_eq!(metric(&m, "e4m3_num_requests_running"), 0.0, "{m}");
            assert!(metric(&m, "e4m3_generation_tokens_total") < 400.0, "{m}");
            assert_eq!(metric(&m, "e4m3_kv_blocks_used"), 0.0, "{m}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the request was not cancelled: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Load on loopback: 64 concurrent streaming requests with prompts of 1 to 20 words, and 16 more whose
/// clients hang up after their first chunk, on 8 slots and a cache too small for all of them (6 blocks of
/// 16 positions: preemption). Every completed stream's text equals the same request run alone afterwards (greedy:
/// batching must not change results), and at the end nothing runs or waits and no KV block is held.
#[test]
fn serve_load_64_streams_and_16_hangups() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let srv = Server::start(
        dir.path(),
        &[
            "--max-model-len",
            "64",
            "--max-num-seqs",
            "8",
            "--num-kv-blocks",
            "6",
        ],
    );
    let words = |n: usize, salt: usize| -> String {
        (0..n)
            .map(|i| format!("w{}", 8 + (i * 7 + salt * 5) % 56))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let body = |i: usize| {
        json!({"model": "tiny", "prompt": words(1 + (i * 7) % 20, i), "max_tokens": 4 + i % 12,
               "temperature": 0, "stream": true})
    };
    let streamed: Vec<String> = std::thread::scope(|sc| {
        let streams: Vec<_> = (0..64)
            .map(|i| {
                let srv = &srv;
                sc.spawn(move || {
                    let mut text = String::new();
                    for e in srv.stream("/v1/completions", &body(i)) {
                        if e == "[DONE]" {
                            break;
                        }
                        let v: Value = serde_json::from_str(&e).unwrap();
                        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                    }
                    text
                })
            })
            .collect();
        for i in 0..16 {
            let addr = srv.addr.clone();
            sc.spawn(move || {
                let b = json!({"model": "tiny", "prompt": words(3, 100 + i), "max_tokens": 55,
                               "temperature": 0, "stream": true})
                .to_string();
                let mut s = TcpStream::connect(&addr).unwrap();
                write!(
                    s,
                    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )
                .unwrap();
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !String::from_utf8_lossy(&seen).contains("\"text\"") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
            });
        }
        streams.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Nothing left running, waiting or holding blocks; at least one hang-up cancelled its request.
    let t = std::time::Instant::now();
    let m = loop {
        let (_, m) = srv.get("/metrics");
        if metric(&m, "e4m3_num_requests_running") == 0.0
            && metric(&m, "e4m3_num_requests_waiting") == 0.0
        {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "requests still running: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(metric(&m, "e4m3_kv_blocks_used"), 0.0, "{m}");
    assert_eq!(metric(&m, "e4m3_requests_failed_total"), 0.0, "{m}");
    let cancelled = metric(&m, "e4m3_requests_total{finish_reason=\"cancelled\"}");
    assert!((1.0..=16.0).contains(&cancelled), "{m}");
    let finished = metric(&m, "e4m3_requests_total{finish_reason=\"stop\"}")
        + metric(&m, "e4m3_requests_total{finish_reason=\"length\"}");
    assert_eq!(finished + cancelled, 80.0, "{m}");
    let preemptions = metric(&m, "e4m3_preemptions_total");
    eprintln!("load: {finished} finished, {cancelled} cancelled, {preemptions} preemptions");
    assert!(preemptions >= 1.0, "this load must preempt: {m}");
    // Each stream equals the same request alone.
    for (i, text) in streamed.iter().enumerate() {
        let mut b = body(i);
        b["stream"] = json!(false);
        let (status, v) = srv.post("/v1/completions", &b);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap(),
            text,
            "request {i}"
        );
    }
}

/// Prompt tokens of a chat request as e4m3's template rendering and tokenizer give them.
fn prompt_tokens(dir: &Path, messages: &Value, tools: Option<&Value>, kwargs: &Value) -> usize {
    use e4m3_core::chat::{render_chat_with, ChatMessage, ChatOptions};
    let tok = e4m3_core::tokenizer::Tokenizer::from_dir(dir).unwrap();
    let msgs: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
    let tools: Option<Vec<Value>> = tools.map(|t| t.as_array().unwrap().clone());
    let text = render_chat_with(
        tok.chat_template().unwrap(),
        &msgs,
        &ChatOptions {
            bos_token: "<bos>",
            eos_token: "<eos>",
            add_generation_prompt: true,
            tools: tools.as_deref(),
            kwargs: kwargs.as_object(),
        },
    )
    .unwrap();
    tok.encode(&text, false).unwrap().len()
}

/// Gemma 4 chat over HTTP: `tools`, `tool_choice`, `chat_template_kwargs` and tool messages reach the
/// template (prompt token counts), the parsed fields appear in messages and streams alike, bad values
/// are 400s naming the field, and the parser flags are checked at start-up.
#[test]
fn serve_gemma4_chat_fields() {
    let dir = tempfile::tempdir().unwrap();
    tiny_gemma4_chat_model(dir.path());
    let model = dir.path().to_str().unwrap();
    // Start-up checks.
    common::fails_with(
        &[
            "serve",
            "--model",
            model,
            "--backend",
            "cpu",
            "--enable-auto-tool-choice",
        ],
        &["--tool-call-parser"],
    );
    let plain = tempfile::tempdir().unwrap();
    tiny_model(plain.path());
    common::fails_with(
        &[
            "serve",
            "--model",
            plain.path().to_str().unwrap(),
            "--backend",
            "cpu",
            "--reasoning-parser",
            "gemma4",
        ],
        &["--reasoning-parser", "<|channel>"],
    );

    let srv = Server::start(
        dir.path(),
        &[
            "--reasoning-parser",
            "gemma4",
            "--tool-call-parser",
            "gemma4",
            "--enable-auto-tool-choice",
        ],
    );
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather in a city.", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let user = json!([{"role": "user", "content": "w20 w21"}]);
    let round_trip = json!([
        {"role": "user", "content": "w20 w21"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"w30\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "w31 w32"},
    ]);
    // What the template sees: the server turns JSON-string arguments into an object, as vLLM does.
    let mut round_trip_obj = round_trip.clone();
    round_trip_obj[1]["tool_calls"][0]["function"]["arguments"] = json!({"city": "w30"});
    let req = |messages: &Value, extra: Value| {
        let mut v =
            json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let thinking = json!({"enable_thinking": true});
    let none = json!({});
    let cases = [
        (&user, &user, json!({}), None, &none),
        (
            &user,
            &user,
            json!({"chat_template_kwargs": thinking}),
            None,
            &thinking,
        ),
        (&user, &user, json!({"tools": tools}), Some(&tools), &none),
        (
            &user,
            &user,
            json!({"tools": tools, "tool_choice": "none"}),
            Some(&tools),
            &none,
        ),
        (
            &round_trip,
            &round_trip_obj,
            json!({"tools": tools, "chat_template_kwargs": thinking}),
            Some(&tools),
            &thinking,
        ),
    ];
    let mut counts = Vec::new();
    for (messages, seen, extra, tl, kw) in cases {
        let body = req(messages, extra.clone());
        let (status, r) = srv.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{extra}: {r}");
        let want = prompt_tokens(dir.path(), seen, tl, kw);
        assert_eq!(r["usage"]["prompt_tokens"], want, "{extra}");
        counts.push(want);
        let msg = &r["choices"][0]["message"];
        assert_eq!(msg["role"], "assistant");
        assert!(msg["tool_calls"].is_array(), "{msg}");
        assert!(msg.get("reasoning_content").is_some(), "{msg}");
        let calls = msg["tool_calls"].as_array().unwrap();
        let finish = r["choices"][0]["finish_reason"].as_str().unwrap();
        if !calls.is_empty() {
            assert_eq!(finish, "tool_calls");
        }
        // The stream carries the same fields.
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let chunks = srv.stream("/v1/chat/completions", &sbody);
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        let (mut reasoning, mut content, mut n_calls, mut sfinish) =
            (String::new(), String::new(), 0, String::new());
        for c in &chunks[..chunks.len() - 1] {
            let v: Value = serde_json::from_str(c).unwrap();
            let ch = &v["choices"][0];
            reasoning.push_str(ch["delta"]["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            n_calls += ch["delta"]["tool_calls"].as_array().map_or(0, Vec::len);
            if let Some(f) = ch["finish_reason"].as_str() {
                sfinish = f.to_string();
            }
        }
        assert_eq!(
            reasoning,
            msg["reasoning_content"].as_str().unwrap_or(""),
            "{extra}"
        );
        if calls.is_empty() {
            assert_eq!(content, msg["content"].as_str().unwrap(), "{extra}");
        }
        assert_eq!(n_calls, calls.len());
        assert_eq!(sfinish, finish);
    }
    // Each of thinking, tools and the tool round trip changed the prompt.
    assert_ne!(counts[0], counts[1]);
    assert_ne!(counts[0], counts[2]);
    assert_eq!(
        counts[2], counts[3],
        "tool_choice none still declares the tools"
    );
    assert!(counts[4] > counts[2]);

    // Validation: 400s naming the field and value.
    for (extra, field, want) in [
        (
            json!({"tools": tools, "tool_choice": "required"}),
            "tool_choice",
            "required",
        ),
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            "tool_choice",
            "get_weather",
        ),
        (json!({"tool_choice": "auto"}), "tool_choice", "tools"),
        (json!({"tools": {"a": 1}}), "tools", "list"),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
            "name",
        ),
        (
            json!({"tools": [{"type": "retrieval"}]}),
            "tools[0].type",
            "retrieval",
        ),
        (
            json!({"chat_template_kwargs": [1]}),
            "chat_template_kwargs",
            "object",
        ),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
            "messages",
        ),
    ] {
        let (s, e) = srv.post("/v1/chat/completions", &req(&user, extra.clone()));
        assert_error(s, &e, 400, &[want]);
        assert_eq!(e["error"]["param"], field, "{extra}");
    }
    let bad_call = json!([{"role": "user", "content": "w8"},
        {"role": "assistant", "tool_calls": [{"type": "function"}]}]);
    let (s, e) = srv.post("/v1/chat/completions", &req(&bad_call, json!({})));
    assert_error(s, &e, 400, &["function"]);
    assert_eq!(e["error"]["param"], "messages[1].tool_calls[0]");

    // A server without --enable-auto-tool-choice refuses "auto" (the default with tools), as vLLM.
    let srv2 = Server::start(plain.path(), &[]);
    let (s, e) = srv2.post(
        "/v1/chat/completions",
        &req(
            &json!([{"role": "user", "content": "w8"}]),
            json!({"tools": tools}),
        ),
    );
    assert_error(s, &e, 400, &["--enable-auto-tool-choice"]);
    let (s, r) = srv2.post(
        "/v1/chat/completions",
        &req(
            &json!([{"role": "user", "content": "w8"}]),
            json!({"tools": tools, "tool_choice": "none"}),
        ),
    );
    assert_eq!(s, 200, "{r}");
    // Without parsers the message is as before: no reasoning_content / tool_calls fields.
    assert!(
        r["choices"][0]["message"].get("tool_calls").is_none(),
        "{r}"
    );
}

/// The KV pool's size: `--num-kv-blocks` as given; by default `--gpu-memory-utilization` of the
/// machine's memory, which holds far more than 4 sequences of the tiny model, so capped at
/// `--max-num-seqs` full-length sequences. Startup line and /metrics agree; bad values fail clearly.
#[test]
fn serve_kv_blocks_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let d = dir.path().to_str().unwrap();
    // 64 positions: 4 blocks a sequence.
    let base = ["--max-model-len", "64", "--max-num-seqs", "4"];
    for (extra, blocks, line) in [
        (
            &["--num-kv-blocks", "10"][..],
            10.0,
            "# KV blocks: 10, maximum concurrency for 64 tokens per request: 2.50x",
        ),
        (
            &["--gpu-memory-utilization", "0.5"][..],
            16.0,
            "# KV blocks: 16, maximum concurrency for 64 tokens per request: 4.00x",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let srv = Server::start(dir.path(), &args);
        assert_eq!(srv.banner, [line], "{args:?}");
        let (status, m) = srv.get("/metrics");
        assert_eq!(status, 200);
        assert_eq!(metric(&m, "e4m3_kv_blocks_total"), blocks, "{m}");
        assert_eq!(metric(&m, "e4m3_kv_blocks_free"), blocks, "{m}");
        assert_eq!(metric(&m, "e4m3_kv_blocks_used"), 0.0, "{m}");
        // A request that needs blocks runs and gives them back.
        let (status, v) = srv.post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "w9 w10 w11", "max_tokens": 20, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        // The response is sent before the engine's step loop releases the sequence: wait for it.
        let mut m = String::new();
        for _ in 0..100 {
            m = srv.get("/metrics").1;
            if metric(&m, "e4m3_kv_blocks_free") == blocks {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(metric(&m, "e4m3_kv_blocks_free"), blocks, "{m}");
    }
    let serve = |extra: &[&'static str]| -> Vec<&str> {
        ["serve", "--model", d, "--backend", "cpu", "--port", "0"]
            .iter()
            .chain(&base)
            .chain(extra)
            .copied()
            .collect()
    };
    fails_with(
        &serve(&["--gpu-memory-utilization", "1.5"]),
        &["--gpu-memory-utilization must be in (0, 1], not 1.5"],
    );
    fails_with(
        &serve(&["--gpu-memory-utilization", "0"]),
        &["--gpu-memory-utilization must be in (0, 1], not 0"],
    );
    // A billionth of the memory holds no weights: not one sequence fits.
    fails_with(
        &serve(&["--gpu-memory-utilization", "0.000000001"]),
        &[
            "--gpu-memory-utilization 0.000000001",
            "MiB of system memory",
            "0 KV blocks",
            "but one sequence of --max-model-len 64 needs 4",
        ],
    );
    fails_with(
        &serve(&["--num-kv-blocks", "3"]),
        &["--num-kv-blocks 3 cannot hold one sequence of --max-model-len 64 (4 blocks of 16 positions)"],
    );
}

/// Images in `/v1/chat/completions` on the tiny transformers Gemma 3 with a vision tower
/// (tests/fixtures/tiny-gemma3-vision, given a word tokenizer whose `<start_of_image>`, `<end_of_image>`,
/// `<image_soft_token>` are its ids 58, 59, 60 and a template that writes `<start_of_image>` per image part).
mod images {
    use super::*;
    use base64::Engine as _;
    use std::net::TcpListener;

    const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.content is string %}{{ m.content }} {% else %}{% for p in m.content %}{% if p.type == 'image' %}<start_of_image>{% elif p.type == 'text' %}{{ p.text }} {% endif %}{% endfor %}{% endif %}{% endfor %}";

    fn vision_model(dir: &Path) {
        vision_model_from(
            dir,
            "tests/fixtures/tiny-gemma3-vision",
            &[
                (58, "<start_of_image>"),
                (59, "<end_of_image>"),
                (60, "<image_soft_token>"),
            ],
            TEMPLATE,
        );
    }

    /// A tiny vision checkpoint (`fixture`) with a 64-word tokenizer whose ids `specials` are the image
    /// tokens, and a chat template.
    fn vision_model_from(dir: &Path, fixture: &str, specials: &[(u32, &str)], template: &str) {
        let src = root().join(fixture);
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        if src.join("processor_config.json").is_file() {
            std::fs::copy(
                src.join("processor_config.json"),
                dir.join("processor_config.json"),
            )
            .unwrap();
        }
        write_word_tokenizer(dir, 64);
        let path = dir.join("tokenizer.json");
        let mut tok: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for &(id, t) in specials {
            let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
            vocab.remove(&format!("w{id}"));
            vocab.insert(t.into(), json!(id));
            tok["added_tokens"].as_array_mut().unwrap().push(json!(
                {"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ));
        }
        std::fs::write(&path, tok.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"add_bos_token": true, "bos_token": "<bos>", "eos_token": "<eos>", "chat_template": template})
                .to_string(),
        )
        .unwrap();
        // <pad> ends generation, so the reference's 8 greedy tokens (the first is <eos>) all come out.
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [0], "do_sample": false}"#,
        )
        .unwrap();
    }

    fn image(name: &str) -> Vec<u8> {
        std::fs::read(root().join("tests/fixtures/images").join(name)).unwrap()
    }

    fn data_url(bytes: &[u8]) -> String {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    /// The reference request of the fixture: text, image, text, image, text (its input_ids exactly).
    fn reference_request(urls: [&str; 2], extra: Value) -> Value {
        let mut v = json!({"model": "tiny", "temperature": 0, "max_tokens": 8, "logprobs": true, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "w5 w17"},
            {"type": "image_url", "image_url": {"url": urls[0]}},
            {"type": "text", "text": "w9 w33 w41"},
            {"type": "image_url", "image_url": {"url": urls[1]}},
            {"type": "text", "text": "w7 w21 w3"},
        ]}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    /// Token ids of a chat response, from its logprobs tokens (`wN`, `<eos>`, ...).
    fn ids(r: &Value) -> Vec<u32> {
        r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"))
            .iter()
            .map(|t| match t["token"].as_str().unwrap() {
                "<pad>" => 0,
                "<eos>" => 1,
                "<bos>" => 2,
                w => w.strip_prefix('w').unwrap().parse().unwrap(),
            })
            .collect()
    }

    /// A loopback HTTP server: `/NAME` answers the bytes of the fixture image NAME, `/slow` waits 3 s,
    /// anything else is a 404.
    fn media_server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    r.read_line(&mut line).unwrap();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                    let file = root().join("tests/fixtures/images").join(&path[1..]);
                    let (status, body) = if path == "/slow" {
                        std::thread::sleep(Duration::from_secs(3));
                        ("200 OK", b"late".to_vec())
                    } else if path.len() > 1 && file.is_file() {
                        ("200 OK", std::fs::read(file).unwrap())
                    } else {
                        ("404 Not Found", b"no".to_vec())
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(&body);
                });
            }
        });
        addr
    }

    /// A Gemma 4 tower checkpoint (tiny, 31B-like: clipped linears, standardize, the image mask on sliding
    /// layers) over HTTP: its images and text parts become transformers' prompt ids, and the greedy tokens
    /// are transformers' (tests/fixtures/tiny-gemma4-vision/bidir).
    #[test]
    fn serve_gemma4_images_give_the_reference_tokens() {
        const G4_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% for p in m.content %}{% if p.type == 'image' %}<|image|>{% elif p.type == 'text' %}{{ p.text }} {% endif %}{% endfor %}{% endfor %}";
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        std::fs::create_dir_all(&dir).unwrap();
        let specials = [(60, "<|image|>"), (61, "<|image>"), (62, "<image|>")];
        vision_model_from(
            &dir,
            "tests/fixtures/tiny-gemma4-vision/bidir",
            &specials,
            G4_TEMPLATE,
        );
        let reference = e4m3_tests::read_json(
            &root().join("tests/fixtures/tiny-gemma4-vision/bidir/reference.json"),
        );
        assert_eq!(
            reference["images"],
            json!(["grad_160x120.png", "alpha_96x64.png"])
        );
        let srv = Server::start(&dir, &[]);
        let (grad, alpha) = (image("grad_160x120.png"), image("alpha_96x64.png"));
        let req = json!({"model": "tiny", "temperature": 0, "max_tokens": 8, "logprobs": true, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "w24 w9 w34 w4"},
            {"type": "image_url", "image_url": {"url": data_url(&grad)}},
            {"type": "text", "text": "w16 w41 w17"},
            {"type": "image_url", "image_url": {"url": data_url(&alpha)}},
            {"type": "text", "text": "w4 w6 w51"},
        ]}]});
        let (status, r) = srv.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{r}");
        let prompt = e4m3_tests::json_u32s(&reference["input_ids"]);
        assert_eq!(r["usage"]["prompt_tokens"], prompt.len(), "{r}");
        let got: Vec<u32> = r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"))
            .iter()
            .map(|t| {
                let t = t["token"].as_str().unwrap();
                match specials.iter().find(|s| s.1 == t) {
                    Some(s) => s.0,
                    None => t.strip_prefix('w').unwrap().parse().unwrap(),
                }
            })
            .collect();
        assert_eq!(got, e4m3_tests::json_u32s(&reference["greedy"]), "{r}");
    }

    #[test]
    fn serve_images_give_the_reference_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let media = tmp.path().join("media");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&media).unwrap();
        vision_model(&dir);
        let (grad, alpha) = (image("grad_160x120.png"), image("alpha_96x64.png"));
        std::fs::write(media.join("grad.png"), &grad).unwrap();
        std::fs::write(media.join("alpha.png"), &alpha).unwrap();
        let reference =
            e4m3_tests::read_json(&root().join("tests/fixtures/tiny-gemma3-vision/reference.json"));
        let want = e4m3_tests::json_u32s(&reference["greedy"]);
        let web = media_server();
        let srv = Server::start(
            &dir,
            &["--allowed-local-media-path", media.to_str().unwrap()],
        );
        let file = |n: &str| format!("file://{}", media.join(n).display());
        let http = |n: &str| format!("http://{web}/{n}");
        let cases = [
            [data_url(&grad), data_url(&alpha)],
            [file("grad.png"), file("alpha.png")],
            [http("grad_160x120.png"), http("alpha_96x64.png")],
            [data_url(&grad), http("alpha_96x64.png")],
        ];
        let mut content = None;
        for urls in &cases {
            let (status, r) = srv.post(
                "/v1/chat/completions",
                &reference_request([&urls[0], &urls[1]], json!({})),
            );
            assert_eq!(status, 200, "{r}");
            // The prompt is the fixture's input_ids (21 tokens with 2 x 4 image tokens); the tokens are
            // transformers' greedy ones for it.
            assert_eq!(r["usage"]["prompt_tokens"], 21, "{r}");
            assert_eq!(ids(&r), want, "{:?}", &urls[1][..20.min(urls[1].len())]);
            let c = r["choices"][0]["message"]["content"].clone();
            assert_eq!(*content.get_or_insert(c.clone()), c);
        }
        // Streaming gives the same text.
        let events = srv.stream(
            "/v1/chat/completions",
            &reference_request([&cases[0][0], &cases[0][1]], json!({"stream": true})),
        );
        let streamed: String = events
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(Value::String(streamed), content.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]");
        // `e4m3 run --image` (the CPU reference) gives the same prompt and tokens.
        let (a, b) = (media.join("grad.png"), media.join("alpha.png"));
        let out = common::e4m3(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--backend",
            "cpu",
            "--prompt",
            "w5 w17 <start_of_image> w9 w33 w41 <start_of_image> w7 w21 w3",
            "--image",
            a.to_str().unwrap(),
            "--image",
            b.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(run["prompt_ids"], reference["input_ids"]);
        assert_eq!(e4m3_tests::json_u32s(&run["generated_ids"]), want);
        // A text request on the same server.
        let (status, r) = srv.post(
            "/v1/chat/completions",
            &chat("w5 w6 w7", json!({"max_tokens": 3})),
        );
        assert_eq!(status, 200, "{r}");
    }

    #[test]
    fn serve_bad_images_are_400_naming_the_part() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let media = tmp.path().join("media");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&media).unwrap();
        vision_model(&dir);
        let (grad, alpha) = (image("grad_160x120.png"), image("alpha_96x64.png"));
        std::fs::write(media.join("alpha.png"), &alpha).unwrap();
        std::fs::write(media.join("grad.png"), &grad).unwrap();
        std::fs::write(tmp.path().join("secret.png"), &alpha).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.png"), media.join("link.png")).unwrap();
        let web = media_server();
        // 4000 bytes: alpha (3351) fits, grad (4952) does not.
        let srv = Server::start(
            &dir,
            &[
                "--allowed-local-media-path",
                media.to_str().unwrap(),
                "--max-image-bytes",
                "4000",
                "--media-fetch-timeout",
                "1",
            ],
        );
        let ok = data_url(&alpha);
        let file = |n: &str| format!("file://{}/{n}", media.display());
        let part = "messages[0].content[3].image_url";
        let cases: Vec<(String, &str)> = vec![
            (
                "data:image/png;base64,bm90IGFuIGltYWdl".into(),
                "cannot read the image",
            ),
            (
                data_url(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"),
                "unsupported image format Gif",
            ),
            (data_url(&grad), "over the limit of 4000"),
            (file("grad.png"), "over the limit of 4000"),
            (
                format!("http://{web}/grad_160x120.png"),
                "over the limit of 4000",
            ),
            (file("../secret.png"), "outside --allowed-local-media-path"),
            (file("link.png"), "outside --allowed-local-media-path"),
            (file("missing.png"), "cannot open"),
            (format!("http://{web}/slow"), "--media-fetch-timeout"),
            (format!("http://{web}/nothing.png"), "404"),
            ("ftp://example.com/a.png".into(), "unsupported URL"),
            ("data:text/plain;base64,AAAA".into(), "not an image"),
        ];
        for (url, why) in &cases {
            let t = std::time::Instant::now();
            let (status, r) = srv.post(
                "/v1/chat/completions",
                &reference_request([&ok, url], json!({})),
            );
            assert_error(status, &r, 400, &[why, part]);
            assert_eq!(r["error"]["param"], part, "{r}");
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{url}: {:?}",
                t.elapsed()
            );
        }
        // A malformed image part, and a marker typed into the text (one marker too many).
        let mut bad = reference_request([&ok, &ok], json!({}));
        bad["messages"][0]["content"][1] = json!({"type": "image_url", "image_url": {"uri": "x"}});
        let (status, r) = srv.post("/v1/chat/completions", &bad);
        assert_error(
            status,
            &r,
            400,
            &["messages[0].content[1].image_url", "url"],
        );
        let mut bad = reference_request([&ok, &ok], json!({}));
        bad["messages"][0]["content"][0]["text"] = json!("w5 <start_of_image>");
        let (status, r) = srv.post("/v1/chat/completions", &bad);
        assert_error(status, &r, 400, &["3 <start_of_image> markers", "2 images"]);
        assert_eq!(r["error"]["param"], "messages");
        // The server goes on serving images.
        let (status, r) = srv.post(
            "/v1/chat/completions",
            &reference_request([&ok, &ok], json!({})),
        );
        assert_eq!(status, 200, "{r}");
        assert_eq!(ids(&r).len(), 8);

        // Without --allowed-local-media-path no file is served.
        let plain = Server::start(&dir, &[]);
        let (status, r) = plain.post(
            "/v1/chat/completions",
            &reference_request([&ok, &file("alpha.png")], json!({})),
        );
        assert_error(status, &r, 400, &[part, "--allowed-local-media-path"]);
        // A model without a vision tower refuses images.
        let text_dir = tmp.path().join("text");
        std::fs::create_dir_all(&text_dir).unwrap();
        tiny_model(&text_dir);
        let text = Server::start(&text_dir, &[]);
        let (status, r) = text.post(
            "/v1/chat/completions",
            &reference_request([&ok, &ok], json!({})),
        );
        assert_error(
            status,
            &r,
            400,
            &["messages[0].content[1].image_url", "no vision tower"],
        );
    }

    #[test]
    fn serve_concurrent_image_and_text_requests_equal_each_alone() {
        let tmp = tempfile::tempdir().unwrap();
        vision_model(tmp.path());
        let imgs = [
            data_url(&image("grad_160x120.png")),
            data_url(&image("alpha_96x64.png")),
            data_url(&image("gray_200x200.png")),
        ];
        let requests: Vec<Value> = (0..6)
            .map(|i| {
                if i % 3 == 2 {
                    chat(
                        &format!("w{} w{} w9", 10 + i, 20 + i),
                        json!({"max_tokens": 6, "logprobs": true}),
                    )
                } else {
                    reference_request(
                        [&imgs[i % 3], &imgs[(i + 1) % 3]],
                        json!({"max_tokens": 5 + i}),
                    )
                }
            })
            .collect();
        // Alone: one sequence at a time.
        let one = Server::start(
            tmp.path(),
            &["--max-num-seqs", "1", "--max-model-len", "32"],
        );
        let want: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| ids(&one.post("/v1/chat/completions", r).1))
            .collect();
        drop(one);
        // Together: 4 slots, 5 blocks of 16 positions (each request takes 2): preemption.
        let srv = Server::start(
            tmp.path(),
            &[
                "--max-num-seqs",
                "4",
                "--max-model-len",
                "32",
                "--num-kv-blocks",
                "5",
            ],
        );
        std::thread::scope(|sc| {
            let threads: Vec<_> = requests
                .iter()
                .map(|r| sc.spawn(|| srv.post("/v1/chat/completions", r)))
                .collect();
            for (k, t) in threads.into_iter().enumerate() {
                let (status, r) = t.join().unwrap();
                assert_eq!(status, 200, "{r}");
                assert_eq!(ids(&r), want[k], "request {k}");
            }
        });
        let (_, m) = srv.get("/metrics");
        assert!(metric(&m, "e4m3_preemptions_total") > 0.0, "{m}");
    }
}
