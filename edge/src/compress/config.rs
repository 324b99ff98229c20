//! The `[compression]` settings and the media-type patterns they list.

use std::sync::Arc;

use super::CompressionStats;

/// Types compressed by default: text, structured text, scripts, SVG, wasm and the font formats
/// that are not compressed already (woff and woff2 are).
pub const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "application/yaml",
    "application/toml",
    "application/vnd.ms-fontobject",
    "application/x-font-ttf",
    "application/x-font-otf",
    "font/ttf",
    "font/otf",
    "font/collection",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
];

/// The `[compression]` settings (see `configs/edge.toml`).
#[derive(Debug, Clone)]
pub struct CompressionConfig {
    pub enabled: bool,
    /// Bodies smaller than this are sent as they are.
    pub min_size: u64,
    /// Content types compressed.
    pub types: Vec<MediaPattern>,
    /// gzip level, 1..=9 (6 by default).
    pub gzip_level: u32,
    /// brotli quality, 0..=11 (4 by default; 11 runs at about 0.5 MB/s).
    pub brotli_quality: u32,
    /// Bodies above this size (or of unknown size) stream through the encoder.
    pub stream_threshold: u64,
    /// Decoding an origin-encoded body stops at this many bytes.
    pub max_decompressed_size: u64,
    /// The counters the edge built from this config updates. A shared handle: clones of the
    /// config share it, so it can be read (metrics, tests) while the edge runs.
    pub stats: Arc<CompressionStats>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_size: 1024,
            types: DEFAULT_TYPES
                .iter()
                .map(|t| MediaPattern::parse(t).expect("built-in media type pattern"))
                .collect(),
            gzip_level: 6,
            brotli_quality: 4,
            stream_threshold: 1 << 20,
            max_decompressed_size: 64 << 20,
            stats: Arc::default(),
        }
    }
}

/// A media type pattern from `compression.types`: `type/subtype`, `type/*` or `type/*+suffix`
/// (`*` as the type matches any type). Compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPattern {
    top: String,
    sub: SubPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubPattern {
    Any,
    Exact(String),
    /// `+json` for `*+json`.
    Suffix(String),
}

impl MediaPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid media type pattern {text:?} (expected type/subtype, type/* or type/*+suffix, for example \"text/*\" or \"application/*+json\")"
            )
        };
        let t = text.trim().to_ascii_lowercase();
        let (top, sub) = t.split_once('/').ok_or_else(bad)?;
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if top != "*" && !token(top) {
            return Err(bad());
        }
        let sub = if sub == "*" {
            SubPattern::Any
        } else if let Some(suffix) = sub.strip_prefix("*+") {
            if !token(suffix) {
                return Err(bad());
            }
            SubPattern::Suffix(format!("+{suffix}"))
        } else if token(sub) {
            SubPattern::Exact(sub.to_string())
        } else {
            return Err(bad());
        };
        Ok(Self {
            top: top.to_string(),
            sub,
        })
    }

    /// Does `top/sub` (ASCII, any case) match?
    pub fn matches(&self, top: &str, sub: &str) -> bool {
        if self.top != "*" && !self.top.eq_ignore_ascii_case(top) {
            return false;
        }
        match &self.sub {
            SubPattern::Any => true,
            SubPattern::Exact(s) => s.eq_ignore_ascii_case(sub),
            SubPattern::Suffix(s) => {
                sub.len() > s.len()
                    && sub.is_char_boundary(sub.len() - s.len())
                    && sub[sub.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}
