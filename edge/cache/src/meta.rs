//! What is stored with every cached object: status, headers, the serialised policy, validators,
//! timing, tags and a format version, so disk contents survive upgrades (an unknown version is a
//! miss, never a misread).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ETAG, HeaderName, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};
use http_cache_semantics::CachePolicy;
use serde::{Deserialize, Serialize};

use super::clock::{from_unix_ms, unix_ms};

/// Bumped whenever the stored layout changes incompatibly.
pub const META_VERSION: u32 = 1;

/// Metadata of one stored response (one Vary variant of one key).
///
/// Stored by position (the disk tier's records are MessagePack arrays): a new field goes at the
/// end, with `#[serde(default)]`; any other change to the fields needs a new record format (a
/// test in the disk tier pins their order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedMeta {
    pub version: u32,
    /// The normalised key text (`host/path?query`).
    pub key: String,
    #[serde(with = "http_serde::status_code")]
    pub status: StatusCode,
    /// End-to-end response headers as stored (hop-by-hop and Set-Cookie removed).
    #[serde(with = "header_bytes")]
    pub headers: HeaderMap,
    /// http-cache-semantics policy, built from a request stripped of Cookie and credentials and
    /// from the response fields it decides on (never a Set-Cookie value).
    pub policy: CachePolicy,
    pub stored_at_ms: u64,
    /// When the response stops being fresh (policy TTL at store time).
    pub fresh_until_ms: u64,
    /// `stale-while-revalidate` window after `fresh_until`, in seconds (0 = none).
    pub swr_secs: u64,
    /// `stale-if-error` window after `fresh_until`, in seconds (0 = none).
    pub sie_secs: u64,
    pub body_len: u64,
    /// Request header names the response varies on (lower-case), empty without Vary.
    pub vary: Vec<String>,
    /// Surrogate keys / cache tags (from `Surrogate-Key` or `Cache-Tag`).
    pub tags: Vec<String>,
    /// The purge sequence current when this response was fetched; a later purge that matches
    /// it invalidates it (see `invalidation`).
    #[serde(default)]
    pub purge_seq: u64,
}

/// `fresh_until_ms` of a pushed (pinned) object: fresh until it is deleted or purged.
pub const PINNED_UNTIL_MS: u64 = u64::MAX / 2;

impl CachedMeta {
    /// A pushed object: its freshness has no end to report (`Cache-Status` gives no `ttl`).
    pub fn pinned(&self) -> bool {
        self.fresh_until_ms >= PINNED_UNTIL_MS
    }

    pub fn fresh_until(&self) -> SystemTime {
        from_unix_ms(self.fresh_until_ms)
    }

    /// How long past freshness the object is at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until()).unwrap_or_default()
    }

    pub fn etag(&self) -> Option<&str> {
        self.headers.get(ETAG).and_then(|v| v.to_str().ok())
    }

    pub fn last_modified(&self) -> Option<&str> {
        self.headers
            .get(LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
    }

    pub fn has_validator(&self) -> bool {
        self.etag().is_some() || self.last_modified().is_some()
    }

    /// Whether `other` is a copy of the same version of the object: the same length and
    /// validator (the ETag; without one, Last-Modified). A 304 confirms one version, and its
    /// metadata goes only onto copies of that version (RFC 9111 §4.3.4): never onto an older
    /// body another tier still holds.
    pub fn same_version(&self, other: &CachedMeta) -> bool {
        self.body_len == other.body_len
            && self.etag() == other.etag()
            && (self.etag().is_some() || self.last_modified() == other.last_modified())
    }

    pub fn vary_names(&self) -> Vec<HeaderName> {
        self.vary
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    }

    pub fn set_stored_now(&mut self, now: SystemTime, ttl: Duration) {
        self.stored_at_ms = unix_ms(now);
        self.fresh_until_ms = unix_ms(now + ttl);
    }
}

/// Tags of a response: `Surrogate-Key` (space-separated, Fastly style) and `Cache-Tag`
/// (comma-separated, Cloudflare style).
pub fn tags_of(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for v in headers.get_all("surrogate-key") {
        if let Ok(v) = v.to_str() {
            tags.extend(v.split_ascii_whitespace().map(str::to_string));
        }
    }
    for v in headers.get_all("cache-tag") {
        if let Ok(v) = v.to_str() {
            // Comma-separated; whitespace separates too, so a tag never holds a space (a
            // `Surrogate-Key` purge could not name it).
            tags.extend(
                v.split(|c: char| c == ',' || c.is_ascii_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
        }
    }
    tags.sort();
    tags.dedup();
    tags
}

/// The bytes of a header map's names and values, plus `per_field` for each field.
pub fn fields_len(headers: &HeaderMap, per_field: usize) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + per_field)
        .sum()
}

/// A body held by the memory tier: shared, never copied per hit.
#[derive(Debug, Clone)]
pub struct MemObject {
    pub meta: Arc<CachedMeta>,
    pub body: Bytes,
}

impl MemObject {
    /// Bytes the memory tier charges for this object.
    pub fn weight(&self) -> u32 {
        let headers = fields_len(&self.meta.headers, 32);
        (self.body.len() + headers + self.meta.key.len() + 1024)
            .try_into()
            .unwrap_or(u32::MAX)
    }
}

/// A header map stored byte for byte: each name with the list of its values, a value as a
/// string when it is visible ASCII, else as bytes. `http_serde`'s human-readable form (which
/// JSON and the disk tier's MessagePack use) silently dropped every value that is not visible
/// ASCII (obs-text: a UTF-8 file name in `Content-Disposition`, Latin-1 bytes), so a copy read
/// back from disk lost those headers. Reads that form too (one string, or a list of strings),
/// as records written before hold it.
mod header_bytes {
    use std::borrow::Cow;
    use std::fmt;

    use http::HeaderMap;
    use http::header::{GetAll, HeaderName, HeaderValue};
    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::ser::{Serialize, SerializeSeq, Serializer};

    pub fn serialize<S: Serializer>(headers: &HeaderMap, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_map(
            headers
                .keys()
                .map(|name| (name.as_str(), Values(headers.get_all(name)))),
        )
    }

    struct Values<'a>(GetAll<'a, HeaderValue>);

    impl Serialize for Values<'_> {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            // With its length (the values' iterator gives none): no buffering in the encoder.
            let mut seq = ser.serialize_seq(Some(self.0.iter().count()))?;
            for v in self.0.iter() {
                seq.serialize_element(&Value(v))?;
            }
            seq.end()
        }
    }

    struct Value<'a>(&'a HeaderValue);

    impl Serialize for Value<'_> {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            match self.0.to_str() {
                Ok(text) => ser.serialize_str(text),
                Err(_) => ser.serialize_bytes(self.0.as_bytes()),
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<HeaderMap, D::Error> {
        de.deserialize_map(MapOf)
    }

    struct MapOf;

    impl<'de> Visitor<'de> for MapOf {
        type Value = HeaderMap;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of header names to values")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<HeaderMap, M::Error> {
            // Lengths come from the record: bounded here, and every insertion is checked, so
            // that a record saying otherwise is refused rather than a panic.
            let hint = map.size_hint().unwrap_or(0).min(64);
            let mut headers = HeaderMap::try_with_capacity(hint).map_err(de::Error::custom)?;
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(de::Error::custom)?;
                map.next_value_seed(Append {
                    headers: &mut headers,
                    name,
                })?;
            }
            Ok(headers)
        }
    }

    /// Appends a name's values to the map as they are read: one string (the earlier form),
    /// or a list of values.
    struct Append<'a> {
        headers: &'a mut HeaderMap,
        name: HeaderName,
    }

    impl<'de> DeserializeSeed<'de> for Append<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Append<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a header value or a list of them")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
            self.visit_bytes(v.as_bytes())
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
            self.headers
                .try_append(self.name, value(v)?)
                .map(drop)
                .map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(v) = seq.next_element::<OneValue>()? {
                self.headers
                    .try_append(self.name.clone(), v.0)
                    .map_err(de::Error::custom)?;
            }
            Ok(())
        }
    }

    fn value<E: de::Error>(v: &[u8]) -> Result<HeaderValue, E> {
        HeaderValue::from_bytes(v).map_err(E::custom)
    }

    /// One value: a string, bytes, or bytes as a list of numbers (how JSON writes bytes).
    struct OneValue(HeaderValue);

    impl<'de> serde::Deserialize<'de> for OneValue {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            de.deserialize_any(OneValueVisitor)
        }
    }

    struct OneValueVisitor;

    impl<'de> Visitor<'de> for OneValueVisitor {
        type Value = OneValue;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a header value")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<OneValue, E> {
            self.visit_bytes(v.as_bytes())
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<OneValue, E> {
            value(v).map(OneValue)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneValue, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            value(&bytes).map(OneValue)
        }
    }
}

#[cfg(test)]
mod header_bytes_tests {
    use http::HeaderMap;
    use http::header::HeaderValue;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Old(#[serde(with = "http_serde::header_map")] HeaderMap);

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct New(#[serde(with = "super::header_bytes")] HeaderMap);

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("cache-control", HeaderValue::from_static("max-age=60"));
        h.append("link", HeaderValue::from_static("</a.css>; rel=preload"));
        h.append("link", HeaderValue::from_static("</b.js>; rel=preload"));
        h
    }

    fn to_msgpack(value: &impl serde::Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        value
            .serialize(&mut rmp_serde::Serializer::new(&mut out).with_human_readable())
            .unwrap();
        out
    }

    fn from_msgpack(data: &[u8]) -> Result<New, rmp_serde::decode::Error> {
        let mut de = rmp_serde::Deserializer::from_read_ref(data).with_human_readable();
        serde::Deserialize::deserialize(&mut de)
    }

    /// Header maps written by `http_serde` (records before this form, JSON and MessagePack:
    /// one string, or a list of strings, per name; an empty list for a name whose values were
    /// all dropped) read back the same.
    #[test]
    fn the_earlier_form_reads_back() {
        let json = serde_json::to_vec(&Old(headers())).unwrap();
        let read: New = serde_json::from_slice(&json).unwrap();
        assert_eq!(read, New(headers()));
        assert_eq!(
            from_msgpack(&to_msgpack(&Old(headers()))).unwrap(),
            New(headers())
        );
        let mut dropped = headers();
        dropped.append("x-latin", HeaderValue::from_bytes(b"\xe9").unwrap());
        assert_eq!(
            from_msgpack(&to_msgpack(&Old(dropped))).unwrap(),
            New(headers())
        );
    }

    /// A record whose lengths lie (a map of four billion headers) is refused, not a panic.
    #[test]
    fn a_lying_length_is_refused() {
        // map32 of 0xffffffff entries, then one name and a value.
        let mut data = vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'a', 0xa1, b'b'];
        assert!(from_msgpack(&data).is_err());
        // array32 of 0xffffffff values under one name.
        data = vec![0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff, 0xa1, b'b'];
        assert!(from_msgpack(&data).is_err());
    }

    /// Values of any bytes go through JSON and MessagePack unchanged.
    #[test]
    fn values_of_any_bytes_round_trip() {
        let mut h = headers();
        h.append(
            "content-disposition",
            HeaderValue::from_bytes(b"attachment; filename=\"caf\xc3\xa9\"").unwrap(),
        );
        h.append("x-latin", HeaderValue::from_bytes(b"\xe9t\xe9").unwrap());
        let json = serde_json::to_vec(&New(h.clone())).unwrap();
        assert_eq!(
            serde_json::from_slice::<New>(&json).unwrap(),
            New(h.clone())
        );
        let mut mp = Vec::new();
        serde::Serialize::serialize(
            &New(h.clone()),
            &mut rmp_serde::Serializer::new(&mut mp).with_human_readable(),
        )
        .unwrap();
        let mut de = rmp_serde::Deserializer::from_read_ref(&mp).with_human_readable();
        let read: New = serde::Deserialize::deserialize(&mut de).unwrap();
        assert_eq!(read, New(h));
    }
}
