//! TLS with rustls (aws-lc-rs, the one crypto provider in the graph).
//!
//! Downstream: the HTTPS listener's certificates. Each `[[tls.certs]]` pair is loaded from PEM
//! (through `rustls::pki_types::pem::PemObject`), checked (readable, key matches the
//! certificate, not expired) and indexed by the DNS names in its subjectAltName extension,
//! wildcards (`*.example.com`) included. [`SniResolver`] picks the certificate for a
//! handshake: exact name, then wildcard, then the default certificate (clients that send no
//! SNI, or a name no certificate covers). The maps sit behind an `ArcSwap`, so a reload
//! (SIGHUP or `POST /tls/reload`) swaps them without touching the `ServerConfig` or any open
//! connection; a new set that fails to load is rejected as a whole and the running one kept.
//! [`TlsState::accept`] runs the handshake, in the connection's task, under a timeout.
//!
//! Upstream: the rustls `ClientConfig` for `https://` origins and shields: system roots, or
//! the CA certificates of `[upstream] ca_file`, or (explicitly, loudly) no verification.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

mod certs;
mod der;
mod upstream;

pub use certs::{CertError, CertFile, CertSpec, LoadedCert};
pub use der::validity;
pub use upstream::{UpstreamTls, UpstreamTlsConfig, load_ca_file};

/// A certificate expiring sooner than this is logged as a warning when it is loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The crypto provider every TLS config here is built with (aws-lc-rs), whether or not the
/// process installed a default one.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// SNI

/// The certificates of one generation, indexed for SNI.
#[derive(Debug)]
struct CertMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertMap {
    /// `None` when `certs` is empty.
    fn build(certs: &[LoadedCert]) -> Option<Self> {
        let default = certs
            .iter()
            .find(|c| c.spec.default)
            .or_else(|| certs.first())?
            .key
            .clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // The first certificate that names a host wins.
        for c in certs {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| c.key.clone());
            }
        }
        Some(Self {
            exact,
            wildcard,
            default,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return k.clone();
        }
        self.default.clone()
    }
}

/// rustls' built-in SNI resolver matches exact names only and gives clients without SNI no
/// certificate; this one does wildcards and a default, and reloads in place.
#[derive(Debug)]
pub struct SniResolver {
    map: ArcSwap<CertMap>,
}

impl SniResolver {
    /// `None` when `certs` is empty.
    pub fn new(certs: &[LoadedCert]) -> Option<Self> {
        Some(Self {
            map: ArcSwap::from_pointee(CertMap::build(certs)?),
        })
    }

    /// Replaces the certificates; handshakes already under way keep the ones they picked.
    /// Returns false (and changes nothing) when `certs` is empty.
    pub fn replace(&self, certs: &[LoadedCert]) -> bool {
        match CertMap::build(certs) {
            Some(m) => {
                self.map.store(Arc::new(m));
                true
            }
            None => false,
        }
    }

    /// The certificate chain served for a server name (`None`: no SNI).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        self.map.load().pick(sni)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

// ---------------------------------------------------------------------------------------------
// The downstream listener

/// The validated `[tls]` section.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// A client that has not finished its handshake by then is disconnected.
    pub handshake_timeout: Duration,
    /// Loaded and checked at config time; never empty.
    pub certs: Vec<LoadedCert>,
}

impl TlsConfig {
    pub fn specs(&self) -> Vec<CertSpec> {
        self.certs.iter().map(|c| c.spec.clone()).collect()
    }
}

/// What `/tls/reload` reports per certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    pub cert: String,
    pub key: String,
    pub names: Vec<String>,
    pub default: bool,
    pub not_after: String,
}

fn summaries(certs: &[LoadedCert]) -> Vec<CertSummary> {
    let default = certs.iter().position(|c| c.spec.default).unwrap_or(0);
    certs
        .iter()
        .enumerate()
        .map(|(i, c)| CertSummary {
            cert: c.spec.cert.display().to_string(),
            key: c.spec.key.display().to_string(),
            names: c.names.clone(),
            default: i == default,
            not_after: httpdate::fmt_http_date(c.not_after),
        })
        .collect()
}

/// Why a TLS connection did not get to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Failed(#[from] std::io::Error),
}

/// Handshake counters (since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HandshakeStats {
    pub completed: u64,
    pub failed: u64,
    pub timed_out: u64,
}

/// The running HTTPS listener's TLS side: acceptor, reloadable certificates, counters.
pub struct TlsState {
    acceptor: TlsAcceptor,
    resolver: Arc<SniResolver>,
    /// The files `/tls/reload` reads, and the certificates now served (for reports).
    current: Mutex<Vec<LoadedCert>>,
    handshake_timeout_ms: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

impl fmt::Debug for TlsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsState")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TlsState {
    /// TLS 1.3 and 1.2, ALPN `h2` then `http/1.1`, session tickets, SNI from `cfg.certs`.
    pub fn new(cfg: &TlsConfig) -> Result<Arc<Self>, String> {
        let resolver =
            Arc::new(SniResolver::new(&cfg.certs).ok_or("[tls] needs at least one certificate")?);
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS server config: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| format!("TLS session tickets: {e}"))?;
        warn_expiring(&cfg.certs);
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            current: Mutex::new(cfg.certs.clone()),
            handshake_timeout_ms: AtomicU64::new(millis(cfg.handshake_timeout)),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }))
    }

    /// Runs the handshake (call it in the connection's task, never in the accept loop),
    /// bounded by the handshake timeout. Dropping the stream on error closes the socket.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let limit = Duration::from_millis(self.handshake_timeout_ms.load(Ordering::Relaxed));
        match tokio::time::timeout(limit, self.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                Ok(s)
            }
            Ok(Err(e)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(HandshakeError::Failed(e))
            }
            Err(_) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(HandshakeError::Timeout(limit))
            }
        }
    }

    pub fn stats(&self) -> HandshakeStats {
        HandshakeStats {
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }

    pub fn resolver(&self) -> &SniResolver {
        &self.resolver
    }

    /// The certificates served now.
    pub fn certs(&self) -> Vec<CertSummary> {
        summaries(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Re-reads the running certificate files (`POST /tls/reload`). All or nothing: if any
    /// pair fails to load, the running certificates stay and the reasons are returned (and
    /// logged).
    pub fn reload(&self) -> Result<Vec<CertSummary>, String> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let specs: Vec<CertSpec> = current.iter().map(|c| c.spec.clone()).collect();
        match LoadedCert::load_all(&specs) {
            Ok(certs) => {
                self.swap(&mut current, certs);
                Ok(summaries(&current))
            }
            Err(errors) => {
                let why = errors
                    .iter()
                    .map(|e| e.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                warn!(error = %why, "TLS certificate reload failed; keeping the running certificates");
                Err(why)
            }
        }
    }

    /// Installs certificates that a config reload (SIGHUP) already loaded and checked, and the
    /// handshake timeout.
    pub fn install(&self, cfg: &TlsConfig) {
        self.handshake_timeout_ms
            .store(millis(cfg.handshake_timeout), Ordering::Relaxed);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.swap(&mut current, cfg.certs.clone());
    }

    fn swap(&self, current: &mut Vec<LoadedCert>, certs: Vec<LoadedCert>) {
        if self.resolver.replace(&certs) {
            warn_expiring(&certs);
            info!(
                certs = certs.len(),
                names = %certs.iter().flat_map(|c| c.names.iter().map(String::as_str)).collect::<Vec<_>>().join(","),
                "TLS certificates reloaded"
            );
            *current = certs;
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

fn warn_expiring(certs: &[LoadedCert]) {
    let soon = SystemTime::now() + EXPIRY_WARNING;
    for c in certs.iter().filter(|c| c.not_after < soon) {
        warn!(
            cert = %c.spec.cert.display(),
            not_after = %httpdate::fmt_http_date(c.not_after),
            "TLS certificate expires soon"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::UNIX_EPOCH;

    use super::der::days_from_civil;
    use super::*;

    struct Pair {
        _dir: tempfile::TempDir,
        spec: CertSpec,
    }

    fn write_pair(names: &[&str], not_after: Option<(i32, u8, u8)>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(y - 1, m, d);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.self_signed(&key).unwrap();
        let spec = CertSpec {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            default: false,
        };
        std::fs::write(&spec.cert, cert.pem()).unwrap();
        std::fs::write(&spec.key, key.serialize_pem()).unwrap();
        Pair { _dir: dir, spec }
    }

    #[test]
    fn validity_reads_utc_and_generalized_time() {
        let p = write_pair(&["a.test"], None);
        let c = LoadedCert::load(&p.spec).unwrap();
        let (nb, na) = validity(&c.key.cert[0]).unwrap();
        // rcgen's defaults: 1975-01-01 (UTCTime) to 4096-01-01 (GeneralizedTime).
        assert_eq!(nb, UNIX_EPOCH + Duration::from_secs(157_766_400));
        assert_eq!(
            na,
            UNIX_EPOCH + Duration::from_secs(days_from_civil(4096, 1, 1) as u64 * 86400)
        );
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(c.names, vec!["a.test".to_string()]);
    }

    #[test]
    fn load_errors_name_the_file() {
        let p = write_pair(&["a.test"], Some((2020, 1, 1)));
        let e = LoadedCert::load(&p.spec).unwrap_err();
        assert_eq!(e.file, CertFile::Cert);
        assert!(e.message.contains("expired"), "{e}");
        assert!(
            e.message.contains(&p.spec.cert.display().to_string()),
            "{e}"
        );

        let a = write_pair(&["a.test"], None);
        let b = write_pair(&["b.test"], None);
        let mixed = CertSpec {
            cert: a.spec.cert.clone(),
            key: b.spec.key.clone(),
            default: false,
        };
        let e = LoadedCert::load(&mixed).unwrap_err();
        assert_eq!(e.file, CertFile::Key);
        assert!(e.message.contains("does not match"), "{e}");
        assert!(e.message.contains(&b.spec.key.display().to_string()), "{e}");

        let missing = CertSpec {
            cert: a.spec.cert.with_file_name("nope.pem"),
            ..a.spec.clone()
        };
        let e = LoadedCert::load(&missing).unwrap_err();
        assert!(
            e.message.contains("nope.pem") && e.message.contains("cannot read"),
            "{e}"
        );

        let swapped = CertSpec {
            cert: a.spec.key.clone(),
            key: a.spec.cert.clone(),
            default: false,
        };
        let e = LoadedCert::load(&swapped).unwrap_err();
        assert!(e.message.contains("no PEM CERTIFICATE"), "{e}");
    }

    #[test]
    fn sni_exact_wildcard_default() {
        let a = write_pair(&["a.example.com"], None);
        let w = write_pair(&["*.example.com", "example.com"], None);
        let d = write_pair(&["fallback.test"], None);
        let mut specs = vec![a.spec.clone(), w.spec.clone(), d.spec.clone()];
        specs[2].default = true;
        let certs = LoadedCert::load_all(&specs).unwrap();
        let r = SniResolver::new(&certs).unwrap();
        let is = |sni: Option<&str>, i: usize| Arc::ptr_eq(&r.pick(sni), &certs[i].key);
        assert!(is(Some("a.example.com"), 0));
        assert!(is(Some("A.Example.COM."), 0));
        assert!(is(Some("img.example.com"), 1));
        assert!(is(Some("example.com"), 1));
        assert!(
            is(Some("deep.img.example.com"), 2),
            "a wildcard covers one label"
        );
        assert!(is(None, 2));
        assert!(is(Some("other.test"), 2));
        // Without `default = true` the first certificate is the default.
        let certs2 = LoadedCert::load_all(&specs[..2]).unwrap();
        let r2 = SniResolver::new(&certs2).unwrap();
        assert!(Arc::ptr_eq(&r2.pick(None), &certs2[0].key));
        // Reload swaps in place.
        assert!(r2.replace(&certs));
        assert!(Arc::ptr_eq(&r2.pick(None), &certs[2].key));
        assert!(!r2.replace(&[]));
    }

    #[test]
    fn ca_file_errors() {
        let a = write_pair(&["a.test"], None);
        assert_eq!(load_ca_file(&a.spec.cert).unwrap().len(), 1);
        let e = load_ca_file(&a.spec.key).unwrap_err();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        let e = load_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
