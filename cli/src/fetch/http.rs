//! The network part of a fetch: one HTTP(S) GET, streamed into a writer and hashed on the
//! way, with connection and read timeouts (a server that stops sending fails the download
//! instead of hanging it), optionally through an HTTP proxy. HTTPS uses rustls with the
//! Mozilla root certificates bundled in `webpki-roots`.
//!
//! Nothing here reads the environment by itself: [`proxy_from_env`] turns `https_proxy` /
//! `HTTPS_PROXY` (for `https://` URLs), `http_proxy` / `HTTP_PROXY` (for `http://` URLs) and
//! `no_proxy` / `NO_PROXY` into an [`HttpProxy`], which the caller puts in [`HttpOptions`].

#[cfg(feature = "download")]
use super::HashingWriter;
use super::{Md5Digest, Progress};
#[cfg(feature = "download")]
use anyhow::anyhow;
use anyhow::{bail, Context, Result};
#[cfg(feature = "download")]
use std::io::Read;
use std::io::Write;
use std::time::Duration;

/// An HTTP proxy to connect through, and where it was set (named in errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProxy {
    /// The proxy, `[http://][USER:PASSWORD@]HOST[:PORT]` (port 80 when absent).
    pub url: String,
    /// Where it was configured, such as `HTTPS_PROXY`.
    pub source: String,
}

/// Timeouts and proxy of a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Longest wait for the connection (and TLS handshake) to be established.
    pub connect_timeout: Duration,
    /// Longest wait for any single read (the response head or the next piece of the body).
    pub read_timeout: Duration,
    /// The proxy to connect through; `None` connects directly.
    pub proxy: Option<HttpProxy>,
}

impl Default for HttpOptions {
    /// 30 s to connect, 60 s per read, no proxy.
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            proxy: None,
        }
    }
}

/// The proxy for `url` from the process environment; see [`proxy_for`].
pub fn proxy_from_env(url: &str) -> Result<Option<HttpProxy>> {
    proxy_for(url, |name| std::env::var(name).ok())
}

/// The proxy for `url` given the environment variables that `var` returns.
///
/// For an `https://` URL the first non-empty of `https_proxy`, `HTTPS_PROXY`; for `http://`,
/// of `http_proxy`, `HTTP_PROXY`; none for other schemes. No proxy when the URL's host
/// matches `no_proxy` (or, when that is unset, `NO_PROXY`): a comma-separated list of host
/// names or addresses, each matching itself and its subdomains (a leading `.` or `*.` is
/// ignored), or `*` for every host; ports and address ranges are not supported. A proxy
/// value that cannot be used (such as an `https://` proxy) is an error naming the variable.
pub fn proxy_for(url: &str, var: impl Fn(&str) -> Option<String>) -> Result<Option<HttpProxy>> {
    let parsed = url::Url::parse(url).with_context(|| format!("{url}: not a URL"))?;
    let names: &[&str] = match parsed.scheme() {
        "https" => &["https_proxy", "HTTPS_PROXY"],
        "http" => &["http_proxy", "HTTP_PROXY"],
        _ => &[],
    };
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let Some((name, value)) = names.iter().find_map(|n| set(n).map(|v| (*n, v))) else {
        return Ok(None);
    };
    let no_proxy = set("no_proxy")
        .or_else(|| set("NO_PROXY"))
        .unwrap_or_default();
    if bypasses(parsed.host_str().unwrap_or_default(), &no_proxy) {
        return Ok(None);
    }
    let value = value.trim();
    #[cfg(feature = "download")]
    ureq::Proxy::new(value).map_err(|e| {
        anyhow!("{name}={value}: not a usable proxy ({e}); expected [http://]HOST[:PORT]")
    })?;
    Ok(Some(HttpProxy {
        url: value.to_string(),
        source: name.to_string(),
    }))
}

/// True when `host` matches an entry of the `no_proxy` list `list`.
fn bypasses(host: &str, list: &str) -> bool {
    let host = host
        .trim_matches(|c| c == '[' || c == ']')
        .to_ascii_lowercase();
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches("*.").trim_start_matches('.');
        let entry = entry
            .trim_matches(|c| c == '[' || c == ']')
            .to_ascii_lowercase();
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    })
}

/// A completed download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes received (the whole body).
    pub bytes: u64,
    /// MD5 of the body.
    pub md5: Md5Digest,
}

/// Whether this build can download (the default-on cargo feature `download`, which brings
/// the HTTP client and its TLS stack).
pub const CAN_DOWNLOAD: bool = cfg!(feature = "download");

/// Fails, naming `url` and the way out, when this build cannot download ([`CAN_DOWNLOAD`]).
pub fn require_download(url: &str) -> Result<()> {
    if !CAN_DOWNLOAD {
        bail!(
            "{url}: this flatmin was built without downloads (cargo feature `download` off, \
             e.g. --no-default-features); download the archive yourself and pass --from FILE"
        );
    }
    Ok(())
}

/// Without the `download` feature: the error of [`require_download`], nothing written.
#[cfg(not(feature = "download"))]
pub fn download(
    url: &str,
    _out: &mut impl Write,
    _opts: &HttpOptions,
    _max_bytes: u64,
    _progress: &mut dyn Progress,
) -> Result<Downloaded> {
    require_download(url)?;
    bail!("{url}: downloads are not built into this flatmin")
}

/// The HTTP client for `opts`, and the words that name its proxy in errors (empty without
/// one).
#[cfg(feature = "download")]
fn agent(opts: &HttpOptions) -> Result<(ureq::Agent, String)> {
    let mut agent = ureq::AgentBuilder::new()
        .timeout_connect(opts.connect_timeout)
        .timeout_read(opts.read_timeout)
        .timeout_write(opts.read_timeout)
        .user_agent(concat!("flatmin/", env!("CARGO_PKG_VERSION")));
    let mut via = String::new();
    if let Some(p) = &opts.proxy {
        let proxy = ureq::Proxy::new(&p.url)
            .map_err(|e| anyhow!("{}={}: not a usable proxy ({e})", p.source, p.url))?;
        agent = agent.proxy(proxy);
        via = format!(" (through the proxy {} set by {})", p.url, p.source);
    }
    Ok((agent.build(), via))
}

/// Downloads `url` into `out`, hashing the body on the way.
///
/// Errors name the URL (and the proxy, when one is used): an HTTP status other than success
/// (with the status), a failed connection, a read that times out or fails, a body shorter
/// than its Content-Length (with the number of bytes that arrived), a body larger than
/// `max_bytes` (refused from its Content-Length before any of it is read, or stopped as
/// soon as more arrives), and a failed write to `out`. Redirects are followed (at most 5).
#[cfg(feature = "download")]
pub fn download(
    url: &str,
    out: &mut impl Write,
    opts: &HttpOptions,
    max_bytes: u64,
    progress: &mut dyn Progress,
) -> Result<Downloaded> {
    let (agent, via) = agent(opts)?;
    let response = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            bail!("{url}{via}: HTTP status {code} {}", r.status_text())
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
            bail!("{url}{via}: {text}")
        }
    };
    let total = response
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(t) = total.filter(|&t| t > max_bytes) {
        bail!(
            "{url}: the server announces {t} bytes, more than the {max_bytes}-byte limit for \
             this archive; nothing was downloaded (is the URL the CIFAR-10 binary release?)"
        );
    }
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
        if sink.bytes() + n as u64 > max_bytes {
            bail!(
                "{url}: the download exceeds the {max_bytes}-byte limit for this archive; \
                 stopped after {} bytes (is the URL the CIFAR-10 binary release?)",
                sink.bytes()
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn proxy(url: &str, vars: &[(&str, &str)]) -> Option<String> {
        proxy_for(url, env(vars))
            .unwrap()
            .map(|p| format!("{} {}", p.source, p.url))
    }

    #[test]
    fn proxy_follows_the_scheme_and_no_proxy() {
        let https = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
        let http = "http://mirror.example/cifar-10-binary.tar.gz";
        let vars = [("HTTPS_PROXY", "http://p:3128"), ("HTTP_PROXY", "q:8080")];
        assert_eq!(
            proxy(https, &vars).as_deref(),
            Some("HTTPS_PROXY http://p:3128")
        );
        assert_eq!(proxy(http, &vars).as_deref(), Some("HTTP_PROXY q:8080"));
        assert_eq!(proxy(https, &[("HTTP_PROXY", "q")]), None);
        // Lowercase first; an empty value counts as unset.
        let vars = [("https_proxy", "lower:1"), ("HTTPS_PROXY", "upper:2")];
        assert_eq!(proxy(https, &vars).as_deref(), Some("https_proxy lower:1"));
        let vars = [("https_proxy", " "), ("HTTPS_PROXY", "upper:2")];
        assert_eq!(proxy(https, &vars).as_deref(), Some("HTTPS_PROXY upper:2"));
        for list in [
            "toronto.edu",
            ".cs.toronto.edu",
            "*.toronto.edu",
            "x, WWW.CS.Toronto.edu",
            "*",
        ] {
            let vars = [("HTTPS_PROXY", "p:1"), ("NO_PROXY", list)];
            assert_eq!(proxy(https, &vars), None, "{list}");
        }
        for list in ["", "ronto.edu", "example.com,localhost"] {
            let vars = [("HTTPS_PROXY", "p:1"), ("no_proxy", list)];
            assert!(proxy(https, &vars).is_some(), "{list}");
        }
        let local = "http://127.0.0.1:8000/a.tar.gz";
        let vars = [("HTTP_PROXY", "p:1"), ("NO_PROXY", "localhost,127.0.0.1")];
        assert_eq!(proxy(local, &vars), None);
        let v6 = "http://[::1]:8000/a.tar.gz";
        let vars = [("HTTP_PROXY", "p:1"), ("NO_PROXY", "::1")];
        assert_eq!(proxy(v6, &vars), None);
    }

    #[test]
    fn unusable_proxy_names_the_variable() {
        let url = "https://example.com/a.tar.gz";
        let err = proxy_for(url, env(&[("HTTPS_PROXY", "https://p:3128")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("HTTPS_PROXY=https://p:3128: not a usable proxy"),
            "{err}"
        );
        assert!(proxy_for("not a url", env(&[])).is_err());
    }
}
