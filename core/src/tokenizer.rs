//! Text <-> token ids, on top of Hugging Face `tokenizers` (`tokenizer.json`), plus the bits of
//! `tokenizer_config.json` that matter at run time: the BOS/EOS tokens, `add_bos_token` and the
//! Jinja chat template.
//!
//! BOS handling is explicit: [`Tokenizer::encode`] never runs the `tokenizer.json` post-processor
//! (which for Gemma prepends `<bos>`); it prepends the BOS id itself iff `add_bos` is true. Special
//! tokens written in the text (`<start_of_turn>`, `<bos>`, ...) are always parsed as special tokens,
//! like `transformers`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A loaded tokenizer (`tokenizer.json`) and its `tokenizer_config.json` settings.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    add_bos_token: bool,
    chat_template: Option<String>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("add_bos_token", &self.add_bos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The parts of `tokenizer_config.json` we use.
#[derive(Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
}

/// A special token in `tokenizer_config.json` is either a string or an AddedToken object
/// `{"content": "<bos>", ...}`; `null` means none.
fn special_token(
    path: &Path,
    obj: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::field(
                path,
                field,
                "expected a string or an object with a string `content`",
            )),
        },
        Some(_) => Err(Error::field(
            path,
            field,
            "expected a string or an object with a string `content`",
        )),
    }
}

fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| Error::file(path, "expected a JSON object at the top level"))?;
    let add_bos_token = match obj.get("add_bos_token") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => return Err(Error::field(path, "add_bos_token", "expected a boolean")),
    };
    // `chat_template` is a string, or (older multi-template configs) a list of {name, template}.
    let chat_template = match obj.get("chat_template") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => {
            let mut default = None;
            for item in list {
                let name = item.get("name").and_then(|v| v.as_str());
                let template = item.get("template").and_then(|v| v.as_str());
                match (name, template) {
                    (Some(n), Some(t)) => {
                        if n == "default" {
                            default = Some(t.to_string());
                        }
                    }
                    _ => {
                        return Err(Error::field(
                            path,
                            "chat_template",
                            "list entries must be objects with string `name` and `template`",
                        ))
                    }
                }
            }
            default
        }
        Some(_) => {
            return Err(Error::field(
                path,
                "chat_template",
                "expected a string or a list",
            ))
        }
    };
    Ok(TokenizerConfig {
        bos_token: special_token(path, obj, "bos_token")?,
        eos_token: special_token(path, obj, "eos_token")?,
        add_bos_token,
        chat_template,
    })
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` (and
    /// `dir/chat_template.jinja`, the newer place for the template).
    ///
    /// Without `tokenizer_config.json` the BOS token is `<bos>` if the vocabulary has it,
    /// `add_bos_token` is true and there is no EOS token or chat template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::file(
                &tok_path,
                "not found (expected a Hugging Face tokenizer.json)",
            ));
        }
        // The small config first, so its errors come without parsing the big tokenizer.json.
        let cfg_path = dir.join("tokenizer_config.json");
        let has_cfg = cfg_path.is_file();
        let mut cfg = if has_cfg {
            read_tokenizer_config(&cfg_path)?
        } else {
            TokenizerConfig::default()
        };
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::file(&tok_path, format!("cannot load tokenizer: {e}")))?;
        if !has_cfg {
            cfg.bos_token = inner.token_to_id("<bos>").map(|_| "<bos>".to_string());
        }
        let jinja_path: PathBuf = dir.join("chat_template.jinja");
        if cfg.chat_template.is_none() && jinja_path.is_file() {
            cfg.chat_template =
                Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?);
        }

        let bos_id = match &cfg.bos_token {
            Some(t) => Some(inner.token_to_id(t).ok_or_else(|| {
                Error::field(
                    &cfg_path,
                    "bos_token",
                    format!("token {t:?} is not in {}", tok_path.display()),
                )
            })?),
            None => None,
        };
        if let Some(t) = &cfg.eos_token {
            if inner.token_to_id(t).is_none() {
                return Err(Error::field(
                    &cfg_path,
                    "eos_token",
                    format!("token {t:?} is not in {}", tok_path.display()),
                ));
            }
        }
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer {
            inner,
            bos_token: cfg.bos_token,
            eos_token: cfg.eos_token,
            bos_id,
            add_bos_token: cfg.add_bos_token.unwrap_or(true),
            chat_template: cfg.chat_template,
            vocab_size,
        })
    }

    /// Encode raw text. Special tokens written in the text are parsed as special tokens. The BOS id
    /// is prepended iff `add_bos` (an error if the tokenizer has no BOS token).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::invalid(format!("tokenizer: cannot encode text: {e}")))?;
        let ids = enc.get_ids();
        if add_bos {
            let bos = self.bos_id.ok_or_else(|| {
                Error::invalid("tokenizer: BOS requested but the tokenizer has no BOS token")
            })?;
            let mut out = Vec::with_capacity(ids.len() + 1);
            out.push(bos);
            out.extend_from_slice(ids);
            Ok(out)
        } else {
            Ok(ids.to_vec())
        }
    }

    /// Encode a raw (non-chat) prompt: BOS is added iff `tokenizer_config.json` says
    /// `add_bos_token` (true when absent) and there is a BOS token.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.add_bos_token && self.bos_id.is_some())
    }

    /// Decode ids to text. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::invalid(format!("tokenizer: cannot decode ids: {e}")))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if self.inner.id_to_token(id).is_none() {
                return Err(Error::invalid(format!(
                    "tokenizer: token id {id} is not in the vocabulary (size {})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS token's id (`eos_token` of tokenizer_config.json), if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `add_bos_token` of tokenizer_config.json (true when absent).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Incremental detokenizer that skips special tokens (what a user should see).
    pub fn stream(&self) -> StreamDecoder<'_> {
        self.stream_with(true)
    }

    /// Incremental detokenizer; `skip_special` as in [`Tokenizer::decode`].
    pub fn stream_with(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenizer. Text is emitted once it is complete: a token that leaves the decoded
/// text ending in an incomplete UTF-8 sequence (byte-fallback tokens `<0xF0>` ...) is held back
/// until the sequence completes. It keeps a short window of ids (the previous emitted token(s)) as
/// context, so the concatenation of the pieces equals `decode(all ids)`.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    /// ids from the start of the context window
    ids: Vec<u32>,
    /// start (in `ids`) of the tokens already emitted that serve as context
    prefix_offset: usize,
    /// end (in `ids`) of the tokens already emitted
    read_offset: usize,
}

/// Longest prefix of `a` and `b` that ends on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

impl StreamDecoder<'_> {
    /// Feed one id; returns the newly completed text ("" if none yet).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tok.check_ids(&[id])?;
        self.ids.push(id);
        let prefix_text = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let new_text = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let start = if new_text.starts_with(&prefix_text) {
                prefix_text.len()
            } else {
                common_prefix_len(&prefix_text, &new_text)
            };
            let piece = new_text[start..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.compact();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Flush whatever is held back (an incomplete UTF-8 tail decodes to U+FFFD, as in `decode`)
    /// and reset the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let prefix_text = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let new_text = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let start = if new_text.starts_with(&prefix_text) {
            prefix_text.len()
        } else {
            common_prefix_len(&prefix_text, &new_text)
        };
        let piece = new_text[start..].to_string();
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(piece)
    }

    /// Drop ids before the context window.
    fn compact(&mut self) {
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}
