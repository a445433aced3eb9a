//! MD5 digests: parsing and printing the hex form, hashing bytes, files, and streams while
//! they are copied (so a download is verified without reading it twice).
//!
//! MD5 is only used to recognize the published archive (the checksum the dataset authors
//! publish), not as a security boundary: the extractor's own checks are what keep a hostile
//! archive from writing outside its folder.

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};
use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;

/// A 128-bit MD5 digest; displays as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Md5Digest(pub [u8; 16]);

impl Md5Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Md5Digest(Md5::digest(bytes).into())
    }

    /// The digest of the whole file at `path`; errors name the file.
    pub fn of_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut hasher = HashingWriter::new(std::io::sink());
        std::io::copy(&mut file, &mut hasher).with_context(|| format!("{}", path.display()))?;
        Ok(hasher.finish().1)
    }

    /// Parses 32 hex digits (either case, surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{text}' is not an MD5 digest (expected 32 hex digits)");
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            // Cannot fail: the characters were checked above.
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or_default();
        }
        Ok(Md5Digest(out))
    }
}

impl FromStr for Md5Digest {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Md5Digest::parse(s)
    }
}

impl fmt::Display for Md5Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A writer that passes bytes on to `inner` and hashes (and counts) exactly the bytes that
/// `inner` accepted.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Md5,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Md5::new(),
            bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The inner writer and the digest of everything written.
    pub fn finish(self) -> (W, Md5Digest) {
        (self.inner, Md5Digest(self.hasher.finalize().into()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The digest of everything `reader` yields.
pub fn md5_reader(mut reader: impl Read) -> std::io::Result<Md5Digest> {
    let mut hasher = HashingWriter::new(std::io::sink());
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test suite of RFC 1321, appendix A.5.
    const RFC1321: [(&str, &str); 7] = [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ];

    #[test]
    fn rfc1321_vectors() {
        for (input, hex) in RFC1321 {
            assert_eq!(
                Md5Digest::of(input.as_bytes()).to_string(),
                hex,
                "{input:?}"
            );
            assert_eq!(
                Md5Digest::parse(hex).unwrap(),
                Md5Digest::of(input.as_bytes())
            );
            // Streamed in uneven pieces through the writer and through a reader.
            let mut w = HashingWriter::new(Vec::new());
            for piece in input.as_bytes().chunks(7) {
                w.write_all(piece).unwrap();
            }
            assert_eq!(w.bytes(), input.len() as u64);
            let (inner, digest) = w.finish();
            assert_eq!(inner, input.as_bytes());
            assert_eq!(digest.to_string(), hex);
            assert_eq!(md5_reader(input.as_bytes()).unwrap().to_string(), hex);
        }
    }

    #[test]
    fn parse_errors_and_case() {
        let upper = "D41D8CD98F00B204E9800998ECF8427E";
        assert_eq!(
            Md5Digest::parse(upper).unwrap().to_string(),
            upper.to_lowercase()
        );
        assert_eq!(
            " d41d8cd98f00b204e9800998ecf8427e\n"
                .parse::<Md5Digest>()
                .unwrap(),
            Md5Digest::of(b"")
        );
        for bad in [
            "",
            "d41d8cd98f00b204e9800998ecf8427",
            "g41d8cd98f00b204e9800998ecf8427e",
        ] {
            let err = Md5Digest::parse(bad).unwrap_err().to_string();
            assert!(err.contains("32 hex digits"), "{err}");
        }
        // Multi-byte characters of the right byte length are not hex digits.
        assert!(Md5Digest::parse("é1d8cd98f00b204e9800998ecf8427e").is_err());
    }
}
