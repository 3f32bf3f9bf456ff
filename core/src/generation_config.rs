//! `generation_config.json`: the model's default generation settings (EOS ids, sampling defaults).
//!
//! A missing file gives `transformers`' `GenerationConfig` defaults: greedy (`do_sample: false`),
//! temperature 1, top_k 50, top_p 1, min_p 0 (off), no EOS. A field that is absent or `null` takes
//! its default; a field of the wrong type or out of range is an `Error::Field` naming it. Fields
//! we do not use are ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: a single id or a list (Gemma 3: `[1, 106]`).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
}

impl Default for GenerationConfig {
    /// `transformers.GenerationConfig()` defaults.
    fn default() -> Self {
        GenerationConfig {
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            max_new_tokens: None,
            max_length: None,
        }
    }
}

fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    }
}

fn as_u32(path: &Path, field: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| {
            Error::field(
                path,
                field,
                format!("expected a non-negative integer token id, got {v}"),
            )
        })
}

fn opt_u32(path: &Path, obj: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    get(obj, field).map(|v| as_u32(path, field, v)).transpose()
}

fn opt_usize(path: &Path, obj: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
    get(obj, field)
        .map(|v| {
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    Error::field(
                        path,
                        field,
                        format!("expected a non-negative integer, got {v}"),
                    )
                })
        })
        .transpose()
}

fn opt_f32(path: &Path, obj: &Map<String, Value>, field: &str) -> Result<Option<f32>> {
    get(obj, field)
        .map(|v| {
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| Error::field(path, field, format!("expected a number, got {v}")))
        })
        .transpose()
}

impl GenerationConfig {
    /// Read `dir/generation_config.json`; a missing file gives the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(GenerationConfig::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&path, &text)
    }

    /// Parse the JSON text of a generation config; `path` is only used in error messages.
    pub fn from_json_str(path: &Path, text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object at the top level"))?;
        let d = GenerationConfig::default();

        let eos_token_ids = match get(obj, "eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| as_u32(path, "eos_token_id", v))
                .collect::<Result<Vec<_>>>()?,
            Some(v) => vec![as_u32(path, "eos_token_id", v)?],
        };
        let do_sample = match get(obj, "do_sample") {
            None => d.do_sample,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(Error::field(
                    path,
                    "do_sample",
                    format!("expected a boolean, got {v}"),
                ))
            }
        };

        let cfg = GenerationConfig {
            bos_token_id: opt_u32(path, obj, "bos_token_id")?,
            eos_token_ids,
            pad_token_id: opt_u32(path, obj, "pad_token_id")?,
            do_sample,
            temperature: opt_f32(path, obj, "temperature")?.unwrap_or(d.temperature),
            top_k: opt_usize(path, obj, "top_k")?.unwrap_or(d.top_k),
            top_p: opt_f32(path, obj, "top_p")?.unwrap_or(d.top_p),
            min_p: opt_f32(path, obj, "min_p")?.unwrap_or(d.min_p),
            max_new_tokens: opt_usize(path, obj, "max_new_tokens")?,
            max_length: opt_usize(path, obj, "max_length")?,
        };

        // Range checks, reported against the field (same rules as SamplingParams::validate).
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            return Err(Error::field(
                path,
                "temperature",
                format!("must be >= 0, got {}", cfg.temperature),
            ));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(Error::field(
                path,
                "top_p",
                format!("must be in (0, 1], got {}", cfg.top_p),
            ));
        }
        if !(cfg.min_p >= 0.0 && cfg.min_p <= 1.0) {
            return Err(Error::field(
                path,
                "min_p",
                format!("must be in [0, 1], got {}", cfg.min_p),
            ));
        }
        Ok(cfg)
    }

    /// Sampling parameters for `generate`: greedy when `do_sample` is false (or temperature is 0),
    /// otherwise temperature / top_k / top_p / min_p as configured.
    pub fn sampling_params(&self, seed: Option<u64>) -> SamplingParams {
        if !self.do_sample || self.temperature == 0.0 {
            return SamplingParams {
                seed,
                ..SamplingParams::greedy()
            };
        }
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed,
        }
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) {
        std::fs::write(dir.join("generation_config.json"), text).unwrap();
    }

    #[test]
    fn gemma3_config_with_eos_list() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            r#"{"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": true,
                "eos_token_id": [1, 106], "pad_token_id": 0, "top_k": 64, "top_p": 0.95,
                "transformers_version": "4.55.0.dev0"}"#,
        );
        let c = GenerationConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.bos_token_id, Some(2));
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert_eq!(c.pad_token_id, Some(0));
        assert!(c.do_sample);
        assert_eq!(c.temperature, 1.0);
        assert_eq!(c.top_k, 64);
        assert_eq!(c.top_p, 0.95);
        assert_eq!(c.min_p, 0.0);
        assert_eq!(c.max_new_tokens, None);
        assert!(c.is_eos(106) && c.is_eos(1) && !c.is_eos(2));
        let p = c.sampling_params(Some(9));
        assert_eq!(
            p,
            SamplingParams {
                temperature: 1.0,
                top_k: 64,
                top_p: 0.95,
                min_p: 0.0,
                seed: Some(9)
            }
        );
        p.validate().unwrap();
    }

    #[test]
    fn eos_as_int_and_more_fields() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            r#"{"eos_token_id": 1, "temperature": 0.7, "min_p": 0.05, "max_new_tokens": 128, "max_length": 20, "do_sample": false, "top_k": null}"#,
        );
        let c = GenerationConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(c.temperature, 0.7);
        assert_eq!(c.min_p, 0.05);
        assert_eq!(c.top_k, 50, "null takes the default");
        assert_eq!(c.max_new_tokens, Some(128));
        assert_eq!(c.max_length, Some(20));
        // do_sample false -> greedy whatever the temperature
        let p = c.sampling_params(Some(1));
        assert_eq!(p.temperature, 0.0);
        assert!(p.is_greedy());
        assert_eq!(p.seed, Some(1));
    }

    #[test]
    fn missing_file_gives_transformers_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = GenerationConfig::from_dir(dir.path()).unwrap();
        assert_eq!(c, GenerationConfig::default());
        assert!(!c.do_sample);
        assert_eq!(
            (c.temperature, c.top_k, c.top_p, c.min_p),
            (1.0, 50, 1.0, 0.0)
        );
        assert!(c.eos_token_ids.is_empty());
        assert!(c.sampling_params(None).is_greedy());
    }

    #[test]
    fn bad_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), r#"{"do_sample": true,"#);
        let err = GenerationConfig::from_dir(dir.path()).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("generation_config.json") && msg.contains("invalid JSON"),
            "{msg}"
        );
        write(dir.path(), "[1, 2]");
        let msg = GenerationConfig::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("generation_config.json"), "{msg}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (r#"{"eos_token_id": "106"}"#, "eos_token_id"),
            (r#"{"eos_token_id": [1, -3]}"#, "eos_token_id"),
            (r#"{"eos_token_id": 1.5}"#, "eos_token_id"),
            (r#"{"do_sample": "yes"}"#, "do_sample"),
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_k": -5}"#, "top_k"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"min_p": 2}"#, "min_p"),
            (r#"{"max_new_tokens": 1.5}"#, "max_new_tokens"),
            (r#"{"bos_token_id": [2]}"#, "bos_token_id"),
            (r#"{"pad_token_id": 4294967296}"#, "pad_token_id"),
        ];
        for (json, field) in cases {
            write(dir.path(), json);
            let err = GenerationConfig::from_dir(dir.path()).unwrap_err();
            match &err {
                Error::Field { field: f, path, .. } => {
                    assert_eq!(f, field, "{json}: {err}");
                    assert!(path.ends_with("generation_config.json"));
                }
                other => panic!("{json}: expected a field error, got {other:?}"),
            }
        }
    }
}
