//! Where tests find the real CIFAR-10 subset (10,000 training and 2,000 test records), one
//! set of rules for every test crate of the workspace.
//!
//! [`subset_dir`] looks in:
//!
//! 1. `$FLATMIN_TEST_DATA`, when it is set and not empty. It must then hold the subset
//!    (`data_batch_1.bin` and `test_batch.bin`); if it does not, the test fails with a
//!    message naming the variable.
//! 2. `shared/data/cifar10-subset` beside the workspace ([`default_subset_dir`]). A folder
//!    there that lacks the files fails the test too.
//!
//! When neither is there, the test is skipped: it writes
//! `SKIPPED <test>: CIFAR-10 subset not found ...` to the process's standard error, which
//! `cargo test` shows (libtest captures only the `print!` family of macros), and returns. With
//! `FLATMIN_REQUIRE_TEST_DATA=1` (as in CI) the test panics instead.
//!
//! ```no_run
//! #[test]
//! fn reads_the_subset() {
//!     let Some(dir) = flatmin_datasets::test_data::subset_dir() else {
//!         return; // skipped, and said so on stderr
//!     };
//!     let data = flatmin_datasets::Cifar10::open(&dir).unwrap();
//!     assert_eq!(data.test().len(), 2_000);
//! }
//! ```

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The variable naming a folder that holds the subset (it overrides [`default_subset_dir`]).
pub const DATA_VAR: &str = "FLATMIN_TEST_DATA";
/// The variable that turns a missing subset from a skip into a failure (`1`).
pub const REQUIRE_VAR: &str = "FLATMIN_REQUIRE_TEST_DATA";
/// The files a folder must hold to count as the subset.
pub const SUBSET_FILES: [&str; 2] = ["data_batch_1.bin", "test_batch.bin"];

/// `shared/data/cifar10-subset` beside the workspace, i.e.
/// `<workspace>/../shared/data/cifar10-subset`.
///
/// The workspace is found when the test runs: the nearest folder, from the running package's
/// folder up, whose `Cargo.toml` has a `[workspace]` table. The package's folder is
/// `$CARGO_MANIFEST_DIR`, which `cargo test` sets for the tests it runs; a test binary run by
/// hand starts from the folder this crate was built in. (Not the build-time path alone: a
/// test binary built in one checkout and reused from another through a shared target folder
/// would look beside the wrong one.)
pub fn default_subset_dir() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let workspace = workspace_root(&start).unwrap_or(start);
    let beside = workspace.parent().unwrap_or(&workspace);
    beside.join("shared").join("data").join("cifar10-subset")
}

/// The nearest of `dir` and its ancestors whose `Cargo.toml` has a `[workspace]` table.
fn workspace_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml"))
                .is_ok_and(|toml| toml.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
}

/// The folder of the CIFAR-10 subset for the calling test, or `None` when the test should
/// skip (the skip line is already written to stderr).
///
/// See the [module documentation](self) for where it looks. Panics, with a message naming
/// the cause, when `FLATMIN_TEST_DATA` is set but holds no subset, when the default folder
/// exists but lacks the files, when the subset is absent and `FLATMIN_REQUIRE_TEST_DATA=1`,
/// and when `FLATMIN_REQUIRE_TEST_DATA` is neither `0`, `1` nor empty.
pub fn subset_dir() -> Option<PathBuf> {
    let data = std::env::var_os(DATA_VAR);
    let require = std::env::var_os(REQUIRE_VAR);
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    match decide(data.as_deref(), require.as_deref(), &default_subset_dir()) {
        Decision::Found(dir) => Some(dir),
        Decision::Skip(why) => {
            // Straight to the process's stderr: libtest would hide an `eprintln!` of a
            // passing test.
            let line = format!("SKIPPED {test}: {why}\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
        Decision::Fail(why) => panic!("{test}: {why}"),
    }
}

/// What [`subset_dir`] does.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Use this folder.
    Found(PathBuf),
    /// Skip the test, for this reason.
    Skip(String),
    /// Fail the test with this message.
    Fail(String),
}

/// The decision for the values of `FLATMIN_TEST_DATA` and `FLATMIN_REQUIRE_TEST_DATA`, with
/// `fallback` as the default folder.
fn decide(data: Option<&OsStr>, require: Option<&OsStr>, fallback: &Path) -> Decision {
    let required = match require.map(|r| r.to_string_lossy()) {
        None => false,
        Some(r) if r.is_empty() || r == "0" => false,
        Some(r) if r == "1" => true,
        Some(r) => return Decision::Fail(format!("{REQUIRE_VAR}={r}: expected 1 or 0")),
    };
    if let Some(dir) = data.filter(|d| !d.is_empty()) {
        let dir = Path::new(dir);
        return match missing_file(dir) {
            None => Decision::Found(dir.to_path_buf()),
            Some(file) => Decision::Fail(format!(
                "{DATA_VAR}={} holds no CIFAR-10 subset: {} is missing",
                dir.display(),
                file.display()
            )),
        };
    }
    if fallback.exists() {
        return match missing_file(fallback) {
            None => Decision::Found(fallback.to_path_buf()),
            Some(file) => Decision::Fail(format!(
                "the CIFAR-10 subset folder {} is incomplete: {} is missing (set {DATA_VAR} \
                 to a complete copy)",
                fallback.display(),
                file.display()
            )),
        };
    }
    let why = format!(
        "CIFAR-10 subset not found (set {DATA_VAR} or place ../shared/data/cifar10-subset \
         beside the workspace; looked for {})",
        fallback.display()
    );
    if required {
        Decision::Fail(format!("{why}; {REQUIRE_VAR}=1 makes this a failure"))
    } else {
        Decision::Skip(format!("{why}; set {REQUIRE_VAR}=1 to fail instead"))
    }
}

/// The first of [`SUBSET_FILES`] that is not a file in `dir`.
fn missing_file(dir: &Path) -> Option<PathBuf> {
    SUBSET_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| !p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    fn subset(root: &Path) -> PathBuf {
        let dir = root.join("subset");
        std::fs::create_dir_all(&dir).unwrap();
        for f in SUBSET_FILES {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        dir
    }

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn variable_first_then_default_folder() {
        let tmp = TempDir::new("locate");
        let good = subset(tmp.path());
        let absent = tmp.path().join("absent");
        // The variable wins over a valid default folder; empty means unset.
        let d = decide(os(good.to_str().unwrap()), None, &good.join(".."));
        assert_eq!(d, Decision::Found(good.clone()));
        assert_eq!(decide(os(""), None, &good), Decision::Found(good.clone()));
        assert_eq!(decide(None, os("1"), &good), Decision::Found(good.clone()));
        // A variable that names no subset fails, naming the variable and the file.
        let Decision::Fail(msg) = decide(os(absent.to_str().unwrap()), None, &good) else {
            panic!("a bad {DATA_VAR} must fail");
        };
        assert!(
            msg.starts_with(&format!("{DATA_VAR}={}", absent.display())),
            "{msg}"
        );
        assert!(msg.contains("data_batch_1.bin"), "{msg}");
        // A default folder without its files fails; one that is absent skips.
        std::fs::remove_file(good.join("test_batch.bin")).unwrap();
        let Decision::Fail(msg) = decide(None, None, &good) else {
            panic!("an incomplete folder must fail");
        };
        assert!(
            msg.contains("test_batch.bin") && msg.contains(DATA_VAR),
            "{msg}"
        );
        let Decision::Skip(why) = decide(None, os("0"), &absent) else {
            panic!("an absent subset must skip");
        };
        assert!(why.starts_with("CIFAR-10 subset not found"), "{why}");
        assert!(why.contains(DATA_VAR) && why.contains(REQUIRE_VAR), "{why}");
    }

    #[test]
    fn required_turns_a_skip_into_a_failure() {
        let absent = Path::new("/nonexistent/flatmin/cifar10-subset");
        let Decision::Fail(msg) = decide(None, os("1"), absent) else {
            panic!("{REQUIRE_VAR}=1 must fail");
        };
        assert!(
            msg.contains("not found") && msg.contains(REQUIRE_VAR),
            "{msg}"
        );
        assert!(matches!(decide(None, os(""), absent), Decision::Skip(_)));
        let Decision::Fail(msg) = decide(None, os("yes"), absent) else {
            panic!("an unclear {REQUIRE_VAR} must fail");
        };
        assert_eq!(msg, format!("{REQUIRE_VAR}=yes: expected 1 or 0"));
    }

    #[test]
    fn default_folder_is_beside_the_workspace() {
        let dir = default_subset_dir();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert_eq!(
            dir,
            workspace
                .parent()
                .unwrap()
                .join("shared/data/cifar10-subset")
        );
        // The nearest [workspace] manifest counts, not the nearest Cargo.toml.
        let tmp = TempDir::new("workspace-root");
        let member = tmp.path().join("ws").join("member");
        std::fs::create_dir_all(member.join("src")).unwrap();
        std::fs::write(
            tmp.path().join("ws/Cargo.toml"),
            "[workspace]\nmembers = []\n",
        )
        .unwrap();
        std::fs::write(member.join("Cargo.toml"), "[package]\nname = \"m\"\n").unwrap();
        assert_eq!(
            workspace_root(&member.join("src")),
            Some(tmp.path().join("ws"))
        );
        assert_eq!(workspace_root(Path::new("/")), None);
    }
}
