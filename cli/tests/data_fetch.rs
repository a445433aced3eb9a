//! `flatmin data fetch cifar10` without the internet: a small HTTP server on 127.0.0.1 (a
//! thread that answers a fixed list of requests and then stops) serves small archives in
//! the layout of the official one (10 records per batch file); the same archives are
//! installed from files with `--from`, and proxies are closed local ports or the test server
//! itself. The expected MD5 and batch size are overridden with the hidden `--md5` /
//! `--batch-bytes` flags (binary runs) or a `ReleaseSpec` (library calls). The installed
//! folders are then found through `FLATMIN_DATA` and `--data`, in both the
//! `cifar-10-batches-bin` and the parent form.

use flate2::write::GzEncoder;
use flatmin::fetch::{
    fetch_release, install_archive, install_from, validate_release, FetchOptions, Fetched,
    HttpOptions, Md5Digest, ReleaseSpec, Silent,
};
use flatmin_datasets::{Cifar10, CLASS_NAMES, RECORD_BYTES};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const RECORDS: usize = 10;
const BATCH_BYTES: u64 = (RECORDS * RECORD_BYTES) as u64;
const RELEASE: &str = "cifar-10-batches-bin";

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-fetch-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sorted names in a folder.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every path under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// A valid batch file of `RECORDS` records (or `records`), labels cycling from `seed`.
fn batch(seed: u8, records: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(records * RECORD_BYTES);
    for i in 0..records {
        v.push((i as u8 + seed) % 10);
        v.extend((0..RECORD_BYTES - 1).map(|j| (i * 7 + j) as u8 ^ seed));
    }
    v
}

enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(&'static str),
    Hardlink(&'static str),
    CharDevice,
}

struct Member {
    name: String,
    kind: Kind,
}

fn file(name: &str, data: Vec<u8>) -> Member {
    Member {
        name: name.into(),
        kind: Kind::File(data),
    }
}

/// The members of the official archive, in its order, with 10-record batches.
fn release_members() -> Vec<Member> {
    let meta = format!("{}\n\n", CLASS_NAMES.join("\n")).into_bytes();
    let p = |n: &str| format!("{RELEASE}/{n}");
    vec![
        Member {
            name: format!("{RELEASE}/"),
            kind: Kind::Dir,
        },
        file(&p("data_batch_1.bin"), batch(1, RECORDS)),
        file(&p("batches.meta.txt"), meta),
        file(&p("data_batch_3.bin"), batch(3, RECORDS)),
        file(&p("data_batch_4.bin"), batch(4, RECORDS)),
        file(&p("test_batch.bin"), batch(9, RECORDS)),
        file(&p("readme.html"), b"<meta http-equiv=refresh>".to_vec()),
        file(&p("data_batch_5.bin"), batch(5, RECORDS)),
        file(&p("data_batch_2.bin"), batch(2, RECORDS)),
    ]
}

/// A `.tar.gz` of the members; names and link targets are written as raw bytes, so that
/// hostile paths (`..`, absolute) can be built.
fn tar_gz(members: &[Member]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for m in members {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_234_567_890);
        h.set_uid(0);
        h.set_gid(0);
        let (kind, mode, data, link): (tar::EntryType, u32, &[u8], &str) = match &m.kind {
            Kind::File(d) => (tar::EntryType::Regular, 0o644, d, ""),
            Kind::Dir => (tar::EntryType::Directory, 0o755, &[], ""),
            Kind::Symlink(t) => (tar::EntryType::Symlink, 0o777, &[], t),
            Kind::Hardlink(t) => (tar::EntryType::Link, 0o644, &[], t),
            Kind::CharDevice => (tar::EntryType::Char, 0o644, &[], ""),
        };
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        assert!(m.name.len() < 100 && link.len() < 100);
        old.name = [0; 100];
        old.name[..m.name.len()].copy_from_slice(m.name.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn spec_for(archive: &[u8]) -> ReleaseSpec {
    ReleaseSpec {
        md5: Md5Digest::of(archive),
        batch_bytes: BATCH_BYTES,
    }
}

/// What the test server answers to one request.
enum Reply {
    /// 200 with this body and its Content-Length.
    Body(Vec<u8>),
    /// This status, with a short body.
    Status(u16, &'static str),
    /// 200 announcing `declared` bytes, sending `body`, then closing the connection.
    Truncated { declared: usize, body: Vec<u8> },
    /// Reads the request, sends nothing for this long, closes.
    Silent(Duration),
    /// 200 without a Content-Length: this body, then the connection is closed.
    Unsized(Vec<u8>),
}

/// Serves `replies` to the next connections on 127.0.0.1, one each, then stops (also when
/// nobody connects within 30 s). Returns the URL and the thread (joined: requests served).
fn serve(replies: Vec<Reply>) -> (String, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!(
        "http://{}/~kriz/cifar-10-binary.tar.gz",
        listener.local_addr().unwrap()
    );
    let handle = std::thread::spawn(move || {
        let mut served = 0;
        for reply in replies {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return served;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return served,
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            // Origin form, or absolute form when the server plays an HTTP proxy.
            let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            assert!(
                line.starts_with("GET ")
                    && line.ends_with("/~kriz/cifar-10-binary.tar.gz HTTP/1.1")
                    && (line.starts_with("GET /") || line.starts_with("GET http://")),
                "{line}"
            );
            let head = |status: &str, len: usize| {
                format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            };
            // The client may hang up first (it refused the reply); ignore write errors.
            let _ = match reply {
                Reply::Body(body) => stream
                    .write_all(head("200 OK", body.len()).as_bytes())
                    .and_then(|()| stream.write_all(&body)),
                Reply::Status(code, text) => {
                    let body = format!("{code} {text}\n");
                    stream
                        .write_all(head(&format!("{code} {text}"), body.len()).as_bytes())
                        .and_then(|()| stream.write_all(body.as_bytes()))
                }
                Reply::Truncated { declared, body } => stream
                    .write_all(head("200 OK", declared).as_bytes())
                    .and_then(|()| stream.write_all(&body)),
                Reply::Silent(d) => {
                    std::thread::sleep(d);
                    Ok(())
                }
                Reply::Unsized(body) => stream
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    .and_then(|()| stream.write_all(&body)),
            };
            let _ = stream.flush();
            drop(stream);
            served += 1;
        }
        served
    });
    (url, handle)
}

/// The variables that choose a proxy; removed for every run, set by the proxy tests.
const PROXY_VARS: [&str; 6] = [
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// Runs the binary with an isolated cache folder, no `FLATMIN_DATA` and no proxy.
fn flatmin(args: &[&str], cwd: &Path) -> Output {
    flatmin_env(args, cwd, &[])
}

/// [`flatmin`] with these environment variables set.
fn flatmin_env(args: &[&str], cwd: &Path, vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatmin"));
    cmd.args(args)
        .current_dir(cwd)
        .env("XDG_CACHE_HOME", cwd.join("xdg"))
        .env_remove("FLATMIN_DATA");
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fast_http() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        proxy: None,
    }
}

fn options(url: &str, dest: &Path, spec: ReleaseSpec) -> FetchOptions {
    FetchOptions {
        url: url.into(),
        spec,
        http: fast_http(),
        ..FetchOptions::new(dest)
    }
}

/// An address on which nothing listens (the port of a listener that was just closed).
fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A URL on which nothing listens.
fn dead_url() -> String {
    format!("http://{}/x.tar.gz", dead_addr())
}

fn assert_installed(dest: &Path) {
    let data = Cifar10::open(dest).unwrap();
    assert_eq!(data.train().len(), 5 * RECORDS);
    assert_eq!(data.test().len(), RECORDS);
    assert_eq!(data.class_names(), CLASS_NAMES);
    assert_eq!(data.train().labels[..3], [1, 2, 3]);
    assert_eq!(
        std::fs::read(dest.join("test_batch.bin")).unwrap(),
        batch(9, RECORDS)
    );
    // The release files, readme.html skipped.
    assert_eq!(
        names(dest),
        [
            "batches.meta.txt",
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin"
        ]
    );
}

#[test]
fn binary_installs_then_second_fetch_is_a_no_op() {
    let dir = tmp("success");
    let archive = tar_gz(&release_members());
    let md5 = Md5Digest::of(&archive).to_string();
    let (url, server) = serve(vec![Reply::Body(archive)]);
    let dest = dir.join("cache").join(RELEASE);
    let dest_s = dest.to_str().unwrap();
    let args = [
        "data",
        "fetch",
        "cifar10",
        "--dir",
        dest_s,
        "--url",
        &url,
        "--md5",
        &md5,
        "--batch-bytes",
        "30730",
    ];
    let out = flatmin(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("downloading {url}")), "{stdout}");
    assert!(
        stdout.contains(&format!("installed CIFAR-10 into {dest_s}")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("MD5 {md5} verified")), "{stdout}");
    assert!(
        stdout.contains("50 training and 10 test images"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("--data {dest_s}")), "{stdout}");
    assert_eq!(server.join().unwrap(), 1);
    assert_installed(&dest);
    assert_eq!(
        names(&dir.join("cache")),
        [RELEASE],
        "temporaries left behind"
    );

    // The server is gone: a second fetch succeeds only because it downloads nothing.
    let out = flatmin(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("{dest_s} already holds CIFAR-10")),
        "{stdout}"
    );
    assert!(stdout.contains("nothing to do"), "{stdout}");
    assert_installed(&dest);

    // --quiet prints nothing.
    let mut quiet = args.to_vec();
    quiet.push("--quiet");
    let out = flatmin(&quiet, &dir);
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
}

#[test]
fn binary_default_folder_is_found_by_data_auto() {
    let dir = tmp("default-dest");
    let archive = tar_gz(&release_members());
    let md5 = Md5Digest::of(&archive).to_string();
    let (url, server) = serve(vec![Reply::Body(archive)]);
    let args = [
        "data",
        "fetch",
        "cifar10",
        "--url",
        &url,
        "--md5",
        &md5,
        "--batch-bytes",
        "30730",
    ];
    let out = flatmin(&args, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.join().unwrap(), 1);
    let dest = dir.join("xdg").join("flatmin").join(RELEASE);
    assert_installed(&dest);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("`--data auto` finds it"), "{stdout}");
}

#[test]
fn binary_checksum_mismatch_installs_nothing() {
    let dir = tmp("checksum");
    let archive = tar_gz(&release_members());
    let actual = Md5Digest::of(&archive).to_string();
    let wrong = "0123456789abcdef0123456789abcdef";
    let (url, server) = serve(vec![Reply::Body(archive)]);
    let dest = dir.join("cache").join(RELEASE);
    let out = flatmin(
        &[
            "data",
            "fetch",
            "cifar10",
            "--dir",
            dest.to_str().unwrap(),
            "--url",
            &url,
            "--md5",
            wrong,
            "--batch-bytes",
            "30730",
            "--quiet",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for part in ["MD5 mismatch", wrong, &actual, &url] {
        assert!(stderr.contains(part), "{part} missing: {stderr}");
    }
    assert_eq!(server.join().unwrap(), 1);
    assert!(!dest.exists());
    assert!(
        names(&dir.join("cache")).is_empty(),
        "temporaries left behind"
    );
}

#[test]
fn binary_flag_errors_are_usage_errors_and_fetch_errors_one_line() {
    let dir = tmp("flags");
    for (args, part) in [
        (vec!["data", "fetch", "cifar100"], "cifar100"),
        (vec!["data", "fetch", "cifar10", "--md5", "xyz"], "--md5"),
        (
            vec!["data", "fetch", "cifar10", "--batch-bytes", "3074"],
            "--batch-bytes",
        ),
    ] {
        // clap's own report: the error naming the value, then usage and --help lines.
        let out = flatmin(&args, &dir);
        assert_eq!(out.status.code(), Some(2));
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.lines().next().unwrap().contains(part),
            "{stderr}"
        );
        assert!(
            stderr.contains("For more information, try '--help'."),
            "{stderr}"
        );
    }
    // Nothing listens: a one-line error naming the URL.
    let url = dead_url();
    let out = flatmin(
        &[
            "data", "fetch", "cifar10", "--dir", "out", "--url", &url, "--quiet",
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(&format!("error: {url}: ")), "{stderr}");
    assert!(
        names(&dir).iter().all(|n| n == "out" || n == "xdg"),
        "{:?}",
        names(&dir)
    );
    assert!(!dir.join("out").exists() || names(&dir.join("out")).is_empty());
}

#[test]
fn http_404_names_status_and_url() {
    let dir = tmp("404");
    let (url, server) = serve(vec![Reply::Status(404, "Not Found")]);
    let dest = dir.join(RELEASE);
    let spec = spec_for(b"");
    let err = fetch_release(&options(&url, &dest, spec), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
    assert_eq!(server.join().unwrap(), 1);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
}

#[test]
fn broken_connection_names_bytes_received() {
    let dir = tmp("broken");
    let archive = tar_gz(&release_members());
    let declared = archive.len();
    let (url, server) = serve(vec![Reply::Truncated {
        declared,
        body: archive[..1000].to_vec(),
    }]);
    let dest = dir.join(RELEASE);
    let err = fetch_release(&options(&url, &dest, spec_for(&archive)), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains(&format!("1000 of {declared} bytes")), "{msg}");
    assert_eq!(server.join().unwrap(), 1);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
}

#[test]
fn silent_server_times_out() {
    let dir = tmp("silent");
    let (url, server) = serve(vec![Reply::Silent(Duration::from_secs(4))]);
    let dest = dir.join(RELEASE);
    let mut opts = options(&url, &dest, spec_for(b""));
    opts.http.read_timeout = Duration::from_millis(500);
    let start = Instant::now();
    let err = fetch_release(&opts, &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(msg.contains(&url), "{msg}");
    assert!(
        msg.to_lowercase().contains("timed out") || msg.contains("timeout"),
        "{msg}"
    );
    assert_eq!(server.join().unwrap(), 1);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
}

/// Installs `members` from an archive file with the library and expects an error containing
/// `part`; nothing may be written at the destination, next to it, or outside.
fn refused(name: &str, members: Vec<Member>, part: &str) {
    let dir = tmp(&format!("refuse-{name}"));
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let archive = tar_gz(&members);
    let path = dir.join("archive.tar.gz");
    std::fs::write(&path, &archive).unwrap();
    let dest = work.join(RELEASE);
    let err = install_archive(&path, &dest, &spec_for(&archive), false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(part), "{name}: {part:?} not in: {msg}");
    assert!(
        msg.contains("archive.tar.gz"),
        "{name}: file not named: {msg}"
    );
    assert!(!dest.exists(), "{name}");
    assert!(names(&work).is_empty(), "{name}: {:?}", names(&work));
    assert_eq!(names(&dir), ["archive.tar.gz", "work"], "{name}");
}

fn with(extra: Member) -> Vec<Member> {
    let mut v = release_members();
    v.push(extra);
    v
}

#[test]
fn hostile_and_malformed_archives_are_refused() {
    refused(
        "dotdot",
        with(file("../evil", b"x".to_vec())),
        "'..' component",
    );
    refused(
        "dotdot-inside",
        with(file(&format!("{RELEASE}/../../evil"), b"x".to_vec())),
        "'..' component",
    );
    let absolute = std::env::temp_dir().join(format!("flatmin-evil-{}", std::process::id()));
    refused(
        "absolute",
        with(file(absolute.to_str().unwrap(), b"x".to_vec())),
        "absolute path",
    );
    assert!(!absolute.exists());
    // A link in place of a batch file (listed first, so nothing was written yet) and after
    // the real one.
    let mut members = release_members();
    members[1] = Member {
        name: format!("{RELEASE}/data_batch_1.bin"),
        kind: Kind::Symlink("/etc/passwd"),
    };
    refused("symlink", members, "symbolic link");
    refused(
        "symlink-extra",
        with(Member {
            name: format!("{RELEASE}/evil"),
            kind: Kind::Symlink("../../.."),
        }),
        "symbolic link",
    );
    refused(
        "hardlink",
        with(Member {
            name: format!("{RELEASE}/test_batch.bin"),
            kind: Kind::Hardlink("/etc/passwd"),
        }),
        "hard link",
    );
    refused(
        "device",
        with(Member {
            name: format!("{RELEASE}/null"),
            kind: Kind::CharDevice,
        }),
        "character device",
    );
    refused(
        "unexpected",
        with(file(&format!("{RELEASE}/extra.bin"), batch(0, RECORDS))),
        "not a file of the CIFAR-10 binary release",
    );
    refused(
        "top-level",
        with(file("readme.html", b"x".to_vec())),
        "not a file of the CIFAR-10 binary release",
    );
    refused(
        "duplicate",
        with(file(
            &format!("{RELEASE}/data_batch_2.bin"),
            batch(2, RECORDS),
        )),
        "appears twice",
    );
    let mut members = release_members();
    members[4] = file(
        &format!("{RELEASE}/data_batch_4.bin"),
        batch(4, RECORDS + 1),
    );
    refused("size", members, "33803 bytes, expected 30730 (10 records)");
    let mut members = release_members();
    members.retain(|m| !m.name.ends_with("test_batch.bin"));
    refused(
        "missing",
        members,
        "lacks cifar-10-batches-bin/test_batch.bin",
    );
    let mut members = release_members();
    members[2] = file(&format!("{RELEASE}/batches.meta.txt"), b"a\nb\n".to_vec());
    refused("meta", members, "2 class names");
    let mut members = release_members();
    members[5] = file(&format!("{RELEASE}/test_batch.bin"), {
        let mut b = batch(9, RECORDS);
        b[RECORD_BYTES] = 10;
        b
    });
    refused("label", members, "label byte 10");
}

#[test]
fn damaged_streams_are_refused() {
    let dir = tmp("damaged");
    let archive = tar_gz(&release_members());
    let spec = spec_for(&archive);
    let dest = dir.join(RELEASE);
    for (name, bytes) in [
        ("not gzip", b"<html>not found</html>".to_vec()),
        ("truncated", archive[..archive.len() / 2].to_vec()),
        ("gzip of junk", {
            let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&[7u8; 2000]).unwrap();
            e.finish().unwrap()
        }),
    ] {
        let err = install_from(&bytes[..], "test archive", &dest, &spec, false).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("test archive: "), "{name}: {msg}");
        assert!(names(&dir).is_empty(), "{name}: {:?}", names(&dir));
    }
    // A damaged tail (after the last member) fails the gzip CRC check.
    let mut bad = archive.clone();
    let n = bad.len();
    bad[n - 8] ^= 0xff;
    let err = install_from(&bad[..], "test archive", &dest, &spec, false).unwrap_err();
    assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    assert!(names(&dir).is_empty());
    // The intact archive installs.
    let info = install_from(&archive[..], "test archive", &dest, &spec, false).unwrap();
    assert_eq!((info.train, info.test), (5 * RECORDS, RECORDS));
    assert_installed(&dest);
}

#[test]
fn hostile_archive_over_http_leaves_nothing() {
    let dir = tmp("hostile-http");
    let archive = tar_gz(&with(file("../evil", b"x".to_vec())));
    let (url, server) = serve(vec![Reply::Body(archive.clone())]);
    let dest = dir.join("cache").join(RELEASE);
    let err = fetch_release(&options(&url, &dest, spec_for(&archive)), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("archive from {url}")), "{msg}");
    assert!(msg.contains("archive member '../evil'"), "{msg}");
    assert_eq!(server.join().unwrap(), 1);
    assert!(
        walk(&dir).iter().all(|p| p == &dir.join("cache")),
        "{:?}",
        walk(&dir)
    );
}

#[test]
fn existing_destination_is_kept_or_replaced_atomically() {
    let dir = tmp("existing");
    let archive = tar_gz(&release_members());
    let spec = spec_for(&archive);
    let dest = dir.join(RELEASE);

    // Something that is not a release: refused without downloading (nothing listens).
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("notes.txt"), "mine").unwrap();
    let err = fetch_release(&options(&dead_url(), &dest, spec), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not a complete CIFAR-10 release") && msg.contains("--force"),
        "{msg}"
    );
    assert!(msg.contains("data_batch_1.bin: missing"), "{msg}");
    assert_eq!(names(&dest), ["notes.txt"]);
    assert!(validate_release(&dest, &spec).is_err());

    // --force installs the release beside it; notes.txt stays.
    let (url, server) = serve(vec![Reply::Body(archive.clone())]);
    let mut opts = options(&url, &dest, spec);
    opts.force = true;
    let fetched = fetch_release(&opts, &mut Silent).unwrap();
    assert!(matches!(fetched, Fetched::Installed { bytes, .. } if bytes == archive.len() as u64));
    assert_eq!(server.join().unwrap(), 1);
    assert_eq!(
        std::fs::read_to_string(dest.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(dest.join("notes.txt")).unwrap();
    assert_installed(&dest);
    assert_eq!(names(&dir), [RELEASE], "temporaries left behind");

    // Now valid: reported as present without a download.
    let got = fetch_release(&options(&dead_url(), &dest, spec), &mut Silent).unwrap();
    assert!(
        matches!(got, Fetched::AlreadyPresent(i) if i.train == 5 * RECORDS && i.test == RECORDS)
    );
    // A folder unpacked by hand, with readme.html, also counts.
    std::fs::write(dest.join("readme.html"), "x").unwrap();
    assert!(validate_release(&dest, &spec).is_ok());
    // A truncated batch file does not.
    let f = std::fs::File::options()
        .write(true)
        .open(dest.join("data_batch_2.bin"))
        .unwrap();
    f.set_len(BATCH_BYTES - RECORD_BYTES as u64).unwrap();
    let err = validate_release(&dest, &spec).unwrap_err().to_string();
    assert!(
        err.contains("data_batch_2.bin") && err.contains("expected 30730"),
        "{err}"
    );

    // An empty folder is simply filled.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (url, server) = serve(vec![Reply::Body(archive.clone())]);
    fetch_release(&options(&url, &empty, spec), &mut Silent).unwrap();
    assert_eq!(server.join().unwrap(), 1);
    assert_installed(&empty);

    // The library refuses to replace without `replace`.
    let err = install_from(&archive[..], "a", &empty, &spec, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

/// The release files in the order of [`release_members`]'s data, and the bytes each holds
/// after an install of that archive.
fn release_contents() -> Vec<(String, Vec<u8>)> {
    release_members()
        .into_iter()
        .filter_map(|m| match m.kind {
            Kind::File(d) if !m.name.ends_with("readme.html") => {
                Some((m.name[RELEASE.len() + 1..].to_string(), d))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn force_replaces_only_the_release_files() {
    let dir = tmp("force-keeps");
    let (file, md5) = archive_file(&dir);
    let dest = dir.join("cache").join(RELEASE);
    let dest_s = dest.to_str().unwrap();
    let args = fetch_args(&md5, &["--from", file.to_str().unwrap(), "--dir", dest_s]);
    // The user's own files, and an old, damaged copy of two release files.
    std::fs::create_dir_all(dest.join("sub")).unwrap();
    std::fs::write(dest.join("notes.txt"), "mine").unwrap();
    std::fs::write(dest.join("sub/inner.txt"), "deep").unwrap();
    std::fs::write(dest.join("data_batch_1.bin"), "old").unwrap();
    std::fs::write(dest.join("batches.meta.txt"), "old").unwrap();
    let before: Vec<_> = walk(&dest)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| (std::fs::read(&p).unwrap(), p))
        .collect();

    // Without --force: refused, saying what --force would replace; nothing changes.
    let err = error_line(&flatmin(&args, &dir));
    for part in [
        format!("error: {dest_s} already exists but is not a complete CIFAR-10 release"),
        "pass --force to replace data_batch_1.bin to data_batch_5.bin, test_batch.bin and \
         batches.meta.txt in it (its other files are left alone)"
            .to_string(),
    ] {
        assert!(err.contains(&part), "{part:?} not in: {err}");
    }
    for (bytes, p) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{}", p.display());
    }

    // --force: the release files are replaced, the user's files are untouched.
    let mut forced = args.clone();
    forced.push("--force");
    let out = flatmin(&forced, &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (name, bytes) in release_contents() {
        assert_eq!(std::fs::read(dest.join(&name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(dest.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("sub/inner.txt")).unwrap(),
        "deep"
    );
    assert_eq!(names(&dest).len(), 7 + 2, "{:?}", names(&dest));
    assert_eq!(names(&dir.join("cache")), [RELEASE], "temporaries left");
    let data = Cifar10::open(&dest).unwrap();
    assert_eq!(
        (data.train().len(), data.test().len()),
        (5 * RECORDS, RECORDS)
    );
    // The release beside other files counts as installed.
    let out = flatmin(&args, &dir);
    assert!(text(&out.stdout).contains("nothing to do"), "{out:?}");
}

#[test]
fn force_refuses_a_folder_or_link_where_a_release_file_goes() {
    let dir = tmp("force-squat");
    let (file, md5) = archive_file(&dir);
    let dest = dir.join("cache").join(RELEASE);
    let dest_s = dest.to_str().unwrap();
    let args = fetch_args(
        &md5,
        &["--from", file.to_str().unwrap(), "--dir", dest_s, "--force"],
    );
    std::fs::create_dir_all(dest.join("test_batch.bin")).unwrap();
    std::fs::write(dest.join("test_batch.bin/keep.txt"), "kept").unwrap();
    std::fs::write(dest.join("notes.txt"), "mine").unwrap();
    let before = walk(&dir);
    let err = error_line(&flatmin(&args, &dir));
    let path = dest.join("test_batch.bin");
    assert!(
        err.contains(&format!(
            "{}: a folder where the release has a file",
            path.display()
        )) && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(walk(&dir), before, "something was written or removed");
    assert_eq!(
        std::fs::read_to_string(dest.join("test_batch.bin/keep.txt")).unwrap(),
        "kept"
    );

    // A link in place of a release file is refused the same way, and so is a destination
    // that is a file, not a folder.
    std::fs::remove_dir_all(dest.join("test_batch.bin")).unwrap();
    std::os::unix::fs::symlink("notes.txt", dest.join("data_batch_2.bin")).unwrap();
    let err = error_line(&flatmin(&args, &dir));
    assert!(err.contains("data_batch_2.bin: a link where"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dest.join("notes.txt")).unwrap(),
        "mine"
    );
    let plain = dir.join("plain");
    std::fs::write(&plain, "x").unwrap();
    let plain_args = fetch_args(
        &md5,
        &[
            "--from",
            file.to_str().unwrap(),
            "--dir",
            "plain",
            "--force",
        ],
    );
    let err = error_line(&flatmin(&plain_args, &dir));
    assert!(err.contains("plain: not a folder but a file"), "{err}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "x");
}

/// The small archive, written to `dir/cifar-10-binary.tar.gz`, and its MD5.
fn archive_file(dir: &Path) -> (PathBuf, String) {
    let archive = tar_gz(&release_members());
    let path = dir.join("cifar-10-binary.tar.gz");
    std::fs::write(&path, &archive).unwrap();
    (path, Md5Digest::of(&archive).to_string())
}

/// `data fetch cifar10` expecting the small archive with MD5 `md5`, then `extra`.
fn fetch_args<'a>(md5: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "data",
        "fetch",
        "cifar10",
        "--md5",
        md5,
        "--batch-bytes",
        "30730",
    ];
    v.extend(extra);
    v
}

/// The one `error: ` line of a failed run with status 1.
fn error_line(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr.trim_end().to_string()
}

#[test]
fn binary_installs_from_a_local_archive() {
    let dir = tmp("from");
    let (file, md5) = archive_file(&dir);
    let file_s = file.to_str().unwrap();
    let dest = dir.join("cache").join(RELEASE);
    let dest_s = dest.to_str().unwrap();
    // No server and a proxy that goes nowhere: nothing touches the network.
    let dead = format!("http://{}", dead_addr());
    let args = fetch_args(&md5, &["--from", file_s, "--dir", dest_s]);
    let out = flatmin_env(&args, &dir, &[("HTTPS_PROXY", &dead)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for part in [
        format!("installed CIFAR-10 into {dest_s}"),
        format!(" of {file_s}, MD5 {md5} verified"),
        "50 training and 10 test images".to_string(),
    ] {
        assert!(stdout.contains(&part), "{part} missing: {stdout}");
    }
    assert_installed(&dest);
    assert_eq!(names(&dir.join("cache")), [RELEASE], "temporaries left");
    assert!(file.is_file(), "the archive stays where it was");
    // Already installed: nothing to do, as for a download.
    let out = flatmin(&args, &dir);
    assert!(text(&out.stdout).contains("nothing to do"), "{out:?}");
    // --from replaces --url; both together are a usage error.
    let out = flatmin(
        &["data", "fetch", "cifar10", "--from", file_s, "--url", &dead],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--from"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_local_archive_is_named() {
    let dir = tmp("from-bad");
    let (_, md5) = archive_file(&dir);
    let dest = dir.join("cache").join(RELEASE);
    let dest_s = dest.to_str().unwrap();
    let missing = dir.join("nope.tar.gz");
    let missing_s = missing.to_str().unwrap();
    let out = flatmin(
        &fetch_args(&md5, &["--from", missing_s, "--dir", dest_s]),
        &dir,
    );
    let line = error_line(&out);
    assert!(
        line.contains(&format!("{missing_s}: no such archive file")),
        "{line}"
    );

    // Not the archive (a saved error page): an MD5 mismatch naming the file.
    let junk = dir.join("cifar-10-binary.tar.gz");
    std::fs::write(&junk, b"<html>Not Found</html>").unwrap();
    let junk_s = junk.to_str().unwrap();
    let out = flatmin(
        &fetch_args(&md5, &["--from", junk_s, "--dir", dest_s]),
        &dir,
    );
    let line = error_line(&out);
    for part in [
        &format!("error: {junk_s}: MD5 mismatch"),
        &md5,
        "the file is damaged",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    // With its own MD5 accepted, it still fails to extract, naming the file.
    let junk_md5 = Md5Digest::of(b"<html>Not Found</html>").to_string();
    let args = fetch_args(&junk_md5, &["--from", junk_s, "--dir", dest_s]);
    let line = error_line(&flatmin(&args, &dir));
    assert!(line.starts_with(&format!("error: {junk_s}: ")), "{line}");
    assert!(!dest.exists());
    assert!(!dir.join("cache").exists() || names(&dir.join("cache")).is_empty());
}

#[test]
fn https_proxy_is_used_and_named_in_errors() {
    let dir = tmp("proxy-dead");
    let proxy = format!("http://{}", dead_addr());
    // A host that does not exist: only the proxy is ever contacted.
    let url = "https://cifar.invalid/~kriz/cifar-10-binary.tar.gz";
    let args = [
        "data", "fetch", "cifar10", "--dir", "out", "--url", url, "--quiet",
    ];
    for var in ["HTTPS_PROXY", "https_proxy"] {
        let line = error_line(&flatmin_env(&args, &dir, &[(var, &proxy)]));
        let want = format!("error: {url} (through the proxy {proxy} set by {var}): ");
        assert!(line.starts_with(&want), "{line}");
    }
    // An unusable proxy setting is an error naming the variable.
    let line = error_line(&flatmin_env(
        &args,
        &dir,
        &[("HTTPS_PROXY", "https://p:3128")],
    ));
    assert!(
        line.starts_with("error: HTTPS_PROXY=https://p:3128: not a usable proxy"),
        "{line}"
    );
    assert!(!dir.join("out").exists());
}

#[test]
fn http_proxy_carries_the_download_and_no_proxy_bypasses_it() {
    let dir = tmp("proxy-http");
    let archive = tar_gz(&release_members());
    let md5 = Md5Digest::of(&archive).to_string();
    // The test server plays the proxy: it receives the request for a host that does not
    // exist, in absolute form, and answers it.
    let (server_url, server) = serve(vec![Reply::Body(archive.clone())]);
    let addr = server_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap();
    let proxy = format!("http://{addr}");
    let dest = dir.join("via-proxy");
    let url = "http://cifar.invalid/~kriz/cifar-10-binary.tar.gz";
    let args = fetch_args(&md5, &["--url", url, "--dir", dest.to_str().unwrap()]);
    let out = flatmin_env(&args, &dir, &[("http_proxy", &proxy)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.join().unwrap(), 1);
    assert_installed(&dest);

    // NO_PROXY naming the host: the (dead) proxy is bypassed.
    let (url, server) = serve(vec![Reply::Body(archive)]);
    let dest = dir.join("direct");
    let args = fetch_args(&md5, &["--url", &url, "--dir", dest.to_str().unwrap()]);
    let dead = format!("http://{}", dead_addr());
    let vars = [
        ("HTTP_PROXY", dead.as_str()),
        ("NO_PROXY", "localhost,127.0.0.1"),
    ];
    let out = flatmin_env(&args, &dir, &vars);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.join().unwrap(), 1);
    assert_installed(&dest);
}

/// Installs the small release into `root/cifar-10-batches-bin` and returns `root`.
fn installed_root(root: PathBuf) -> PathBuf {
    let archive = tar_gz(&release_members());
    install_from(
        &archive[..],
        "test",
        &root.join(RELEASE),
        &spec_for(&archive),
        false,
    )
    .unwrap();
    root
}

/// A one-epoch `flatmin train` on the small release in `dir`, with `extra` flags and `vars`;
/// returns the run's output and, when it succeeded, its data origin from `config.json`.
fn train_on(dir: &Path, extra: &[&str], vars: &[(&str, &str)]) -> (Output, Option<String>) {
    let mut args = vec![
        "train",
        "--model",
        "tiny-tanh",
        "--epochs",
        "1",
        "--train-size",
        "50",
        "--test-size",
        "10",
        "--batch-size",
        "10",
        "--warmup",
        "0",
        "--quiet",
        "--overwrite",
        "--out",
        "run",
    ];
    args.extend(extra);
    let out = flatmin_env(&args, dir, vars);
    let origin = out.status.success().then(|| {
        let config = std::fs::read_to_string(dir.join("run/config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        config["dataset"]["origin"].as_str().unwrap().to_string()
    });
    (out, origin)
}

#[test]
fn flatmin_data_and_data_flag_take_the_release_or_its_parent() {
    let dir = tmp("flatmin-data");
    let root = installed_root(dir.join("datasets"));
    let release = root.join(RELEASE);
    let (root_s, release_s) = (root.to_str().unwrap(), release.to_str().unwrap());
    // (flags, FLATMIN_DATA)
    let cases = [
        (vec![], Some(root_s)),
        (vec![], Some(release_s)),
        (vec!["--data", root_s], None),
        (vec!["--data", release_s], None),
    ];
    for (extra, env) in cases {
        let vars: Vec<(&str, &str)> = env.map(|e| ("FLATMIN_DATA", e)).into_iter().collect();
        let (out, origin) = train_on(&dir, &extra, &vars);
        assert!(
            out.status.success(),
            "{extra:?} {vars:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(origin.as_deref(), Some(release_s), "{extra:?} {vars:?}");
    }
    // `data fetch` says that auto finds a folder that FLATMIN_DATA names by its parent.
    let (file, md5) = archive_file(&dir);
    let args = fetch_args(
        &md5,
        &["--from", file.to_str().unwrap(), "--dir", release_s],
    );
    let out = flatmin_env(&args, &dir, &[("FLATMIN_DATA", root_s)]);
    assert!(
        text(&out.stdout).contains("`--data auto` finds it"),
        "{out:?}"
    );
}

#[test]
fn flatmin_data_without_cifar10_is_an_error_naming_it() {
    let dir = tmp("flatmin-data-bad");
    // A valid release where auto would look next: FLATMIN_DATA must not fall back to it.
    installed_root(dir.join("data"));
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("cifar-10-batches-bin")).unwrap();
    let absent = dir.join("absent");
    let a_file = dir.join("a-file.bin");
    std::fs::write(&a_file, b"not a folder").unwrap();
    // A release whose batch file is damaged: the error names FLATMIN_DATA and the file.
    let damaged = installed_root(dir.join("damaged"));
    std::fs::write(damaged.join(RELEASE).join("test_batch.bin"), [0u8; 100]).unwrap();
    for (bad, why) in [
        (&empty, "no CIFAR-10 batch files"),
        (&absent, "no such folder"),
        (&a_file, "not a folder"),
        (&damaged, "test_batch.bin"),
    ] {
        let bad = bad.to_str().unwrap();
        let (out, _) = train_on(&dir, &[], &[("FLATMIN_DATA", bad)]);
        let line = error_line(&out);
        assert!(
            line.starts_with(&format!("error: FLATMIN_DATA={bad}")) && line.contains(why),
            "{line}"
        );
        assert!(
            !line.contains("--data"),
            "an unset --data is blamed: {line}"
        );
    }
    // Unset (or empty), auto finds ./data/cifar-10-batches-bin.
    let want = Path::new("data").join(RELEASE);
    for vars in [&[][..], &[("FLATMIN_DATA", "")][..]] {
        let (out, origin) = train_on(&dir, &[], vars);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(origin.as_deref(), want.to_str());
    }
    // --data naming a folder with neither form: an error naming --data.
    let (out, _) = train_on(&dir, &["--data", empty.to_str().unwrap()], &[]);
    let line = error_line(&out);
    assert!(
        line.starts_with(&format!("error: --data {}", empty.display())),
        "{line}"
    );
}

/// The download is bounded by the largest archive the release can be
/// (`ReleaseSpec::max_archive_bytes`: here about 4.4 MB, for the official release about
/// 212 MB against its 170 MB): a larger Content-Length is refused before the body is read,
/// a body without one is stopped as soon as it passes the limit, and a `--from` file larger
/// than the limit (a 1 TiB sparse file) or a FIFO is refused before it is read. Nothing is
/// left behind.
#[test]
fn downloads_and_local_archives_are_bounded_in_size() {
    let archive = tar_gz(&release_members());
    let spec = spec_for(&archive);
    let max = spec.max_archive_bytes();
    assert!(max > archive.len() as u64 && max < 5 << 20, "{max}");
    let official = ReleaseSpec::official().max_archive_bytes();
    assert!((180_000_000..250_000_000).contains(&official), "{official}");

    let dir = tmp("too-large-declared");
    let declared = 1usize << 40;
    let (url, server) = serve(vec![Reply::Truncated {
        declared,
        body: vec![0; 1000],
    }]);
    let dest = dir.join(RELEASE);
    let err = fetch_release(&options(&url, &dest, spec), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&url)
            && msg.contains(&format!("announces {declared} bytes"))
            && msg.contains(&format!("{max}-byte limit")),
        "{msg}"
    );
    assert_eq!(server.join().unwrap(), 1);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));

    let dir = tmp("too-large-stream");
    let (url, server) = serve(vec![Reply::Unsized(vec![7; max as usize + (1 << 20)])]);
    let dest = dir.join(RELEASE);
    let err = fetch_release(&options(&url, &dest, spec), &mut Silent).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&url) && msg.contains(&format!("exceeds the {max}-byte limit")),
        "{msg}"
    );
    assert_eq!(server.join().unwrap(), 1);
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));

    // The same body within the limit is read to its end (and then fails its MD5).
    let dir = tmp("unsized-ok");
    let (url, server) = serve(vec![Reply::Unsized(archive.clone())]);
    let dest = dir.join(RELEASE);
    let got = fetch_release(&options(&url, &dest, spec), &mut Silent);
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(server.join().unwrap(), 1);

    let dir = tmp("too-large-local");
    let huge = dir.join("cifar-10-binary.tar.gz");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let fifo = dir.join("fifo.tar.gz");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let dest = dir.join("cache").join(RELEASE);
    for (from, want) in [(&huge, "more than the"), (&fifo, "is a FIFO")] {
        let opts = FetchOptions {
            from: Some(from.clone()),
            ..options(&dead_url(), &dest, spec)
        };
        let err = fetch_release(&opts, &mut Silent).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(from.to_str().unwrap()) && msg.contains(want),
            "{msg}"
        );
        assert!(!dir.join("cache").exists() || names(&dir.join("cache")).is_empty());
    }
}
