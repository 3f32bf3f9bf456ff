//! Safetensors checkpoints, memory-mapped: tensors are read in place, never copied whole into RAM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::tensor::{bytes_to_f32, DType};

/// Where a tensor's bytes live.
#[derive(Clone)]
enum Storage {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        end: usize,
    },
    Owned(Arc<Vec<u8>>),
}

/// One stored tensor: dtype, shape (PyTorch order) and its bytes.
#[derive(Clone)]
pub struct Weight {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The file it came from (for error messages and `info`).
    pub file: PathBuf,
    storage: Storage,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({} {} {:?})", self.name, self.dtype, self.shape)
    }
}

impl Weight {
    /// A tensor held in memory (tests, synthetic models, converted tensors).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Weight {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Weight {
            name: name.to_string(),
            dtype: DType::F32,
            shape,
            file: PathBuf::from("<memory>"),
            storage: Storage::Owned(Arc::new(bytes)),
        }
    }

    /// A tensor of any dtype held in memory, from its little-endian bytes.
    pub fn from_bytes(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<Weight> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if bytes.len() != want {
            return Err(Error::tensor(
                name,
                format!(
                    "{} bytes for shape {shape:?} of {dtype}, expected {want}",
                    bytes.len()
                ),
            ));
        }
        Ok(Weight {
            name: name.to_string(),
            dtype,
            shape,
            file: PathBuf::from("<memory>"),
            storage: Storage::Owned(Arc::new(bytes)),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, start, end } => &map[*start..*end],
            Storage::Owned(v) => v,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// All values as f32 (a copy; for small tensors such as norms).
    pub fn to_f32(&self) -> Vec<f32> {
        bytes_to_f32(self.dtype, self.bytes())
    }

    /// The `i`-th slice along the first dimension (an expert of a fused `[E, ...]` tensor), named `name`:
    /// a view of the mapped file, or a copy of in-memory bytes.
    pub fn slice_outer(&self, i: usize, name: &str) -> Result<Weight> {
        let Some((&outer, inner)) = self.shape.split_first() else {
            return Err(Error::tensor(&self.name, "a scalar has no slices"));
        };
        if i >= outer {
            return Err(Error::tensor(
                &self.name,
                format!("slice {i} of a first dimension of {outer}"),
            ));
        }
        let len = inner.iter().product::<usize>() * self.dtype.size();
        let storage = match &self.storage {
            Storage::Mapped { map, start, .. } => Storage::Mapped {
                map: map.clone(),
                start: start + i * len,
                end: start + (i + 1) * len,
            },
            Storage::Owned(v) => Storage::Owned(Arc::new(v[i * len..(i + 1) * len].to_vec())),
        };
        Ok(Weight {
            name: name.to_string(),
            dtype: self.dtype,
            shape: inner.to_vec(),
            file: self.file.clone(),
            storage,
        })
    }

    /// A copy of this tensor under another name (tied embeddings).
    pub fn renamed(&self, name: &str) -> Weight {
        Weight {
            name: name.to_string(),
            ..self.clone()
        }
    }

    /// Check shape and dtype against what the model expects; the error names the tensor.
    pub fn expect(&self, shape: &[usize], dtypes: &[DType]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::tensor(
                &self.name,
                format!(
                    "expected shape {:?}, found {:?} (in {})",
                    shape,
                    self.shape,
                    self.file.display()
                ),
            ));
        }
        if !dtypes.contains(&self.dtype) {
            let want: Vec<String> = dtypes.iter().map(|d| d.to_string()).collect();
            return Err(Error::tensor(
                &self.name,
                format!(
                    "expected dtype {}, found {} (in {})",
                    want.join(" or "),
                    self.dtype,
                    self.file.display()
                ),
            ));
        }
        Ok(())
    }
}

/// Every tensor of a checkpoint directory, by its name in the files.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub tensors: BTreeMap<String, Weight>,
}

impl Checkpoint {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`,
    /// or every `*.safetensors` file of the directory.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "model directory not found"));
        }
        let files = list_safetensors(dir)?;
        let mut tensors = BTreeMap::new();
        for file in &files {
            for w in open_safetensors(file)? {
                if let Some(prev) = tensors.insert(w.name.clone(), w) {
                    return Err(Error::tensor(
                        &prev.name,
                        format!("appears in two files (second: {})", file.display()),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|w| w.bytes().len()).sum()
    }
}

fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::field(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::field(&index, format!("weight_map.{tensor}"), "not a string")
            })?;
            let p = dir.join(f);
            if !files.contains(&p) {
                if !p.is_file() {
                    return Err(Error::file(
                        &p,
                        format!(
                            "shard listed in {} for `{tensor}` not found",
                            index.display()
                        ),
                    ));
                }
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(
            dir,
            "no model.safetensors, model.safetensors.index.json or *.safetensors file",
        ));
    }
    Ok(files)
}

/// Map one safetensors file and list its tensors. A truncated or corrupt file is an error.
pub fn open_safetensors(path: &Path) -> Result<Vec<Weight>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; we never write through the map. A file changed by another
    // process while mapped is outside what we guard against (as with every mmap-based loader).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let map = Arc::new(map);
    let parsed = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let base = map.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in parsed.tensors() {
        let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
            Error::tensor(
                &name,
                format!(
                    "unsupported dtype {:?} (in {})",
                    view.dtype(),
                    path.display()
                ),
            )
        })?;
        let start = view.data().as_ptr() as usize - base;
        let end = start + view.data().len();
        out.push(Weight {
            name,
            dtype,
            shape: view.shape().to_vec(),
            file: path.to_path_buf(),
            storage: Storage::Mapped {
                map: map.clone(),
                start,
                end,
            },
        });
    }
    Ok(out)
}

/// Start a safetensors file whose tensors are streamed one by one: writes the header for `tensors`
/// (name, dtype, shape, in file order) with `{"format": "pt"}` metadata and returns the writer; the caller
/// then writes each tensor's bytes in the same order. Only one tensor need be in memory at a time.
pub fn begin_safetensors(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>)],
) -> Result<std::io::BufWriter<std::fs::File>> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::invalid(format!("serializing the safetensors header: {e}")))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(&header_bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_one(path: &Path) {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data)
            .unwrap();
        safetensors::serialize_to_file([("a.weight", view)], None, path).unwrap();
    }

    #[test]
    fn reads_mapped_values() {
        let dir = tempfile::tempdir().unwrap();
        write_one(&dir.path().join("model.safetensors"));
        let ck = Checkpoint::open(dir.path()).unwrap();
        let w = &ck.tensors["a.weight"];
        assert_eq!(w.shape, vec![2, 2]);
        assert_eq!(w.to_f32(), vec![1.0, 2.0, 3.0, 4.0]);
        assert!(w.expect(&[2, 2], &[DType::F32]).is_ok());
        let e = w.expect(&[4], &[DType::F32]).unwrap_err().to_string();
        assert!(
            e.contains("a.weight") && e.contains("[4]") && e.contains("[2, 2]"),
            "{e}"
        );
        let e = w.expect(&[2, 2], &[DType::BF16]).unwrap_err().to_string();
        assert!(e.contains("expected dtype BF16, found F32"), "{e}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write_one(&p);
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 5, 8, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = Checkpoint::open(dir.path())
                .err()
                .expect("must fail")
                .to_string();
            assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
        }
    }

    #[test]
    fn missing_dir_and_missing_shard_are_errors() {
        let e = Checkpoint::open(Path::new("/nonexistent/e4m3"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/e4m3"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"a.weight":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("model-00001-of-00002.safetensors") && e.contains("a.weight"),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        let e = Checkpoint::open(empty.path()).err().unwrap().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
    }
}
