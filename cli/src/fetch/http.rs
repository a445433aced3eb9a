//! The network part of a fetch: one HTTP(S) GET, streamed into a writer and hashed on the
//! way, with connection and read timeouts (a server that stops sending fails the download
//! instead of hanging it). HTTPS uses rustls with the Mozilla root certificates bundled in
//! `webpki-roots`; no system proxy settings are read.

use super::{HashingWriter, Md5Digest, Progress};
use anyhow::{anyhow, bail, Result};
use std::io::{Read, Write};
use std::time::Duration;

/// Timeouts of a download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Longest wait for the connection (and TLS handshake) to be established.
    pub connect_timeout: Duration,
    /// Longest wait for any single read (the response head or the next piece of the body).
    pub read_timeout: Duration,
}

impl Default for HttpOptions {
    /// 30 s to connect, 60 s per read.
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// A completed download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes received (the whole body).
    pub bytes: u64,
    /// MD5 of the body.
    pub md5: Md5Digest,
}

/// Downloads `url` into `out`, hashing the body on the way.
///
/// Errors name the URL: an HTTP status other than success (with the status), a failed
/// connection, a read that times out or fails, a body shorter than its Content-Length
/// (with the number of bytes that arrived), and a failed write to `out`. Redirects are
/// followed (at most 5).
pub fn download(
    url: &str,
    out: &mut impl Write,
    opts: &HttpOptions,
    progress: &mut dyn Progress,
) -> Result<Downloaded> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(opts.connect_timeout)
        .timeout_read(opts.read_timeout)
        .timeout_write(opts.read_timeout)
        .user_agent(concat!("flatmin/", env!("CARGO_PKG_VERSION")))
        .build();
    let response = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            bail!("{url}: HTTP status {code} {}", r.status_text())
        }
        Err(ureq::Error::Transport(t)) => {
            // The transport error starts with the URL when it knows it; print it once.
            let text = t.to_string();
            let text = match t.url() {
                Some(u) => text
                    .strip_prefix(&format!("{u}: "))
                    .map(str::to_string)
                    .unwrap_or(text),
                None => text,
            };
            bail!("{url}: {text}")
        }
    };
    let total = response
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    progress.download_started(url, total);
    let of_total = || total.map_or(String::new(), |t| format!(" of {t}"));
    let mut body = response.into_reader();
    let mut sink = HashingWriter::new(out);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
                        "no data for {} s (read timeout)",
                        opts.read_timeout.as_secs_f64()
                    ),
                    _ => e.to_string(),
                };
                bail!(
                    "{url}: download broken after {}{} bytes: {why}",
                    sink.bytes(),
                    of_total()
                );
            }
        };
        sink.write_all(&buf[..n])
            .map_err(|e| anyhow!("{url}: cannot store the download: {e}"))?;
        progress.downloaded(sink.bytes());
    }
    let bytes = sink.bytes();
    if let Some(t) = total {
        if bytes != t {
            bail!("{url}: connection closed after {bytes} of {t} bytes");
        }
    }
    let (_, md5) = sink.finish();
    progress.download_finished(bytes);
    Ok(Downloaded { bytes, md5 })
}
