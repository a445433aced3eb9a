//! The run-configuration reader of `flatmin train --config` and `--resume` on arbitrary
//! text: `TrainConfig::from_json`, then `validate` and the parameter count of the memory
//! check, must return an error or a value, never panic.
#![no_main]

use flatmin::train::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = TrainConfig::from_json(text) {
        if cfg.validate().is_ok() {
            // What `flatmin train` computes next, before building anything.
            let _ = flatmin::train::param_bytes(&cfg);
        }
    }
});
