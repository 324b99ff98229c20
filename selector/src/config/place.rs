//! Where things are: the `[regions]` table, the `[clients]` prefix table, and the location of
//! a node or a client given as a region, coordinates, or both.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use outpost_config::{Diagnostics, Place, Setting};
use serde::Deserialize;

use crate::locate::{ClientMap, Coords, Location};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub(super) lat: Setting<f64>,
    pub(super) lon: Setting<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
    pub(super) default: Option<Setting<RawPlace>>,
    #[serde(default)]
    pub(super) prefix: Vec<Setting<RawPrefix>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlace {
    pub(super) region: Option<Setting<String>>,
    pub(super) lat: Option<Setting<f64>>,
    pub(super) lon: Option<Setting<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrefix {
    pub(super) cidr: Option<Setting<String>>,
    pub(super) region: Option<Setting<String>>,
    pub(super) lat: Option<Setting<f64>>,
    pub(super) lon: Option<Setting<f64>>,
}

/// The `[regions]` table: name to coordinates.
pub(super) struct Regions {
    /// Every declared name, valid or not, so a bad region is reported once, not again by
    /// every node that names it.
    declared: BTreeSet<String>,
    valid: HashMap<String, Coords>,
}

impl Regions {
    pub(super) fn validate(
        d: &mut Diagnostics,
        raw: &BTreeMap<String, Setting<RawRegion>>,
    ) -> Self {
        let mut valid = HashMap::new();
        for (name, r) in raw {
            let lat = latitude(d, &format!("regions.{name}.lat"), &r.value.lat);
            let lon = longitude(d, &format!("regions.{name}.lon"), &r.value.lon);
            if let (Some(lat), Some(lon)) = (lat, lon) {
                valid.insert(name.clone(), Coords::new(lat, lon));
            }
        }
        Self {
            declared: raw.keys().cloned().collect(),
            valid,
        }
    }
}

pub(super) fn latitude(d: &mut Diagnostics, field: &str, s: &Setting<f64>) -> Option<f64> {
    if (-90.0..=90.0).contains(&s.value) {
        Some(s.value)
    } else {
        d.error(
            field,
            s,
            format!("latitude {} is outside -90..=90", s.value),
        );
        None
    }
}

pub(super) fn longitude(d: &mut Diagnostics, field: &str, s: &Setting<f64>) -> Option<f64> {
    if (-180.0..=180.0).contains(&s.value) {
        Some(s.value)
    } else {
        d.error(
            field,
            s,
            format!("longitude {} is outside -180..=180", s.value),
        );
        None
    }
}

/// A place given as `region`, `lat` + `lon`, or both (explicit coordinates win; the region
/// is then a label). `Ok(None)`: nothing given. `Err(())`: an error was recorded.
pub(super) fn place(
    d: &mut Diagnostics,
    prefix: &str,
    regions: &Regions,
    region: &Option<Setting<String>>,
    lat: &Option<Setting<f64>>,
    lon: &Option<Setting<f64>>,
) -> Result<Option<Location>, ()> {
    let region_coords = match region {
        None => Ok(None),
        Some(r) => match regions.valid.get(&r.value) {
            Some(c) => Ok(Some(*c)),
            None if regions.declared.contains(&r.value) => Err(()),
            None => {
                let known: Vec<_> = regions.declared.iter().map(String::as_str).collect();
                d.error(
                    &format!("{prefix}.region"),
                    r,
                    if known.is_empty() {
                        format!(
                            "unknown region {:?}: declare it under [regions] with lat and lon",
                            r.value
                        )
                    } else {
                        format!(
                            "unknown region {:?} (declared: {})",
                            r.value,
                            known.join(", ")
                        )
                    },
                );
                Err(())
            }
        },
    };
    let coords = match (lat, lon) {
        (None, None) => Ok(None),
        (Some(la), Some(lo)) => {
            let la = latitude(d, &format!("{prefix}.lat"), la);
            let lo = longitude(d, &format!("{prefix}.lon"), lo);
            match (la, lo) {
                (Some(la), Some(lo)) => Ok(Some(Coords::new(la, lo))),
                _ => Err(()),
            }
        }
        (Some(la), None) => {
            d.error(
                &format!("{prefix}.lon"),
                la,
                "is required when `lat` is set",
            );
            Err(())
        }
        (None, Some(lo)) => {
            d.error(
                &format!("{prefix}.lat"),
                lo,
                "is required when `lon` is set",
            );
            Err(())
        }
    };
    let (region_coords, coords) = (region_coords?, coords?);
    Ok(coords.or(region_coords).map(|coords| Location {
        region: region.as_ref().map(|r| r.value.clone()),
        coords,
    }))
}

/// Line of a setting in its file, for "first declared on line N" messages.
pub(super) fn line_of<T>(d: &Diagnostics, s: &Setting<T>) -> Option<usize> {
    match &s.place {
        Place::File(span) => Some(d.source().line_of(span.start)),
        _ => None,
    }
}

pub(super) fn first_at(line: Option<usize>) -> String {
    line.map(|l| format!(" (first declared on line {l})"))
        .unwrap_or_default()
}

pub(super) fn clients(d: &mut Diagnostics, raw: &RawClients, regions: &Regions) -> ClientMap {
    let default = raw.default.as_ref().and_then(|s| {
        let p = &s.value;
        match place(d, "clients.default", regions, &p.region, &p.lat, &p.lon) {
            Ok(Some(loc)) => Some(loc),
            Ok(None) => {
                d.error("clients.default", s, "needs `region`, or `lat` and `lon`");
                None
            }
            Err(()) => None,
        }
    });
    let mut map = ClientMap::new(default);
    let mut seen: HashMap<IpNet, Option<usize>> = HashMap::new();
    for (i, entry) in raw.prefix.iter().enumerate() {
        let f = format!("clients.prefix[{i}]");
        let e = &entry.value;
        let net = match &e.cidr {
            Some(s) => cidr(d, &format!("{f}.cidr"), s).and_then(|net| {
                if let Some(first) = seen.get(&net) {
                    d.error(
                        &format!("{f}.cidr"),
                        s,
                        format!("duplicate prefix {net}{}", first_at(*first)),
                    );
                    return None;
                }
                seen.insert(net, line_of(d, s));
                Some(net)
            }),
            None => {
                d.error(
                    &format!("{f}.cidr"),
                    entry,
                    "is required (a source prefix, for example \"10.0.0.0/8\")",
                );
                None
            }
        };
        let loc = match place(d, &f, regions, &e.region, &e.lat, &e.lon) {
            Ok(Some(loc)) => Some(loc),
            Ok(None) => {
                d.error(&f, entry, "needs `region`, or `lat` and `lon`");
                None
            }
            Err(()) => None,
        };
        if let (Some(net), Some(loc)) = (net, loc) {
            map.insert(net, loc);
        }
    }
    map
}

/// A CIDR prefix, or a bare address meaning a single host.
fn cidr(d: &mut Diagnostics, field: &str, s: &Setting<String>) -> Option<IpNet> {
    let text = s.value.trim();
    let parsed = if text.contains('/') {
        text.parse::<IpNet>().ok()
    } else {
        text.parse::<IpAddr>().ok().map(IpNet::from)
    };
    match parsed {
        None => {
            d.error(
                field,
                s,
                format!(
                    "invalid CIDR prefix {:?} (expected for example \"10.0.0.0/8\" or \"2001:db8::/32\")",
                    s.value
                ),
            );
            None
        }
        // Host bits set is most often a typo for a different prefix: say which one we would
        // have used instead of guessing silently.
        Some(net) if net != net.trunc() => {
            d.error(
                field,
                s,
                format!(
                    "{:?} has host bits set (the network is {})",
                    s.value,
                    net.trunc()
                ),
            );
            None
        }
        Some(net) => Some(net),
    }
}
