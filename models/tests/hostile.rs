//! Hostile and broken safetensors files: every one is rejected with an error naming the file,
//! never a panic; plus a bounded random-mutation smoke fuzz of the loader.

use flatmin_models::io::{
    parse_safetensors, read_safetensors, write_safetensors, RawData, RawTensor,
};
use flatmin_models::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn rejects(name: &str, bytes: &[u8], needle: &str) {
    let err = parse_safetensors(Path::new(name), bytes)
        .expect_err(name)
        .to_string();
    assert!(err.contains(name), "{name}: {err}");
    assert!(err.contains(needle), "{name}: {err}");
}

#[test]
fn broken_headers_and_offsets_are_rejected() {
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(parse_safetensors(Path::new("ok"), &file(ok, &[0; 8])).is_ok());
    rejects("short.st", &[1, 2, 3], "too short");
    rejects(
        "huge-header.st",
        &file(ok, &[0; 8])[..8]
            .iter()
            .copied()
            .chain([0u8; 4])
            .collect::<Vec<_>>(),
        "header length",
    );
    let mut absurd = u64::MAX.to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    rejects("absurd.st", &absurd, "header length");
    rejects("json.st", &file("{not json", &[]), "header");
    rejects(
        "overlap.st",
        &file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        ),
        "offset",
    );
    rejects(
        "range.st",
        &file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}}"#,
            &[0; 8],
        ),
        "",
    );
    rejects(
        "mismatch.st",
        &file(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
        "",
    );
    rejects(
        "dup.st",
        &file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            &[0; 16],
        ),
        "appears twice",
    );
    rejects(
        "f16.st",
        &file(
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        "dtype",
    );
}

#[test]
fn non_finite_weights_are_rejected_by_name() {
    let dir = std::env::temp_dir().join(format!("flatmin-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = Model::<f32>::named("tiny-tanh", 0).unwrap();
    let mut raw = m.to_raw();
    if let RawData::F32(v) = &mut raw[1].data {
        v[3] = f32::NAN;
    }
    let p = dir.join("nan.safetensors");
    write_safetensors(&p, &raw).unwrap();
    let err = Model::<f32>::named("tiny-tanh", 0)
        .unwrap()
        .load(&p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite") && err.contains(&raw[1].name),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_mutations_never_panic() {
    // A bounded smoke fuzz: flip, insert, delete and truncate bytes of a valid file.
    let raw = vec![
        RawTensor {
            name: "w".into(),
            shape: vec![2, 3],
            data: RawData::F32(vec![1.0; 6]),
        },
        RawTensor {
            name: "n".into(),
            shape: vec![],
            data: RawData::I64(vec![7]),
        },
    ];
    let dir = std::env::temp_dir().join(format!("flatmin-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("seed.safetensors");
    write_safetensors(&p, &raw).unwrap();
    let seed = std::fs::read(&p).unwrap();
    assert_eq!(read_safetensors(&p).unwrap().len(), 2);
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..20_000 {
        let mut b = seed.clone();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..4) {
                0 if !b.is_empty() => {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
                1 => {
                    let i = rng.gen_range(0..=b.len());
                    b.insert(i, rng.gen());
                }
                2 if !b.is_empty() => {
                    let i = rng.gen_range(0..b.len());
                    b.remove(i);
                }
                _ => b.truncate(rng.gen_range(0..=b.len())),
            }
        }
        let _ = parse_safetensors(Path::new("fuzz"), &b);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A FIFO, a character device and a folder given as a weights or network file are refused
/// at once, naming the file and what it is (before the fix a FIFO blocked for ever in
/// `open`, and `/dev/zero` was read until memory ran out).
#[test]
fn only_regular_files_are_read() {
    let dir = std::env::temp_dir().join(format!("flatmin-hostile-special-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("w.safetensors");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let net_fifo = dir.join("net.json");
    assert!(std::process::Command::new("mkfifo")
        .arg(&net_fifo)
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    let cases: [(&Path, &str); 3] = [
        (&fifo, "is a FIFO, not a regular file"),
        (
            Path::new("/dev/zero"),
            "is a character device, not a regular file",
        ),
        (&dir, "is a folder, not a regular file"),
    ];
    for (path, needle) in cases {
        let err = read_safetensors(path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let err = flatmin_models::netfile::read_network(&net_fifo)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("net.json") && err.contains("is a FIFO"),
        "{err}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A weights file holding the model's tensors and a huge extra one (12 GiB, a sparse file
/// that takes no disk space) is refused from its header, before any data is read: at once
/// and without allocating the tensor. Also as a direction file (`load_param_like`), and a
/// file whose header says a tensor has another shape.
#[test]
fn files_are_refused_from_their_header_before_the_data_is_read() {
    let dir = std::env::temp_dir().join(format!("flatmin-header-first-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut model = Model::<f32>::named("tiny-tanh", 0).unwrap();
    let huge = dir.join("huge-extra.safetensors");
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for e in model.entries() {
        let bytes = 4 * e.shape.iter().product::<usize>() as u64;
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": e.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let junk = 12u64 << 30;
    header.insert(
        "junk".into(),
        serde_json::json!({"dtype": "F32", "shape": [junk / 4], "data_offsets": [offset, offset + junk]}),
    );
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&huge).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        f.set_len(8 + h.len() as u64 + offset + junk).unwrap();
    }
    let started = std::time::Instant::now();
    let err = model.load(&huge).unwrap_err().to_string();
    assert!(
        err.contains("huge-extra.safetensors") && err.contains("unexpected tensor 'junk'"),
        "{err}"
    );
    let err = model.load_param_like(&huge).unwrap_err().to_string();
    assert!(err.contains("unexpected tensor 'junk'"), "{err}");
    assert!(
        started.elapsed().as_secs_f64() < 3.0,
        "took {:?}: the data was read",
        started.elapsed()
    );

    // A header whose shape differs is named from the header too.
    let mut raw = model.to_raw();
    raw[0].shape = vec![raw[0].shape.iter().product()];
    let reshaped = dir.join("reshaped.safetensors");
    write_safetensors(&reshaped, &raw).unwrap();
    let err = model.load(&reshaped).unwrap_err().to_string();
    assert!(
        err.contains("has shape") && err.contains(&raw[0].name),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Each fault of the data offsets is named for what it is: a file longer than its header
/// says is not "truncated", a hole between tensors is not "overlapping", and a file short of
/// data is "truncated" with the bytes missing.
#[test]
fn offset_faults_are_named_for_what_they_are() {
    let two = |a: [u64; 2], b: [u64; 2]| {
        format!(
            r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}}}"#,
            a[0], a[1], b[0], b[1]
        )
    };
    let one = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    /// A file, its bytes, what the error must contain and what it must not.
    type Case<'a> = (&'a str, Vec<u8>, &'a [&'a str], &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "longer.st",
            file(one, &[0; 13]),
            &["5 bytes after the end", "longer than its header says"],
            &["truncated", "shorter"],
        ),
        (
            "short.st",
            file(one, &[0; 5]),
            &["truncated", "3 bytes missing"],
            &["longer"],
        ),
        (
            "hole.st",
            file(&two([0, 8], [12, 20]), &[0; 20]),
            &[
                "hole of 4 bytes",
                "tensor 'a' (bytes 0..8)",
                "tensor 'b' (bytes 12..20)",
            ],
            &["overlap"],
        ),
        (
            "hole-first.st",
            file(&two([4, 12], [12, 20]), &[0; 20]),
            &["hole of 4 bytes between the start of the data and tensor 'a'"],
            &["overlap"],
        ),
        (
            "overlap.st",
            file(&two([0, 8], [4, 12]), &[0; 12]),
            &["tensor 'b' (bytes 4..12) overlaps tensor 'a' (bytes 0..8)"],
            &["hole"],
        ),
        (
            "backwards.st",
            file(&two([0, 8], [8, 0]), &[0; 8]),
            &["ends (byte 0) before it starts (byte 8)"],
            &["overlap", "hole"],
        ),
    ];
    for (name, bytes, want, not) in cases {
        let err = parse_safetensors(Path::new(name), &bytes)
            .expect_err(name)
            .to_string();
        assert!(err.contains(name), "{name}: {err}");
        for w in want {
            assert!(err.contains(w), "{name}: no '{w}' in: {err}");
        }
        for n in not {
            assert!(!err.contains(n), "{name}: '{n}' in: {err}");
        }
    }
}

/// A file whose tensor has a huge shape (50,000 dimensions) or a huge name (300 KB) makes a
/// short one-line error, not one that repeats the shape or the name in full.
#[test]
fn huge_shapes_and_names_make_short_messages() {
    let dir = std::env::temp_dir().join(format!("flatmin-huge-shape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut model = Model::<f32>::named("tiny-tanh", 0).unwrap();
    let mut raw = model.to_raw();
    let elems: usize = raw[0].shape.iter().product();
    let mut shape = vec![1usize; 50_000];
    shape[0] = elems;
    raw[0].shape = shape;
    let many_dims = dir.join("many-dims.safetensors");
    write_safetensors(&many_dims, &raw).unwrap();
    let err = model.load(&many_dims).unwrap_err().to_string();
    assert!(err.len() < 1000, "{} bytes: {}", err.len(), &err[..1000]);
    assert!(
        err.contains("many-dims.safetensors")
            && err.contains(&raw[0].name)
            && err.contains("50000 dimensions"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    let mut raw = model.to_raw();
    let long = "x".repeat(300_000);
    raw.push(RawTensor {
        name: long.clone(),
        shape: vec![1],
        data: RawData::F32(vec![0.0]),
    });
    let long_name = dir.join("long-name.safetensors");
    write_safetensors(&long_name, &raw).unwrap();
    let err = model.load(&long_name).unwrap_err().to_string();
    assert!(err.len() < 1000, "{} bytes", err.len());
    assert!(
        err.contains("long-name.safetensors")
            && err.contains("unexpected tensor 'xxxx")
            && err.contains("more bytes"),
        "{err}"
    );
    // The same name twice in a parsed header, and as a misshapen tensor.
    let dup = format!(
        r#"{{"{long}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"{long}":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#
    );
    let err = parse_safetensors(Path::new("dup.st"), &file(&dup, &[0; 8]))
        .unwrap_err()
        .to_string();
    assert!(
        err.len() < 1000 && err.contains("appears twice"),
        "{err:.1000}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
