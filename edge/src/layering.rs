//! The floors of this crate point down (see the crate docs): a module of a lower floor never
//! names a module of a higher one.

use std::path::{Path, PathBuf};

/// Modules of this crate, by floor (support, phases, listeners and admin).
const SUPPORT: [&str; 7] = [
    "config.rs",
    "error.rs",
    "compress",
    "tls",
    "observe",
    "operator.rs",
    "drain.rs",
];
const PHASES: [&str; 1] = ["proxy"];
const ABOVE_SUPPORT: [&str; 6] = [
    "crate::proxy",
    "crate::server",
    "crate::admin",
    "crate::stats_client",
    "crate::log_client",
    "crate::layering",
];
const ABOVE_PHASES: [&str; 4] = [
    "crate::server",
    "crate::admin",
    "crate::stats_client",
    "crate::log_client",
];

fn sources(entry: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(entry);
    if root.is_file() {
        return vec![root];
    }
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read src dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

fn violations(modules: &[&str], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for m in modules {
        for file in sources(m) {
            let text = std::fs::read_to_string(&file).expect("read source");
            for (n, line) in text.lines().enumerate() {
                if let Some(f) = forbidden.iter().find(|f| line.contains(*f)) {
                    found.push(format!("{}:{}: names {f}", file.display(), n + 1));
                }
            }
        }
    }
    found
}

#[test]
fn layering_points_down() {
    let mut found = violations(&SUPPORT, &ABOVE_SUPPORT);
    found.extend(violations(&PHASES, &ABOVE_PHASES));
    assert!(
        found.is_empty(),
        "a lower floor names a higher one:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_violation() {
    // The scanner itself: this file names higher floors in its tables.
    assert!(!violations(&["layering.rs"], &ABOVE_PHASES).is_empty());
}
