//! flatmin as a library: reproducible training runs on CIFAR-10 (data sources, run folders
//! with config, metrics and atomic checkpoints, bit-identical resume), used by the `flatmin`
//! command line and usable from Rust.
#![warn(missing_docs)]

#[macro_use]
mod words;
pub mod data;
pub mod fetch;
pub mod plot;
pub mod suggest;
pub mod tensorboard;
pub mod train;

/// The model `--model` names (a preset, a custom MLP spec or a network file), initialized from
/// `seed`, checked to take CIFAR-10 images (`[3, 32, 32]`) to 10 logits, the data every
/// command feeds it. Errors name the flag and the value (and, for a file, the layer).
pub fn cifar_model<T: flatmin_engine::Scalar>(
    model: &str,
    seed: u64,
) -> anyhow::Result<flatmin_models::Model<T>> {
    let m = flatmin_models::Model::<T>::named(model, seed)
        .map_err(|e| suggest::model_error(model, e))?;
    let (input, output) = (m.net().input_shape(), m.net().output_shape());
    if input != [3, 32, 32] || output != [10] {
        anyhow::bail!(
            "--model {model}: the network maps {input:?} to {output:?} per sample; CIFAR-10 needs [3, 32, 32] to [10]"
        );
    }
    Ok(m)
}
