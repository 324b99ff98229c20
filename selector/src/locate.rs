//! Where a client is: the source-prefix table (longest match wins) and great-circle distance.
//!
//! Real anycast lets BGP pick the "nearest" announcement; on one machine we approximate that
//! with a table from client prefix to a place (a named region or coordinates), the way GeoIP
//! tables map prefixes to locations, and measure distance with the haversine formula.

use std::net::IpAddr;

use ipnet::IpNet;

/// A point on the Earth, in decimal degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coords {
    pub lat: f64,
    pub lon: f64,
}

impl Coords {
    pub fn new(lat: f64, lon: f64) -> Self {
        Self { lat, lon }
    }

    /// Great-circle distance in kilometres (haversine formula, mean Earth radius 6371.0088 km
    /// as recommended by the IUGG). Good to about 0.5%, far better than our placement data.
    pub fn distance_km(self, other: Coords) -> f64 {
        const EARTH_RADIUS_KM: f64 = 6371.0088;
        let (phi1, phi2) = (self.lat.to_radians(), other.lat.to_radians());
        let dphi = (other.lat - self.lat).to_radians();
        let dlambda = (other.lon - self.lon).to_radians();
        let a =
            (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlambda / 2.0).sin().powi(2);
        // min(1.0): rounding can push `a` a hair above 1 for antipodal points.
        2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
    }
}

/// A place: coordinates, and the region they came from when the config named one.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    pub region: Option<String>,
    pub coords: Coords,
}

impl Location {
    /// A named region at the given coordinates.
    pub fn region(name: impl Into<String>, lat: f64, lon: f64) -> Self {
        Self {
            region: Some(name.into()),
            coords: Coords::new(lat, lon),
        }
    }

    /// Bare coordinates.
    pub fn at(lat: f64, lon: f64) -> Self {
        Self {
            region: None,
            coords: Coords::new(lat, lon),
        }
    }
}

/// The client table: source prefix to location, plus the location of everyone else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientMap {
    /// Longest prefix first, so the first match is the most specific one.
    prefixes: Vec<(IpNet, Location)>,
    default: Option<Location>,
}

impl ClientMap {
    /// An empty table whose unmatched clients are at `default` (`None`: location unknown, and
    /// the `nearest` policy then falls back to measured latency).
    pub fn new(default: Option<Location>) -> Self {
        Self {
            prefixes: Vec::new(),
            default,
        }
    }

    /// Adds (or replaces) a prefix. Host bits are cleared, so `10.1.2.3/8` means `10.0.0.0/8`.
    pub fn insert(&mut self, prefix: IpNet, location: Location) {
        let prefix = prefix.trunc();
        self.prefixes.retain(|(p, _)| *p != prefix);
        // Stable position among equal lengths: declaration order, which does not matter
        // anyway because two distinct prefixes of one length never overlap.
        let at = self
            .prefixes
            .partition_point(|(p, _)| p.prefix_len() >= prefix.prefix_len());
        self.prefixes.insert(at, (prefix, location));
    }

    pub fn default_location(&self) -> Option<&Location> {
        self.default.as_ref()
    }

    pub fn prefixes(&self) -> impl Iterator<Item = &(IpNet, Location)> {
        self.prefixes.iter()
    }

    /// The location of a client: its longest matching prefix, else the default.
    pub fn locate(&self, ip: IpAddr) -> Option<&Location> {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2);
        // match them against the IPv4 table like any other IPv4 client.
        let ip = ip.to_canonical();
        self.prefixes
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, loc)| loc)
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARIS: Coords = Coords {
        lat: 48.8566,
        lon: 2.3522,
    };
    const LONDON: Coords = Coords {
        lat: 51.5074,
        lon: -0.1278,
    };
    const ASHBURN: Coords = Coords {
        lat: 39.0438,
        lon: -77.4874,
    };

    #[test]
    fn haversine_distances() {
        assert!((PARIS.distance_km(LONDON) - 343.5).abs() < 3.0);
        let atlantic = PARIS.distance_km(ASHBURN);
        assert!((6150.0..6300.0).contains(&atlantic), "{atlantic}");
        assert_eq!(PARIS.distance_km(PARIS), 0.0);
        assert!((PARIS.distance_km(ASHBURN) - ASHBURN.distance_km(PARIS)).abs() < 1e-9);
        let antipode = Coords::new(-PARIS.lat, PARIS.lon - 180.0);
        assert!((PARIS.distance_km(antipode) - 20015.1).abs() < 1.0);
    }

    fn table() -> ClientMap {
        let mut m = ClientMap::new(Some(Location::region("us", ASHBURN.lat, ASHBURN.lon)));
        m.insert("10.0.0.0/8".parse().unwrap(), Location::at(1.0, 1.0));
        m.insert("10.1.0.0/16".parse().unwrap(), Location::at(2.0, 2.0));
        m.insert(
            "127.0.0.0/24".parse().unwrap(),
            Location::region("eu", PARIS.lat, PARIS.lon),
        );
        m.insert("2001:db8::/32".parse().unwrap(), Location::at(3.0, 3.0));
        m
    }

    #[test]
    fn longest_prefix_wins_and_default_catches_the_rest() {
        let m = table();
        let at = |ip: &str| m.locate(ip.parse().unwrap()).map(|l| l.coords.lat);
        assert_eq!(at("10.1.2.3"), Some(2.0));
        assert_eq!(at("10.2.0.1"), Some(1.0));
        assert_eq!(at("2001:db8::1"), Some(3.0));
        assert_eq!(
            m.locate("127.0.0.1".parse().unwrap())
                .and_then(|l| l.region.as_deref()),
            Some("eu")
        );
        assert_eq!(at("127.0.1.1"), Some(ASHBURN.lat));
        assert_eq!(at("192.0.2.1"), Some(ASHBURN.lat));
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let mut m = ClientMap::new(None);
        m.insert("10.1.0.0/16".parse().unwrap(), Location::at(2.0, 2.0));
        m.insert("10.0.0.0/8".parse().unwrap(), Location::at(1.0, 1.0));
        assert_eq!(
            m.locate("10.1.0.1".parse().unwrap()).unwrap().coords.lat,
            2.0
        );
        assert!(m.locate("11.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_prefixes() {
        let m = table();
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        assert_eq!(
            m.locate(mapped).and_then(|l| l.region.as_deref()),
            Some("eu")
        );
    }

    #[test]
    fn insert_clears_host_bits_and_replaces() {
        let mut m = ClientMap::new(None);
        m.insert("10.1.2.3/8".parse().unwrap(), Location::at(1.0, 1.0));
        m.insert("10.0.0.0/8".parse().unwrap(), Location::at(5.0, 5.0));
        assert_eq!(m.prefixes().count(), 1);
        assert_eq!(
            m.locate("10.9.9.9".parse().unwrap()).unwrap().coords.lat,
            5.0
        );
    }
}
