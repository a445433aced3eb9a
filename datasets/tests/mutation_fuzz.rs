//! A bounded random-mutation smoke fuzz of the CIFAR-10 record parser and the folder reader:
//! any byte string is either a valid batch or a typed error naming the file, never a panic.

use flatmin_datasets::{Batch, Cifar10, RECORD_BYTES};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

#[test]
fn mutated_batches_parse_or_fail_cleanly() {
    let mut rng = StdRng::seed_from_u64(9);
    let mut seed = vec![0u8; 3 * RECORD_BYTES];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = if i % RECORD_BYTES == 0 {
            (i / RECORD_BYTES) as u8
        } else {
            rng.gen()
        };
    }
    let path = Path::new("fuzz.bin");
    assert_eq!(Batch::from_bytes(path, &seed).unwrap().len(), 3);
    for _ in 0..5_000 {
        let mut b = seed.clone();
        match rng.gen_range(0..4) {
            0 => {
                let i = rng.gen_range(0..3) * RECORD_BYTES;
                b[i] = rng.gen(); // label byte, possibly > 9
            }
            1 => b.truncate(rng.gen_range(0..b.len())),
            2 => b.extend((0..rng.gen_range(1..10)).map(|_| rng.gen::<u8>())),
            _ => {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
        }
        match Batch::from_bytes(path, &b) {
            Ok(batch) => {
                assert_eq!(b.len() % RECORD_BYTES, 0);
                assert!(batch.labels.iter().all(|&l| l <= 9));
            }
            Err(e) => assert!(e.to_string().contains("fuzz.bin"), "{e}"),
        }
    }
}

#[test]
fn unreadable_or_odd_folders_fail_cleanly() {
    let dir = std::env::temp_dir().join(format!("flatmin-fuzz-folder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // An empty folder, a batch file that is a folder, and a truncated batch file.
    assert!(Cifar10::open(&dir).is_err());
    std::fs::create_dir(dir.join("data_batch_1.bin")).unwrap();
    let e = Cifar10::open(&dir).unwrap_err().to_string();
    assert!(e.contains("data_batch_1.bin"), "{e}");
    std::fs::remove_dir(dir.join("data_batch_1.bin")).unwrap();
    std::fs::write(dir.join("data_batch_1.bin"), vec![0u8; RECORD_BYTES + 5]).unwrap();
    let e = Cifar10::open(&dir).unwrap_err().to_string();
    assert!(e.contains("data_batch_1.bin") && e.contains("3073"), "{e}");
    assert!(Cifar10::open(dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A batch file or `batches.meta.txt` that is a FIFO, and `/dev/zero` as a batch file, are
/// refused at once naming the file and what it is (before the fix the FIFO blocked `open`
/// for ever).
#[test]
fn fifo_and_device_batch_files_are_refused_without_blocking() {
    let dir = std::env::temp_dir().join(format!("flatmin-fuzz-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mkfifo = |p: &std::path::Path| {
        assert!(std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap()
            .success())
    };
    let start = std::time::Instant::now();
    let batch = dir.join("data_batch_1.bin");
    mkfifo(&batch);
    let e = Cifar10::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("data_batch_1.bin") && e.contains("is a FIFO"),
        "{e}"
    );
    let e = flatmin_datasets::read_batch_file(&batch)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_batch_1.bin") && e.contains("is a FIFO"),
        "{e}"
    );
    let e = flatmin_datasets::read_batch_file("/dev/zero")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("a character device"),
        "{e}"
    );
    std::fs::remove_file(&batch).unwrap();
    std::fs::write(&batch, vec![0u8; RECORD_BYTES]).unwrap();
    let meta = dir.join("batches.meta.txt");
    mkfifo(&meta);
    let e = flatmin_datasets::read_class_names(&meta)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("batches.meta.txt") && e.contains("is a FIFO"),
        "{e}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
}
