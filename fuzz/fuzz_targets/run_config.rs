//! The run-configuration reader of `flatmin train --config` and `--resume` on arbitrary
//! text: `TrainConfig::from_json`, then `validate`, must return an error or a recipe, never
//! panic.
#![no_main]

use flatmin::train::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = TrainConfig::from_json(text) {
        let _ = cfg.validate();
    }
});
