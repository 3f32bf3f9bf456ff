//! Parsing Gemma 4 chat output (the behaviour of vLLM's `gemma4` reasoning and tool-call parsers):
//!
//! * the thought channel `<|channel>thought\n...<channel|>` is reasoning, returned apart from the
//!   answer (the `thought\n` label is dropped);
//! * `<|tool_call>call:NAME{key:value,...}<tool_call|>` is a tool call. Values are `<|"|>`-quoted
//!   strings (taken verbatim), `{...}` maps (bare or quoted keys), `[...]` lists, numbers, `true` /
//!   `false` and `null`; the arguments become a JSON object text (keys in the model's order,
//!   formatted like Python's `json.dumps`, as vLLM returns them). A call that does not parse, or is
//!   never closed, is returned as content, as vLLM does.
//!
//! [`Gemma4Parser`] is incremental: feed it text deltas with [`Gemma4Parser::push`] and call
//! [`Gemma4Parser::finish`] at the end. A tail that could be the start of a marker is held back until
//! it is decided, so the concatenated output is the same however the text was split. A tool call
//! is handed out whole once its `<tool_call|>` arrives.

pub const CHANNEL_START: &str = "<|channel>";
pub const CHANNEL_END: &str = "<channel|>";
pub const TOOL_CALL_START: &str = "<|tool_call>";
pub const TOOL_CALL_END: &str = "<tool_call|>";
pub const STRING_DELIM: &str = "<|\"|>";
/// The token the model ends a tool-calling step with (generation stops there).
pub const TOOL_RESPONSE_START: &str = "<|tool_response>";
const THOUGHT_LABEL: &str = "thought\n";

/// A parsed tool call: its position among the calls of the response, the function name and the
/// arguments as JSON object text.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedToolCall {
    pub index: usize,
    pub name: String,
    pub arguments: String,
}

/// What some text contributed: reasoning, answer text and finished tool calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

impl ParsedDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    /// Append `other` (a later delta) to this one.
    pub fn extend(&mut self, other: ParsedDelta) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.tool_calls.extend(other.tool_calls);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Content,
    /// In the thought channel; `label_done` once the `thought\n` label was dropped or ruled out.
    Thought {
        label_done: bool,
    },
    ToolCall,
}

/// Incremental Gemma 4 output parser (see the module docs).
#[derive(Clone, Debug)]
pub struct Gemma4Parser {
    reasoning: bool,
    tools: bool,
    state: State,
    buf: String,
    calls: usize,
}

impl Gemma4Parser {
    /// `reasoning`: split off the thought channel; `tools`: parse tool calls. With neither, the
    /// text passes through as content.
    pub fn new(reasoning: bool, tools: bool) -> Gemma4Parser {
        Gemma4Parser {
            reasoning,
            tools,
            state: State::Content,
            buf: String::new(),
            calls: 0,
        }
    }

    /// Start inside the thought channel: for a prompt that ends with an open `<|channel>` (see
    /// [`prompt_opens_thought`]).
    pub fn in_thought(mut self) -> Gemma4Parser {
        if self.reasoning {
            self.state = State::Thought { label_done: false };
        }
        self
    }

    pub fn push(&mut self, text: &str) -> ParsedDelta {
        self.buf.push_str(text);
        let mut out = ParsedDelta::default();
        self.step(&mut out, false);
        out
    }

    /// The end of the text: flush what was held back (an unclosed tool call becomes content).
    pub fn finish(&mut self) -> ParsedDelta {
        let mut out = ParsedDelta::default();
        self.step(&mut out, true);
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Content => out.content.push_str(&rest),
            State::Thought { .. } => out.reasoning.push_str(&rest),
            State::ToolCall => {
                out.content.push_str(TOOL_CALL_START);
                out.content.push_str(&rest);
            }
        }
        self.state = State::Content;
        out
    }

    fn step(&mut self, out: &mut ParsedDelta, at_end: bool) {
        loop {
            match self.state {
                State::Content => {
                    let mut markers: Vec<&str> = Vec::new();
                    if self.reasoning {
                        markers.push(CHANNEL_START);
                        markers.push(CHANNEL_END);
                    }
                    if self.tools {
                        markers.push(TOOL_CALL_START);
                    }
                    let found = markers
                        .iter()
                        .filter_map(|m| self.buf.find(m).map(|p| (p, *m)))
                        .min_by_key(|&(p, _)| p);
                    match found {
                        Some((pos, marker)) => {
                            out.content.push_str(&self.buf[..pos]);
                            self.buf.drain(..pos + marker.len());
                            self.state = match marker {
                                CHANNEL_START => State::Thought { label_done: false },
                                TOOL_CALL_START => State::ToolCall,
                                // A stray channel end: dropped.
                                _ => State::Content,
                            };
                        }
                        None => {
                            let keep = if at_end {
                                0
                            } else {
                                partial_marker_len(&self.buf, &markers)
                            };
                            let end = self.buf.len() - keep;
                            out.content.push_str(&self.buf[..end]);
                            self.buf.drain(..end);
                            return;
                        }
                    }
                }
                State::Thought { label_done } => {
                    if !label_done {
                        if self.buf.starts_with(THOUGHT_LABEL) {
                            self.buf.drain(..THOUGHT_LABEL.len());
                        } else if THOUGHT_LABEL.starts_with(self.buf.as_str()) && !at_end {
                            return; // not decided yet
                        }
                        self.state = State::Thought { label_done: true };
                        continue;
                    }
                    match self.buf.find(CHANNEL_END) {
                        Some(pos) => {
                            out.reasoning.push_str(&self.buf[..pos]);
                            self.buf.drain(..pos + CHANNEL_END.len());
                            self.state = State::Content;
                        }
                        None => {
                            let keep = if at_end {
                                0
                            } else {
                                partial_marker_len(&self.buf, &[CHANNEL_END])
                            };
                            let end = self.buf.len() - keep;
                            out.reasoning.push_str(&self.buf[..end]);
                            self.buf.drain(..end);
                            return;
                        }
                    }
                }
                State::ToolCall => match self.buf.find(TOOL_CALL_END) {
                    Some(pos) => {
                        let raw = &self.buf[..pos];
                        match parse_tool_call(raw) {
                            Some((name, arguments)) => {
                                out.tool_calls.push(ParsedToolCall {
                                    index: self.calls,
                                    name,
                                    arguments,
                                });
                                self.calls += 1;
                            }
                            None => {
                                out.content.push_str(TOOL_CALL_START);
                                out.content.push_str(raw);
                                out.content.push_str(TOOL_CALL_END);
                            }
                        }
                        self.buf.drain(..pos + TOOL_CALL_END.len());
                        self.state = State::Content;
                    }
                    None => return,
                },
            }
        }
    }
}

/// Parse a whole response at once.
pub fn parse_gemma4(text: &str, reasoning: bool, tools: bool) -> ParsedDelta {
    let mut p = Gemma4Parser::new(reasoning, tools);
    let mut out = p.push(text);
    out.extend(p.finish());
    out
}

/// Whether a rendered prompt leaves the thought channel open (its last `<|channel>` has no
/// `<channel|>` after it), so that the model's output starts as reasoning.
pub fn prompt_opens_thought(prompt: &str) -> bool {
    match prompt.rfind(CHANNEL_START) {
        Some(p) => !prompt[p..].contains(CHANNEL_END),
        None => false,
    }
}

/// Whether a chat template writes Gemma 4 turns, thought channels and tool calls.
pub fn is_gemma4_template(template: &str) -> bool {
    template.contains("<|turn>") && template.contains(CHANNEL_START)
}

/// Length of the longest tail of `buf` that is a proper prefix of one of `markers`.
fn partial_marker_len(buf: &str, markers: &[&str]) -> usize {
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    (1..longest.min(buf.len() + 1))
        .rev()
        .find(|&k| {
            let start = buf.len() - k;
            buf.is_char_boundary(start) && markers.iter().any(|m| m.starts_with(&buf[start..]))
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Tool-call arguments

/// A Gemma 4 argument value; maps keep the model's key order.
#[derive(Clone, Debug, PartialEq)]
enum GValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<GValue>),
    Map(Vec<(String, GValue)>),
}

impl GValue {
    /// JSON text formatted like Python's `json.dumps(..., ensure_ascii=False)`.
    fn write_json(&self, out: &mut String) {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        match self {
            GValue::Str(s) => out.push_str(&quote(s)),
            GValue::Int(i) => out.push_str(&i.to_string()),
            GValue::Float(x) => match serde_json::Number::from_f64(*x) {
                Some(n) => out.push_str(&n.to_string()),
                None => out.push_str("null"),
            },
            GValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            GValue::Null => out.push_str("null"),
            GValue::List(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            GValue::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&quote(k));
                    out.push_str(": ");
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

/// `call:NAME{ARGS}` (the text between `<|tool_call>` and `<tool_call|>`) → name and JSON
/// arguments; `None` when it is not well formed.
pub fn parse_tool_call(raw: &str) -> Option<(String, String)> {
    let rest = raw.trim().strip_prefix("call:")?;
    let brace = rest.find('{')?;
    let name = rest[..brace].trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return None;
    }
    let mut p = ArgParser {
        s: &rest[brace..],
        pos: 0,
    };
    let args = p.map()?;
    p.ws();
    if p.pos != p.s.len() {
        return None;
    }
    let mut json = String::new();
    args.write_json(&mut json);
    Some((name.to_string(), json))
}

struct ArgParser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> ArgParser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start().len();
    }

    fn eat(&mut self, t: &str) -> bool {
        self.ws();
        if self.rest().starts_with(t) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    /// `<|"|>...<|"|>`, verbatim (no escapes).
    fn string(&mut self) -> Option<String> {
        if !self.eat(STRING_DELIM) {
            return None;
        }
        let end = self.rest().find(STRING_DELIM)?;
        let s = self.rest()[..end].to_string();
        self.pos += end + STRING_DELIM.len();
        Some(s)
    }

    fn map(&mut self) -> Option<GValue> {
        if !self.eat("{") {
            return None;
        }
        let mut entries: Vec<(String, GValue)> = Vec::new();
        if self.eat("}") {
            return Some(GValue::Map(entries));
        }
        loop {
            self.ws();
            let key = if self.rest().starts_with(STRING_DELIM) {
                self.string()?
            } else {
                let end = self.rest().find(':')?;
                let k = self.rest()[..end].trim().to_string();
                if k.is_empty() || k.contains(['{', '}', '[', ']', ',']) {
                    return None;
                }
                self.pos += end;
                k
            };
            if !self.eat(":") {
                return None;
            }
            let v = self.value()?;
            // A repeated key keeps its first place and takes the last value (a Python dict).
            match entries.iter_mut().find(|(k, _)| *k == key) {
                Some(e) => e.1 = v,
                None => entries.push((key, v)),
            }
            if self.eat(",") {
                continue;
            }
            if self.eat("}") {
                return Some(GValue::Map(entries));
            }
            return None;
        }
    }

    fn list(&mut self) -> Option<GValue> {
        if !self.eat("[") {
            return None;
        }
        let mut items = Vec::new();
        if self.eat("]") {
            return Some(GValue::List(items));
        }
        loop {
            items.push(self.value()?);
            if self.eat(",") {
                continue;
            }
            if self.eat("]") {
                return Some(GValue::List(items));
            }
            return None;
        }
    }

    fn value(&mut self) -> Option<GValue> {
        self.ws();
        let r = self.rest();
        if r.starts_with(STRING_DELIM) {
            return self.string().map(GValue::Str);
        }
        if r.starts_with('{') {
            return self.map();
        }
        if r.starts_with('[') {
            return self.list();
        }
        let end = r.find([',', '}', ']']).unwrap_or(r.len());
        let tok = r[..end].trim();
        if tok.is_empty() || tok.contains(STRING_DELIM) {
            return None;
        }
        let v = bare_value(tok);
        self.pos += end;
        Some(v)
    }
}

/// A bare value as vLLM reads it: booleans, null, a number (float when it has a dot), else the
/// text itself.
fn bare_value(tok: &str) -> GValue {
    match tok {
        "true" => return GValue::Bool(true),
        "false" => return GValue::Bool(false),
        _ => {}
    }
    if matches!(tok.to_ascii_lowercase().as_str(), "null" | "none" | "nil") {
        return GValue::Null;
    }
    if tok.contains('.') {
        if let Ok(x) = tok.parse::<f64>() {
            if x.is_finite() {
                return GValue::Float(x);
            }
        }
    } else if let Ok(i) = tok.parse::<i64>() {
        return GValue::Int(i);
    }
    GValue::Str(tok.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn call(index: usize, name: &str, args: &str) -> ParsedToolCall {
        ParsedToolCall {
            index,
            name: name.into(),
            arguments: args.into(),
        }
    }

    /// Feed `pieces` one by one and collect everything.
    fn run(pieces: &[&str], reasoning: bool, tools: bool) -> ParsedDelta {
        let mut p = Gemma4Parser::new(reasoning, tools);
        let mut all = ParsedDelta::default();
        for piece in pieces {
            all.extend(p.push(piece));
        }
        all.extend(p.finish());
        all
    }

    /// Char boundaries of `s`.
    fn cuts(s: &str) -> Vec<usize> {
        (0..=s.len()).filter(|&i| s.is_char_boundary(i)).collect()
    }

    /// Every split into two and three pieces, and random splits, give the one-piece result.
    fn assert_split_invariant(text: &str, reasoning: bool, tools: bool) -> ParsedDelta {
        let whole = run(&[text], reasoning, tools);
        let c = cuts(text);
        for &i in &c {
            let got = run(&[&text[..i], &text[i..]], reasoning, tools);
            assert_eq!(got, whole, "split at {i} of {text:?}");
        }
        for (a, &i) in c.iter().enumerate().step_by(3) {
            for &j in &c[a..] {
                let got = run(&[&text[..i], &text[i..j], &text[j..]], reasoning, tools);
                assert_eq!(got, whole, "split at {i},{j} of {text:?}");
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < text.len() {
                let mut next = (at + rng.random_range(1..=6)).min(text.len());
                while !text.is_char_boundary(next) {
                    next += 1;
                }
                pieces.push(&text[at..next]);
                at = next;
            }
            assert_eq!(run(&pieces, reasoning, tools), whole, "pieces {pieces:?}");
        }
        // Character by character.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&pieces, reasoning, tools), whole);
        whole
    }

    #[test]
    fn thought_channel_is_reasoning() {
        let text = "<|channel>thought\nLet me think: 2+2.\n<channel|>The answer is 4.";
        let got = assert_split_invariant(text, true, true);
        assert_eq!(got.reasoning, "Let me think: 2+2.\n");
        assert_eq!(got.content, "The answer is 4.");
        assert!(got.tool_calls.is_empty());
    }

    #[test]
    fn no_channel_is_all_content() {
        let text = "Just an answer with < and <| and <channel and | bars.";
        let got = assert_split_invariant(text, true, true);
        assert_eq!(got.reasoning, "");
        assert_eq!(got.content, text);
    }

    #[test]
    fn reasoning_off_passes_markers_through() {
        let text = "<|channel>thought\nx<channel|>y<|tool_call>call:f{a:1}<tool_call|>";
        let got = assert_split_invariant(text, false, false);
        assert_eq!(got.content, text);
        assert_eq!(got.reasoning, "");
    }

    #[test]
    fn thought_without_label_and_unclosed() {
        let got = assert_split_invariant("<|channel>thinking hard", true, false);
        assert_eq!(got.reasoning, "thinking hard");
        assert_eq!(got.content, "");
        // a short unfinished label is kept as reasoning
        let got = assert_split_invariant("<|channel>thou", true, false);
        assert_eq!(got.reasoning, "thou");
        let got = assert_split_invariant("<|channel>thought\n<channel|>Hi", true, false);
        assert_eq!((got.reasoning.as_str(), got.content.as_str()), ("", "Hi"));
    }

    #[test]
    fn starts_in_thought_when_the_prompt_opens_it() {
        assert!(prompt_opens_thought("<|turn>model\n<|channel>thought\n"));
        assert!(!prompt_opens_thought(
            "<|turn>model\n<|channel>thought\n<channel|>"
        ));
        assert!(!prompt_opens_thought("<|turn>model\n"));
        let mut p = Gemma4Parser::new(true, false).in_thought();
        let mut got = p.push("reason<channel|>answer");
        got.extend(p.finish());
        assert_eq!(
            (got.reasoning.as_str(), got.content.as_str()),
            ("reason", "answer")
        );
    }

    #[test]
    fn tool_call_with_nested_arguments() {
        let text = "<|channel>thought\nI need the weather.<channel|>\
            <|tool_call>call:get_weather{city:<|\"|>Paris, \"FR\" {x}<|\"|>,days:3,\
            opts:{metric:true,ratio:2.5,none:null,tags:[<|\"|>a<|\"|>,[1,-2],{k:<|\"|>v<|\"|>}]},\
            <|\"|>quoted key<|\"|>:false}<tool_call|>";
        let got = assert_split_invariant(text, true, true);
        assert_eq!(got.reasoning, "I need the weather.");
        assert_eq!(got.content, "");
        assert_eq!(
            got.tool_calls,
            vec![call(
                0,
                "get_weather",
                r#"{"city": "Paris, \"FR\" {x}", "days": 3, "opts": {"metric": true, "ratio": 2.5, "none": null, "tags": ["a", [1, -2], {"k": "v"}]}, "quoted key": false}"#
            )]
        );
        // the JSON is valid and means what the call said
        let v: serde_json::Value = serde_json::from_str(&got.tool_calls[0].arguments).unwrap();
        assert_eq!(v["opts"]["tags"][1][1], -2);
        assert_eq!(v["city"], "Paris, \"FR\" {x}");
    }

    #[test]
    fn parallel_calls_text_and_unicode() {
        let text = "Sure.<|tool_call>call:a{}<tool_call|><|tool_call>call:b.c-d{s:<|\"|>東京 🌸<|\"|>}<tool_call|> done";
        let got = assert_split_invariant(text, true, true);
        assert_eq!(got.content, "Sure. done");
        assert_eq!(
            got.tool_calls,
            vec![call(0, "a", "{}"), call(1, "b.c-d", r#"{"s": "東京 🌸"}"#)]
        );
    }

    #[test]
    fn tools_off_leaves_calls_as_content() {
        let text = "<|tool_call>call:a{x:1}<tool_call|>";
        let got = assert_split_invariant(text, true, false);
        assert_eq!(got.content, text);
        assert!(got.tool_calls.is_empty());
    }

    #[test]
    fn malformed_calls_are_content() {
        for bad in [
            "<|tool_call>get_weather{city:1}<tool_call|>", // no call:
            "<|tool_call>call:{city:1}<tool_call|>",       // no name
            "<|tool_call>call:get weather{a:1}<tool_call|>", // bad name
            "<|tool_call>call:f{city:<|\"|>Paris}<tool_call|>", // unterminated string
            "<|tool_call>call:f{a:{b:1}<tool_call|>",      // unbalanced
            "<|tool_call>call:f{a:1}}<tool_call|>",        // trailing text
            "<|tool_call>call:f{a:}<tool_call|>",          // no value
            "<|tool_call>call:f{:1}<tool_call|>",          // no key
            "<|tool_call>call:f<tool_call|>",              // no braces
            "<|tool_call>call:f{a:1",                      // never closed
        ] {
            let text = format!("Hi {bad} bye");
            let got = assert_split_invariant(&text, true, true);
            assert!(got.tool_calls.is_empty(), "{bad}: {got:?}");
            assert_eq!(got.content, text, "{bad}");
        }
        // A malformed call does not stop a later good one.
        let text = "<|tool_call>call:f{a:}<tool_call|><|tool_call>call:g{b:2}<tool_call|>";
        let got = assert_split_invariant(text, true, true);
        assert_eq!(got.content, "<|tool_call>call:f{a:}<tool_call|>");
        assert_eq!(got.tool_calls, vec![call(0, "g", r#"{"b": 2}"#)]);
    }

    #[test]
    fn bare_values_as_vllm_reads_them() {
        let (_, j) =
            parse_tool_call("call:f{a:1.0,b:-7,c:None,d:hello world,e:1e3,f: 2 }").unwrap();
        assert_eq!(
            j,
            r#"{"a": 1.0, "b": -7, "c": null, "d": "hello world", "e": "1e3", "f": 2}"#
        );
        let (_, j) = parse_tool_call("call:f{a:1,a:2,b:3}").unwrap();
        assert_eq!(j, r#"{"a": 2, "b": 3}"#);
    }

    #[test]
    fn template_arguments_round_trip() {
        // What the Gemma 4 template writes for the arguments of tests/fixtures/gemma4-chat
        // (tool_calls_parallel_with_reasoning) parses back to the same JSON values.
        let raw = "call:search_docs{exact:false,filters:{lang:<|\"|>en<|\"|>,max_results:2.5},query:<|\"|>fp8 {scales}, \"quoted\"<|\"|>,tags:[<|\"|>a<|\"|>,<|\"|>b<|\"|>]}";
        let (name, j) = parse_tool_call(raw).unwrap();
        assert_eq!(name, "search_docs");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"query": "fp8 {scales}, \"quoted\"", "filters": {"lang": "en", "max_results": 2.5}, "tags": ["a", "b"], "exact": false})
        );
    }

    #[test]
    fn partial_marker_holdback() {
        let mut p = Gemma4Parser::new(true, true);
        assert_eq!(p.push("abc<|").content, "abc");
        assert_eq!(p.push("x").content, "<|x");
        assert_eq!(p.push("<|tool_c").content, "");
        let d = p.push("all>call:f{}<tool_call|>z");
        assert_eq!(d.content, "z");
        assert_eq!(d.tool_calls, vec![call(0, "f", "{}")]);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn gemma4_template_detection() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let g4 = std::fs::read_to_string(dir.join("gemma4-chat/chat_template.jinja")).unwrap();
        assert!(is_gemma4_template(&g4));
        assert!(!is_gemma4_template(
            "{{ bos_token }}<start_of_turn>user\n{{ messages[0]['content'] }}<end_of_turn>"
        ));
    }
}
