//! One error type for the whole runtime. Every variant names what the user gave us that was wrong:
//! the file, the tensor or the field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or is malformed as a whole.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    /// A field of a JSON file (config.json, tokenizer_config.json, ...) is missing, mistyped or unsupported.
    #[error("{path}: field `{field}`: {msg}")]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// A tensor is missing, unexpected, misshaped or of the wrong dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    /// A backend that was asked for is not compiled in or finds no device.
    #[error("backend `{backend}` is not available: {reason}")]
    BackendUnavailable { backend: String, reason: String },

    /// A backend does not implement an op of the graph.
    #[error("backend `{backend}` does not support op `{op}` (node `{node}`)")]
    Unsupported {
        backend: String,
        op: String,
        node: String,
    },

    /// A request is invalid (too-long prompt, bad sampling parameter, unknown slot, ...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Field {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    /// Wrap an io::Error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::File {
            path: path.into(),
            msg: err.to_string(),
        }
    }
}
