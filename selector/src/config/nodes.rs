//! The `[[nodes]]` tables: names, addresses, weights and locations of the edges.

use std::collections::HashMap;
use std::net::SocketAddr;

use outpost_config::{Diagnostics, Setting};
use serde::Deserialize;

use super::NodeSpec;
use super::place::{Regions, first_at, line_of, place};
use crate::policy::PolicyKind;

const MAX_WEIGHT: i64 = 1_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: Option<Setting<String>>,
    pub(super) address: Option<Setting<String>>,
    pub(super) admin: Option<Setting<String>>,
    pub(super) region: Option<Setting<String>>,
    pub(super) lat: Option<Setting<f64>>,
    pub(super) lon: Option<Setting<f64>>,
    pub(super) weight: Option<Setting<i64>>,
    pub(super) proxy_protocol: Option<bool>,
}

fn node_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(super) fn validate(
    d: &mut Diagnostics,
    raw: &[Setting<RawNode>],
    regions: &Regions,
    listen: Option<SocketAddr>,
    policy: Option<PolicyKind>,
) -> Vec<NodeSpec> {
    if raw.is_empty() {
        d.missing(
            "nodes",
            "declare at least one [[nodes]] table with name, address and admin",
        );
        return Vec::new();
    }
    let mut names: HashMap<String, Option<usize>> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
    let mut out = Vec::new();
    for (i, entry) in raw.iter().enumerate() {
        let f = |field: &str| format!("nodes[{i}].{field}");
        let n = &entry.value;
        let required = |d: &mut Diagnostics, field: &str, hint: &str| {
            d.error(&f(field), entry, format!("is required ({hint})"));
        };
        let name = match &n.name {
            None => {
                required(d, "name", "a unique name, for example \"edge-eu\"");
                None
            }
            Some(s) if !node_name_ok(&s.value) => {
                d.error(
                    &f("name"),
                    s,
                    "must be a non-empty token of letters, digits, '-', '_' or '.'",
                );
                None
            }
            Some(s) => match names.get(&s.value) {
                Some(first) => {
                    d.error(
                        &f("name"),
                        s,
                        format!("duplicate node name {:?}{}", s.value, first_at(*first)),
                    );
                    None
                }
                None => {
                    names.insert(s.value.clone(), line_of(d, s));
                    Some(s.value.clone())
                }
            },
        };
        let address = match &n.address {
            None => {
                required(
                    d,
                    "address",
                    "the node's data address, for example \"127.0.0.1:8081\"",
                );
                None
            }
            Some(s) => d.socket_addr(&f("address"), s).and_then(|a| {
                if Some(a) == listen {
                    d.error(
                        &f("address"),
                        s,
                        "is the selector's own `listen` address (connections would loop)",
                    );
                    return None;
                }
                if let Some(other) = addresses.get(&a) {
                    d.error(
                        &f("address"),
                        s,
                        format!("{a} is already the address of {other}"),
                    );
                    return None;
                }
                let who = match &name {
                    Some(name) => format!("node {name:?}"),
                    None => format!("nodes[{i}]"),
                };
                addresses.insert(a, who);
                Some(a)
            }),
        };
        let admin = match &n.admin {
            None => {
                required(
                    d,
                    "admin",
                    "the node's admin address, probed with GET /readyz, for example \"127.0.0.1:9081\"",
                );
                None
            }
            Some(s) => d.socket_addr(&f("admin"), s),
        };
        let weight = match &n.weight {
            None => Some(1),
            Some(s) if (1..=MAX_WEIGHT).contains(&s.value) => Some(s.value as u32),
            Some(s) => {
                d.error(
                    &f("weight"),
                    s,
                    format!("must be between 1 and {MAX_WEIGHT}, not {}", s.value),
                );
                None
            }
        };
        let location = place(
            d,
            &format!("nodes[{i}]"),
            regions,
            &n.region,
            &n.lat,
            &n.lon,
        );
        if let Ok(None) = location
            && policy == Some(PolicyKind::Nearest)
        {
            d.error(
                &f("region"),
                entry,
                "is required by policy \"nearest\" (give the node a `region`, or `lat` and `lon`)",
            );
        }
        if let (Some(name), Some(address), Some(admin), Some(weight), Ok(location)) =
            (name, address, admin, weight, location)
        {
            out.push(NodeSpec {
                name,
                address,
                admin,
                location,
                weight,
                proxy_protocol: n.proxy_protocol.unwrap_or(false),
            });
        }
    }
    out
}
