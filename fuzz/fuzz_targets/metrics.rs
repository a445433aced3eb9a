//! The `metrics.jsonl` reader of `flatmin train --resume` (`parse_records`) and of
//! `flatmin plot` (`parse_run_records`, which adds the kind and emptiness checks) on
//! arbitrary bytes: records or an error, never a panic.
#![no_main]

use flatmin::plot::parse_run_records;
use flatmin::train::parse_records;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("metrics.jsonl");
    let a = parse_records(path, data);
    let b = parse_run_records(path, data);
    if b.is_ok() {
        assert!(a.is_ok(), "plot accepted what resume rejects");
    }
});
