//! `flatmin export --tensorboard`: the event file of a real run, read back (framing, masked
//! CRC-32C of every record, the Event/Summary messages) holds every number of every record
//! at its step; a folder that is not a run is refused in one line.
//! (`tools/check_tensorboard.py` reads the same file with TensorBoard's own reader.)

use std::process::Command;

mod common;

fn flatmin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

#[test]
fn tensorboard_export_holds_every_record_and_reads_back() {
    let dir = common::tmp("export", "tb");
    let run = dir.join("sa-run");
    let o = flatmin(&[
        "train",
        "--model",
        "tiny-tanh",
        "--data",
        "synthetic",
        "--train-size",
        "100",
        "--test-size",
        "50",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--optimizer",
        "sa",
        "--trace-every",
        "2",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tb = dir.join("tb");
    let o = flatmin(&[
        "export",
        run.to_str().unwrap(),
        "--tensorboard",
        tb.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(tb.join("sa-run/events.out.tfevents.flatmin")).unwrap();
    let got = flatmin::tensorboard::decode_events(&bytes).unwrap();
    let recs = flatmin::train::read_records(&run.join("metrics.jsonl")).unwrap();
    let want: Vec<_> = recs
        .iter()
        .flat_map(flatmin::tensorboard::record_scalars)
        .collect();
    assert_eq!(got, want);
    for tag in [
        "eval/test_acc",
        "train/loss",
        "train/gate",
        "train/v_cos_grad",
        "trace/trace_norm",
    ] {
        assert!(got.iter().any(|s| s.tag == tag), "{tag}");
    }
    let r = recs.iter().find(|r| r.kind == "eval").unwrap();
    let acc = got.iter().find(|s| s.tag == "eval/test_acc").unwrap();
    assert_eq!(
        (acc.step, acc.value),
        (r.step as i64, r.test_acc.unwrap() as f32)
    );
    // A flipped byte anywhere in a record fails its CRC.
    let mut bad = bytes.clone();
    bad[bytes.len() / 2] ^= 1;
    assert!(flatmin::tensorboard::decode_events(&bad).is_err());
    // Not a run folder.
    let o = flatmin(&[
        "export",
        dir.to_str().unwrap(),
        "--tensorboard",
        tb.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.lines().count() == 1 && err.contains("not a run folder"),
        "{err}"
    );
}
