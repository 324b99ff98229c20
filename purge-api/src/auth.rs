//! Bearer tokens with scopes (RFC 6750), checked in constant time.
//!
//! [`Auth`] keeps only the SHA-256 digest of each secret. A presented token is hashed and
//! compared with every configured digest using `subtle`, without stopping at the first match,
//! so neither the length of a secret nor which token matched shows in the timing. Secrets never
//! appear in `Debug` output or logs.

use std::fmt;
use std::str::FromStr;

use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The environment variable holding an extra token with every scope.
pub const ADMIN_TOKEN_ENV: &str = "OUTPOST_ADMIN_TOKEN";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /purge` and the data port's `PURGE` method.
    Purge,
    /// `PUT` and `DELETE /objects/<path>`.
    Push,
    /// `GET /objects`.
    Read,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Purge, Scope::Push, Scope::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Purge => "purge",
            Scope::Push => "push",
            Scope::Read => "read",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Purge => 1,
            Scope::Push => 2,
            Scope::Read => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`; expected purge, push or read"))
    }
}

/// A configured token: its secret and what it may do. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub secret: String,
    pub scopes: Vec<Scope>,
}

impl Token {
    pub fn new(secret: impl Into<String>, scopes: impl IntoIterator<Item = Scope>) -> Self {
        Self {
            secret: secret.into(),
            scopes: scopes.into_iter().collect(),
        }
    }

    /// A token with every scope (what `OUTPOST_ADMIN_TOKEN` grants).
    pub fn admin(secret: impl Into<String>) -> Self {
        Self::new(secret, Scope::ALL)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// A configured token that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{which}: {reason}")]
pub struct TokenError {
    /// `tokens[2]` (position in the configured list) or `OUTPOST_ADMIN_TOKEN`.
    pub which: String,
    pub reason: &'static str,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("the token lacks the `{}` scope", .0.as_str())]
    Forbidden(Scope),
}

impl AuthError {
    /// 401 for a missing or unknown token, 403 for a known token without the scope.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3): no error code when no credentials were
    /// sent, `invalid_token` or `insufficient_scope` otherwise.
    pub fn www_authenticate(&self) -> HeaderValue {
        HeaderValue::from_static(match self {
            AuthError::Missing => "Bearer realm=\"outpost\"",
            AuthError::Invalid => "Bearer realm=\"outpost\", error=\"invalid_token\"",
            AuthError::Forbidden(Scope::Purge) => {
                "Bearer realm=\"outpost\", error=\"insufficient_scope\", scope=\"purge\""
            }
            AuthError::Forbidden(Scope::Push) => {
                "Bearer realm=\"outpost\", error=\"insufficient_scope\", scope=\"push\""
            }
            AuthError::Forbidden(Scope::Read) => {
                "Bearer realm=\"outpost\", error=\"insufficient_scope\", scope=\"read\""
            }
        })
    }
}

struct Entry {
    digest: [u8; 32],
    scopes: u8,
}

/// The set of accepted tokens. With no token at all the API is open (see [`Auth::is_open`]).
pub struct Auth {
    entries: Vec<Entry>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.entries.len())
            .field("open", &self.is_open())
            .finish()
    }
}

impl Auth {
    /// Accepts exactly `tokens`. Each secret must be non-empty and a valid RFC 6750 `b64token`
    /// (letters, digits, `-._~+/`, trailing `=`), and each token needs at least one scope.
    pub fn new(tokens: impl IntoIterator<Item = Token>) -> Result<Self, TokenError> {
        let mut entries = Vec::new();
        for (i, t) in tokens.into_iter().enumerate() {
            entries.push(Entry::new(&t, || format!("tokens[{i}]"))?);
        }
        Ok(Self { entries })
    }

    /// [`Auth::new`] plus `OUTPOST_ADMIN_TOKEN` (every scope) when that variable is set and
    /// non-empty.
    pub fn from_config_and_env(
        tokens: impl IntoIterator<Item = Token>,
    ) -> Result<Self, TokenError> {
        let env = std::env::var(ADMIN_TOKEN_ENV).ok();
        Self::with_admin_token(tokens, env)
    }

    /// [`Auth::new`] plus `admin` (every scope) when it is `Some` and non-empty; the environment
    /// as an input, for tests.
    pub fn with_admin_token(
        tokens: impl IntoIterator<Item = Token>,
        admin: Option<String>,
    ) -> Result<Self, TokenError> {
        let mut auth = Self::new(tokens)?;
        if let Some(secret) = admin.filter(|s| !s.is_empty()) {
            auth.entries.push(Entry::new(&Token::admin(secret), || {
                ADMIN_TOKEN_ENV.to_string()
            })?);
        }
        Ok(auth)
    }

    /// No tokens: every request is allowed. The edge refuses to expose an open admin API on a
    /// non-loopback address.
    pub fn open() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// True when no token is configured, so [`Auth::check`] lets everything through.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks `Authorization: Bearer <token>` for `scope`. Usable by any listener (the edge's
    /// data-port `PURGE` method too). Always `Ok` when [`Auth::is_open`].
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<(), AuthError> {
        if self.is_open() {
            return Ok(());
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(AuthError::Missing);
        };
        let presented = bearer(value).ok_or(AuthError::Invalid)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Visit every entry whatever matches, and select the scopes without branching.
        let mut found = subtle::Choice::from(0);
        let mut scopes = 0u8;
        for e in &self.entries {
            let eq = e.digest.ct_eq(&digest);
            scopes |= u8::conditional_select(&0, &e.scopes, eq);
            found |= eq;
        }
        if !bool::from(found) {
            return Err(AuthError::Invalid);
        }
        if scopes & scope.bit() == 0 {
            return Err(AuthError::Forbidden(scope));
        }
        Ok(())
    }
}

impl Entry {
    fn new(t: &Token, which: impl Fn() -> String) -> Result<Self, TokenError> {
        let err = |reason| TokenError {
            which: which(),
            reason,
        };
        if t.secret.is_empty() {
            return Err(err("the secret is empty"));
        }
        if !is_b64token(&t.secret) {
            return Err(err(
                "the secret may only hold letters, digits, `-._~+/` and trailing `=` (RFC 6750 b64token)",
            ));
        }
        if t.scopes.is_empty() {
            return Err(err("no scopes: give at least one of purge, push, read"));
        }
        Ok(Self {
            digest: Sha256::digest(t.secret.as_bytes()).into(),
            scopes: t.scopes.iter().fold(0, |acc, s| acc | s.bit()),
        })
    }
}

/// The credentials of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 §11.1).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    (!token.is_empty()).then_some(token)
}

fn is_b64token(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    fn auth() -> Auth {
        Auth::new([
            Token::new("purger-secret", [Scope::Purge]),
            Token::new("pusher-secret", [Scope::Push, Scope::Read]),
        ])
        .unwrap()
    }

    #[test]
    fn missing_and_invalid_tokens_are_401() {
        let a = auth();
        assert_eq!(
            a.check(&HeaderMap::new(), Scope::Purge),
            Err(AuthError::Missing)
        );
        for bad in [
            "Bearer nope",
            "Bearer purger-secre",   // a prefix of a real secret
            "Bearer purger-secretX", // a real secret plus one byte
            "Basic cHVyZ2VyLXNlY3JldA==",
            "Bearer",
            "Bearer ",
            "purger-secret",
        ] {
            let err = a.check(&headers(bad), Scope::Purge).unwrap_err();
            assert_eq!(err, AuthError::Invalid, "{bad}");
            assert_eq!(err.status(), 401);
        }
    }

    #[test]
    fn scopes_are_enforced_with_403() {
        let a = auth();
        assert_eq!(
            a.check(&headers("Bearer purger-secret"), Scope::Purge),
            Ok(())
        );
        assert_eq!(
            a.check(&headers("bearer  purger-secret"), Scope::Purge),
            Ok(())
        );
        let err = a
            .check(&headers("Bearer purger-secret"), Scope::Push)
            .unwrap_err();
        assert_eq!(err, AuthError::Forbidden(Scope::Push));
        assert_eq!(err.status(), 403);
        assert_eq!(
            a.check(&headers("Bearer pusher-secret"), Scope::Read),
            Ok(())
        );
        assert_eq!(
            a.check(&headers("Bearer pusher-secret"), Scope::Purge),
            Err(AuthError::Forbidden(Scope::Purge))
        );
    }

    #[test]
    fn the_same_secret_twice_unions_scopes() {
        let a = Auth::new([
            Token::new("shared", [Scope::Purge]),
            Token::new("shared", [Scope::Read]),
        ])
        .unwrap();
        assert_eq!(a.check(&headers("Bearer shared"), Scope::Read), Ok(()));
        assert_eq!(a.check(&headers("Bearer shared"), Scope::Purge), Ok(()));
    }

    #[test]
    fn admin_token_from_the_environment_has_every_scope() {
        let a = Auth::with_admin_token([], Some("root-token".into())).unwrap();
        assert!(!a.is_open());
        for s in Scope::ALL {
            assert_eq!(a.check(&headers("Bearer root-token"), s), Ok(()));
        }
        let open = Auth::with_admin_token([], Some(String::new())).unwrap();
        assert!(open.is_open(), "an empty variable configures nothing");
        assert_eq!(open.check(&HeaderMap::new(), Scope::Push), Ok(()));
    }

    #[test]
    fn unusable_tokens_are_config_errors() {
        let e = Auth::new([
            Token::new("ok", [Scope::Read]),
            Token::new("", [Scope::Read]),
        ])
        .unwrap_err();
        assert_eq!(e.which, "tokens[1]");
        assert!(Auth::new([Token::new("has space", [Scope::Read])]).is_err());
        assert!(Auth::new([Token::new("abc", [])]).is_err());
        assert!(Auth::new([Token::new("YWJj==", [Scope::Read])]).is_ok());
        let e = Auth::with_admin_token([], Some("bad\ttoken".into())).unwrap_err();
        assert_eq!(e.which, ADMIN_TOKEN_ENV);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let t = Token::new("super-secret-value", [Scope::Purge]);
        let a = Auth::new([t.clone()]).unwrap();
        for s in [format!("{t:?}"), format!("{a:?}")] {
            assert!(!s.contains("super-secret-value"), "{s}");
        }
        assert!(format!("{t:?}").contains("<redacted>"));
    }

    #[test]
    fn scopes_parse_and_deserialize() {
        assert_eq!("push".parse::<Scope>(), Ok(Scope::Push));
        assert!("admin".parse::<Scope>().is_err());
        let t: Token = serde_json::from_str(r#"{"secret":"x","scopes":["purge","read"]}"#).unwrap();
        assert_eq!(t.scopes, vec![Scope::Purge, Scope::Read]);
    }
}
