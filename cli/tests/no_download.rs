//! The build without the `download` feature (`cargo test -p flatmin --no-default-features
//! --test no_download`): `data fetch` without `--from` fails at once with one line naming the
//! URL, the missing feature and `--from FILE`, and creates nothing.
#![cfg(not(feature = "download"))]

use std::process::Command;

#[test]
fn data_fetch_without_the_download_feature_suggests_from_file() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-download");
    let _ = std::fs::remove_dir_all(&dir);
    let dest = dir.join("cifar-10-batches-bin");
    let o = Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(["data", "fetch", "cifar10", "--dir", dest.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cifar-10-binary.tar.gz: this flatmin was built without downloads")
            && err.contains("cargo feature `download`")
            && err.contains("pass --from FILE"),
        "{err}"
    );
    assert!(!dest.exists());
}
