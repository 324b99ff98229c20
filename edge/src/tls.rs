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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

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
// Certificates

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

fn pem_problem(what: &str, path: &dyn fmt::Display, e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => format!("cannot read {what} file {path}: {e}"),
        e => format!("{what} file {path} is not valid PEM: {e}"),
    }
}

/// `notBefore` and `notAfter` of a DER certificate.
pub fn validity(cert: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (tag, cert, _) = der_next(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = der_next(cert)?;
    if tag != 0x30 {
        return None;
    }
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let mut skipped = 0;
    while skipped < 3 || tbs.first() == Some(&0xa0) {
        let (tag, _, rest) = der_next(tbs)?;
        tbs = rest;
        if tag != 0xa0 {
            skipped += 1;
        }
    }
    let (tag, validity, _) = der_next(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, v1, rest) = der_next(validity)?;
    let (t2, v2, _) = der_next(rest)?;
    Some((der_time(t1, v1)?, der_time(t2, v2)?))
}

/// One DER element: (tag, contents, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, v: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 if s.len() == 14 => (num(0..4)?, 4),
        _ => return None,
    };
    let at = |i: usize| num(rest + i..rest + i + 2);
    let (month, day, h, m, sec) = (at(0)?, at(2)?, at(4)?, at(6)?, at(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + sec;
    Some(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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

// ---------------------------------------------------------------------------------------------
// Upstream

/// The validated `[upstream]` section: how `https://` origins and shields are verified.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTlsConfig {
    /// CA certificates that replace the system roots (`ca_file`).
    pub ca_file: Option<PathBuf>,
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Server name sent to (and verified against) the origin instead of its URL's host.
    pub sni: Option<ServerName<'static>>,
    /// No certificate verification at all. Only for tests and emergencies.
    pub insecure_skip_verify: bool,
}

impl PartialEq for UpstreamTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.ca_certs == other.ca_certs
            && self.sni == other.sni
            && self.insecure_skip_verify == other.insecure_skip_verify
    }
}

/// Reads a PEM file of CA certificates (at least one, each a valid trust anchor).
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| pem_problem("CA", &shown, e))?;
    if certs.is_empty() {
        return Err(format!("CA file {shown} holds no PEM CERTIFICATE block"));
    }
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        roots.add(c.clone()).map_err(|e| {
            format!(
                "certificate #{} in CA file {shown} is not a usable CA certificate: {e}",
                i + 1
            )
        })?;
    }
    Ok(certs)
}

/// What the upstream client needs: the rustls config and an SNI override for one origin.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub client: Arc<ClientConfig>,
    /// `(origin authority, name)`: the override applies to that origin only, never to shields.
    pub sni: Option<(http::uri::Authority, ServerName<'static>)>,
}

impl UpstreamTls {
    /// Builds the client config: `ca_file` roots, else the system roots, else (with
    /// `insecure_skip_verify`) none. Fails when the system has no usable root certificate.
    pub fn new(cfg: &UpstreamTlsConfig, origin: &http::Uri) -> Result<Self, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?;
        let client = if cfg.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth()
        } else if !cfg.ca_certs.is_empty() {
            let mut roots = RootCertStore::empty();
            for c in &cfg.ca_certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("[upstream] ca_file: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            use hyper_rustls::ConfigBuilderExt;
            builder
                .with_native_roots()
                .map_err(|e| {
                    format!(
                        "cannot load the system's root certificates for https upstreams: {e} (install ca-certificates or set [upstream] ca_file)"
                    )
                })?
                .with_no_client_auth()
        };
        Ok(Self {
            client: Arc::new(client),
            sni: cfg
                .sni
                .clone()
                .and_then(|name| Some((origin.authority()?.clone(), name))),
        })
    }

    /// A config that trusts nothing, for clients that only ever speak plain http.
    pub fn plain_only() -> Self {
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        Self {
            client: Arc::new(client),
            sni: None,
        }
    }

    /// The connector of one upstream (origin or shield) at `target`.
    pub fn connector(
        &self,
        target: &http::Uri,
        http: hyper_util::client::legacy::connect::HttpConnector,
    ) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.client).clone())
            .https_or_http();
        let builder = match &self.sni {
            Some((authority, name)) if Some(authority) == target.authority() => builder
                .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    name.clone(),
                )),
            _ => builder,
        };
        // HTTP/1.1 only, as nginx and Varnish speak to upstreams: the request target is
        // origin-form and the Host field is the site's authority, the one the cache key was
        // built from. Over HTTP/2, `:authority` would name the next hop's address instead, and
        // an upstream that (rightly, RFC 9113 §8.3.1) refuses a Host that disagrees with it
        // would refuse every request.
        builder.enable_http1().wrap_connector(http)
    }
}

/// `insecure_skip_verify`: accepts any certificate (the handshake signature is still
/// checked, so the connection is at least encrypted to whoever answered).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        debug!(server = ?server_name, "upstream certificate NOT verified (insecure_skip_verify)");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
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
