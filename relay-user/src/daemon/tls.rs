//! The TLS listeners' certificate: loaded from PEM files at start, swapped on reload (SIGHUP,
//! `relay ctl reload`) without touching open connections.
//!
//! Each accepted connection takes the configuration current at its accept, so a reload changes
//! what new handshakes present while established sessions keep theirs. A reload that cannot
//! read or use the files keeps the old certificate and says why; at start the same error stops
//! the relay, naming the file. The session cache lives in each configuration, so a reload
//! also ends resumption of sessions made with the old certificate.

use std::{
    io,
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::Context;
use rustls::{
    crypto::ring::default_provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};

use crate::config::TlsFiles;

/// The certificate and key the TLS listeners present, and where they come from.
pub struct TlsCertificates {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCertificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsCertificates {
    /// Reads the files; any problem is an error naming the file.
    pub fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files again without using them yet (a reload checks everything before it
    /// changes anything); on failure the error says why.
    pub fn prepare(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let config = server_config(&self.files)
            .context("TLS certificate not reloaded; the previous one stays in use")?;
        Ok(Arc::new(config))
    }

    /// New handshakes use `config` (from [`TlsCertificates::prepare`]).
    pub fn install(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

/// A rustls server configuration for TLS 1.2 and 1.3 (RFC 8489 §6.2.2 requires at least 1.2)
/// with the certificate chain and key of `files`.
fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "TLS key {} does not fit certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    // rustls' defaults stay: a bounded in-memory session cache (256 sessions) and two TLS 1.3
    // tickets after each handshake. The tickets also matter for latency: a client that sends
    // its first request right after its Finished message would otherwise wait for the relay's
    // delayed ACK (40 ms) under Nagle, as the relay has nothing else to send then.
    Ok(config)
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path, "certificate")?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, path, "certificate"))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "no certificate in {} (expected PEM `BEGIN CERTIFICATE` blocks)",
        path.display()
    );
    Ok(chain)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_file(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(e, path, "private key"))
}

/// The file's bytes, or an error naming it (with what to do when the relay, no longer root
/// after its start, may not read it: a reload runs as the unprivileged user).
fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| {
        let hint = if error.kind() == io::ErrorKind::PermissionDenied {
            " (after its start the relay runs as an unprivileged user, nobody unless \
             --user-id: give that user or its group read access)"
        } else {
            ""
        };
        anyhow::Error::new(error)
            .context(format!("cannot read TLS {what} {}{hint}", path.display()))
    })
}

fn pem_error(error: rustls::pki_types::pem::Error, path: &Path, what: &str) -> anyhow::Error {
    match error {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("no {what} in {} (expected a PEM block)", path.display())
        }
        other => anyhow::Error::new(io::Error::other(format!("{other:?}")))
            .context(format!("invalid PEM {what} in {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.cert.pem()).expect("write cert");
        std::fs::write(&files.key, cert.key_pair.serialize_pem()).expect("write key");
        files
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn errors_name_the_file() {
        let dir = temp_dir("errors");
        let good = write_pair(&dir, "a.test");
        let missing = TlsFiles {
            cert: dir.join("missing.crt"),
            key: good.key.clone(),
        };
        let err = format!("{:#}", TlsCertificates::load(missing).unwrap_err());
        assert!(
            err.contains("cannot read TLS certificate") && err.contains("missing.crt"),
            "{err}"
        );

        std::fs::write(dir.join("empty.crt"), "not pem\n").expect("write");
        let empty = TlsFiles {
            cert: dir.join("empty.crt"),
            key: good.key.clone(),
        };
        let err = format!("{:#}", TlsCertificates::load(empty).unwrap_err());
        assert!(
            err.contains("no certificate in") && err.contains("empty.crt"),
            "{err}"
        );

        let other = write_pair(&dir, "b.test");
        let mismatched = TlsFiles {
            cert: good.cert.clone(),
            key: other.key.clone(),
        };
        let err = format!("{:#}", TlsCertificates::load(mismatched).unwrap_err());
        assert!(err.contains("does not fit certificate"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_failed_reload_keeps_the_old_certificate() {
        let dir = temp_dir("reload");
        let files = write_pair(&dir, "a.test");
        let tls = TlsCertificates::load(files.clone()).expect("load");
        let before = tls.current();
        std::fs::write(&files.cert, "garbage").expect("write");
        let err = format!("{:#}", tls.prepare().unwrap_err());
        assert!(err.contains("previous one stays"), "{err}");
        assert!(
            Arc::ptr_eq(&before, &tls.current()),
            "old configuration kept"
        );

        // Fixed files: the next reload takes them.
        let fresh = write_pair(&dir, "a.test");
        assert_eq!(fresh, files);
        tls.install(tls.prepare().expect("reload"));
        assert!(
            !Arc::ptr_eq(&before, &tls.current()),
            "new configuration in use"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
