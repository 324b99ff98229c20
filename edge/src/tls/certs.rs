//! Certificates: a `[[tls.certs]]` pair loaded from PEM and checked (readable, key matches,
//! not expired), with the DNS names it covers.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::der::validity;
use super::provider;

/// One `[[tls.certs]]` entry: PEM files (the certificate file holds the leaf first, then any
/// intermediates; the key file one PKCS#8, PKCS#1 or SEC1 private key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Served to clients that send no SNI (or a name no certificate covers). When no entry
    /// says so, the first one is the default.
    pub default: bool,
}

/// Which file of a [`CertSpec`] a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    Cert,
    Key,
}

/// A certificate pair that cannot be used. The message names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertError {
    pub file: CertFile,
    pub message: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CertError {}

/// A checked certificate pair, ready to serve.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub spec: CertSpec,
    /// DNS names from the subjectAltName extension, lower-case (`*.example.com` included).
    pub names: Vec<String>,
    pub not_after: SystemTime,
    pub key: Arc<CertifiedKey>,
}

impl LoadedCert {
    /// Reads and checks one pair: both files readable PEM, the key matching the leaf
    /// certificate, the leaf not expired.
    pub fn load(spec: &CertSpec) -> Result<Self, CertError> {
        let cert_err = |message: String| CertError {
            file: CertFile::Cert,
            message,
        };
        let key_err = |message: String| CertError {
            file: CertFile::Key,
            message,
        };
        let cert_path = spec.cert.display();
        let key_path = spec.key.display();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&spec.cert)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| cert_err(pem_problem("certificate", &cert_path, e)))?;
        if chain.is_empty() {
            return Err(cert_err(format!(
                "certificate file {cert_path} holds no PEM CERTIFICATE block"
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&spec.key).map_err(|e| {
            key_err(match e {
                rustls::pki_types::pem::Error::NoItemsFound => format!(
                    "private key file {key_path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"
                ),
                e => pem_problem("private key", &key_path, e),
            })
        })?;
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
            cert_err(format!(
                "the first certificate in {cert_path} is not a usable X.509 certificate: {e}"
            ))
        })?;
        let mut names: Vec<String> = leaf
            .valid_dns_names()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        names.dedup();
        let (_, not_after) = validity(&chain[0]).ok_or_else(|| {
            cert_err(format!(
                "cannot read the validity period of the certificate in {cert_path}"
            ))
        })?;
        if not_after < SystemTime::now() {
            return Err(cert_err(format!(
                "the certificate in {cert_path} expired on {}",
                httpdate::fmt_http_date(not_after)
            )));
        }
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => key_err(format!(
                "the private key in {key_path} does not match the certificate in {cert_path}"
            )),
            e => key_err(format!("cannot use the private key in {key_path}: {e}")),
        })?;
        Ok(Self {
            spec: spec.clone(),
            names,
            not_after,
            key: Arc::new(key),
        })
    }

    /// Loads every pair; all or nothing, every problem reported.
    pub fn load_all(specs: &[CertSpec]) -> Result<Vec<Self>, Vec<CertError>> {
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for spec in specs {
            match Self::load(spec) {
                Ok(c) => ok.push(c),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(ok)
        } else {
            Err(errors)
        }
    }
}

pub(super) fn pem_problem(
    what: &str,
    path: &dyn fmt::Display,
    e: rustls::pki_types::pem::Error,
) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => format!("cannot read {what} file {path}: {e}"),
        e => format!("{what} file {path} is not valid PEM: {e}"),
    }
}
