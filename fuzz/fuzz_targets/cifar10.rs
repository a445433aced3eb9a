//! The CIFAR-10 record parser on arbitrary bytes (`Batch::from_bytes`, which
//! `read_batch_file` calls on a file's contents): a batch or an error, never a panic.
#![no_main]

use flatmin_datasets::Batch;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Batch::from_bytes(Path::new("fuzz.bin"), data) {
        assert_eq!(b.pixels.len(), b.len() * 3072);
        assert!(b.labels.iter().all(|&l| l < 10));
        for i in 0..b.len() {
            let _ = b.image(i);
        }
    }
});
