//! e4m3-core: the graph of ops and their reference semantics (the CPU backend), Gemma models,
//! checkpoint formats, tokenizer, chat template, sampling and KV-cache management.

pub mod backend;
pub mod chat;
pub mod chat_parse;
pub mod checkpoint;
pub mod config;
pub mod conformance;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fp8;
pub mod gemma4_vision;
pub mod generate;
pub mod generation_config;
pub mod gguf;
pub mod graph;
pub mod image;
pub mod import_gguf;
pub mod kv_pages;
pub mod model;
pub mod multimodal;
pub mod prepare;
pub mod quant_config;
pub mod quantize;
pub mod sampling;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod vision;

pub use error::{Error, Result};
