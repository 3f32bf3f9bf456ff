//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json`, rendered with minijinja
//! configured like `transformers`' `apply_chat_template` (Jinja2 with `trim_blocks` and
//! `lstrip_blocks`, Python string methods via pycompat, a `raise_exception` function).
//!
//! The rendered text already contains the BOS token when the template writes `{{ bos_token }}`
//! (Gemma's does), so tokenize it with `add_bos = false`.

use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, Value as JValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One chat message as a template sees it (the dict `transformers` passes): `role`, `content` (a
/// string or a list of content parts), and for tool use the assistant's `tool_calls`, a tool
/// message's `tool_call_id` / `name`, and an assistant's earlier `reasoning_content` (also read from
/// `reasoning` / `thinking`, as `transformers` aliases them). Absent fields are absent in the
/// template too (`message.get('x')` is none).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(
        default,
        alias = "reasoning",
        alias = "thinking",
        skip_serializing_if = "Option::is_none"
    )]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A message's content: a string or a list of parts (`{"type": "text", "text": ...}`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

/// An assistant's tool call as templates read it: `{id, type: "function", function: {name,
/// arguments}}`. `arguments` is a JSON object (vLLM turns OpenAI's JSON-string arguments into an
/// object before rendering; so does [`ToolCall::function`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

fn function_type() -> String {
    "function".into()
}

impl ToolCall {
    /// A function call; `arguments` that are a JSON string holding an object are parsed into it.
    pub fn function(id: Option<String>, name: impl Into<String>, arguments: Value) -> ToolCall {
        let arguments = match arguments {
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Object(_)) => v,
                _ => Value::String(s),
            },
            v => v,
        };
        ToolCall {
            id,
            kind: function_type(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            ..Default::default()
        }
    }

    /// The text of `content` (text parts joined with nothing between them).
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(s)) => s.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        }
    }
}

/// What a template sees besides the messages, as `transformers`' `apply_chat_template` passes it:
/// the special tokens, `add_generation_prompt`, `tools` (a list of JSON schemas, none when absent)
/// and extra keyword arguments (`chat_template_kwargs`, e.g. `enable_thinking`).
#[derive(Clone, Debug, Default)]
pub struct ChatOptions<'a> {
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    pub add_generation_prompt: bool,
    pub tools: Option<&'a [Value]>,
    pub kwargs: Option<&'a Map<String, Value>>,
}

/// Names a template context always sets; `chat_template_kwargs` may not replace them.
pub const RESERVED_TEMPLATE_VARS: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

fn template_error(e: minijinja::Error) -> Error {
    // minijinja's Display carries the kind, the detail (the `raise_exception` message) and the
    // template line; include the cause chain too.
    let mut msg = format!("chat template: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::invalid(msg)
}

fn environment(template: &str) -> Result<Environment<'_>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Floats print as Python prints them (`1e+20`, `1e-05`), as Jinja2 does.
    env.set_formatter(|out, state, value| {
        if value.kind() == ValueKind::Number && !value.is_integer() {
            if let Ok(x) = f64::try_from(value.clone()) {
                return std::fmt::Write::write_str(out, &python_float_repr(x)).map_err(|_| {
                    minijinja::Error::new(ErrorKind::WriteFailure, "cannot write a number")
                });
            }
        }
        minijinja::escape_formatter(out, state, value)
    });
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat_template", template)
        .map_err(template_error)?;
    Ok(env)
}

/// `repr(float)` of Python: the shortest digits that round-trip, in positional notation for
/// exponents -4..16 (with at least one decimal), else scientific with a signed two-digit exponent.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let point = exp as usize + 1;
            if digits.len() <= point {
                format!("{digits}{}.0", "0".repeat(point - digits.len()))
            } else {
                format!("{}.{}", &digits[..point], &digits[point..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    }
}

/// Render `messages` with a chat template. Errors (syntax errors, `raise_exception(...)` such as
/// Gemma's "Conversation roles must alternate ...") are `Error::Invalid` carrying the message.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    render_chat_with(
        template,
        messages,
        &ChatOptions {
            bos_token,
            eos_token,
            add_generation_prompt,
            ..Default::default()
        },
    )
}

/// Render `messages` with tools and extra template variables (see [`ChatOptions`]). A
/// `chat_template_kwargs` key that names one of [`RESERVED_TEMPLATE_VARS`] is an error.
pub fn render_chat_with(
    template: &str,
    messages: &[ChatMessage],
    opts: &ChatOptions,
) -> Result<String> {
    let env = environment(template)?;
    let tmpl = env.get_template("chat_template").map_err(template_error)?;
    let mut ctx: std::collections::BTreeMap<String, JValue> = Default::default();
    if let Some(kw) = opts.kwargs {
        for (k, v) in kw {
            if RESERVED_TEMPLATE_VARS.contains(&k.as_str()) {
                return Err(Error::invalid(format!(
                    "chat_template_kwargs: `{k}` is set by the server and cannot be given"
                )));
            }
            ctx.insert(k.clone(), JValue::from_serialize(v));
        }
    }
    ctx.insert("messages".into(), JValue::from_serialize(messages));
    ctx.insert(
        "tools".into(),
        opts.tools.map_or(JValue::from(()), JValue::from_serialize),
    );
    ctx.insert("bos_token".into(), JValue::from(opts.bos_token));
    ctx.insert("eos_token".into(), JValue::from(opts.eos_token));
    ctx.insert(
        "add_generation_prompt".into(),
        JValue::from(opts.add_generation_prompt),
    );
    tmpl.render(ctx).map_err(template_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEMMA: &str = "{{ bos_token }}\n{%- for m in messages -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('roles must alternate') }}{%- endif -%}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m['content'] | trim }}<end_of_turn>\n{%- endfor -%}{%- if add_generation_prompt -%}{{ '\n<start_of_turn>model\n' }}{%- endif -%}";

    #[test]
    fn renders_and_trims() {
        let msgs = [ChatMessage::new("user", "  hi \n")];
        let out = render_chat(GEMMA, &msgs, "<bos>", "<eos>", true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_message() {
        let msgs = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let err = render_chat(GEMMA, &msgs, "<bos>", "<eos>", false).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_error_is_an_error() {
        let err = render_chat("{% if %}", &[], "<bos>", "<eos>", false).unwrap_err();
        assert!(err.to_string().starts_with("chat template:"), "{err}");
    }

    #[test]
    fn python_string_methods() {
        let t = "{{ messages[0].content.upper() }}|{% if messages[0].content.startswith('he') %}yes{% endif %}";
        let out = render_chat(t, &[ChatMessage::new("user", "hello")], "", "", false).unwrap();
        assert_eq!(out, "HELLO|yes");
    }

    /// The Gemma 4 chat template renders exactly as transformers' `apply_chat_template` does
    /// (tests/fixtures/gemma4-chat, made by tools/make_gemma4_chat_fixtures.py).
    #[test]
    fn gemma4_template_matches_transformers() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma4-chat");
        let template = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 18);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone())
                .unwrap_or_else(|e| panic!("case {name}: messages: {e}"));
            let tools: Option<Vec<Value>> = c["tools"].as_array().cloned();
            let kwargs = c["kwargs"].as_object().unwrap();
            let out = render_chat_with(
                &template,
                &messages,
                &ChatOptions {
                    bos_token: doc["bos_token"].as_str().unwrap(),
                    eos_token: doc["eos_token"].as_str().unwrap(),
                    add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
                    tools: tools.as_deref(),
                    kwargs: Some(kwargs),
                },
            )
            .unwrap_or_else(|e| panic!("case {name}: {e}"));
            assert_eq!(out, c["rendered"].as_str().unwrap(), "case {name}");
        }
    }

    #[test]
    fn json_string_arguments_become_an_object() {
        let tc = ToolCall::function(None, "f", Value::String(r#"{"a": 1}"#.into()));
        assert_eq!(tc.function.arguments, serde_json::json!({"a": 1}));
        let tc = ToolCall::function(None, "f", Value::String("not json".into()));
        assert_eq!(tc.function.arguments, Value::String("not json".into()));
    }

    #[test]
    fn reserved_kwargs_are_rejected() {
        let mut kw = Map::new();
        kw.insert("messages".into(), Value::Null);
        let err = render_chat_with(
            "x",
            &[],
            &ChatOptions {
                kwargs: Some(&kw),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("`messages`"), "{err}");
    }

    #[test]
    fn floats_print_like_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (-0.5, "-0.5"),
            (1e20, "1e+20"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456.789, "123456.789"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.25e100, "-2.25e+100"),
            (0.1 + 0.2, "0.30000000000000004"),
            (0.0, "0.0"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
        let out = render_chat("{{ 1e20 }} {{ 3 }} {{ 0.5 }}", &[], "", "", false).unwrap();
        assert_eq!(out, "1e+20 3 0.5");
    }

    #[test]
    fn reasoning_aliases() {
        let m: ChatMessage =
            serde_json::from_value(serde_json::json!({"role": "assistant", "reasoning": "r"}))
                .unwrap();
        assert_eq!(m.reasoning_content.as_deref(), Some("r"));
    }
}
