//! "Did you mean" for a misspelt name: the one suggestion helper behind every name flatmin
//! refuses (presets, optimizer and other word choices, config keys, plot metrics, axes).

/// Least Jaro similarity of a suggestion (clap's own threshold for flags and values).
const MIN_SIMILARITY: f64 = 0.7;

/// The candidate closest to `word`, if it is close enough to be what was meant.
pub fn closest<S: AsRef<str>>(
    word: &str,
    candidates: impl IntoIterator<Item = S>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro(word, c.as_ref()), c.as_ref().to_string()))
        .filter(|(score, c)| *score >= MIN_SIMILARITY && c != word)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `"; did you mean 'NAME'?"` for the closest candidate, or `""` when none is close: to
/// append to an error naming the unknown `word`.
pub fn did_you_mean<S: AsRef<str>>(word: &str, candidates: impl IntoIterator<Item = S>) -> String {
    closest(word, candidates).map_or(String::new(), |c| format!("; did you mean '{c}'?"))
}

/// An error of building the model `--model` names, with a preset suggested for a misspelt
/// preset name.
pub fn model_error(model: &str, e: flatmin_models::ModelError) -> anyhow::Error {
    let hint = match e {
        flatmin_models::ModelError::UnknownModel(_) => {
            did_you_mean(model, flatmin_models::arch::PRESETS.iter())
        }
        _ => String::new(),
    };
    anyhow::anyhow!("--model {model}: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_name_only_when_close() {
        let presets = ["tiny-tanh", "mlp-s", "cnn-s", "resnet20", "resnet18"];
        assert_eq!(closest("cnns", presets.iter()), Some("cnn-s".into()));
        assert_eq!(
            closest("resnet-20", presets.iter()),
            Some("resnet20".into())
        );
        assert_eq!(closest("resnet19", presets.iter()), Some("resnet18".into()));
        assert_eq!(closest("transformer", presets.iter()), None);
        assert_eq!(did_you_mean("cnn-s", presets.iter()), "");
        assert_eq!(
            did_you_mean("adamv", ["sgd", "adamw"].iter()),
            "; did you mean 'adamw'?"
        );
    }
}
