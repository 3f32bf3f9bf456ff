//! GGUF reader (versions 2 and 3) and ggml-exact dequantization.
//!
//! The file is memory-mapped; metadata and tensor infos are parsed eagerly, tensor data is read
//! lazily through [`GgufFile::tensor_data`] / [`GgufFile::dequantize`].
//!
//! Dequantization follows ggml's reference `dequantize_row_*` routines (ggml-quants.c)
//! operation for operation, so results are bit-identical to ggml's scalar path (and to gguf-py's
//! `gguf.quants.dequantize`): scales are f16 values widened exactly to f32, and every product is
//! formed in the same order, unfused (no FMA).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
pub const GGML_MAX_DIMS: usize = 4;
/// Elements in a k-quant super-block.
pub const QK_K: usize = 256;

/// A ggml tensor element type, by its numeric id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const BF16: GgmlType = GgmlType(30);

    /// (name, elements per block, bytes per block) for every type id ggml knows.
    fn traits(self) -> Option<(&'static str, usize, usize)> {
        let qk = QK_K;
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 2 + 16),
            3 => ("Q4_1", 32, 2 + 2 + 16),
            6 => ("Q5_0", 32, 2 + 4 + 16),
            7 => ("Q5_1", 32, 2 + 2 + 4 + 16),
            8 => ("Q8_0", 32, 2 + 32),
            9 => ("Q8_1", 32, 4 + 4 + 32),
            10 => ("Q2_K", qk, 2 + 2 + qk / 16 + qk / 4),
            11 => ("Q3_K", qk, 2 + qk / 4 + qk / 8 + 12),
            12 => ("Q4_K", qk, 2 + 2 + qk / 2 + 12),
            13 => ("Q5_K", qk, 2 + 2 + qk / 2 + qk / 8 + 12),
            14 => ("Q6_K", qk, 2 + qk / 2 + qk / 4 + qk / 16),
            15 => ("Q8_K", qk, 4 + qk + qk / 8),
            16 => ("IQ2_XXS", qk, 2 + qk / 4),
            17 => ("IQ2_XS", qk, 2 + qk / 4 + qk / 32),
            18 => ("IQ3_XXS", qk, 2 + qk / 4 + qk / 8),
            19 => ("IQ1_S", qk, 2 + qk / 8 + qk / 16),
            20 => ("IQ4_NL", 32, 2 + 16),
            21 => ("IQ3_S", qk, 2 + qk / 4 + qk / 8 + qk / 32 + 4),
            22 => ("IQ2_S", qk, 2 + qk / 4 + qk / 16),
            23 => ("IQ4_XS", qk, 2 + 2 + qk / 2 + qk / 64),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", qk, qk / 8 + qk / 16 + qk / 32),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", qk, 2 + 4 * 13),
            35 => ("TQ2_0", qk, 2 + 64),
            39 => ("MXFP4", 32, 1 + 16),
            _ => return None,
        })
    }

    /// The ggml name ("Q4_K"), or "unknown(N)".
    pub fn name(self) -> String {
        match self.traits() {
            Some((n, _, _)) => n.to_string(),
            None => format!("unknown({})", self.0),
        }
    }
    /// Elements per block, if the type is known.
    pub fn block_size(self) -> Option<usize> {
        self.traits().map(|t| t.1)
    }
    /// Bytes per block, if the type is known.
    pub fn type_size(self) -> Option<usize> {
        self.traits().map(|t| t.2)
    }
    /// Whether [`GgufFile::dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(self.0, 0 | 1 | 6 | 8 | 12 | 14 | 30)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF type name of the value.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::F32(_) => "float32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F64(_) => "float64",
        }
    }
    /// Any integer value as i128 (lossless).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v as i128,
            MetaValue::I8(v) => v as i128,
            MetaValue::U16(v) => v as i128,
            MetaValue::I16(v) => v as i128,
            MetaValue::U32(v) => v as i128,
            MetaValue::I32(v) => v as i128,
            MetaValue::U64(v) => v as i128,
            MetaValue::I64(v) => v as i128,
            _ => return None,
        })
    }
    /// A float value (or an integer one), as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as stored: innermost first (`dims[0]` is the row length, ggml's `ne[0]`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Number of elements.
    pub n_elements: u64,
    /// Number of bytes of data.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major (PyTorch) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened, parsed GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::file(
                self.path,
                format!(
                    "truncated GGUF: needs {n} bytes at offset {} for {}, but the file is {} bytes",
                    self.pos,
                    what(),
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that will drive an allocation or a loop: at least `min_item` bytes must remain
    /// for every item, so absurd counts are rejected before anything is allocated.
    fn count(&mut self, v2: bool, min_item: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = if v2 {
            self.u64(what)?
        } else {
            self.u32(what)? as u64
        };
        let max = (self.remaining() / min_item.max(1)) as u64;
        if n > max {
            return Err(Error::file(
                self.path,
                format!(
                    "{}: count {n} is impossible, only {} bytes remain at offset {}",
                    what(),
                    self.remaining(),
                    self.pos
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(Error::file(
                self.path,
                format!(
                    "truncated GGUF: string of {len} bytes at offset {} for {}, but only {} bytes remain",
                    self.pos,
                    what(),
                    self.remaining()
                ),
            ));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::file(self.path, format!("{} is not valid UTF-8", what())))
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let b = self.array::<1>(what)?[0];
                match b {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    _ => {
                        return Err(Error::file(
                            self.path,
                            format!("{}: invalid bool byte {b}", what()),
                        ))
                    }
                }
            }
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth > 8 {
                    return Err(Error::file(
                        self.path,
                        format!("{}: arrays nested too deeply", what()),
                    ));
                }
                let elem_ty = self.u32(what)?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => 8,
                    9 => 12,
                    10..=12 => 8,
                    _ => {
                        return Err(Error::file(
                            self.path,
                            format!("{}: unknown array element type {elem_ty}", what()),
                        ))
                    }
                };
                let n = self.count(true, min, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem_ty, what, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            _ => {
                return Err(Error::file(
                    self.path,
                    format!("{}: unknown metadata value type {ty}", what()),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Open and parse a GGUF file (v2 or v3). The tensor data stays mapped, unread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; like every mmap-based model loader we assume it
        // is not truncated or rewritten while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors, alignment, data_offset) = Self::parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            mmap,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        buf: &[u8],
    ) -> Result<(
        u32,
        BTreeMap<String, MetaValue>,
        Vec<GgufTensorInfo>,
        u64,
        u64,
    )> {
        let mut r = Reader { buf, pos: 0, path };
        let magic: [u8; 4] = r.array(&|| "the magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(Error::file(
                path,
                format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""),
            ));
        }
        let version = r.u32(&|| "the version".into())?;
        if version != 2 && version != 3 {
            return Err(Error::file(
                path,
                format!("unsupported GGUF version {version} (supported: 2, 3)"),
            ));
        }
        // v1 used 32-bit counts; v2 and v3 use 64-bit ones.
        let v2 = true;
        // A tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = r.count(v2, 24, &|| "the tensor count".into())?;
        // A key/value is at least 8 (key len) + 4 (type) + 1 bytes.
        let n_kv = r.count(v2, 13, &|| "the metadata count".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let what = || format!("metadata `{key}`");
            let ty = r.u32(&what)?;
            let value = r.value(ty, &what, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::file(path, format!("duplicate metadata key `{key}`")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some(v) => match v.as_int() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => a as u64,
                _ => {
                    return Err(Error::field(
                        path,
                        "general.alignment",
                        format!("must be a power of two, got {v:?}"),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("the name of tensor #{i}"))?;
            let what = || format!("tensor `{name}`");
            let n_dims = r.u32(&what)? as usize;
            if n_dims == 0 || n_dims > GGML_MAX_DIMS {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}`: {n_dims} dimensions (1 to {GGML_MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ggml_type = GgmlType(r.u32(&what)?);
            let offset = r.u64(&what)?;
            let (_, block, tsize) = ggml_type.traits().ok_or_else(|| {
                Error::file(
                    path,
                    format!("tensor `{name}`: unknown ggml type id {}", ggml_type.0),
                )
            })?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n < (1u64 << 48))
                .ok_or_else(|| {
                    Error::file(path, format!("tensor `{name}`: absurd dimensions {dims:?}"))
                })?;
            if dims[0] % block as u64 != 0 {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `{name}`: row length {} is not a multiple of the {} block size {block}",
                        dims[0],
                        ggml_type.name()
                    ),
                ));
            }
            let n_bytes = n_elements / block as u64 * tsize as u64;
            if offset % alignment != 0 {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}`: data offset {offset} is not aligned to {alignment}"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(Error::file(path, format!("duplicate tensor `{name}`")));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_elements,
                n_bytes,
            });
        }

        let pos = r.pos as u64;
        let data_offset = pos.div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::file(
                        path,
                        format!(
                            "tensor `{}`: data ({} bytes at offset {}) extends beyond the end of the file ({} bytes); the file is truncated",
                            t.name,
                            t.n_bytes,
                            data_offset.saturating_add(t.offset),
                            file_len
                        ),
                    ))
                }
            }
        }
        Ok((version, metadata, tensors, alignment, data_offset))
    }

    /// The tensor info with this name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Metadata value; an error naming the key if absent.
    pub fn meta(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::field(&self.path, key, "missing from the GGUF metadata"))
    }

    /// An integer metadata value that fits in u32.
    pub fn meta_u32(&self, key: &str) -> Result<u32> {
        let v = self.meta(key)?;
        v.as_int()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                Error::field(
                    &self.path,
                    key,
                    format!(
                        "expected an unsigned 32-bit integer, got {} {v:?}",
                        v.type_name()
                    ),
                )
            })
    }

    /// A float (or integer) metadata value, as f32.
    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        let v = self.meta(key)?;
        match v {
            MetaValue::F32(f) => Ok(*f),
            _ => v.as_f64().map(|f| f as f32).ok_or_else(|| {
                Error::field(
                    &self.path,
                    key,
                    format!("expected a number, got {}", v.type_name()),
                )
            }),
        }
    }

    /// A string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        let v = self.meta(key)?;
        v.as_str().ok_or_else(|| {
            Error::field(
                &self.path,
                key,
                format!("expected a string, got {}", v.type_name()),
            )
        })
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.n_bytes as usize]
    }

    /// The tensor's values as f32, in storage order (row-major over [`GgufTensorInfo::shape`]).
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        dequantize(
            &info.name,
            info.ggml_type,
            self.tensor_data(info),
            info.n_elements as usize,
        )
        .map_err(|e| match e {
            Error::Tensor { name, msg } => {
                Error::tensor(name, format!("{msg} (in {})", self.path.display()))
            }
            other => other,
        })
    }
}

/// Dequantize `n` elements of type `ty` from `data`. `name` is used in errors.
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let (block, tsize) = match (ty.block_size(), ty.type_size()) {
        (Some(b), Some(t)) => (b, t),
        _ => {
            return Err(Error::tensor(
                name,
                format!("unknown ggml type id {}", ty.0),
            ))
        }
    };
    if !ty.can_dequantize() {
        return Err(Error::tensor(
            name,
            format!(
                "ggml type {} is not supported (supported: F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K)",
                ty.name()
            ),
        ));
    }
    if !n.is_multiple_of(block) {
        return Err(Error::tensor(
            name,
            format!(
                "{n} elements is not a multiple of the {} block size {block}",
                ty.name()
            ),
        ));
    }
    let nb = n / block;
    if data.len() != nb * tsize {
        return Err(Error::tensor(
            name,
            format!(
                "{} data is {} bytes, {n} elements need {}",
                ty.name(),
                data.len(),
                nb * tsize
            ),
        ));
    }
    let mut out = vec![0f32; n];
    // Process in chunks of whole blocks in parallel; each block is independent.
    let blocks_per_chunk = (16384 / block).max(1);
    let f: fn(&[u8], &mut [f32]) = match ty.0 {
        0 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        1 => |b, y| y[0] = f16_to_f32(b),
        30 => |b, y| y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        6 => dequant_block_q5_0,
        8 => dequant_block_q8_0,
        12 => dequant_block_q4_k,
        14 => dequant_block_q6_k,
        _ => unreachable!("checked by can_dequantize"),
    };
    out.par_chunks_mut(blocks_per_chunk * block)
        .zip(data.par_chunks(blocks_per_chunk * tsize))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(block).zip(x.chunks_exact(tsize)) {
                f(xb, yb);
            }
        });
    Ok(out)
}

/// ggml's GGML_FP16_TO_FP32: an exact widening.
#[inline]
fn f16_to_f32(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// block_q8_0 { f16 d; int8 qs[32] }: y[j] = qs[j]*d.
fn dequant_block_q8_0(x: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(&x[0..2]);
    for j in 0..32 {
        y[j] = (x[2 + j] as i8) as f32 * d;
    }
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: low nibbles are elements 0..16, high nibbles
/// 16..32; bit j of qh is the fifth bit of element j.
fn dequant_block_q5_0(x: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(&x[0..2]);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let qs = &x[6..22];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// ggml's get_scale_min_k4: unpack the j-th 6-bit scale and min from the 12 packed bytes.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }.
fn dequant_block_q4_k(x: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(&x[0..2]);
    let min = f16_to_f32(&x[2..4]);
    let scales = &x[4..16];
    let qs = &x[16..144];
    let mut is = 0;
    for (n, q) in qs.chunks_exact(32).enumerate() {
        let (sc, m) = get_scale_min_k4(is, scales);
        let d1 = d * sc as f32;
        let m1 = min * m as f32;
        let (sc, m) = get_scale_min_k4(is + 1, scales);
        let d2 = d * sc as f32;
        let m2 = min * m as f32;
        let yo = &mut y[n * 64..n * 64 + 64];
        for l in 0..32 {
            yo[l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            yo[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
        is += 2;
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }.
fn dequant_block_q6_k(x: &[u8], y: &mut [f32]) {
    let d = f16_to_f32(&x[208..210]);
    for half_ in 0..2 {
        let ql = &x[half_ * 64..half_ * 64 + 64];
        let qh = &x[128 + half_ * 32..128 + half_ * 32 + 32];
        let sc = &x[192 + half_ * 8..192 + half_ * 8 + 8];
        let yo = &mut y[half_ * 128..half_ * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            // `d * sc[..] * q`: (d * sc) first, then * q, as in C.
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Helpers shared by the GGUF and import tests: a minimal GGUF writer and fixture paths.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf")
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    fn put_value(b: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => b.push(*x),
            MetaValue::I8(x) => b.push(*x as u8),
            MetaValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => b.push(*x as u8),
            MetaValue::String(s) => put_str(b, s),
            MetaValue::Array(a) => {
                let et = a.first().map(type_id).unwrap_or(0);
                b.extend_from_slice(&et.to_le_bytes());
                b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(b, x);
                }
            }
            MetaValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// A test tensor: name, dims (innermost first), ggml type id, raw data.
    pub struct T<'a>(pub &'a str, pub Vec<u64>, pub u32, pub Vec<u8>);

    /// Serialize a GGUF file (alignment 32 unless `general.alignment` is among the kvs).
    pub fn build_gguf(version: u32, kvs: &[(&str, MetaValue)], tensors: &[T]) -> Vec<u8> {
        let align = kvs
            .iter()
            .find(|(k, _)| *k == "general.alignment")
            .and_then(|(_, v)| v.as_int())
            .unwrap_or(32) as usize;
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_str(&mut b, k);
            b.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut off = 0usize;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut b, t.0);
            b.extend_from_slice(&(t.1.len() as u32).to_le_bytes());
            for d in &t.1 {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.2.to_le_bytes());
            b.extend_from_slice(&(off as u64).to_le_bytes());
            offsets.push(off);
            off += t.3.len().div_ceil(align) * align;
        }
        while b.len() % align != 0 {
            b.push(0);
        }
        let start = b.len();
        for (t, o) in tensors.iter().zip(offsets) {
            b.resize(start + o, 0);
            b.extend_from_slice(&t.3);
        }
        b
    }

    pub fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    fn read(name: &str) -> Vec<u8> {
        std::fs::read(fixture_dir().join(name)).unwrap()
    }

    /// Dequantize a committed block fixture and compare with gguf-py's output bit for bit.
    fn check_fixture(case: &str, ty: GgmlType) {
        let raw = read(&format!("dequant_{case}.bin"));
        let want: Vec<f32> = read(&format!("dequant_{case}.f32"))
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = dequantize(case, ty, &raw, want.len()).unwrap();
        assert_eq!(got.len(), want.len());
        let mut nonzero = 0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{case}[{i}]: got {g:e}, gguf-py {w:e}"
            );
            nonzero += (*w != 0.0) as usize;
        }
        assert!(nonzero > want.len() / 2, "{case}: fixture is mostly zeros");
    }

    #[test]
    fn gguf_dequant_q8_0_matches_gguf_py() {
        check_fixture("Q8_0", GgmlType::Q8_0);
        check_fixture("Q8_0_quantized", GgmlType::Q8_0);
    }
    #[test]
    fn gguf_dequant_q5_0_matches_gguf_py() {
        check_fixture("Q5_0", GgmlType::Q5_0);
        check_fixture("Q5_0_quantized", GgmlType::Q5_0);
    }
    #[test]
    fn gguf_dequant_q4_k_matches_gguf_py() {
        check_fixture("Q4_K", GgmlType::Q4_K);
    }
    #[test]
    fn gguf_dequant_q6_k_matches_gguf_py() {
        check_fixture("Q6_K", GgmlType::Q6_K);
    }
    #[test]
    fn gguf_dequant_f16_bf16_match_gguf_py() {
        check_fixture("F16", GgmlType::F16);
        check_fixture("BF16", GgmlType::BF16);
    }

    #[test]
    fn gguf_dequant_hand_computed_values() {
        // Q8_0: d = 0.5 (f16 0x3800), qs = -128, -1, 0, 1, 127, ...
        let mut b = vec![0x00, 0x38];
        let qs: Vec<i8> = (0..32).map(|i| [-128i8, -1, 0, 1, 127][i % 5]).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let y = dequantize("t", GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&y[..5], &[-64.0, -0.5, 0.0, 0.5, 63.5]);
        // Q5_0: d = 1, qh bit 0 set (element 0 gets +16), bit 16 set (element 16 gets +16),
        // qs[0] = 0x3F: element 0 low nibble 15 -> 31-16 = 15, element 16 high nibble 3 -> 19-16 = 3.
        let mut b = vec![0x00, 0x3C];
        b.extend_from_slice(&(1u32 | 1 << 16).to_le_bytes());
        b.extend_from_slice(&[0x3F; 1]);
        b.extend_from_slice(&[0x00; 15]);
        let y = dequantize("t", GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!((y[0], y[16], y[1], y[17]), (15.0, 3.0, -16.0, -16.0));
        // Q4_K: d = 1, dmin = 1, scale/min for sub-block 0 = 2/3, sub-block 4 from the
        // high bits: sc = (q[8]&15) | (q[0]>>6)<<4 = 1 | 1<<4 = 17, m = (q[8]>>4) | (q[4]>>6)<<4 = 5.
        let mut b = vec![0x00, 0x3C, 0x00, 0x3C];
        let mut sc = [0u8; 12];
        sc[0] = 2 | 0x40;
        sc[4] = 3;
        sc[8] = 1 | (5 << 4);
        b.extend_from_slice(&sc);
        let mut qs = [0u8; 128];
        qs[0] = 0x07; // element 0: 7, element 32: 0
        qs[64] = 0x09; // element 128 (sub-block 4): 9
        b.extend_from_slice(&qs);
        let y = dequantize("t", GgmlType::Q4_K, &b, 256).unwrap();
        assert_eq!(y[0], 2.0 * 7.0 - 3.0);
        assert_eq!(y[128], 17.0 * 9.0 - 5.0);
        // Q6_K: d = 2, scales[0] = -3; element 0 = ql low nibble 5 | qh bits 0-1 = 2 -> 37-32 = 5.
        let mut b = vec![0u8; 210];
        b[0] = 0x05;
        b[128] = 0x02;
        b[192] = (-3i8) as u8;
        b[208..210].copy_from_slice(&[0x00, 0x40]);
        let y = dequantize("t", GgmlType::Q6_K, &b, 256).unwrap();
        assert_eq!(y[0], 2.0 * -3.0 * 5.0);
        assert_eq!(y[1], 2.0 * -3.0 * -32.0);
    }

    #[test]
    fn gguf_open_tiny_fixture_metadata_and_tensors() {
        let g = GgufFile::open(fixture_dir().join("tiny_gemma3.gguf")).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, 32);
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.meta_str("general.architecture").unwrap(), "gemma3");
        assert_eq!(g.meta_u32("gemma3.block_count").unwrap(), 2);
        assert_eq!(g.meta_u32("gemma3.embedding_length").unwrap(), 32);
        assert_eq!(
            g.meta_f32("gemma3.attention.layer_norm_rms_epsilon")
                .unwrap(),
            1e-6
        );
        assert_eq!(g.meta_f32("gemma3.rope.freq_base").unwrap(), 1e6);
        let toks = g.meta("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks.len(), 64);
        assert_eq!(toks[50].as_str(), Some("<end_of_turn>"));
        assert_eq!(g.tensors.len(), 28);
        let e = g.tensor("token_embd.weight").unwrap();
        assert_eq!(e.dims, vec![32, 64]);
        assert_eq!(e.shape(), vec![64, 32]);
        assert_eq!(e.ggml_type, GgmlType::Q8_0);
        assert_eq!(e.n_bytes, 64 * 34);
        assert_eq!(g.tensor_data(e).len(), 64 * 34);

        // Every tensor's dequantization equals gguf-py's.
        let expected: serde_json::Value =
            serde_json::from_slice(&read("tiny_gemma3.expected.json")).unwrap();
        for t in &g.tensors {
            let exp = &expected[&t.name];
            assert_eq!(
                exp["type"].as_str().unwrap(),
                t.ggml_type.name(),
                "{}",
                t.name
            );
            let shape: Vec<usize> = serde_json::from_value(exp["shape"].clone()).unwrap();
            assert_eq!(shape, t.shape(), "{}", t.name);
            let v = g.dequantize(t).unwrap();
            for (i, w) in exp["first"].as_array().unwrap().iter().enumerate() {
                assert_eq!(v[i], w.as_f64().unwrap() as f32, "{}[{i}]", t.name);
            }
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let want = exp["sum"].as_f64().unwrap();
            assert!(
                (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{}: sum {sum} vs {want}",
                t.name
            );
        }
    }

    #[test]
    fn gguf_v2_all_value_types_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let kvs = vec![
            ("general.architecture", MetaValue::String("gemma3".into())),
            ("general.alignment", MetaValue::U32(64)),
            ("a.u8", MetaValue::U8(200)),
            ("a.i8", MetaValue::I8(-5)),
            ("a.u16", MetaValue::U16(60000)),
            ("a.i16", MetaValue::I16(-30000)),
            ("a.i32", MetaValue::I32(-7)),
            ("a.f32", MetaValue::F32(0.25)),
            ("a.bool", MetaValue::Bool(true)),
            ("a.u64", MetaValue::U64(1 << 40)),
            ("a.i64", MetaValue::I64(-(1 << 40))),
            ("a.f64", MetaValue::F64(-2.5)),
            (
                "a.arr",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                    MetaValue::Array(vec![MetaValue::I32(3)]),
                ]),
            ),
        ];
        let data: Vec<u8> = [1.0f32, -2.0, 3.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let bf: Vec<u8> = [0x3F80u16, 0xC000]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let bytes = build_gguf(
            2,
            &kvs,
            &[T("x", vec![3, 1], 0, data), T("y", vec![2], 30, bf)],
        );
        let p = write_tmp(dir.path(), "v2.gguf", &bytes);
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 2);
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        for (k, v) in &kvs {
            assert_eq!(g.meta(k).unwrap(), v, "{k}");
        }
        assert_eq!(g.meta_u32("a.u16").unwrap(), 60000);
        assert_eq!(g.meta_f32("a.f64").unwrap(), -2.5);
        // Errors name the file and the key.
        let e = g.meta_u32("a.i32").unwrap_err().to_string();
        assert!(e.contains("a.i32") && e.contains("v2.gguf"), "{e}");
        let e = g.meta_str("missing.key").unwrap_err().to_string();
        assert!(e.contains("missing.key") && e.contains("v2.gguf"), "{e}");
        let e = g.meta_str("a.u8").unwrap_err().to_string();
        assert!(e.contains("a.u8") && e.contains("string"), "{e}");
        let x = g.tensor("x").unwrap();
        assert_eq!(x.shape(), vec![1, 3]);
        assert_eq!(g.dequantize(x).unwrap(), vec![1.0, -2.0, 3.5]);
        assert_eq!(g.tensor("y").unwrap().offset, 64);
        assert_eq!(
            g.dequantize(g.tensor("y").unwrap()).unwrap(),
            vec![1.0, -2.0]
        );
    }

    fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
        let p = write_tmp(dir, name, bytes);
        let e = GgufFile::open(&p).expect_err("must fail").to_string();
        assert!(e.contains(name), "error does not name the file: {e}");
        e
    }

    #[test]
    fn gguf_truncated_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let full = read("tiny_gemma3.gguf");
        let g = GgufFile::open(fixture_dir().join("tiny_gemma3.gguf")).unwrap();
        let data_offset = g.data_offset as usize;
        let cuts = [
            0,
            3,
            4,
            6,
            8,
            15,
            23,
            30,
            100,
            500,
            1000,
            data_offset - 40,
            data_offset - 1,
            data_offset,
            data_offset + 100,
            full.len() - 1,
        ];
        for cut in cuts {
            let e = open_err(dir.path(), "cut.gguf", &full[..cut]);
            assert!(
                e.contains("truncated") || e.contains("impossible") || e.contains("beyond the end"),
                "cut at {cut}: {e}"
            );
        }
        // Cut inside the data: the error names the first tensor that no longer fits.
        let e = open_err(dir.path(), "cut.gguf", &full[..full.len() - 1]);
        assert!(
            e.contains("tensor `") && e.contains("beyond the end"),
            "{e}"
        );
    }

    #[test]
    fn gguf_bad_magic_version_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = read("tiny_gemma3.gguf");
        b[0] = b'X';
        let e = open_err(dir.path(), "magic.gguf", &b);
        assert!(e.contains("not a GGUF file"), "{e}");
        for v in [1u32, 4] {
            let mut b = read("tiny_gemma3.gguf");
            b[4..8].copy_from_slice(&v.to_le_bytes());
            let e = open_err(dir.path(), "version.gguf", &b);
            assert!(e.contains(&format!("unsupported GGUF version {v}")), "{e}");
        }
        let e = GgufFile::open(dir.path().join("nope.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.gguf"), "{e}");
    }

    #[test]
    fn gguf_absurd_counts_are_errors_not_allocations() {
        let dir = tempfile::tempdir().unwrap();
        // Tensor count u64::MAX.
        let mut b = build_gguf(3, &[], &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = open_err(dir.path(), "count.gguf", &b);
        assert!(
            e.contains("tensor count") && e.contains("impossible"),
            "{e}"
        );
        // KV count huge.
        let mut b = build_gguf(3, &[], &[]);
        b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = open_err(dir.path(), "kv.gguf", &b);
        assert!(e.contains("metadata count"), "{e}");
        // String length huge.
        let mut b = build_gguf(3, &[("k", MetaValue::String("v".into()))], &[]);
        let vlen_at = 24 + 8 + 1 + 4;
        b[vlen_at..vlen_at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let e = open_err(dir.path(), "str.gguf", &b);
        assert!(e.contains("metadata `k`") && e.contains("truncated"), "{e}");
        // Array length huge.
        let mut b = build_gguf(
            3,
            &[("arr", MetaValue::Array(vec![MetaValue::U32(1)]))],
            &[],
        );
        let alen_at = 24 + 8 + 3 + 4 + 4;
        b[alen_at..alen_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let e = open_err(dir.path(), "arr.gguf", &b);
        assert!(
            e.contains("metadata `arr`") && e.contains("impossible"),
            "{e}"
        );
        // Absurd dimensions.
        let b = build_gguf(3, &[], &[T("big", vec![1 << 32, 1 << 32, 16], 0, vec![])]);
        let e = open_err(dir.path(), "dims.gguf", &b);
        assert!(e.contains("`big`") && e.contains("absurd"), "{e}");
        // Too many dimensions.
        let b = build_gguf(3, &[], &[T("five", vec![1, 1, 1, 1, 1], 0, vec![0; 4])]);
        let e = open_err(dir.path(), "ndims.gguf", &b);
        assert!(e.contains("`five`") && e.contains("5 dimensions"), "{e}");
        // Unknown metadata value type.
        let mut b = build_gguf(3, &[("k", MetaValue::U32(1))], &[]);
        b[24 + 8 + 1..24 + 8 + 1 + 4].copy_from_slice(&77u32.to_le_bytes());
        let e = open_err(dir.path(), "vtype.gguf", &b);
        assert!(e.contains("metadata `k`") && e.contains("77"), "{e}");
    }

    #[test]
    fn gguf_unsupported_and_unknown_tensor_types() {
        let dir = tempfile::tempdir().unwrap();
        // Q4_0 is a real ggml type whose size is known, but it is not dequantized here.
        let b = build_gguf(
            3,
            &[],
            &[T("blk.0.attn_q.weight", vec![32, 2], 2, vec![0; 36])],
        );
        let p = write_tmp(dir.path(), "q4_0.gguf", &b);
        let g = GgufFile::open(&p).unwrap();
        let t = &g.tensors[0];
        assert_eq!(g.tensor_data(t).len(), 36);
        let e = g.dequantize(t).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("Q4_0"),
            "{e}"
        );
        assert!(e.contains("q4_0.gguf"), "{e}");
        // Type id 99 does not exist: the file is rejected at open, naming the tensor.
        let b = build_gguf(3, &[], &[T("weird", vec![4], 99, vec![0; 16])]);
        let e = open_err(dir.path(), "t99.gguf", &b);
        assert!(e.contains("`weird`") && e.contains("99"), "{e}");
        // Row length not a multiple of the block size.
        let b = build_gguf(3, &[], &[T("odd", vec![16], 8, vec![0; 17])]);
        let e = open_err(dir.path(), "odd.gguf", &b);
        assert!(e.contains("`odd`") && e.contains("block size"), "{e}");
    }
}
