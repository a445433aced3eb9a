//! What a checkpoint records about the experiment it belongs to, so that `--resume` cannot
//! silently change it: the recipe (its canonical JSON and that JSON's SHA-256) and the
//! identity of the images trained on ([`DatasetIdentity`]). Stored in the checkpoint as the
//! tensor [`RUN_RECORD_TENSOR`]: the UTF-8 bytes of a JSON object, padded with spaces to a
//! multiple of 8 and packed 8 to an int64 element, little-endian (safetensors has no string
//! type, and the checkpoint stays one atomically written file).

use super::run_dir::DatasetIdentity;
use anyhow::{bail, Result};
use flatmin_models::io::{RawData, RawTensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Name of the checkpoint tensor holding the [`RunRecord`].
pub const RUN_RECORD_TENSOR: &str = "trainer/run_record";

/// Settings that say where something is read from, not what: not compared on resume.
const LOCATION_KEYS: [&str; 1] = ["data"];

/// The recipe and data identity a checkpoint was written with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// SHA-256 (hex) of `recipe` serialized compactly.
    pub recipe_sha256: String,
    /// The recipe as `config.json` holds it, without the run's metadata.
    pub recipe: Value,
    /// The images the run trained and evaluated on.
    pub dataset: DatasetIdentity,
}

/// SHA-256 (hex) of the compact JSON of `recipe` (its keys in the recipe's field order).
pub fn recipe_sha256(recipe: &Value) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(recipe.to_string().as_bytes())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

impl RunRecord {
    /// The record of a run with `recipe` (as from [`super::RunDir::recipe`]) on `dataset`.
    pub fn new(recipe: Value, dataset: DatasetIdentity) -> Self {
        RunRecord {
            recipe_sha256: recipe_sha256(&recipe),
            recipe,
            dataset,
        }
    }

    /// The record as a checkpoint tensor ([`RUN_RECORD_TENSOR`]).
    pub fn to_tensor(&self) -> Result<RawTensor> {
        let mut bytes = serde_json::to_vec(self)?;
        bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
        let words: Vec<i64> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect();
        Ok(RawTensor {
            name: RUN_RECORD_TENSOR.into(),
            shape: vec![words.len()],
            data: RawData::I64(words),
        })
    }

    /// Decodes the record tensor `t` of the checkpoint `path`; anything but bytes of a
    /// record's JSON is an error naming the file and the tensor.
    pub fn from_tensor(path: &Path, t: &RawTensor) -> Result<Self> {
        let bad = |why: &str| {
            anyhow::anyhow!(
                "{}: tensor '{RUN_RECORD_TENSOR}' is not a run record ({why})",
                path.display()
            )
        };
        let RawData::I64(v) = &t.data else {
            return Err(bad("not int64"));
        };
        let bytes: Vec<u8> = v.iter().flat_map(|w| w.to_le_bytes()).collect();
        let record: RunRecord =
            serde_json::from_slice(&bytes).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        if !record.recipe.is_object() {
            return Err(bad("its recipe is not a JSON object"));
        }
        Ok(record)
    }

    /// Checks that `recipe`, the recipe now in `config` (a run's `config.json`), is the one
    /// recorded. The keys compared are those of both recipes, so a setting added by a later
    /// flatmin (absent from an older record) is no difference; `data` (where the images are
    /// read from) is not compared, since the images themselves are
    /// ([`DatasetIdentity::check_against`]), so a moved data folder can be named. The error
    /// names every setting that differs with its recorded and its current value.
    pub fn check_recipe(&self, recipe: &Value, config: &Path) -> Result<()> {
        if recipe_sha256(recipe) == self.recipe_sha256 {
            return Ok(());
        }
        let Some(changed) = recipe_differences(&self.recipe, recipe) else {
            bail!("{}: the recipe is not a JSON object", config.display());
        };
        if changed.is_empty() {
            return Ok(());
        }
        bail!(
            "{} was changed since the checkpoint: {}; a resume continues the recorded \
             experiment, so restore these settings (or start a new run with --config {} \
             --out NEW)",
            config.display(),
            changed.join(", "),
            config.display()
        )
    }
}

/// The settings in which the recipe `now` differs from the recipe `was`, each as
/// `key WAS -> NOW` (`None` when either is not a JSON object). Only keys both hold are
/// compared, so a setting added by a later flatmin is no difference, and `data` (where the
/// images are read from) is not compared. The one comparison of recipes: `--resume` against
/// the checkpoint's record, `flatmin sweep` against the runs already in its folder.
pub fn recipe_differences(was: &Value, now: &Value) -> Option<Vec<String>> {
    let (old, new) = (was.as_object()?, now.as_object()?);
    Some(
        new.iter()
            .filter(|(key, _)| !LOCATION_KEYS.contains(&key.as_str()))
            .filter_map(|(key, now)| {
                let was = old.get(key)?;
                (was != now).then(|| format!("{key} {was} -> {now}"))
            })
            .collect(),
    )
}

impl DatasetIdentity {
    /// The fields in which `self` (the images loaded now) differs from `recorded`, each as
    /// `name recorded vs now`; the origin (where the images were read from) is not compared.
    pub fn differences(&self, recorded: &DatasetIdentity) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, was: String, now: String| {
            if was != now {
                out.push(format!("{name} {was} vs {now}"));
            }
        };
        cmp(
            "synthetic",
            recorded.synthetic.to_string(),
            self.synthetic.to_string(),
        );
        cmp(
            "training images",
            recorded.train_images.to_string(),
            self.train_images.to_string(),
        );
        cmp(
            "test images",
            recorded.test_images.to_string(),
            self.test_images.to_string(),
        );
        cmp(
            "training sha256",
            recorded.train_sha256.clone(),
            self.train_sha256.clone(),
        );
        cmp(
            "test sha256",
            recorded.test_sha256.clone(),
            self.test_sha256.clone(),
        );
        out
    }

    /// Checks that `self`, the images a resume of `run` loaded, are those recorded in `source`
    /// (the checkpoint or `config.json`). The error names the data's origin and every field
    /// that differs, recorded value first.
    pub fn check_against(
        &self,
        recorded: &DatasetIdentity,
        run: &Path,
        source: &str,
    ) -> Result<()> {
        let diff = self.differences(recorded);
        if diff.is_empty() {
            return Ok(());
        }
        bail!(
            "--resume {}: the data loaded from {} holds other images than the run was trained \
             on ({}, recorded in {source} vs loaded now); pass --data with the run's data \
             (recorded origin: {})",
            run.display(),
            self.origin,
            diff.join(", "),
            recorded.origin
        )
    }
}

/// Reads the run record from the checkpoint tensors `raw` of `path`, if it has one (older
/// checkpoints do not).
pub fn find_record(path: &Path, raw: &[RawTensor]) -> Result<Option<RunRecord>> {
    raw.iter()
        .find(|t| t.name == RUN_RECORD_TENSOR)
        .map(|t| RunRecord::from_tensor(path, t))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(train_sha: &str) -> DatasetIdentity {
        DatasetIdentity {
            origin: "here".into(),
            synthetic: true,
            train_images: 10,
            test_images: 5,
            train_sha256: train_sha.into(),
            test_sha256: "t".into(),
        }
    }

    #[test]
    fn record_round_trips_and_names_changed_settings() {
        let recipe = serde_json::json!({"lr": 0.1, "epochs": 5, "model": "cnn-s"});
        let rec = RunRecord::new(recipe.clone(), identity("a"));
        let p = Path::new("ck.safetensors");
        let back = RunRecord::from_tensor(p, &rec.to_tensor().unwrap()).unwrap();
        assert_eq!(back, rec);
        back.check_recipe(&recipe, Path::new("c.json")).unwrap();
        let edited = serde_json::json!({"lr": 0.2, "epochs": 9, "model": "cnn-s", "new": 1});
        let err = back
            .check_recipe(&edited, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "c.json was changed since the checkpoint: epochs 5 -> 9, lr 0.1 -> 0.2;"
            ),
            "{err}"
        );
        // Where the data is read from is no difference (its identity is checked).
        let moved = serde_json::json!({"lr": 0.1, "epochs": 5, "model": "cnn-s", "data": "/x"});
        RunRecord::new(
            serde_json::json!({"lr": 0.1, "epochs": 5, "model": "cnn-s", "data": "auto"}),
            identity("a"),
        )
        .check_recipe(&moved, Path::new("c.json"))
        .unwrap();
        // A setting only one side knows (added by a later version) is no difference.
        let later = serde_json::json!({"lr": 0.1, "epochs": 5, "model": "cnn-s", "new": 1});
        back.check_recipe(&later, Path::new("c.json")).unwrap();
    }

    #[test]
    fn damaged_records_are_errors_naming_the_tensor() {
        let p = Path::new("ck.safetensors");
        for data in [
            RawData::F32(vec![1.0]),
            RawData::I64(vec![-1]),
            RawData::I64(vec![i64::from_le_bytes(*b"{\"x\":1} ")]),
        ] {
            let t = RawTensor {
                name: RUN_RECORD_TENSOR.into(),
                shape: vec![1],
                data,
            };
            let err = RunRecord::from_tensor(p, &t).unwrap_err().to_string();
            assert!(
                err.contains("ck.safetensors: tensor 'trainer/run_record'"),
                "{err}"
            );
        }
    }

    #[test]
    fn dataset_differences_ignore_the_origin() {
        let a = identity("a");
        let mut b = identity("b");
        b.origin = "elsewhere".into();
        assert_eq!(a.differences(&identity("a")), Vec::<String>::new());
        let mut moved = identity("a");
        moved.origin = "elsewhere".into();
        assert!(moved.differences(&a).is_empty());
        assert_eq!(
            b.differences(&a),
            vec!["training sha256 a vs b".to_string()]
        );
        let err = b
            .check_against(&a, Path::new("r"), "the checkpoint")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--resume r: the data loaded from elsewhere holds other images"),
            "{err}"
        );
    }
}
