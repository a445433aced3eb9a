//! `flatmin data`: dataset management. `flatmin data fetch cifar10` downloads the official
//! CIFAR-10 binary release (through the proxy of `https_proxy`/`HTTPS_PROXY`, unless
//! `no_proxy`/`NO_PROXY` names the host), or takes a local copy with `--from FILE`, checks
//! its MD5 and installs it atomically (see `flatmin::fetch`).
//!
//! Two hidden flags exist for tests and mirrors of a different archive: `--md5 HEX`
//! replaces the expected MD5 of the archive, `--batch-bytes N` the exact size of each of
//! the six batch files (a positive multiple of 3073).

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use flatmin::fetch::{
    default_dest, fetch_release, found_by_auto, proxy_from_env, whole_records, FetchOptions,
    Fetched, HttpOptions, Md5Digest, Progress, ReleaseSpec, OFFICIAL_URL,
};
use flatmin_datasets::RECORD_BYTES;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `flatmin data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The subcommands of `flatmin data`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Download a dataset, verify its checksum and install it where `--data auto` finds it.
    Fetch(FetchArgs),
}

/// The datasets `flatmin data fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataset {
    /// The CIFAR-10 binary release (cifar-10-binary.tar.gz, about 163 MB).
    Cifar10,
}

/// Arguments of `flatmin data fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The dataset.
    #[arg(value_enum)]
    pub dataset: Dataset,
    /// The release folder to create [default: cifar-10-batches-bin in the cache folder,
    /// $XDG_CACHE_HOME/flatmin or ~/.cache/flatmin, where `--data auto` looks].
    #[arg(long, value_name = "D")]
    pub dir: Option<PathBuf>,
    /// Where to download the archive from (through the proxy of https_proxy/HTTPS_PROXY, or
    /// http_proxy/HTTP_PROXY for an http:// URL, unless no_proxy/NO_PROXY names the host).
    #[arg(long, value_name = "URL", default_value = OFFICIAL_URL)]
    pub url: String,
    /// Install from this already downloaded cifar-10-binary.tar.gz instead of downloading it
    /// (for machines without internet; its MD5 is still checked).
    #[arg(long, value_name = "FILE", conflicts_with = "url")]
    pub from: Option<PathBuf>,
    /// Download and install even when the folder already holds a valid release (or other
    /// files): its release files (data_batch_1.bin to data_batch_5.bin, test_batch.bin,
    /// batches.meta.txt) are replaced, every other file in it is left alone.
    #[arg(long)]
    pub force: bool,
    /// No progress output (errors are still reported).
    #[arg(long)]
    pub quiet: bool,
    /// Expected MD5 of the archive instead of the published one (for tests and mirrors).
    #[arg(long, value_name = "HEX", hide = true, value_parser = parse_md5)]
    pub md5: Option<Md5Digest>,
    /// Exact size of each batch file instead of 30730000 (for tests with small archives).
    #[arg(long, value_name = "N", hide = true, value_parser = parse_batch_bytes)]
    pub batch_bytes: Option<u64>,
}

fn parse_md5(s: &str) -> std::result::Result<Md5Digest, String> {
    Md5Digest::parse(s).map_err(|e| e.to_string())
}

fn parse_batch_bytes(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if whole_records(n) => Ok(n),
        _ => Err(format!(
            "expected a positive multiple of the {RECORD_BYTES}-byte record"
        )),
    }
}

/// Runs `flatmin data`.
pub fn run(args: &DataArgs) -> Result<()> {
    match &args.command {
        DataCommand::Fetch(a) => fetch(a),
    }
}

fn fetch(args: &FetchArgs) -> Result<()> {
    let Dataset::Cifar10 = args.dataset;
    let dest = match &args.dir {
        Some(d) => d.clone(),
        None => default_dest()
            .context("no cache folder: neither XDG_CACHE_HOME nor HOME is set; pass --dir")?,
    };
    let official = ReleaseSpec::official();
    let proxy = match &args.from {
        Some(_) => None,
        None => proxy_from_env(&args.url)?,
    };
    let opts = FetchOptions {
        url: args.url.clone(),
        from: args.from.clone(),
        spec: ReleaseSpec {
            md5: args.md5.unwrap_or(official.md5),
            batch_bytes: args.batch_bytes.unwrap_or(official.batch_bytes),
        },
        force: args.force,
        http: HttpOptions {
            proxy,
            ..HttpOptions::default()
        },
        ..FetchOptions::new(&dest)
    };
    let mut progress = Report::new(args.quiet);
    let fetched = fetch_release(&opts, &mut progress);
    progress.clear();
    let shown = dest.display();
    let hint = if found_by_auto(&dest) {
        "`--data auto` finds it".to_string()
    } else {
        format!("use it with `--data {shown}`")
    };
    match fetched? {
        Fetched::AlreadyPresent(info) => progress.say(&format!(
            "{shown} already holds CIFAR-10 ({} training and {} test images); nothing to do \
             ({hint}; --force downloads it again)",
            info.train, info.test
        )),
        Fetched::Installed { info, bytes, md5 } => progress.say(&format!(
            "installed CIFAR-10 into {shown}: {} training and {} test images from {bytes} \
             bytes{}, MD5 {md5} verified ({hint})",
            info.train,
            info.test,
            args.from
                .as_ref()
                .map_or(String::new(), |f| format!(" of {}", f.display()))
        )),
    }
    Ok(())
}

/// Progress output: a bar where stderr can show one live ([`super::term::live_progress`]),
/// else a line on stderr every 10% (or 10 s), nothing when quiet; the steps ("downloading
/// URL", ...) are lines on stdout.
struct Report {
    quiet: bool,
    bar: Option<ProgressBar>,
    total: Option<u64>,
    last_line: Instant,
    last_tenth: u64,
}

impl Report {
    fn new(quiet: bool) -> Self {
        Report {
            quiet,
            bar: None,
            total: None,
            last_line: Instant::now(),
            last_tenth: 0,
        }
    }

    fn terminal(&self) -> bool {
        !self.quiet && super::term::live_progress()
    }

    fn say(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl Progress for Report {
    fn download_started(&mut self, url: &str, total: Option<u64>) {
        self.total = total;
        let size = total.map_or_else(|| "size unknown".to_string(), megabytes);
        self.say(&format!("downloading {url} ({size})"));
        if self.terminal() {
            let bar = super::term::bar("", total, "", true);
            let template = match total {
                Some(_) => "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                None => "{spinner} {bytes} {bytes_per_sec}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            self.bar = Some(bar);
        }
        self.last_line = Instant::now();
    }

    fn downloaded(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_position(bytes);
            return;
        }
        if self.quiet {
            return;
        }
        let tenth = self
            .total
            .map_or(0, |t| bytes.saturating_mul(10) / t.max(1));
        if tenth > self.last_tenth || self.last_line.elapsed().as_secs() >= 10 {
            let of = match self.total {
                Some(t) => format!(" of {} ({}%)", megabytes(t), bytes * 100 / t.max(1)),
                None => String::new(),
            };
            eprintln!("downloaded {}{of}", megabytes(bytes));
            self.last_tenth = tenth;
            self.last_line = Instant::now();
        }
    }

    fn download_finished(&mut self, bytes: u64) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.total.is_none() {
            self.say(&format!("downloaded {}", megabytes(bytes)));
        }
    }

    fn step(&mut self, what: &str) {
        self.say(&format!("{what} ..."));
    }
}
