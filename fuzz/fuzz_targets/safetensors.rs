//! The safetensors reader on arbitrary bytes: `parse_safetensors` must return a value or an
//! error, never panic or allocate beyond what the input justifies. Accepted files are then
//! loaded into a tiny model, as `--init-from` and `--resume` do with a checkpoint's entries.
#![no_main]

use flatmin_models::io::parse_safetensors;
use flatmin_models::Model;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    if let Ok(raw) = parse_safetensors(path, data) {
        for t in &raw {
            let _ = t.data.to_f64();
        }
        let mut model = Model::<f32>::named("tiny-tanh", 0).expect("a preset");
        let _ = model.load_raw(path, raw);
    }
});
