//! TensorBoard event files of a run's records (`flatmin export --tensorboard`), written
//! directly: no maintained Rust crate writes them (tensorboard-rs and its protobuf crate were
//! last released in 2022), and scalars need little. A file is a sequence of TFRecords (length,
//! masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each holding one
//! `Event` protobuf message: the first gives the file version, each other one a record's step,
//! wall time and a `Summary` of `simple_value` scalars. [`decode_events`] reads such a file
//! back (checking every CRC), for tests; `tools/check_tensorboard.py` reads one with
//! TensorBoard's own reader.

use crate::train::Record;
use anyhow::{bail, Result};

/// One scalar of an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalarEvent {
    /// Tag, `KIND/NAME` (`eval/test_acc`, `train/loss`, `train/gate`, `trace/trace_norm`).
    pub tag: String,
    /// Optimizer steps completed.
    pub step: i64,
    /// Seconds: the record's `wall_s` (time since its process started training).
    pub wall_time: f64,
    /// The value (TensorBoard scalars are f32).
    pub value: f32,
}

/// The `file_version` of the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The masked CRC of TFRecord framing.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends `data` as one TFRecord to `out`.
fn push_record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// Appends a protobuf varint.
fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field (wire type 2).
fn push_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    push_varint(out, field << 3 | 2);
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` message: wall time (field 1, double), step (2, int64) and either the file
/// version (3) or a summary (5).
fn event(wall_time: f64, step: i64, version: Option<&str>, summary: &[u8]) -> Vec<u8> {
    let mut e = vec![1 << 3 | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    push_varint(&mut e, 2 << 3);
    push_varint(&mut e, step as u64);
    match version {
        Some(v) => push_bytes(&mut e, 3, v.as_bytes()),
        None => push_bytes(&mut e, 5, summary),
    }
    e
}

/// A `Summary` message of `(tag, simple_value)` values (field 1; in each value the tag is
/// field 1, the float field 2).
fn summary<'a>(values: impl IntoIterator<Item = (&'a str, f32)>) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, v) in values {
        let mut value = Vec::new();
        push_bytes(&mut value, 1, tag.as_bytes());
        value.push(2 << 3 | 5);
        value.extend_from_slice(&v.to_le_bytes());
        push_bytes(&mut s, 1, &value);
    }
    s
}

/// The scalars of one record: every number but its epoch, step and wall time, and each
/// optimizer or trace figure of `extra`, tagged `KIND/NAME`.
pub fn record_scalars(r: &Record) -> Vec<ScalarEvent> {
    let mut out = Vec::new();
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(r) else {
        return out;
    };
    let mut push = |name: &str, v: &serde_json::Value| {
        if let Some(x) = v.as_f64() {
            out.push(ScalarEvent {
                tag: format!("{}/{name}", r.kind),
                step: r.step as i64,
                wall_time: r.wall_s,
                value: x as f32,
            });
        }
    };
    for (k, v) in &map {
        match k.as_str() {
            "epoch" | "step" | "wall_s" => {}
            "extra" => v
                .as_object()
                .into_iter()
                .flatten()
                .for_each(|(k, v)| push(k, v)),
            _ => push(k, v),
        }
    }
    out
}

/// An event file of `records`: the version event, then one event per record with scalars.
pub fn encode_events(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    push_record(&mut out, &event(0.0, 0, Some(FILE_VERSION), &[]));
    for r in records {
        let scalars = record_scalars(r);
        if scalars.is_empty() {
            continue;
        }
        let s = summary(scalars.iter().map(|s| (s.tag.as_str(), s.value)));
        push_record(&mut out, &event(r.wall_s, r.step as i64, None, &s));
    }
    out
}

/// A protobuf reader over one message's bytes.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some((&b, rest)) = self.0.split_first() else {
                bail!("truncated varint")
            };
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint too long")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.0.len() {
            bail!("field runs past the message");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    /// The next field: its number and its value (a varint as 8 bytes LE, or the bytes).
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => self.varint()?.to_le_bytes().to_vec(),
            1 => self.take(8)?.to_vec(),
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?.to_vec()
            }
            5 => self.take(4)?.to_vec(),
            w => bail!("unsupported wire type {w}"),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// The scalars of an event file's summaries, in order, after checking its framing and
/// CRCs and that it starts with the [`FILE_VERSION`] event.
pub fn decode_events(bytes: &[u8]) -> Result<Vec<ScalarEvent>> {
    let mut rest = bytes;
    let mut out = Vec::new();
    let mut first = true;
    while !rest.is_empty() {
        if rest.len() < 12 {
            bail!("truncated record header");
        }
        let (len, crc) = (&rest[..8], &rest[8..12]);
        if masked_crc(len).to_le_bytes() != crc {
            bail!("length CRC mismatch");
        }
        let n = u64::from_le_bytes(len.try_into()?) as usize;
        if rest.len() < 12 + n + 4 {
            bail!("truncated record");
        }
        let data = &rest[12..12 + n];
        if masked_crc(data).to_le_bytes() != rest[12 + n..16 + n] {
            bail!("data CRC mismatch");
        }
        rest = &rest[16 + n..];
        decode_event(data, &mut first, &mut out)?;
    }
    Ok(out)
}

/// Decodes one `Event` into `out` (the first one must be the version event).
fn decode_event(data: &[u8], first: &mut bool, out: &mut Vec<ScalarEvent>) -> Result<()> {
    let (mut wall_time, mut step, mut version, mut summary) = (0.0, 0i64, None, None);
    let mut f = Fields(data);
    while let Some((field, v)) = f.next()? {
        match field {
            1 => wall_time = f64::from_le_bytes(v[..8].try_into()?),
            2 => step = u64::from_le_bytes(v[..8].try_into()?) as i64,
            3 => version = Some(String::from_utf8(v)?),
            5 => summary = Some(v),
            _ => {}
        }
    }
    if std::mem::take(first) {
        if version.as_deref() != Some(FILE_VERSION) {
            bail!("the first event is not the file version");
        }
        return Ok(());
    }
    let mut values = Fields(summary.as_deref().unwrap_or_default());
    while let Some((1, value)) = values.next()? {
        let (mut tag, mut x) = (String::new(), f32::NAN);
        let mut v = Fields(&value);
        while let Some((field, b)) = v.next()? {
            match field {
                1 => tag = String::from_utf8(b)?,
                2 => x = f32::from_le_bytes(b[..4].try_into()?),
                _ => {}
            }
        }
        out.push(ScalarEvent {
            tag,
            step,
            wall_time,
            value: x,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The check value of CRC-32C ("123456789"), and TFRecord's masking of it.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
