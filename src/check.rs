//! `outpost check --config FILE`: validates a configuration the way the role's start-up does
//! (the same loader, so the same errors), without binding or serving anything, like `nginx -t`.
//! Every problem is reported in one run: unknown fields, values of the wrong type, bad values
//! and missing fields together.

use std::path::Path;

use clap::ValueEnum;
use outpost_config::{ConfigErrors, Source};

/// What a file configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// `outpost edge` (also a shield: `role = "shield"` in the same format).
    Edge,
    /// `outpost origin`, with the rules file it names.
    Origin,
    /// `outpost selector`.
    Selector,
    /// An origin's rules file on its own.
    Rules,
}

impl Role {
    /// Guesses the role from the file's top-level keys: a selector has `nodes`, `regions`,
    /// `clients` or `policy`; an origin has `root` and no `origin`; a rules file has `rule` or
    /// `default_cache_control`; anything else is an edge (whose loader then names what is
    /// wrong).
    pub fn detect(text: &str) -> Role {
        let Ok(table) = text.parse::<toml::Table>() else {
            return Role::Edge;
        };
        let has = |k: &str| table.contains_key(k);
        if has("nodes") || has("regions") || has("clients") || has("policy") {
            Role::Selector
        } else if has("rule") || has("default_cache_control") {
            Role::Rules
        } else if has("root") && !has("origin") {
            Role::Origin
        } else {
            Role::Edge
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Origin => "origin",
            Role::Selector => "selector",
            Role::Rules => "origin rules",
        }
    }
}

/// Loads `file` as `role` (detected when `None`). `Ok` names the role it was checked as.
pub fn check(file: &Path, role: Option<Role>) -> Result<&'static str, ConfigErrors> {
    let src = Source::read(file)?;
    let role = role.unwrap_or_else(|| Role::detect(&src.text));
    match role {
        Role::Edge => {
            let cfg = outpost_edge::EdgeConfig::from_source(&src, Default::default())?;
            Ok(match cfg.role {
                outpost_edge::config::Role::Edge => "edge",
                outpost_edge::config::Role::Shield => "shield",
            })
        }
        Role::Origin => {
            outpost_origin::OriginConfig::load(Some(file), Default::default())?;
            Ok(role.name())
        }
        Role::Selector => {
            outpost_selector::SelectorConfig::from_source(&src, Default::default())?;
            Ok(role.name())
        }
        Role::Rules => {
            outpost_origin::rules::Rules::from_source(&src)?;
            Ok(role.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_told_apart_by_their_keys() {
        for (file, role) in [
            ("edge.toml", Role::Edge),
            ("edge-fleet.toml", Role::Edge),
            ("origin.toml", Role::Origin),
            ("origin-rules.toml", Role::Rules),
            ("selector.toml", Role::Selector),
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("configs")
                .join(file);
            let text = std::fs::read_to_string(&path).expect("read config");
            assert_eq!(Role::detect(&text), role, "{file}");
        }
    }
}
