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
        let n = if v2 { self.u64(what)? } else { self.u32(what)? as u64 };
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
                    format!("expected an unsigned 32-bit integer, got {} {v:?}", v.type_name()),
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
        dequantize(&info.name, info.ggml_type, self.tensor_data(info), info.n_elements as usize)
            .map_err(|e| match e {
                Error::Tensor { name, msg } => Error::tensor(name, format!("{msg} (in {})", self.path.display())),
                other => other,
            })
    }
}

/// Dequantize `n` elements of type `ty` from `data`. `name` is used in errors.
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let (block, tsize) = match (ty.block_size(), ty.type_size()) {
        (Some(b), Some(t)) => (b, t),
        _ => return Err(Error::tensor(name, format!("unknown ggml type id {}", ty.0))),
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
    if n % block != 0 {
        return Err(Error::tensor(
            name,
            format!("{n} elements is not a multiple of the {} block size {block}", ty.name()),
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
