//! Upstream TLS: the rustls `ClientConfig` for `https://` origins and shields (system roots,
//! the CA certificates of `[upstream] ca_file`, or, explicitly and loudly, no verification).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::debug;

use super::certs::pem_problem;
use super::provider;

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
