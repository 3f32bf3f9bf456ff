//! The bytes behind an image URL of a request: `data:image/...;base64,...`, `file://` under
//! `--allowed-local-media-path` only, and `http(s)://` downloaded with a timeout and a size limit. Blocking:
//! call it off the async executor.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// Where images may come from, and how large and slow they may be.
pub struct MediaPolicy {
    /// `--allowed-local-media-path`, canonical (symlinks resolved); None: local files are refused.
    allowed_local: Option<PathBuf>,
    timeout: Duration,
    max_bytes: usize,
    agent: ureq::Agent,
}

impl MediaPolicy {
    /// `allowed_local` must be an existing directory.
    pub fn new(
        allowed_local: Option<&Path>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<MediaPolicy, String> {
        let allowed_local = match allowed_local {
            None => None,
            Some(dir) => {
                let real = std::fs::canonicalize(dir)
                    .map_err(|e| format!("--allowed-local-media-path {}: {e}", dir.display()))?;
                if !real.is_dir() {
                    return Err(format!(
                        "--allowed-local-media-path {}: not a directory",
                        dir.display()
                    ));
                }
                Some(real)
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .into();
        Ok(MediaPolicy {
            allowed_local,
            timeout,
            max_bytes,
            agent,
        })
    }

    /// The bytes of an image URL; the error says why it cannot be had.
    pub fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("data:") {
            self.data_url(&url[5..])
        } else if lower.starts_with("file://") {
            self.local_file(&url[7..])
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            self.download(url)
        } else {
            Err(format!(
                "unsupported URL `{}`: use data:image/...;base64,..., http(s):// or file:// (with --allowed-local-media-path)",
                url.chars().take(40).collect::<String>()
            ))
        }
    }

    fn too_large(&self, n: impl std::fmt::Display) -> String {
        format!(
            "the image is {n} bytes, over the limit of {} (--max-image-bytes)",
            self.max_bytes
        )
    }

    fn data_url(&self, rest: &str) -> Result<Vec<u8>, String> {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("a data URL needs `,` before its data")?;
        let Some(mime) = meta.strip_suffix(";base64") else {
            return Err("only base64 data URLs are supported (data:image/...;base64,...)".into());
        };
        if !mime.to_ascii_lowercase().starts_with("image/") {
            return Err(format!(
                "the data URL's media type `{mime}` is not an image type"
            ));
        }
        // Four base64 characters are three bytes.
        if data.len() / 4 * 3 > self.max_bytes + 3 {
            return Err(self.too_large(format!("about {}", data.len() / 4 * 3)));
        }
        let engine = GeneralPurpose::new(
            &STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let bytes = engine
            .decode(data.trim())
            .map_err(|e| format!("the data URL is not valid base64: {e}"))?;
        if bytes.len() > self.max_bytes {
            return Err(self.too_large(bytes.len()));
        }
        Ok(bytes)
    }

    fn local_file(&self, rest: &str) -> Result<Vec<u8>, String> {
        let Some(root) = &self.allowed_local else {
            return Err(
                "local files are refused: start the server with --allowed-local-media-path DIR to allow files under DIR"
                    .into(),
            );
        };
        if !rest.starts_with('/') {
            return Err("a file URL must be file:///ABSOLUTE/PATH".into());
        }
        let path = PathBuf::from(percent_decode(rest)?);
        // The real path (`..` and symlinks resolved) must be under the allowed directory.
        let real = std::fs::canonicalize(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if !real.starts_with(root) {
            return Err(format!(
                "{} is outside --allowed-local-media-path {}",
                path.display(),
                root.display()
            ));
        }
        let meta =
            std::fs::metadata(&real).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if meta.len() > self.max_bytes as u64 {
            return Err(self.too_large(meta.len()));
        }
        std::fs::read(&real).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    fn download(&self, url: &str) -> Result<Vec<u8>, String> {
        let secs = self.timeout.as_secs_f64();
        let err = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => {
                format!("downloading {url} took longer than {secs} s (--media-fetch-timeout)")
            }
            ureq::Error::BodyExceedsLimit(_) => self.too_large("more than that"),
            ureq::Error::StatusCode(code) => {
                format!("downloading {url} failed: HTTP status {code}")
            }
            e => format!("downloading {url} failed: {e}"),
        };
        let mut resp = self.agent.get(url).call().map_err(err)?;
        if let Some(n) = resp.body().content_length() {
            if n > self.max_bytes as u64 {
                return Err(self.too_large(n));
            }
        }
        resp.body_mut()
            .with_config()
            .limit(self.max_bytes as u64)
            .read_to_vec()
            .map_err(err)
    }
}

/// `%XX` escapes of a URL path decoded.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad `%` escape in the file URL at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the file URL is not UTF-8 once decoded".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: Option<&Path>, max: usize) -> MediaPolicy {
        MediaPolicy::new(dir, Duration::from_secs(1), max).unwrap()
    }

    #[test]
    fn data_urls_decode_and_are_checked() {
        let p = policy(None, 8);
        assert_eq!(
            p.fetch("data:image/png;base64,AAEC").unwrap(),
            vec![0, 1, 2]
        );
        // Unpadded base64 is accepted too.
        assert_eq!(p.fetch("data:image/png;base64,AAE").unwrap(), vec![0, 1]);
        for (url, why) in [
            ("data:text/plain;base64,AAEC", "not an image"),
            ("data:image/png,rawbytes", "only base64"),
            ("data:image/png;base64,@@@@", "not valid base64"),
            (
                "data:image/png;base64,AAECAwQFBgcICQ==",
                "over the limit of 8",
            ),
            ("ftp://x/y.png", "unsupported URL"),
            ("file:///etc/passwd", "--allowed-local-media-path"),
        ] {
            let e = p.fetch(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn local_files_stay_under_the_allowed_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("media");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a b.png"), b"png").unwrap();
        std::fs::write(tmp.path().join("secret.png"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.png"), root.join("link.png")).unwrap();
        let p = policy(Some(&root), 100);
        let url = |rel: &str| format!("file://{}/{rel}", root.display());
        assert_eq!(p.fetch(&url("a%20b.png")).unwrap(), b"png");
        assert_eq!(p.fetch(&url("a b.png")).unwrap(), b"png");
        for rel in ["../secret.png", "link.png"] {
            let e = p.fetch(&url(rel)).unwrap_err();
            assert!(
                e.contains("outside --allowed-local-media-path"),
                "{rel}: {e}"
            );
        }
        assert!(p
            .fetch(&url("missing.png"))
            .unwrap_err()
            .contains("cannot open"));
        assert!(p
            .fetch("file://host/x.png")
            .unwrap_err()
            .contains("ABSOLUTE"));
        let small = policy(Some(&root), 2);
        assert!(small
            .fetch(&url("a b.png"))
            .unwrap_err()
            .contains("over the limit"));
    }
}
