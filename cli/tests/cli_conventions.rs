//! The command line as a user meets it (issue 16): clap's own usage errors with their tips,
//! "did you mean" for misspelt names, grouped `train --help`, hidden old flag names, shell
//! completions, manual pages, colour and live progress decided by `NO_COLOR`, `TERM=dumb`
//! and whether stderr is a terminal. Every test runs the real binary; the terminal tests
//! run it under a pseudo-terminal with `script(1)` (skipped, with a note, where it is absent).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_flatmin");

fn flatmin(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli-conventions", name)
}

/// Runs `flatmin ARGS` on a pseudo-terminal (stdout and stderr both on it) with the
/// environment `vars` added (and `NO_COLOR` removed unless given); returns what the terminal
/// showed, or `None` where `script(1)` is missing.
fn on_terminal(args: &[&str], vars: &[(&str, &str)]) -> Option<String> {
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(script) = script else {
        eprintln!("note: script(1) not found; terminal checks skipped");
        return None;
    };
    let line = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(script);
    cmd.args(["-qec", &line, "/dev/null"])
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Some(text(&cmd.output().unwrap().stdout))
}

/// A misspelt flag gets clap's whole error: the error line, the tip naming the similar flag,
/// the usage line, status 2 (before, only the first line survived).
#[test]
fn misspelt_flag_shows_clap_tip_and_usage() {
    let out = flatmin(&["train", "--lrr", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: unexpected argument '--lrr' found"),
        "{err}"
    );
    assert!(
        err.contains("tip: a similar argument exists: '--lr'"),
        "{err}"
    );
    assert!(err.contains("Usage: flatmin train"), "{err}");
    let out = flatmin(&["trian"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("similar subcommands exist: 'trace', 'train'"),
        "{}",
        text(&out.stderr)
    );
}

/// Misspelt names of presets, optimizers, config keys, plot metrics and axes, and sweep
/// keys each get a suggestion.
#[test]
fn misspelt_names_get_did_you_mean() {
    let out = flatmin(&["train", "--model", "cnns", "--data", "synthetic"]);
    common::assert_error(&out, "did you mean 'cnn-s'?", "--model cnns");
    let out = flatmin(&["train", "--model", "resnet-20", "--data", "synthetic"]);
    common::assert_error(&out, "did you mean 'resnet20'?", "--model resnet-20");
    let out = flatmin(&["train", "--optimizer", "adamv"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a similar value exists: 'adamw'"),
        "{}",
        text(&out.stderr)
    );
    let dir = scratch("names");
    let cfg = dir.join("c.json");
    std::fs::write(&cfg, r#"{"lrr": 0.1}"#).unwrap();
    let out = flatmin(&["train", "--config", cfg.to_str().unwrap()]);
    common::assert_error(&out, "unknown key 'lrr'; did you mean 'lr'?", "config key");
    std::fs::write(&cfg, r#"{"optimizer": "adamv"}"#).unwrap();
    let out = flatmin(&["train", "--config", cfg.to_str().unwrap()]);
    common::assert_error(&out, "did you mean 'adamw'?", "config optimizer");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"kind\":\"eval\",\"epoch\":0,\"step\":1,\"test_loss\":1.0,\"test_acc\":0.5,\"wall_s\":0.1}\n",
    )
    .unwrap();
    let svg = dir.join("p.svg");
    let (run_s, svg_s) = (run.to_str().unwrap(), svg.to_str().unwrap());
    let out = flatmin(&["plot", run_s, "--metric", "test_los", "--out", svg_s]);
    common::assert_error(&out, "did you mean 'test_loss'?", "--metric");
    let out = flatmin(&["plot", run_s, "--x", "epochs", "--out", svg_s]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("'epoch'"),
        "{}",
        text(&out.stderr)
    );
    let sweep = dir.join("sweep");
    let out = flatmin(&[
        "sweep",
        "--grid",
        "lrr=0.1,0.2",
        "--out",
        sweep.to_str().unwrap(),
        "--",
        "--data",
        "synthetic",
    ]);
    common::assert_error(&out, "a similar argument exists: '--lr'", "sweep key");
}

/// `train --help` groups its flags under headings (as do `trace`, `eigen`, `density`); old
/// flag names are accepted but no longer shown.
#[test]
fn train_help_has_headings_and_old_names_are_hidden() {
    let out = flatmin(&["train", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    let mut at = 0;
    for heading in [
        "Model:",
        "Optimizer:",
        "Schedule:",
        "Data:",
        "Run folder:",
        "Perturbation:",
        "Curvature logging:",
    ] {
        let pos = help
            .lines()
            .position(|l| l == heading)
            .unwrap_or_else(|| panic!("no heading {heading}: {help}"));
        assert!(pos >= at, "{heading} out of order");
        at = pos;
    }
    assert!(!help.contains("trace-samples"), "{help}");
    for (cmd, heading) in [
        ("trace", "Method:"),
        ("eigen", "Lanczos:"),
        ("density", "Stochastic Lanczos quadrature:"),
    ] {
        let h = text(&flatmin(&[cmd, "--help"]).stdout);
        let lines: Vec<&str> = h.lines().collect();
        let at = |name: &str| lines.iter().position(|l| *l == name);
        let (images, own) = (at("Model and images:"), at(heading));
        assert!(images.is_some() && own > images, "{cmd}: {h}");
    }
    for (cmd, old) in [("trace", "limit"), ("trace", "top-k"), ("eigen", "top-k")] {
        let h = text(&flatmin(&[cmd, "--help"]).stdout);
        assert!(!h.contains(&format!("--{old}")), "{cmd}: {h}");
    }
    // A hidden alias still parses (the error is about the missing model, not the flag).
    let out = flatmin(&["trace", "--limit", "5", "--top-k", "2"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
}

/// The sections of a `--help` (`-h`) text, in order, each with the long flags listed under
/// it: `("Options:", ["--help", "--version"])`, ...
fn help_sections(help: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in help.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            sections.push((line.to_string(), Vec::new()));
        } else if let (Some(last), Some(at)) = (sections.last_mut(), line.find("--")) {
            let flag = line[at..].split([' ', ',']).next().unwrap_or_default();
            if line[..at].trim_start().is_empty() || line[..at].trim().ends_with(',') {
                last.1.push(flag.to_string());
            }
        }
    }
    sections
}

/// `eval`, `sweep`, `hvp`, `bench` and `plot` (more than 8 flags each) group their flags
/// under headings, in this order, as `train` does: only `--help` and `--version` stay under
/// "Options:". `data fetch` (5 flags) and `export` (1) keep one list.
#[test]
fn long_helps_group_their_flags_under_headings() {
    let cases: [(&[&str], &[&str]); 7] = [
        (&["eval"], &["Model:", "Data:", "Evaluation:", "Run:"]),
        (&["sweep"], &["Sweep:", "Scheduler scripts (--emit):"]),
        (&["hvp"], &["Inputs:", "Computation:", "Run:"]),
        (&["bench"], &["Workload:", "Trace:", "GEMM:", "Run:"]),
        (&["plot"], &["Panels:", "Image:"]),
        (&["data", "fetch"], &[]),
        (&["export"], &[]),
    ];
    for (cmd, headings) in cases {
        let out = flatmin(&[cmd, &["-h"]].concat());
        assert!(out.status.success(), "{cmd:?}");
        let help = text(&out.stdout);
        let sections = help_sections(&help);
        let names: Vec<&str> = sections
            .iter()
            .map(|s| s.0.as_str())
            .filter(|h| *h != "Arguments:" && *h != "Options:")
            .collect();
        assert_eq!(names, headings, "{cmd:?}: {help}");
        let options = &sections.iter().find(|s| s.0 == "Options:").unwrap().1;
        if !headings.is_empty() {
            assert_eq!(options, &["--help", "--version"], "{cmd:?}: {help}");
        }
        assert!(
            sections
                .iter()
                .all(|s| s.0 == "Arguments:" || !s.1.is_empty()),
            "{cmd:?}: an empty section: {help}"
        );
    }
}

/// `completions bash|zsh|fish` print scripts naming the subcommands; bash accepts its own; a
/// stdout that cannot take the script is an error line, not a panic.
#[test]
fn completions_are_printed_and_bash_accepts_them() {
    for shell in ["bash", "zsh", "fish"] {
        let out = flatmin(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for sub in ["train", "trace", "eigen", "sweep", "completions"] {
            assert!(script.contains(sub), "{shell} lacks {sub}");
        }
    }
    let dir = scratch("completions");
    let file = dir.join("flatmin.bash");
    std::fs::write(&file, flatmin(&["completions", "bash"]).stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(check.status.success(), "{}", text(&check.stderr));
    let out = flatmin(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    // A full disk behind stdout: one error line, no panic (clap_complete's own writer
    // panics on a write error).
    if Path::new("/dev/full").exists() {
        for args in [&["completions", "bash"][..], &["man"][..]] {
            let full = std::fs::File::options()
                .write(true)
                .open("/dev/full")
                .unwrap();
            let out = Command::new(BIN).args(args).stdout(full).output().unwrap();
            common::assert_error(&out, "No space left on device", &format!("{args:?}"));
        }
    }
}

/// `man` prints the flatmin(1) page as roff; `man --out DIR` writes one page per command.
#[test]
fn man_pages_are_roff() {
    let out = flatmin(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH flatmin 1"), "{page}");
    assert!(
        page.contains(".SH SUBCOMMANDS") || page.contains("train"),
        "{page}"
    );
    let dir = scratch("man");
    let out = flatmin(&["man", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in ["flatmin.1", "flatmin-train.1", "flatmin-data-fetch.1"] {
        let p = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(p.starts_with(".ie") || p.contains(".TH"), "{name}");
    }
    let train = std::fs::read_to_string(dir.join("flatmin-train.1")).unwrap();
    assert!(train.contains("learning rate"), "{train}");
}

/// On a terminal clap colours its errors; `NO_COLOR` or `TERM=dumb` leave no escape codes.
#[test]
fn no_color_and_dumb_terminal_leave_no_escape_codes() {
    let Some(coloured) = on_terminal(&["train", "--lrr", "1"], &[]) else {
        return;
    };
    assert!(coloured.contains('\x1b'), "{coloured:?}");
    for vars in [[("NO_COLOR", "1")], [("TERM", "dumb")]] {
        let plain = on_terminal(&["train", "--lrr", "1"], &vars).unwrap();
        assert!(plain.contains("similar argument"), "{plain:?}");
        assert!(!plain.contains('\x1b'), "{vars:?}: {plain:?}");
    }
    let help = on_terminal(&["train", "--help"], &[("NO_COLOR", "1")]).unwrap();
    assert!(help.contains("Curvature logging:") && !help.contains('\x1b'));
}

/// Lanczos, SLQ, Hutchinson and basis-HVP traces draw a bar with the total and an ETA on a
/// terminal's stderr; not under `TERM=dumb`, not with `--json`, not into a pipe; and the
/// results are the same bits with and without the bar.
#[test]
fn trace_progress_bars_on_a_terminal_only() {
    let base = [
        "--model",
        "tiny-tanh",
        "--data",
        "synthetic",
        "--size",
        "40",
        "--batch",
        "20",
    ];
    let weights_dir = scratch("progress");
    let w = weights_dir.join("w.safetensors");
    let out = flatmin(&[
        "train",
        "--model",
        "tiny-tanh",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--train-size",
        "100",
        "--test-size",
        "20",
        "--batch-size",
        "50",
        "--quiet",
        "--out",
        weights_dir.join("run").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::copy(weights_dir.join("run/model.safetensors"), &w).unwrap();
    let ws = w.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &[
            "trace", "--method", "lanczos", "--top", "2", "--steps", "20",
        ],
        &["trace", "--method", "slq", "--probes", "2", "--steps", "10"],
        &["trace", "--method", "hutchinson", "--probes", "20"],
        &["trace", "--method", "basis"],
    ];
    for case in cases {
        let args: Vec<&str> = case
            .iter()
            .copied()
            .chain(base)
            .chain(["--weights", ws])
            .collect();
        let piped = flatmin(&args);
        assert!(piped.status.success(), "{case:?}: {}", text(&piped.stderr));
        assert!(
            !text(&piped.stderr).contains('\r'),
            "{case:?}: bar into a pipe"
        );
        let Some(live) = on_terminal(&args, &[]) else {
            return;
        };
        assert!(
            live.contains("HVPs") && live.contains("ETA"),
            "{case:?}: {live:?}"
        );
        let dumb = on_terminal(&args, &[("TERM", "dumb")]).unwrap();
        assert!(!dumb.contains("ETA"), "{case:?}: {dumb:?}");
        let json: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let quiet = on_terminal(&json, &[]).unwrap();
        assert!(!quiet.contains("ETA"), "{case:?} --json: {quiet:?}");
        // The same numbers with the bar as without it.
        let piped_out = text(&piped.stdout);
        assert_eq!(result_lines(&piped_out), result_lines(&live), "{case:?}");
    }
}

/// The result lines of a trace report (`trace ...` and `λ...`) as a screen shows them: each
/// line's text after its last carriage return, without escape sequences.
fn result_lines(shown: &str) -> Vec<String> {
    shown
        .lines()
        .map(|l| {
            let last = l.rsplit('\r').next().unwrap_or_default();
            let mut plain = String::new();
            let mut chars = last.chars();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    // CSI: ESC [ parameters, then one final letter.
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            plain.trim().to_string()
        })
        .filter(|l| l.starts_with("trace ") || l.starts_with('λ'))
        .collect()
}
