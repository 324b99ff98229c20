//! Tests of the selector configuration: every field, every error with its field and line.

use super::*;
use crate::locate::Coords;

const GOOD: &str = r#"
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
policy = "nearest"

[health]
probe_interval = "200ms"
probe_timeout = "100ms"
rise = 3
fall = 2

[limits]
connect_timeout = "250ms"

[regions]
eu = { lat = 48.8566, lon = 2.3522 }
us = { lat = 39.0438, lon = -77.4874 }

[clients]
default = { region = "us" }

[[clients.prefix]]
cidr = "127.0.0.0/24"
region = "eu"

[[clients.prefix]]
cidr = "192.0.2.7"
lat = 35.0
lon = 139.0

[[nodes]]
name = "edge-eu"
address = "127.0.0.1:8081"
admin = "127.0.0.1:9081"
region = "eu"
weight = 3

[[nodes]]
name = "edge-us"
address = "127.0.0.1:8082"
admin = "127.0.0.1:9082"
lat = 40.0
lon = -75.0
region = "us"
"#;

fn load(text: &str) -> Result<SelectorConfig, ConfigErrors> {
    SelectorConfig::from_source(
        &Source::inline("selector.toml", text),
        SelectorOverrides::default(),
    )
}

fn line_of_field(e: &ConfigErrors, field: &str) -> Option<usize> {
    e.0.iter().find(|x| x.field == field).and_then(|x| x.line)
}

#[test]
fn parses_a_full_file() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(c.policy, PolicyKind::Nearest);
    assert_eq!(c.health.probe_interval, Duration::from_millis(200));
    assert_eq!(c.health.probe_timeout, Duration::from_millis(100));
    assert_eq!((c.health.rise, c.health.fall), (3, 2));
    assert_eq!(c.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.nodes[0].weight, 3);
    let eu = c.nodes[0].location.as_ref().unwrap();
    assert_eq!(eu.region.as_deref(), Some("eu"));
    assert_eq!(eu.coords, Coords::new(48.8566, 2.3522));
    // Explicit coordinates win over the region's; the region stays as a label.
    let us = c.nodes[1].location.as_ref().unwrap();
    assert_eq!(us.coords, Coords::new(40.0, -75.0));
    assert_eq!(us.region.as_deref(), Some("us"));
    assert_eq!(c.nodes[1].weight, 1);
}

#[test]
fn cidr_table_maps_clients() {
    let c = load(GOOD).unwrap();
    let region = |ip: &str| {
        c.clients
            .locate(ip.parse().unwrap())
            .map(|l| (l.region.clone(), l.coords.lat))
    };
    assert_eq!(region("127.0.0.5"), Some((Some("eu".into()), 48.8566)));
    assert_eq!(region("192.0.2.7"), Some((None, 35.0)));
    assert_eq!(region("192.0.2.8"), Some((Some("us".into()), 39.0438)));
    assert_eq!(region("::1"), Some((Some("us".into()), 39.0438)));
}

#[test]
fn defaults() {
    let c = load(
        "listen = \"127.0.0.1:1\"\n[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\nlat = 1\nlon = 2\n",
    )
    .unwrap();
    assert_eq!(c.policy, PolicyKind::Nearest);
    assert_eq!(c.health, HealthConfig::default());
    assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert!(c.admin_listen.is_none());
    assert!(c.clients.default_location().is_none());
    // Integers are fine as coordinates.
    assert_eq!(
        c.nodes[0].location.as_ref().unwrap().coords,
        Coords::new(1.0, 2.0)
    );
    // A short interval shortens the default timeout with it.
    let c = load(
        "listen = \"127.0.0.1:1\"\npolicy = \"hash\"\n[health]\nprobe_interval = \"100ms\"\n[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\n",
    )
    .unwrap();
    assert_eq!(c.health.probe_timeout, Duration::from_millis(100));
    assert!(c.nodes[0].location.is_none(), "no location needed for hash");
}

#[test]
fn every_policy_name_parses() {
    for p in PolicyKind::ALL {
        let c = load(&format!(
            "listen = \"127.0.0.1:1\"\npolicy = \"{}\"\n[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\nlat = 0\nlon = 0\n",
            p.as_str()
        ))
        .unwrap();
        assert_eq!(c.policy, p);
    }
}

#[test]
fn reports_every_error_with_field_and_line() {
    let text = r#"listen = "127.0.0.1:8080"
policy = "random"
[regions]
eu = { lat = 48.8, lon = 2.3 }
[clients]
default = { region = "mars" }
[[clients.prefix]]
cidr = "10.0.0.0/33"
region = "eu"
[[clients.prefix]]
cidr = "10.1.2.3/8"
region = "eu"
[[nodes]]
name = "a"
address = "127.0.0.1:8081"
admin = "127.0.0.1:9081"
region = "eu"
[[nodes]]
name = "a"
address = "localhost:8082"
admin = "127.0.0.1:9082"
region = "eu"
weight = 0
"#;
    let e = load(text).unwrap_err();
    let expect = [
        ("policy", 2),
        ("clients.default.region", 6),
        ("clients.prefix[0].cidr", 8),
        ("clients.prefix[1].cidr", 11),
        ("nodes[1].name", 19),
        ("nodes[1].address", 20),
        ("nodes[1].weight", 23),
    ];
    for (field, line) in expect {
        assert_eq!(line_of_field(&e, field), Some(line), "{field} in\n{e}");
    }
    assert_eq!(e.0.len(), expect.len(), "{e}");
    let text = e.to_string();
    for needle in [
        "unknown policy \"random\" (expected one of: nearest, latency, weighted-round-robin, least-connections, hash)",
        "unknown region \"mars\" (declared: eu)",
        "invalid CIDR prefix \"10.0.0.0/33\"",
        "has host bits set (the network is 10.0.0.0/8)",
        "duplicate node name \"a\" (first declared on line 14)",
        "invalid socket address \"localhost:8082\"",
        "must be between 1 and 1000000, not 0",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
}

#[test]
fn no_nodes_is_an_error() {
    let e = load("listen = \"127.0.0.1:8080\"\n").unwrap_err();
    assert!(e.mentions("nodes"), "{e}");
    let e = load("").unwrap_err();
    assert!(e.mentions("nodes") && e.mentions("listen"), "{e}");
}

#[test]
fn missing_node_fields_point_at_the_node() {
    let e = load("listen = \"127.0.0.1:8080\"\npolicy = \"hash\"\n\n[[nodes]]\nweight = 2\n")
        .unwrap_err();
    for f in ["nodes[0].name", "nodes[0].address", "nodes[0].admin"] {
        let line = line_of_field(&e, f);
        assert!(matches!(line, Some(4 | 5)), "{f}: {line:?} in\n{e}");
    }
}

#[test]
fn nearest_needs_node_locations() {
    let e = load(
        "listen = \"127.0.0.1:1\"\n[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\n",
    )
    .unwrap_err();
    assert!(e.mentions("nodes[0].region"), "{e}");
    assert!(e.to_string().contains("policy \"nearest\""), "{e}");
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let e = load(&GOOD.replace("weight = 3", "weight = 3\ncolour = \"red\"")).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    assert_eq!(e.0[0].field, "nodes.colour");
    let line = GOOD
        .lines()
        .position(|l| l.starts_with("weight = 3"))
        .unwrap()
        + 2;
    assert_eq!(e.0[0].line, Some(line), "{e}");
}

#[test]
fn coordinates_and_regions_are_checked() {
    let e = load(
        r#"listen = "127.0.0.1:1"
[regions]
north = { lat = 91, lon = 0 }
[[nodes]]
name = "a"
address = "127.0.0.1:2"
admin = "127.0.0.1:3"
region = "north"
[[nodes]]
name = "b"
address = "127.0.0.1:4"
admin = "127.0.0.1:5"
lat = 10
[[nodes]]
name = "c"
address = "127.0.0.1:6"
admin = "127.0.0.1:7"
lat = 10
lon = 200
"#,
    )
    .unwrap_err();
    assert!(e.mentions("regions.north.lat"), "{e}");
    assert!(e.mentions("nodes[1].lon"), "{e}");
    assert!(e.mentions("nodes[2].lon"), "{e}");
    // The bad region is reported once, not again by node a.
    assert!(!e.mentions("nodes[0].region"), "{e}");
    assert_eq!(e.0.len(), 3, "{e}");
}

#[test]
fn health_and_address_checks() {
    let e = load(
        r#"listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:8080"
policy = "hash"
[health]
probe_interval = "100ms"
probe_timeout = "1s"
rise = 0
fall = -1
[limits]
connect_timeout = "0s"
[[nodes]]
name = "loop"
address = "127.0.0.1:8080"
admin = "127.0.0.1:9081"
[[nodes]]
name = "bad name"
address = "127.0.0.1:8082"
admin = "127.0.0.1:9082"
[[nodes]]
name = "twin"
address = "127.0.0.1:8082"
admin = "127.0.0.1:9083"
"#,
    )
    .unwrap_err();
    for f in [
        "admin_listen",
        "health.probe_timeout",
        "health.rise",
        "health.fall",
        "limits.connect_timeout",
        "nodes[0].address",
        "nodes[1].name",
        "nodes[2].address",
    ] {
        assert!(e.mentions(f), "{f} missing from\n{e}");
    }
}

#[test]
fn flags_override_and_are_named() {
    let src = Source::inline("selector.toml", GOOD);
    let c = SelectorConfig::from_source(
        &src,
        SelectorOverrides {
            listen: Some("127.0.0.1:18080".into()),
            admin_listen: Some("127.0.0.1:19090".into()),
        },
    )
    .unwrap();
    assert_eq!(c.listen.port(), 18080);
    assert_eq!(c.admin_listen.unwrap().port(), 19090);
    let e = SelectorConfig::from_source(
        &src,
        SelectorOverrides {
            listen: Some("anywhere".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.mentions("--listen"), "{e}");
}

#[test]
fn built_in_code() {
    let c = SelectorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        vec![
            NodeSpec::new(
                "a",
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            )
            .with_weight(2)
            .with_location(Location::region("eu", 48.8, 2.3)),
        ],
    );
    assert_eq!(c.nodes[0].weight, 2);
    assert_eq!(c.policy, PolicyKind::Nearest);
}

#[test]
fn connection_limits_parse_default_and_are_checked() {
    const NODE: &str = "[[nodes]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nadmin = \"127.0.0.1:3\"\nlat = 1\nlon = 2\n";
    let c = load(&format!("listen = \"127.0.0.1:1\"\n{NODE}")).unwrap();
    assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(c.admin_max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);
    assert_eq!(
        c.admin_header_read_timeout,
        DEFAULT_ADMIN_HEADER_READ_TIMEOUT
    );
    assert_eq!(c.admin_idle_timeout, DEFAULT_ADMIN_IDLE_TIMEOUT);
    let c = load(&format!(
        "listen = \"127.0.0.1:1\"\n[limits]\nmax_connections = 10\nidle_timeout = \"2m\"\nadmin_max_connections = 3\nadmin_header_read_timeout = \"2s\"\nadmin_idle_timeout = \"5s\"\n{NODE}"
    ))
    .unwrap();
    assert_eq!(c.max_connections, 10);
    assert_eq!(c.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.admin_max_connections, 3);
    assert_eq!(c.admin_header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.admin_idle_timeout, Duration::from_secs(5));

    let e = load(&format!(
        "listen = \"127.0.0.1:1\"\n[limits]\nmax_connections = 0\nidle_timeout = \"0s\"\nadmin_max_connections = -4\nadmin_header_read_timeout = \"soon\"\nadmin_idle_timeout = \"0s\"\n{NODE}"
    ))
    .unwrap_err();
    for (field, line) in [
        ("limits.max_connections", 3),
        ("limits.idle_timeout", 4),
        ("limits.admin_max_connections", 5),
        ("limits.admin_header_read_timeout", 6),
        ("limits.admin_idle_timeout", 7),
    ] {
        assert_eq!(line_of_field(&e, field), Some(line), "{field}: {e}");
    }
    let e = load(&format!(
        "listen = \"127.0.0.1:1\"\n[limits]\nmax_connections = 100000000000\n{NODE}"
    ))
    .unwrap_err();
    assert_eq!(line_of_field(&e, "limits.max_connections"), Some(3), "{e}");
}
