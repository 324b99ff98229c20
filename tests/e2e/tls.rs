//! HTTPS end to end (issue 8): the edge's TLS listener (TLS 1.3 and 1.2, ALPN h2 and
//! http/1.1), SNI with wildcard and default certificates, start-up errors for bad certificate
//! files, hot reload that keeps open connections, `https://` origins and shields verified with
//! a configured CA and the handshake timeout. (`outpost demo --tls` is in `demo`.)
//!
//! Every certificate and private key is generated here with rcgen into a temporary directory;
//! none is committed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeOverrides};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::edge::{Edge, Reloader, TlsState, bind, config};
use crate::support::proc::outpost;
use crate::support::test_origin::{Reply, TestOrigin};
use crate::support::{client_within, https_client as https_client_within, init};

/// Upper bound of every wait and request.
const WAIT: Duration = Duration::from_secs(20);
const PUSH_TOKEN: &str = "tls-push-token";
const READ_TOKEN: &str = "tls-read-token";

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A test CA that signs leaf certificates, and a directory for the PEM files.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

/// A leaf certificate and its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { ca, dir }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_valid_until(names, None)
    }

    /// `not_after`: (year, month, day); in the past for an expired certificate.
    fn leaf_valid_until(&self, names: &[&str], not_after: Option<(i32, u8, u8)>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        if let Some((y, m, d)) = not_after {
            p.not_before = rcgen::date_time_ymd(y - 1, m, d);
            p.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = p.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `<stem>.pem` and `<stem>.key`; returns their paths.
    fn write(&self, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{stem}.pem"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    }
}

fn cert_entry(cert: &Path, key: &Path, default: bool) -> String {
    format!(
        "[[tls.certs]]\ncert = {:?}\nkey = {:?}\n{}",
        cert.display().to_string(),
        key.display().to_string(),
        if default { "default = true\n" } else { "" }
    )
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A running edge with a TLS listener; dropping it stops the server.
struct TlsEdge {
    addr: SocketAddr,
    tls_addr: SocketAddr,
    admin_addr: SocketAddr,
    tls: Arc<TlsState>,
    reloader: Reloader,
    _edge: Edge,
}

/// The config text of an edge in front of `origin` (127.0.0.1:0 everywhere); `extra` holds
/// `[tls]`, `[[tls.certs]]`, `[upstream]`... An `[admin]` section with a push and a read
/// token is added.
fn edge_toml(origin: &str, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"{origin}\"\n\
         [admin]\ntokens = [{{ secret = \"{PUSH_TOKEN}\", scopes = [\"push\"] }}, {{ secret = \"{READ_TOKEN}\", scopes = [\"read\"] }}]\n\
         {extra}"
    )
}

fn tls_config(text: &str) -> EdgeConfig {
    config("tls-test.toml", text)
}

impl TlsEdge {
    async fn start(text: &str) -> TlsEdge {
        let server = bind(tls_config(text)).await;
        let tls = server.tls_state().expect("TLS state");
        let reloader = server.reloader();
        let edge = Edge::run(server);
        TlsEdge {
            addr: edge.addr,
            tls_addr: edge.tls_addr.expect("a TLS listener"),
            admin_addr: edge.admin.expect("an admin listener"),
            tls,
            reloader,
            _edge: edge,
        }
    }

    fn https(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_addr.port())
    }

    async fn reload(&self, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = client_within(WAIT).post(format!("http://{}/tls/reload", self.admin_addr));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.timeout(WAIT).send().await.expect("POST /tls/reload");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }
}

/// A reqwest client that trusts only `ca_pem` and reports the peer's certificate.
fn https_client(ca_pem: &str) -> reqwest::ClientBuilder {
    https_client_within(ca_pem, WAIT)
}

/// The DER of the certificate the server presented.
fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}

async fn cacheable_origin(path: &str, body: &'static str) -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.route(
        path,
        Reply::ok(body).header("cache-control", "public, max-age=600"),
    );
    origin
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 and HTTP/2 over TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h1_and_h2_over_tls_with_tls12_and_tls13() {
    let pki = Pki::new("test CA");
    let (cert, key) = pki.write("edge", &pki.leaf(&["localhost", "127.0.0.1"]));
    let origin = cacheable_origin("/a", "over tls").await;
    let edge = TlsEdge::start(&edge_toml(
        &origin.base_url(),
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}",
            cert_entry(&cert, &key, false)
        ),
    ))
    .await;

    let h1 = https_client(&pki.ca_pem()).http1_only().build().unwrap();
    let r = h1
        .get(edge.https("localhost", "/a"))
        .send()
        .await
        .expect("h1 over TLS");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.text().await.unwrap(), "over tls");
    let upstream = origin.last_request("/a").expect("the origin saw the miss");
    assert_eq!(
        upstream.header("x-forwarded-proto"),
        Some("https"),
        "{upstream:?}"
    );

    // ALPN offers h2 first: reqwest's default client speaks HTTP/2 over TLS.
    let h2 = https_client(&pki.ca_pem()).build().unwrap();
    let r = h2
        .get(edge.https("localhost", "/a"))
        .send()
        .await
        .expect("h2 over TLS");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        r.headers()["x-cache"],
        "HIT",
        "h1 and h2 share one cache entry"
    );
    assert_eq!(r.text().await.unwrap(), "over tls");

    // TLS 1.2 only, and TLS 1.3 only.
    for (min, max) in [
        (
            reqwest::tls::Version::TLS_1_2,
            reqwest::tls::Version::TLS_1_2,
        ),
        (
            reqwest::tls::Version::TLS_1_3,
            reqwest::tls::Version::TLS_1_3,
        ),
    ] {
        let c = https_client(&pki.ca_pem())
            .tls_version_min(min)
            .tls_version_max(max)
            .build()
            .unwrap();
        let r = c
            .get(edge.https("localhost", "/a"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{max:?}: {e}"));
        assert_eq!(r.status(), 200, "{max:?}");
    }

    // The plain data port still serves (the same object: the key is host + path).
    let r = client_within(WAIT)
        .get(format!("http://{}/a", edge.addr))
        .header("host", format!("localhost:{}", edge.tls_addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(origin.hits("/a"), 1);
    assert!(edge.tls.stats().completed >= 4, "{:?}", edge.tls.stats());
}

// ---------------------------------------------------------------------------------------------
// SNI
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sni_picks_exact_wildcard_and_default_certificates() {
    let pki = Pki::new("test CA");
    let exact = pki.leaf(&["a.example.com"]);
    let wildcard = pki.leaf(&["*.example.com"]);
    let default = pki.leaf(&["default.test", "127.0.0.1"]);
    let (c1, k1) = pki.write("exact", &exact);
    let (c2, k2) = pki.write("wildcard", &wildcard);
    let (c3, k3) = pki.write("default", &default);
    let origin = cacheable_origin("/", "root").await;
    // The default is listed last, so only `default = true` makes it the default.
    let edge = TlsEdge::start(&edge_toml(
        &origin.base_url(),
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
            cert_entry(&c1, &k1, false),
            cert_entry(&c2, &k2, false),
            cert_entry(&c3, &k3, true)
        ),
    ))
    .await;

    let cases: [(&str, &[u8], &str); 4] = [
        ("a.example.com", &exact.der, "exact name"),
        ("img.example.com", &wildcard.der, "wildcard"),
        ("default.test", &default.der, "the default's own name"),
        ("127.0.0.1", &default.der, "no SNI (an IP address)"),
    ];
    for (host, want, what) in cases {
        let client = https_client(&pki.ca_pem())
            .resolve(host, edge.tls_addr)
            .build()
            .unwrap();
        let r = client
            .get(edge.https(host, "/"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what} ({host}): {e}"));
        assert_eq!(r.status(), 200, "{what}");
        assert!(
            peer_cert(&r) == want,
            "{what}: {host} got the wrong certificate"
        );
    }

    // A name no certificate covers gets the default one (which the client then rejects for
    // the name mismatch); raw rustls shows what was presented.
    let presented = presented_cert(edge.tls_addr, "other.test", &pki.ca_pem()).await;
    assert!(
        presented == default.der,
        "unknown name: the default certificate"
    );
    let presented = presented_cert(edge.tls_addr, "x.y.example.com", &pki.ca_pem()).await;
    assert!(
        presented == default.der,
        "a wildcard covers one label only: the default certificate"
    );
}

/// Connects with tokio-rustls sending `sni`, and returns the leaf certificate the server
/// presented, whether or not it verifies for that name.
async fn presented_cert(addr: SocketAddr, sni: &str, ca_pem: &str) -> Vec<u8> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct Capture(
        Arc<Mutex<Option<Vec<u8>>>>,
        Arc<rustls::client::WebPkiServerVerifier>,
    );
    impl ServerCertVerifier for Capture {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            *self.0.lock().unwrap() = Some(end_entity.to_vec());
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.1.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.1.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.supported_verify_schemes()
        }
    }
    init();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(None));
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Capture(seen.clone(), webpki)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let _tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    seen.lock().unwrap().take().expect("a certificate")
}

// ---------------------------------------------------------------------------------------------
// Start-up errors
// ---------------------------------------------------------------------------------------------

/// Runs `outpost edge` with these extra arguments; returns (exit code, stderr).
fn edge_fails(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec![
        "edge",
        "--listen",
        "127.0.0.1:0",
        "--origin",
        "http://127.0.0.1:9",
    ];
    all.extend_from_slice(args);
    let out = outpost(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_certificate_or_key_is_a_config_error_naming_the_file() {
    let pki = Pki::new("test CA");
    let (cert, _) = pki.write("good", &pki.leaf(&["localhost"]));
    let (_, other_key) = pki.write("other", &pki.leaf(&["localhost"]));
    let (expired, expired_key) = pki.write(
        "expired",
        &pki.leaf_valid_until(&["localhost"], Some((2020, 1, 1))),
    );
    let missing = pki.dir.path().join("missing.pem");
    let s = |p: &Path| p.display().to_string();

    let cases = [
        (&cert, &other_key, &other_key, "does not match"),
        (&missing, &other_key, &missing, "cannot read"),
        (&expired, &expired_key, &expired, "expired"),
    ];
    for (c, k, named, why) in cases {
        let (code, stderr) = edge_fails(&[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &s(c),
            "--tls-key",
            &s(k),
        ]);
        assert_eq!(
            code,
            Some(64),
            "{why}: exit code 64 (config error)\n{stderr}"
        );
        assert!(
            stderr.contains(&s(named)),
            "{why}: names {}\n{stderr}",
            s(named)
        );
        assert!(stderr.contains(why), "{why}\n{stderr}");
    }

    // From a config file: the field and the line are named too.
    let file = pki.dir.path().join("edge.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\norigin = \"http://127.0.0.1:9\"\n[tls]\nlisten = \"127.0.0.1:0\"\n{}",
            cert_entry(&expired, &expired_key, false)
        ),
    )
    .unwrap();
    let out = outpost(&["edge", "--config", &s(&file)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(":6: field `tls.certs[0].cert`") && stderr.contains(&s(&expired)),
        "{stderr}"
    );

    // A lone --tls-cert is a usage error too.
    let (code, stderr) = edge_fails(&["--tls-listen", "127.0.0.1:0", "--tls-cert", &s(&cert)]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reload_switches_the_certificate_and_keeps_open_connections() {
    let pki = Pki::new("test CA");
    let v1 = pki.leaf(&["a.example.com"]);
    let (cert, key) = pki.write("site", &v1);
    let origin = cacheable_origin("/a", "reloaded").await;
    let text = edge_toml(
        &origin.base_url(),
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}",
            cert_entry(&cert, &key, false)
        ),
    );
    let edge = TlsEdge::start(&text).await;
    let client = |_: ()| {
        https_client(&pki.ca_pem())
            .resolve("a.example.com", edge.tls_addr)
            .build()
            .unwrap()
    };
    let get = |c: reqwest::Client| {
        let url = edge.https("a.example.com", "/a");
        async move {
            let r = c.get(url).send().await.expect("GET over TLS");
            assert_eq!(r.status(), 200);
            let der = peer_cert(&r);
            assert_eq!(r.text().await.unwrap(), "reloaded");
            der
        }
    };
    // A keep-alive connection (h2) made before the reload.
    let old = client(());
    assert!(get(old.clone()).await == v1.der);

    // New files in place, then POST /tls/reload: needs the push scope.
    let v2 = pki.leaf(&["a.example.com"]);
    pki.write("site", &v2);
    assert_eq!(edge.reload(None).await.0, 401);
    assert_eq!(edge.reload(Some(READ_TOKEN)).await.0, 403);
    let (status, body) = edge.reload(Some(PUSH_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"], true, "{body}");
    assert_eq!(body["certs"][0]["names"][0], "a.example.com", "{body}");

    // The old connection still works, on its old session (so it was not dropped)...
    assert!(
        get(old.clone()).await == v1.der,
        "the open connection is kept"
    );
    // ...and a new connection sees the new certificate.
    assert!(
        get(client(())).await == v2.der,
        "new connections get the new certificate"
    );

    // A broken set (key of another certificate) is refused; the running one stays.
    let stray = pki.leaf(&["a.example.com"]);
    std::fs::write(&key, &stray.key_pem).unwrap();
    let (status, body) = edge.reload(Some(PUSH_TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["reloaded"], false, "{body}");
    let why = body["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("does not match") && why.contains(&key.display().to_string()),
        "{body}"
    );
    assert!(
        get(client(())).await == v2.der,
        "the running certificate is kept"
    );
    assert!(get(old.clone()).await == v1.der);

    // The SIGHUP path: a re-read config with other files is applied by the Reloader.
    let v3 = pki.leaf(&["a.example.com"]);
    let (cert3, key3) = pki.write("site-v3", &v3);
    let text3 = edge_toml(
        &origin.base_url(),
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}",
            cert_entry(&cert3, &key3, false)
        ),
    );
    let kept = edge
        .reloader
        .apply(tls_config(&text3))
        .expect("reload applies");
    assert!(kept.is_empty(), "{kept:?}");
    assert!(
        get(client(())).await == v3.der,
        "SIGHUP reload switches too"
    );
    // A config whose certificate is broken never loads (SIGHUP logs it and keeps running).
    std::fs::write(&key3, &stray.key_pem).unwrap();
    let e = EdgeConfig::from_source(
        &Source::inline("tls-test.toml", text3),
        EdgeOverrides::default(),
    )
    .unwrap_err();
    assert!(e.mentions("tls.certs[0].key"), "{e}");
    assert!(get(client(())).await == v3.der);
    // And /tls/reload now re-reads the v3 files (broken): refused, v3 kept.
    assert_eq!(edge.reload(Some(PUSH_TOKEN)).await.0, 422);
    assert!(get(old).await == v1.der, "still the first connection");
    assert_eq!(origin.hits("/a"), 1);
}

// ---------------------------------------------------------------------------------------------
// HTTPS upstreams
// ---------------------------------------------------------------------------------------------

/// A minimal HTTPS/1.1 origin on tokio-rustls: keep-alive, one cacheable body, and a record
/// of the SNI each connection sent.
struct TlsOrigin {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    snis: Arc<Mutex<Vec<Option<String>>>>,
    task: JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsOrigin {
    async fn start(leaf: &Leaf) -> TlsOrigin {
        init();
        let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let snis = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (hits.clone(), snis.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, hits, snis) = (acceptor.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    snis.lock().unwrap().push(sni);
                    let mut buf = Vec::new();
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = "from the https origin";
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: public, max-age=600\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if tls.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TlsOrigin {
            addr,
            hits,
            snis,
            task,
        }
    }
}

#[tokio::test]
async fn https_origin_verified_with_a_configured_ca_and_sni_override() {
    let origin_pki = Pki::new("origin CA");
    // Valid for the IP and for origin.test.
    let origin = TlsOrigin::start(&origin_pki.leaf(&["origin.test", "127.0.0.1"])).await;
    let url = format!("https://{}", origin.addr);
    let ca = origin_pki.ca_path().display().to_string();

    // ca_file: verified against the origin's CA; the URL's host (an IP) sends no SNI.
    let edge = TlsEdge::start(&edge_toml(
        &url,
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}[upstream]\nca_file = {ca:?}\n",
            {
                let edge_pki = &origin_pki;
                let (c, k) = edge_pki.write("edge", &edge_pki.leaf(&["localhost"]));
                cert_entry(&c, &k, false)
            }
        ),
    ))
    .await;
    let plain = client_within(WAIT);
    let r = plain
        .get(format!("http://{}/x", edge.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.text().await.unwrap(), "from the https origin");
    let r = plain
        .get(format!("http://{}/x", edge.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(origin.hits.load(Ordering::SeqCst), 1);
    assert_eq!(origin.snis.lock().unwrap().last().cloned(), Some(None));

    // sni = "origin.test": sent to the origin and verified against it.
    let only_name = Pki::new("name-only CA");
    let named = TlsOrigin::start(&only_name.leaf(&["origin.test"])).await;
    let edge2 = TlsEdge::start(&edge_toml(
        &format!("https://{}", named.addr),
        &format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\n{}[upstream]\nca_file = {:?}\nsni = \"origin.test\"\n",
            {
                let (c, k) = only_name.write("edge2", &only_name.leaf(&["localhost"]));
                cert_entry(&c, &k, false)
            },
            only_name.ca_path().display().to_string()
        ),
    ))
    .await;
    let r = plain
        .get(format!("http://{}/y", edge2.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "from the https origin");
    assert_eq!(
        named.snis.lock().unwrap().last().cloned(),
        Some(Some("origin.test".to_string()))
    );

    // Without the CA (system roots) the origin's certificate is refused: 502, no request
    // reaches it. (On a machine without system roots the edge refuses to start instead.)
    match start_plain_edge(&url, "").await {
        Ok(edge3) => {
            let r = plain
                .get(format!("http://{}/z", edge3.0))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_server_error(), "{}", r.status());
        }
        Err(e) => assert!(e.contains("root certificates"), "{e}"),
    }
    assert_eq!(
        origin.hits.load(Ordering::SeqCst),
        1,
        "no request without a verified session"
    );

    // insecure_skip_verify (explicit, logged) accepts it.
    let edge4 = start_plain_edge(&url, "[upstream]\ninsecure_skip_verify = true\n")
        .await
        .unwrap();
    let r = plain
        .get(format!("http://{}/z", edge4.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(origin.hits.load(Ordering::SeqCst), 2);
}

/// An edge without a TLS listener; returns its data address and the running edge, or why it
/// could not start.
async fn start_plain_edge(origin: &str, extra: &str) -> Result<(SocketAddr, Edge), String> {
    let server = outpost_edge::EdgeServer::bind(tls_config(&edge_toml(origin, extra)))
        .await
        .map_err(|e| e.to_string())?;
    let edge = Edge::run(server);
    Ok((edge.addr, edge))
}

#[tokio::test]
async fn https_shield_between_edge_and_origin() {
    let pki = Pki::new("cluster CA");
    let origin = cacheable_origin("/s", "via an https shield").await;
    let (c, k) = pki.write("shield", &pki.leaf(&["127.0.0.1"]));
    let shield = TlsEdge::start(&format!(
        "role = \"shield\"\nname = \"shield-1\"\n{}",
        edge_toml(
            &origin.base_url(),
            &format!(
                "[tls]\nlisten = \"127.0.0.1:0\"\n{}",
                cert_entry(&c, &k, false)
            )
        )
    ))
    .await;
    let (c2, k2) = pki.write("edge", &pki.leaf(&["localhost"]));
    let edge = TlsEdge::start(&edge_toml(
        &origin.base_url(),
        &format!(
            "[[shields]]\nname = \"shield-1\"\nurl = \"https://{}\"\n[tls]\nlisten = \"127.0.0.1:0\"\n{}[upstream]\nca_file = {:?}\n",
            shield.tls_addr,
            cert_entry(&c2, &k2, false),
            pki.ca_path().display().to_string()
        ),
    ))
    .await;
    let client = https_client(&pki.ca_pem()).build().unwrap();
    let r = client
        .get(edge.https("localhost", "/s"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let via = r.headers()["via"].to_str().unwrap().to_string();
    assert_eq!(r.text().await.unwrap(), "via an https shield");
    assert!(via.contains("shield-1"), "went through the shield: {via}");
    assert_eq!(origin.hits("/s"), 1);
    assert!(
        shield.tls.stats().completed >= 1,
        "{:?}",
        shield.tls.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// Handshake timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn handshake_timeout_frees_the_slot_and_others_are_served() {
    let pki = Pki::new("test CA");
    let (cert, key) = pki.write("edge", &pki.leaf(&["localhost"]));
    let origin = cacheable_origin("/t", "still serving").await;
    let edge = TlsEdge::start(&edge_toml(
        &origin.base_url(),
        &format!(
            "[limits]\nheader_read_timeout = \"1s\"\n[tls]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"500ms\"\n{}",
            cert_entry(&cert, &key, false)
        ),
    ))
    .await;

    // Clients that connect and never send a ClientHello.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(edge.tls_addr).await.unwrap());
    }
    // Meanwhile others are served at once.
    let client = https_client(&pki.ca_pem()).build().unwrap();
    for _ in 0..3 {
        let r = client
            .get(edge.https("localhost", "/t"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "still serving");
    }
    // Handshakes run in the connection tasks: had the accept loop waited on the silent
    // clients, these requests would have queued behind 20 × 500 ms.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "served while handshakes hang: {:?}",
        started.elapsed()
    );
    // The silent ones are closed after the handshake timeout.
    for mut s in silent {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("closed by the server within the handshake timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "closed without data: {n:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "not before the timeout: {waited:?}"
    );
    assert_eq!(edge.tls.stats().timed_out, 20, "{:?}", edge.tls.stats());

    // A client that completes the handshake and then sends nothing is closed too (after
    // limits.header_read_timeout), instead of holding the connection forever.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(edge.tls_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut b))
        .await
        .expect("an idle TLS connection is closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
}
