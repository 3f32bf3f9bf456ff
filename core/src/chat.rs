//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json`, rendered with minijinja
//! configured like `transformers`' `apply_chat_template` (Jinja2 with `trim_blocks` and
//! `lstrip_blocks`, Python string methods via pycompat, a `raise_exception` function).
//!
//! The rendered text already contains the BOS token when the template writes `{{ bos_token }}`
//! (Gemma's does), so tokenize it with `add_bos = false`.

use minijinja::{context, Environment, ErrorKind};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

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

/// Render `messages` with a chat template. Errors (syntax errors, `raise_exception(...)` such as
/// Gemma's "Conversation roles must alternate ...") are `Error::Invalid` carrying the message.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let env = environment(template)?;
    let tmpl = env.get_template("chat_template").map_err(template_error)?;
    tmpl.render(context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
    })
    .map_err(template_error)
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
}
