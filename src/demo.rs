//! `outpost demo`: the whole topology in one process on loopback, wired from the library
//! crates: the origin on the sample site, one shield, N edges and the selector.
//!
//! Ports are laid out from `--base-port P`: selector P, origin P+1, shield P+2, edges P+3…;
//! each node's admin port is its data port + 1000. With `--tls`, the shield and each edge also
//! serve HTTPS on their data port + 2000 with a certificate for `localhost` / `127.0.0.1`
//! signed by a CA generated at start-up (`<cache-dir>/tls/ca.pem`, for `curl --cacert`), and
//! the edges reach the shield over https, verifying it with that CA (`[upstream] ca_file`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeServer};
use outpost_selector::{ClientMap, Location, NodeSpec, Selector, SelectorConfig};
use tokio::sync::watch;

pub struct DemoArgs {
    pub edges: u16,
    pub base_port: u16,
    pub site: PathBuf,
    pub cache_dir: PathBuf,
    pub tls: bool,
    /// Every node joins a local nats-server (fleet mode).
    pub fleet: bool,
}

/// Offset of a node's HTTPS port from its data port (`--tls`).
const TLS_OFFSET: u16 = 2000;

/// The generated PEM files of `--tls`.
struct DemoTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and one leaf certificate (localhost, *.localhost, 127.0.0.1) signed by it, written to
/// `dir` (the key readable by the owner only). Generated at every start: nothing secret is
/// kept in the repository.
fn generate_tls(dir: &std::path::Path) -> Result<DemoTls, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| format!("generating the demo certificates: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Outpost demo CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?).map_err(err)?;
    let leaf_key = KeyPair::generate().map_err(err)?;
    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "*.localhost".to_string(),
        "127.0.0.1".to_string(),
    ])
    .map_err(err)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca).map_err(err)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let files = DemoTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let write = |path: &PathBuf, text: String, private: bool| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        std::io::Write::write_all(
            &mut opts
                .open(path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
            text.as_bytes(),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&files.ca, ca.pem(), false)?;
    write(&files.cert, leaf.pem(), false)?;
    write(&files.key, leaf_key.serialize_pem(), true)?;
    Ok(files)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Regions the demo edges are spread over, for the selector's `nearest` policy.
const REGIONS: [(&str, f64, f64); 2] = [("eu", 48.8566, 2.3522), ("us", 38.9072, -77.0369)];

pub async fn run(args: DemoArgs, shutdown: impl std::future::Future<Output = ()>) -> ExitCode {
    let p = args.base_port;
    let top = if args.tls { 2003 } else { 1003 };
    if args.edges == 0 || u32::from(p) + top + u32::from(args.edges) > 65535 {
        errln!(
            "outpost demo: --edges must be at least 1 and --base-port leave room for P+{} and its admin ports (+1000){}",
            2 + args.edges,
            if args.tls {
                " and HTTPS ports (+2000)"
            } else {
                ""
            }
        );
        return ExitCode::from(64);
    }
    // --fleet: a local nats-server (JetStream) that every node joins.
    let nats = if args.fleet {
        match start_nats(&args.cache_dir.join("nats"), p + NATS_OFFSET).await {
            Ok(n) => Some(n),
            Err(code) => return code,
        }
    } else {
        None
    };
    let tls = if args.tls {
        match generate_tls(&args.cache_dir.join("tls")) {
            Ok(t) => Some(t),
            Err(e) => return fail("TLS setup", &e),
        }
    } else {
        None
    };
    if !args.site.join("index.html").is_file() {
        errln!(
            "outpost demo: no sample site at {} (run from the repository root, or pass --site DIR)",
            args.site.display()
        );
        return ExitCode::from(64);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();

    // Origin.
    let origin_cfg = match outpost_origin::OriginConfig::load(
        None,
        outpost_origin::OriginOverrides {
            listen: Some(addr(p + 1).to_string()),
            root: Some(args.site.display().to_string()),
            rules: Some("configs/origin-rules.toml".into()).filter(|r| PathBuf::from(r).is_file()),
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            errout!("{e}");
            return ExitCode::from(64);
        }
    };
    let origin = match outpost_origin::OriginServer::bind(origin_cfg).await {
        Ok(o) => o,
        Err(e) => return fail("origin", &e.to_string()),
    };
    tasks.push(tokio::spawn({
        let rx = stop_rx.clone();
        async move {
            let _ = origin.run(stopped(rx)).await;
        }
    }));
    let origin_url = format!("http://{}", addr(p + 1));

    // One admin token for every node: $OUTPOST_ADMIN_TOKEN, or a fresh random one.
    let from_env = std::env::var(outpost_purge_api::ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty());
    let token = from_env.clone().unwrap_or_else(|| {
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        blake3::hash(seed.as_bytes()).to_hex()[..32].to_string()
    });
    let admin_section = if from_env.is_some() {
        String::new()
    } else {
        format!(
            "[admin]\ntokens = [{{ secret = \"{token}\", scopes = [\"purge\", \"push\", \"read\"] }}]\n"
        )
    };

    // Shield.
    let node_cfg = |role: &str, name: &str, port: u16, shield: Option<u16>| {
        let mut t = format!(
            "role = \"{role}\"\nname = \"{name}\"\nlisten = \"{}\"\nadmin_listen = \"{}\"\norigin = \"{origin_url}\"\n[cache]\ndir = \"{}\"\nmemory = \"64MiB\"\ndisk = \"1GiB\"\n{admin_section}",
            addr(port),
            addr(port + 1000),
            args.cache_dir.join(name).display(),
        );
        if let Some(s) = shield {
            let (scheme, data) = match &tls {
                Some(_) => ("https", s + TLS_OFFSET),
                None => ("http", s),
            };
            t.push_str(&format!(
                "[[shields]]\nname = \"shield\"\nurl = \"{scheme}://{}\"\nadmin = \"{}\"\n",
                addr(data),
                addr(s + 1000)
            ));
        }
        if nats.is_some() {
            // Every node joins the fleet: purges and pushes reach all of them through NATS.
            t.push_str(&format!(
                "[fleet]\nservers = [\"nats://{}\"]\n",
                addr(p + NATS_OFFSET)
            ));
        } else if role == "edge" {
            // Sibling edges: a purge sent to any edge reaches all of them (and the shield).
            for j in 0..args.edges {
                let sibling = p + 3 + j;
                if sibling != port {
                    t.push_str(&format!(
                        "[[peers]]\nname = \"edge-{}\"\nadmin = \"{}\"\n",
                        j + 1,
                        addr(sibling + 1000)
                    ));
                }
            }
        }
        if let Some(files) = &tls {
            let q = |p: &PathBuf| format!("{:?}", p.display().to_string());
            t.push_str(&format!(
                "[tls]\nlisten = \"{}\"\n[[tls.certs]]\ncert = {}\nkey = {}\n[upstream]\nca_file = {}\n",
                addr(port + TLS_OFFSET),
                q(&files.cert),
                q(&files.key),
                q(&files.ca),
            ));
        }
        EdgeConfig::from_source(
            &Source::inline(format!("demo {name}"), t),
            Default::default(),
        )
    };
    let mut nodes = vec![("shield".to_string(), "shield", p + 2)];
    for i in 0..args.edges {
        nodes.push((format!("edge-{}", i + 1), "edge", p + 3 + i));
    }
    for (name, role, port) in &nodes {
        let shield = (*role == "edge").then_some(p + 2);
        let cfg = match node_cfg(role, name, *port, shield) {
            Ok(c) => c,
            Err(e) => {
                errout!("{e}");
                return ExitCode::from(64);
            }
        };
        let server = match EdgeServer::bind(cfg).await {
            Ok(s) => s,
            Err(e) => return fail(name, &e.to_string()),
        };
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(server.run(stopped(rx))));
    }

    // Selector.
    let specs: Vec<NodeSpec> = (0..args.edges)
        .map(|i| {
            let (region, lat, lon) = REGIONS[usize::from(i) % REGIONS.len()];
            NodeSpec::new(
                format!("edge-{}", i + 1),
                addr(p + 3 + i),
                addr(p + 1003 + i),
            )
            .with_location(Location::region(region, lat, lon))
        })
        .collect();
    let mut sel = SelectorConfig::new(addr(p), specs);
    sel.admin_listen = Some(addr(p + 1000));
    sel.clients = ClientMap::new(Some(Location::region("eu", REGIONS[0].1, REGIONS[0].2)));
    let selector = match Selector::bind(sel).await {
        Ok(s) => s,
        Err(e) => return fail("selector", &e.to_string()),
    };
    tasks.push(tokio::spawn({
        let rx = stop_rx.clone();
        selector.run(stopped(rx))
    }));

    print_table(&args, p, tls.as_ref().map(|t| t.ca.as_path()), &token);
    if nats.is_some() {
        outln!(
            "Fleet: every node joins nats-server on {} (JetStream); see http://{}/fleet",
            addr(p + NATS_OFFSET),
            addr(p + 1003)
        );
    }
    shutdown.await;
    outln!("stopping the demo…");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(mut n) = nats {
        let _ = n.kill().await;
    }
    ExitCode::SUCCESS
}

/// The NATS port of `--fleet`: the base port + 900.
const NATS_OFFSET: u16 = 900;

/// Starts `nats-server -js` on 127.0.0.1:`port`, storing in `store`; waits (5 s at most) until
/// it accepts connections. Exit 69 (unavailable) with how to install it when it is missing.
async fn start_nats(store: &std::path::Path, port: u16) -> Result<tokio::process::Child, ExitCode> {
    let Some(bin) = outpost_fleet::nats_server_binary() else {
        errln!(
            "outpost demo --fleet needs nats-server (NATS with JetStream), which is not installed.\n\
             On Debian or Ubuntu: sudo apt install nats-server; elsewhere see https://docs.nats.io/running-a-nats-service/introduction/installation"
        );
        return Err(ExitCode::from(69));
    };
    let mut child = match tokio::process::Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Err(fail("nats-server", &format!("{}: {e}", bin.display()))),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if tokio::net::TcpStream::connect(addr(port)).await.is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(
                "nats-server",
                &format!("exited ({status}); is port {port} (--base-port + 900) free?"),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                "nats-server",
                &format!("not listening on port {port} after 5 s"),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn fail(what: &str, e: &str) -> ExitCode {
    errln!("outpost demo: cannot start the {what}: {e}");
    if e.contains("in use") || e.contains("cannot bind") {
        // The role's own hint names its flag; the demo picks every port from one base.
        errln!(
            "outpost demo: its ports all come from --base-port (P and up, admin ports P+1000 and up); try another, e.g. --base-port 18080"
        );
    }
    ExitCode::FAILURE
}

fn print_table(args: &DemoArgs, p: u16, ca: Option<&std::path::Path>, token: &str) {
    // With --tls, an `https` column: the node's HTTPS port (data + 2000).
    let https = |port: Option<u16>| match (ca, port) {
        (Some(_), Some(port)) => format!("https://localhost:{}", port + TLS_OFFSET),
        (Some(_), None) => "-".to_string(),
        (None, _) => String::new(),
    };
    let row = |component: &str, role: &str, data: String, admin: String, tls: String| {
        let line = format!("{component:<10} {role:<8} {data:<24} {admin:<24} {tls}");
        outln!("{}", line.trim_end());
    };
    outln!("Outpost demo is running (Ctrl-C stops everything)\n");
    let tls_header = if ca.is_some() { "https" } else { "" };
    row(
        "component",
        "role",
        "data".into(),
        "admin".into(),
        tls_header.into(),
    );
    row(
        "selector",
        "front",
        format!("http://{}", addr(p)),
        format!("http://{}/nodes", addr(p + 1000)),
        https(None),
    );
    row(
        "origin",
        "origin",
        format!("http://{}", addr(p + 1)),
        "-".into(),
        https(None),
    );
    row(
        "shield",
        "shield",
        format!("http://{}", addr(p + 2)),
        format!("http://{}", addr(p + 1002)),
        https(Some(p + 2)),
    );
    for i in 0..args.edges {
        row(
            &format!("edge-{}", i + 1),
            "edge",
            format!("http://{}", addr(p + 3 + i)),
            format!("http://{}", addr(p + 1003 + i)),
            https(Some(p + 3 + i)),
        );
    }
    outln!("\nTry:");
    outln!(
        "  curl -sI http://{}/                      # through the selector: x-cache MISS, then HIT",
        addr(p)
    );
    outln!(
        "  curl -s  http://{}/nodes                 # which edge got the connections",
        addr(p + 1000)
    );
    outln!(
        "  curl -s  http://{}/metrics | grep hit_ratio",
        addr(p + 1003)
    );
    outln!(
        "  curl -s  http://{}/stats                 # rolling windows, top missed URLs",
        addr(p + 1003)
    );
    outln!(
        "  open http://{}/ in a browser             # edge-1's status page with a live chart",
        addr(p + 1003)
    );
    outln!(
        "  curl -s -X POST -H 'Authorization: Bearer {token}' -d '{{\"urls\":[\"/\"]}}' http://{}/purge",
        addr(p + 1003)
    );
    outln!(
        "  curl -s -X PUT -H 'Authorization: Bearer {token}' --data-binary @README.md http://{}/objects/readme.txt",
        addr(p + 1003)
    );
    outln!(
        "  OUTPOST_ADMIN_TOKEN={token} outpost purge --admin http://{} --tag html",
        addr(p + 1003)
    );
    if let Some(ca) = ca {
        outln!(
            "  curl -sI --cacert {} https://localhost:{}/   # HTTPS (h2) at edge-1",
            ca.display(),
            p + 3 + TLS_OFFSET
        );
        outln!("\nCA certificate (for curl --cacert): {}", ca.display());
    }
    outln!("\nadmin token (purge, push, read on every node): {token}");
    outln!("cache directories: {}", args.cache_dir.display());
}
