//! Test certificates for the relay's TLS listeners, generated per test with rcgen (no private key
//! is ever committed), and a rustls client configuration that trusts only the test CA.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::{
    pki_types::{CertificateDer, ServerName},
    ClientConfig, RootCertStore, SupportedProtocolVersion,
};

/// Names every test certificate is valid for: loopback and the lab's client-side relay
/// addresses.
const NAMES: [&str; 4] = ["localhost", "127.0.0.1", "198.18.1.1", "2001:2:0:1::1"];

/// A leaf certificate and its key, as PEM and DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub subject: String,
}

/// A throw-away CA in a temporary directory (deleted on drop) that issues leaves and writes the
/// files the relay reads (`cert.pem`, `key.pem`) and the file clients trust (`ca.pem`).
pub struct TestPki {
    dir: PathBuf,
    ca: Certificate,
    ca_key: KeyPair,
    ca_der: CertificateDer<'static>,
    next_serial: u64,
}

impl TestPki {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relay-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary certificate directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "relay test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_der = cert.der().clone();
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("write ca.pem");
        Self {
            dir,
            ca: cert,
            ca_key: key,
            ca_der,
            next_serial: 1,
        }
    }

    /// A new CA with a leaf for `subject` already written to the relay's files.
    pub fn installed(subject: &str) -> (Self, Leaf) {
        let mut pki = Self::new();
        let leaf = pki.leaf(subject);
        pki.install(&leaf);
        (pki, leaf)
    }

    /// A new leaf (new key, new serial) for [`NAMES`], with common name `subject`.
    pub fn leaf(&mut self, subject: &str) -> Leaf {
        let names: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, subject);
        params.serial_number = Some(SerialNumber::from(self.next_serial));
        self.next_serial += 1;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            subject: subject.to_owned(),
        }
    }

    /// Writes `leaf` to the files the relay reads (`--tls-cert`, `--tls-key`).
    pub fn install(&self, leaf: &Leaf) {
        self.write_files(&leaf.cert_pem, &leaf.key_pem);
    }

    /// Writes arbitrary contents to the certificate and key files (to break them on purpose).
    pub fn write_files(&self, cert_pem: &str, key_pem: &str) {
        // Written next to the target and renamed: the relay never reads half a file.
        for (name, contents) in [("cert.pem", cert_pem), ("key.pem", key_pem)] {
            let tmp = self.dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, contents).expect("write PEM");
            std::fs::rename(&tmp, self.dir.join(name)).expect("rename PEM");
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The CA certificate clients trust (PEM), for uclient `-E` and Python's ssl.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A rustls client configuration trusting only this CA, limited to `versions`
    /// (e.g. `&[&rustls::version::TLS12]`); all versions when empty.
    pub fn client_config(
        &self,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("trust the test CA");
        let versions = if versions.is_empty() {
            rustls::ALL_VERSIONS
        } else {
            versions
        };
        // The provider is named explicitly: whichever providers the workspace enables, the
        // test client is unambiguous.
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        Arc::new(config)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name a client checks the relay's certificate against when it dials `ip`.
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}
