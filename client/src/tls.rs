//! TLS on the client side: the PEM files a client presents ([`TlsFiles`]), which addresses are
//! reached over TLS ([`Target`]), and the rustls configuration that tonic is given.
//!
//! The caller is known from the kernel on a Unix socket and on loopback; beyond loopback a
//! server knows it by its client certificate (API.md, "Who may do what"). This client carries
//! no system CA store: the CA that signs the server's certificate is always named.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::ClientError;

/// The variable of [`TlsFiles::ca`] (and the default of the CLI's `--tls-ca`).
pub const ENV_CA: &str = "BERTH_TLS_CA";
/// The variable of [`TlsFiles::cert`] (`--tls-cert`).
pub const ENV_CERT: &str = "BERTH_TLS_CERT";
/// The variable of [`TlsFiles::key`] (`--tls-key`).
pub const ENV_KEY: &str = "BERTH_TLS_KEY";

/// How a file of [`TlsFiles`] is named in messages: the CLI flag and the variable that set it.
const NAME_CA: &str = "--tls-ca (BERTH_TLS_CA)";
const NAME_CERT: &str = "--tls-cert (BERTH_TLS_CERT)";
const NAME_KEY: &str = "--tls-key (BERTH_TLS_KEY)";

/// TLS material a client presents: the CA that signs the server's certificate, and the
/// client's own certificate and key (mTLS). All PEM files. An empty path is unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The path of `p` unless it is unset or empty.
fn set(p: &Option<PathBuf>) -> Option<&Path> {
    p.as_deref().filter(|p| !p.as_os_str().is_empty())
}

impl TlsFiles {
    /// From `BERTH_TLS_CA`, `BERTH_TLS_CERT`, `BERTH_TLS_KEY` (empty = unset).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// From the variables that `var` looks up: the testable part of [`TlsFiles::from_env`].
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let path = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self {
            ca: path(ENV_CA),
            cert: path(ENV_CERT),
            key: path(ENV_KEY),
        }
    }

    /// Whether no file is set: then the client speaks plaintext (except to `https://`).
    pub fn is_empty(&self) -> bool {
        set(&self.ca).is_none() && set(&self.cert).is_none() && set(&self.key).is_none()
    }

    /// The same files with empty paths as `None`.
    pub fn normalized(&self) -> Self {
        Self {
            ca: set(&self.ca).map(Path::to_path_buf),
            cert: set(&self.cert).map(Path::to_path_buf),
            key: set(&self.key).map(Path::to_path_buf),
        }
    }

    /// A certificate goes with its key: one without the other is refused before any file is
    /// read or any connection is made.
    pub fn check(&self) -> Result<(), ClientError> {
        match (set(&self.cert), set(&self.key)) {
            (Some(_), None) => Err(ClientError::TlsIncomplete {
                given: NAME_CERT,
                missing: NAME_KEY,
            }),
            (None, Some(_)) => Err(ClientError::TlsIncomplete {
                given: NAME_KEY,
                missing: NAME_CERT,
            }),
            _ => Ok(()),
        }
    }

    /// The rustls configuration for a connection to `addr`: the CA as the only trust anchor,
    /// the certificate and key as the client's identity. Reads the files (every connection
    /// reads them afresh, so a renewed certificate is taken up by the next one).
    pub(crate) async fn client_config(&self, addr: &str) -> Result<ClientTlsConfig, ClientError> {
        self.check()?;
        let Some(ca) = set(&self.ca) else {
            return Err(ClientError::TlsNoCa {
                addr: addr.to_owned(),
            });
        };
        let ca = read_pem(NAME_CA, ca, "CERTIFICATE").await?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (set(&self.cert), set(&self.key)) {
            let cert = read_pem(NAME_CERT, cert, "CERTIFICATE").await?;
            let key = read_pem(NAME_KEY, key, "PRIVATE KEY").await?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        Ok(config)
    }
}

/// The contents of PEM file `path`, which must hold a block whose label ends in `label`
/// (`CERTIFICATE`; `PRIVATE KEY` for PKCS#8, `RSA PRIVATE KEY`, `EC PRIVATE KEY`): rustls
/// passes over what it cannot parse, so a wrong file would otherwise surface only as a failed
/// handshake.
async fn read_pem(what: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, ClientError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| ClientError::TlsFile {
            what,
            path: path.to_owned(),
            source,
        })?;
    if !has_pem_block(&bytes, label) {
        return Err(ClientError::TlsFile {
            what,
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no PEM block \"-----BEGIN …{label}-----\" in it"),
            ),
        });
    }
    Ok(bytes)
}

/// Whether `pem` holds a `-----BEGIN <…label>-----` line.
fn has_pem_block(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem).lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

/// Where an address leads, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `unix:PATH`: never TLS (the kernel tells the server who calls).
    Unix(PathBuf),
    /// A TCP server: the URI tonic dials, and whether over TLS.
    Tcp { uri: String, tls: bool },
}

impl Target {
    /// Reads `addr`: `unix:PATH` (also `unix://PATH`), `https://HOST:PORT` (TLS),
    /// `http://HOST:PORT` (plaintext, as written), or `HOST:PORT`: TLS when `tls` (TLS material
    /// is given), plaintext otherwise.
    pub fn parse(addr: &str, tls: bool) -> Result<Self, ClientError> {
        let invalid = |message: &str| ClientError::Address {
            addr: addr.to_owned(),
            message: message.to_owned(),
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() {
                return Err(invalid("names no socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let (uri, tls) = match addr.split_once("://") {
            Some(("https", _)) => (addr.to_owned(), true),
            Some(("http", _)) => (addr.to_owned(), false),
            Some((scheme, _)) => {
                return Err(invalid(&format!(
                    "scheme {scheme:?}: want HOST:PORT, http://HOST:PORT, https://HOST:PORT or \
                     unix:PATH"
                )))
            }
            None if tls => (format!("https://{addr}"), true),
            None => (format!("http://{addr}"), false),
        };
        Ok(Self::Tcp { uri, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_from_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let t = TlsFiles::from_vars(vars(&[
            ("BERTH_TLS_CA", "/etc/berth/ca.pem"),
            ("BERTH_TLS_CERT", "alice.pem"),
            ("BERTH_TLS_KEY", "alice.key"),
        ]));
        assert_eq!(
            t,
            TlsFiles {
                ca: Some("/etc/berth/ca.pem".into()),
                cert: Some("alice.pem".into()),
                key: Some("alice.key".into()),
            }
        );
        assert!(!t.is_empty());
        // Empty is unset.
        let t = TlsFiles::from_vars(vars(&[("BERTH_TLS_CA", ""), ("BERTH_TLS_CERT", "")]));
        assert_eq!(t, TlsFiles::default());
        assert!(t.is_empty());
        let t = TlsFiles::from_vars(vars(&[("BERTH_TLS_CA", "ca.pem")]));
        assert_eq!(t.ca.as_deref(), Some(Path::new("ca.pem")));
        assert!(t.cert.is_none() && t.key.is_none() && !t.is_empty());
    }

    #[test]
    fn empty_paths_are_unset() {
        let t = TlsFiles {
            ca: Some(PathBuf::new()),
            cert: None,
            key: Some(PathBuf::new()),
        };
        assert!(t.is_empty());
        assert_eq!(t.normalized(), TlsFiles::default());
        assert!(t.check().is_ok());
    }

    #[test]
    fn a_certificate_goes_with_its_key() {
        let cert_only = TlsFiles {
            cert: Some("c.pem".into()),
            ..Default::default()
        };
        let e = cert_only.check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-cert (BERTH_TLS_CERT) is given without --tls-key (BERTH_TLS_KEY): a client \
             certificate goes with its key"
        );
        let key_only = TlsFiles {
            ca: Some("ca.pem".into()),
            key: Some("k.pem".into()),
            ..Default::default()
        };
        let e = key_only.check().unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-key (BERTH_TLS_KEY) is given without --tls-cert"),
            "{e}"
        );
        for ok in [
            TlsFiles::default(),
            TlsFiles {
                ca: Some("ca.pem".into()),
                ..Default::default()
            },
            TlsFiles {
                cert: Some("c".into()),
                key: Some("k".into()),
                ..Default::default()
            },
        ] {
            assert!(ok.check().is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn which_addresses_use_tls() {
        let tcp = |uri: &str, tls: bool| Target::Tcp {
            uri: uri.into(),
            tls,
        };
        let cases: &[(&str, bool, Target)] = &[
            ("10.0.0.1:7300", false, tcp("http://10.0.0.1:7300", false)),
            ("10.0.0.1:7300", true, tcp("https://10.0.0.1:7300", true)),
            ("[::1]:7300", true, tcp("https://[::1]:7300", true)),
            ("node1:7300", true, tcp("https://node1:7300", true)),
            // An explicit scheme is what it says.
            ("http://node1:7300", true, tcp("http://node1:7300", false)),
            ("https://node1:7300", false, tcp("https://node1:7300", true)),
            // The Unix socket never: the kernel tells who calls.
            (
                "unix:/run/berth/berthd.sock",
                true,
                Target::Unix("/run/berth/berthd.sock".into()),
            ),
            ("unix:///x.sock", false, Target::Unix("/x.sock".into())),
        ];
        for (addr, tls, want) in cases {
            assert_eq!(&Target::parse(addr, *tls).unwrap(), want, "{addr} {tls}");
        }
        for bad in ["unix:", "ftp://a:1"] {
            let e = Target::parse(bad, false).unwrap_err();
            assert!(matches!(e, ClientError::Address { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn pem_blocks() {
        let cert = b"junk\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(has_pem_block(cert, "CERTIFICATE"));
        assert!(!has_pem_block(cert, "PRIVATE KEY"));
        for key in [
            &b"-----BEGIN PRIVATE KEY-----\n"[..],
            b"-----BEGIN EC PRIVATE KEY-----\r\n",
            b"-----BEGIN RSA PRIVATE KEY-----\n",
        ] {
            assert!(has_pem_block(key, "PRIVATE KEY"));
        }
        assert!(!has_pem_block(b"", "CERTIFICATE"));
        assert!(!has_pem_block(&[0xff, 0xfe, 0], "CERTIFICATE"));
    }

    #[tokio::test]
    async fn unreadable_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let t = TlsFiles {
            ca: Some(missing.clone()),
            ..Default::default()
        };
        let e = t.client_config("h:1").await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot read --tls-ca (BERTH_TLS_CA) {}: ",
                missing.display()
            )),
            "{e}"
        );
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let t = TlsFiles {
            ca: Some(not_pem),
            ..Default::default()
        };
        let e = t.client_config("h:1").await.unwrap_err().to_string();
        assert!(e.contains("no PEM block"), "{e}");
        let t = TlsFiles {
            cert: Some(missing.clone()),
            key: Some(missing),
            ..Default::default()
        };
        let e = t.client_config("h:1").await.unwrap_err().to_string();
        assert_eq!(
            e,
            "TLS to h:1 needs the CA certificate that signs the server's: --tls-ca \
             (BERTH_TLS_CA)"
        );
    }
}
