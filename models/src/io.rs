//! Safetensors files: reading (f32/f64/i64, validated) and atomic writing.

use crate::error::{brief, ModelError, Result};
use safetensors::{Dtype, SafeTensors};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Element data of one tensor as read from or written to a file.
#[derive(Clone, Debug, PartialEq)]
pub enum RawData {
    /// float32 elements.
    F32(Vec<f32>),
    /// float64 elements.
    F64(Vec<f64>),
    /// int64 elements (BatchNorm's `num_batches_tracked`).
    I64(Vec<i64>),
}

impl RawData {
    /// The float elements widened to f64, or `None` for integer data.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match self {
            RawData::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            RawData::F64(v) => Some(v.clone()),
            RawData::I64(_) => None,
        }
    }

    fn dtype(&self) -> Dtype {
        match self {
            RawData::F32(_) => Dtype::F32,
            RawData::F64(_) => Dtype::F64,
            RawData::I64(_) => Dtype::I64,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            RawData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            RawData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            RawData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One named tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    /// Name in the file.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: RawData,
}

/// Largest file accepted (bytes); a guard against unbounded allocation.
pub const MAX_FILE_BYTES: u64 = 16 << 30;

/// Reads every tensor of a safetensors file, in the file's order of data offsets.
/// Accepts F32, F64 and I64 tensors; anything else is an error naming the tensor.
pub fn read_safetensors(path: &Path) -> Result<Vec<RawTensor>> {
    let io = |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    };
    // Only a regular file is read (a FIFO or a device would block or never end), and never
    // more than the limit, even if the file grows while it is read.
    let bytes = flatmin_engine::fsread::read_regular_file(path, MAX_FILE_BYTES).map_err(io)?;
    parse_safetensors(path, &bytes)
}

/// `name` without `prefix` where it starts with it (`--strip-prefix`), else `name`.
pub fn strip_name<'a>(name: &'a str, prefix: Option<&str>) -> &'a str {
    prefix.and_then(|p| name.strip_prefix(p)).unwrap_or(name)
}

/// The model's tensors of a weights file: a training checkpoint's `optimizer/` and
/// `trainer/` tensors left out, and `prefix` removed from the names that start with it
/// ([`strip_name`]). For every reader of `--weights`, `--init-from` and the like.
pub fn read_model_tensors(path: &Path, prefix: Option<&str>) -> Result<Vec<RawTensor>> {
    let mut raw: Vec<RawTensor> = read_safetensors(path)?
        .into_iter()
        .filter(|t| !t.name.starts_with("optimizer/") && !t.name.starts_with("trainer/"))
        .collect();
    for t in &mut raw {
        t.name = strip_name(&t.name, prefix).to_string();
    }
    Ok(raw)
}

/// The kind of a `torch.save` file from its first bytes (`zip`, or `legacy pickle` for a
/// pickle stream such as `_use_new_zipfile_serialization=False` writes), if it is one.
fn torch_kind(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"PK\x03\x04") {
        Some("zip")
    } else if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        Some("legacy pickle")
    } else {
        None
    }
}

/// The error of a file whose header length field is out of range: a `torch.save` file
/// named as such, else `detail`.
fn bad_length(path: &Path, head: &[u8], detail: String) -> ModelError {
    match torch_kind(head) {
        Some(kind) => ModelError::Torch {
            path: path.to_path_buf(),
            kind,
        },
        None => format_err(path, detail),
    }
}

/// Largest safetensors header read before the data (bytes).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Names and shapes of the tensors of a safetensors file, read from its header alone (at
/// most [`MAX_HEADER_BYTES`]), so that a file can be refused for what it holds before its
/// data is read. The order is the header's; `__metadata__` is skipped.
pub fn read_safetensors_header(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let io = |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let (file, len) = flatmin_engine::fsread::open_regular_file(path).map_err(io)?;
    let mut file = file.take(8 + MAX_HEADER_BYTES);
    let mut head = [0u8; 8];
    if len < 8 || file.read_exact(&mut head).is_err() {
        return Err(format_err(
            path,
            format!("too short ({len} bytes) to be a safetensors file"),
        ));
    }
    let n = u64::from_le_bytes(head);
    if n > len - 8 || n > MAX_HEADER_BYTES {
        return Err(bad_length(
            path,
            &head,
            format!(
                "the header length field ({n}) exceeds the file size ({len} bytes) or the \
                 {MAX_HEADER_BYTES}-byte header limit: not a safetensors file, or truncated"
            ),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let bad = |detail: String| format_err(path, format!("header: {detail}"));
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    map.iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, info)| {
            let shape = info["shape"]
                .as_array()
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| bad(format!("tensor '{}' has no valid shape", brief(name))))?;
            Ok((name.clone(), shape))
        })
        .collect()
}

/// The first key that appears twice in the header's top-level JSON object, if any (a JSON
/// map would otherwise keep the last one silently). Malformed JSON is left to the parser.
fn duplicate_name(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(Keys).ok().flatten()
}

/// Checks the header's data offsets against each other and against the data section of
/// `data_len` bytes, naming the real fault: a tensor that ends before it starts, two tensors
/// that overlap, a gap between tensors (or before the first), data missing at the end
/// (truncated) or bytes after the last tensor (longer than the header says). A header that
/// is not a table of tensors with two-number offsets is left to the parser.
fn check_data_offsets(header: &[u8], data_len: u64) -> std::result::Result<(), String> {
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header)
    else {
        return Ok(());
    };
    let mut ranges = Vec::with_capacity(map.len());
    for (name, info) in map.iter().filter(|(n, _)| n.as_str() != "__metadata__") {
        match info["data_offsets"].as_array().map(|a| a.as_slice()) {
            Some([s, e]) => match (s.as_u64(), e.as_u64()) {
                (Some(s), Some(e)) => ranges.push((s, e, brief(name))),
                _ => return Ok(()),
            },
            _ => return Ok(()),
        }
    }
    ranges.sort_unstable_by_key(|&(s, e, _)| (s, e));
    let mut before: Option<(u64, u64, &str)> = None;
    for (s, e, name) in &ranges {
        if e < s {
            return Err(format!(
                "tensor '{name}' ends (byte {e}) before it starts (byte {s})"
            ));
        }
        let end = before.map_or(0, |(_, e, _)| e);
        let prev = match before {
            Some((ps, pe, p)) => format!("tensor '{p}' (bytes {ps}..{pe})"),
            None => "the start of the data".to_string(),
        };
        if *s < end {
            return Err(format!(
                "tensor '{name}' (bytes {s}..{e}) overlaps {prev} in the data offsets"
            ));
        }
        if *s > end {
            return Err(format!(
                "a hole of {} bytes between {prev} and tensor '{name}' (bytes {s}..{e}): the \
                 data offsets must follow each other without gaps",
                s - end
            ));
        }
        before = Some((*s, *e, name));
    }
    let end = before.map_or(0, |(_, e, _)| e);
    if end > data_len {
        return Err(format!(
            "truncated: the header's tensors need {end} bytes of data, the file holds {data_len} \
             ({} bytes missing)",
            end - data_len
        ));
    }
    if end < data_len {
        return Err(format!(
            "{} bytes after the end of the last tensor's data (byte {end} of {data_len}): the \
             file is longer than its header says",
            data_len - end
        ));
    }
    Ok(())
}

/// A readable description of a safetensors parsing error.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader | E::InvalidHeaderStart => "the header is not valid UTF-8 JSON".into(),
        E::InvalidHeaderDeserialization => {
            "the header is not a valid tensor table (bad JSON or fields)".into()
        }
        E::HeaderTooLarge => "the header is larger than the 100 MB limit".into(),
        E::HeaderTooSmall => "the file is too short to hold a header".into(),
        E::InvalidHeaderLength => {
            "the header length field is out of range (not a safetensors file, or truncated)".into()
        }
        E::TensorNotFound(n) => format!("tensor '{}' not found", brief(n)),
        E::TensorInvalidInfo => "a tensor's shape and dtype do not match its byte range".into(),
        // `check_data_offsets` runs first and says which of these it is; these two are
        // fallbacks that blame nothing in particular.
        E::InvalidOffset(n) => format!("tensor '{}' has invalid data offsets", brief(n)),
        E::MetadataIncompleteBuffer => {
            "the data section's length does not match the header's data offsets".into()
        }
        E::ValidationOverflow => "a tensor's size overflows".into(),
        other => format!("{other:?}"),
    }
}

fn format_err(path: &Path, detail: String) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        detail,
    }
}

/// Parses safetensors bytes (`path` is only used in error messages).
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<RawTensor>> {
    if bytes.len() < 8 {
        return Err(format_err(
            path,
            format!("{} bytes is too short for a header", bytes.len()),
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > (bytes.len() as u64).saturating_sub(8) {
        return Err(bad_length(
            path,
            bytes,
            format!(
                "the header length field ({header_len}) exceeds the file size ({} bytes): \
                 not a safetensors file, or truncated",
                bytes.len()
            ),
        ));
    }
    let header = &bytes[8..8 + header_len as usize];
    if let Some(dup) = duplicate_name(header) {
        return Err(format_err(
            path,
            format!("tensor name '{}' appears twice in the header", brief(&dup)),
        ));
    }
    let data_len = (bytes.len() - 8 - header.len()) as u64;
    check_data_offsets(header, data_len).map_err(|detail| format_err(path, detail))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(path, describe(&e)))?;
    let mut out = Vec::with_capacity(st.len());
    let mut names: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    names.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    for (name, view) in names {
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => RawData::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Dtype::F64 => RawData::F64(
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Dtype::I64 => RawData::I64(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            other => {
                return Err(ModelError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                    expected: "F32, F64 or I64",
                })
            }
        };
        out.push(RawTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Writes tensors to `path` atomically: a temporary file in the same folder, fsync, rename,
/// fsync of the folder. A crash at any point leaves either the old file or the new one.
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let owned: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.data.bytes(),
                t.data.dtype(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, b, d, s)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format_err(path, format!("tensor '{n}': {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, &None).map_err(|e| format_err(path, format!("{e:?}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // Errors name the destination the caller gave, not the temporary file.
    let io = |_: &Path| {
        let p = path.to_path_buf();
        move |cause| ModelError::Io { path: p, cause }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(ModelError::NotAFile(path.to_path_buf()));
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| format_err(path, "not a file path".into()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
