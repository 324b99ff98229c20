//! Scorer for the HTTP caching test suite (cache-tests, https://cache-tests.fyi/).
//!
//! The suite's CLI writes one results object, `{test_id: true | [error_name, message] | false}`.
//! Its test definitions (a list of suites, each with `tests`) say what each result means:
//! the `kind` of a test (`required` conformance, `optimal` behaviour, informational `check`),
//! which tests it `depends_on`, and whether it only applies to browsers. This module joins the
//! two and classifies every test the way cache-tests.fyi displays it, with the same rules as the
//! team's reference tool `shared/tools/cachetests_score.py` (the conformance tests cross-check
//! the two on the published result files).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

/// What a test measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A requirement of RFC 9111 and friends: a failure is a conformance problem.
    Required,
    /// The cache could have done better; not a conformance problem.
    Optimal,
    /// Information gathering: the answer is yes or no, neither is wrong.
    Check,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Required, Kind::Optimal, Kind::Check];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Required => "required",
            Kind::Optimal => "optimal",
            Kind::Check => "check",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How one applicable test came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// A required or optimal test whose result is `true`.
    Pass,
    /// A required test that failed.
    Fail,
    /// An optimal test that failed.
    OptFail,
    /// A check whose answer is yes (`true`).
    Yes,
    /// A check whose answer is no.
    No,
    /// The test could not set up what it wanted to test (error name `Setup`).
    SetupFail,
    /// A `Setup` error whose message is `retry`: the cache retried a request.
    Retry,
    /// The harness itself failed: result `false`, or error name `AbortError`.
    HarnessFail,
    /// A test named in `depends_on` did not pass, so this result means nothing.
    DepFail,
    /// No entry in the results.
    Untested,
}

impl Verdict {
    /// In the order the reference tool lists them.
    pub const ALL: [Verdict; 10] = [
        Verdict::Pass,
        Verdict::Fail,
        Verdict::OptFail,
        Verdict::Yes,
        Verdict::No,
        Verdict::SetupFail,
        Verdict::Retry,
        Verdict::HarnessFail,
        Verdict::DepFail,
        Verdict::Untested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::OptFail => "opt_fail",
            Verdict::Yes => "yes",
            Verdict::No => "no",
            Verdict::SetupFail => "setup_fail",
            Verdict::Retry => "retry",
            Verdict::HarnessFail => "harness_fail",
            Verdict::DepFail => "dep_fail",
            Verdict::Untested => "untested",
        }
    }

    pub fn parse(name: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == name)
    }

    /// Whether a test depending on this one may count.
    pub fn is_success(self) -> bool {
        matches!(self, Verdict::Pass | Verdict::Yes)
    }

    /// A failure of the test itself (not of a dependency, and not a plain "no" or an optimal
    /// miss): what a conformance report lists.
    pub fn is_own_failure(self) -> bool {
        matches!(
            self,
            Verdict::Fail
                | Verdict::SetupFail
                | Verdict::Retry
                | Verdict::HarnessFail
                | Verdict::Untested
        )
    }
}

/// One test of the suite, as far as scoring cares.
#[derive(Clone, Debug)]
pub struct TestDef {
    pub id: String,
    // Read by nothing yet: kept so a definition prints whole in a failure message.
    #[allow(dead_code)]
    pub suite: String,
    #[allow(dead_code)]
    pub name: String,
    pub kind: Kind,
    pub depends_on: Vec<String>,
    /// Only meaningful for a browser (private) cache.
    pub browser_only: bool,
    /// Only meaningful for a CDN (`CDN-Cache-Control`).
    pub cdn_only: bool,
    /// Not meaningful for a browser.
    pub browser_skip: bool,
}

/// All test definitions, in suite order.
#[derive(Clone, Debug, Default)]
pub struct Definitions {
    tests: Vec<TestDef>,
    by_id: HashMap<String, usize>,
}

impl Definitions {
    /// Parses the definitions JSON (the suite's `export` output: a list of suites). Text printed
    /// before the JSON (an npm banner) is skipped.
    pub fn from_json(text: &str) -> Result<Definitions, String> {
        let value: Value = serde_json::from_str(skip_to_json(text, '['))
            .map_err(|e| format!("test definitions are not JSON: {e}"))?;
        let suites = value
            .as_array()
            .ok_or("test definitions: expected a list of suites")?;
        let mut defs = Definitions::default();
        for suite in suites {
            let suite_id = suite
                .get("id")
                .and_then(Value::as_str)
                .ok_or("test definitions: a suite has no string `id`")?;
            let tests = suite
                .get("tests")
                .and_then(Value::as_array)
                .ok_or_else(|| format!("test definitions: suite {suite_id} has no `tests` list"))?;
            for test in tests {
                let def = parse_test(suite_id, test)?;
                if defs.by_id.contains_key(&def.id) {
                    return Err(format!("test definitions: duplicate test id {}", def.id));
                }
                defs.by_id.insert(def.id.clone(), defs.tests.len());
                defs.tests.push(def);
            }
        }
        Ok(defs)
    }

    pub fn len(&self) -> usize {
        self.tests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tests.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&TestDef> {
        self.by_id.get(id).map(|&i| &self.tests[i])
    }

    #[allow(dead_code)] // the scorer looks tests up by id; iteration is for new checks
    pub fn iter(&self) -> impl Iterator<Item = &TestDef> {
        self.tests.iter()
    }
}

fn parse_test(suite_id: &str, test: &Value) -> Result<TestDef, String> {
    let id = test
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("test definitions: a test of suite {suite_id} has no string `id`"))?
        .to_owned();
    // An absent kind means required; anything present must be one of the three names.
    let kind = match test.get("kind") {
        None => Kind::Required,
        Some(value) => value
            .as_str()
            .and_then(Kind::parse)
            .ok_or_else(|| format!("test definitions: test {id} has unknown kind {value}"))?,
    };
    let depends_on = match test.get("depends_on") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("test definitions: test {id}: depends_on holds a non-string"))?,
        Some(other) => {
            return Err(format!(
                "test definitions: test {id}: depends_on is not a list: {other}"
            ));
        }
    };
    Ok(TestDef {
        name: test
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        suite: suite_id.to_owned(),
        browser_only: truthy(test.get("browser_only")),
        cdn_only: truthy(test.get("cdn_only")),
        browser_skip: truthy(test.get("browser_skip")),
        kind,
        depends_on,
        id,
    })
}

/// JavaScript-ish truthiness of an optional flag, so `browser_only: 1` counts like `true`.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// Skips lines printed before the JSON document (for instance npm's `> script` banner when
/// `--silent` was forgotten): the document starts at the first line that opens with `opener`.
fn skip_to_json(text: &str, opener: char) -> &str {
    let stripped = text.trim_start();
    if stripped.starts_with(opener) {
        return stripped;
    }
    match text.find(&format!("\n{opener}")) {
        Some(pos) => text[pos..].trim_start(),
        None => text,
    }
}

/// One run's raw results.
#[derive(Clone, Debug, Default)]
pub struct Results {
    entries: BTreeMap<String, Value>,
}

impl Results {
    pub fn from_json(text: &str) -> Result<Results, String> {
        let value: Value = serde_json::from_str(skip_to_json(text, '{'))
            .map_err(|e| format!("results are not JSON: {e}"))?;
        match value {
            Value::Object(map) => Ok(Results {
                entries: map.into_iter().collect(),
            }),
            _ => Err("results: not a cache-tests results object".to_owned()),
        }
    }

    /// The result of a test; a `null` entry counts as no result.
    pub fn get(&self, id: &str) -> Option<&Value> {
        self.entries.get(id).filter(|v| !v.is_null())
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[allow(dead_code)] // goes with `len`
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The error message of a failed test, if it has one.
    pub fn message(&self, id: &str) -> Option<String> {
        match self.get(id)? {
            Value::Array(items) if items.len() > 1 => Some(match &items[1] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            _ => None,
        }
    }

    /// The error name of a failed test (`Assertion`, `Setup`, `FetchError`, ...).
    pub fn error_name(&self, id: &str) -> Option<&Value> {
        match self.get(id)? {
            Value::Array(items) => items.first(),
            _ => None,
        }
    }
}

/// Which tests apply to the cache under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// A shared cache: everything but `browser_only` tests. A reverse proxy / CDN also runs the
    /// `cdn_only` tests (the suite's CLI does), a plain forward proxy need not.
    SharedCache { include_cdn_only: bool },
    /// A browser's private cache: everything but `cdn_only` and `browser_skip` tests.
    Browser,
}

impl Audience {
    /// What Outpost is: a shared cache acting as a CDN.
    pub const CDN: Audience = Audience::SharedCache {
        include_cdn_only: true,
    };

    pub fn applies_to(self, test: &TestDef) -> bool {
        match self {
            Audience::Browser => !(test.cdn_only || test.browser_skip),
            Audience::SharedCache { include_cdn_only } => {
                !test.browser_only && (include_cdn_only || !test.cdn_only)
            }
        }
    }
}

/// Tallies for one kind of test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Applicable tests of this kind.
    pub total: usize,
    /// Of those, how many have the raw result `true` (dependencies not considered).
    pub raw_true: usize,
    verdicts: BTreeMap<Verdict, usize>,
}

impl KindCounts {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.verdicts.get(&verdict).copied().unwrap_or(0)
    }

    /// Classified successes: `pass` for required and optimal tests, `yes` for checks.
    pub fn passed(&self) -> usize {
        self.count(Verdict::Pass) + self.count(Verdict::Yes)
    }

    /// The non-zero verdict counts, e.g. `pass 49, fail 8, dep_fail 72`.
    pub fn breakdown(&self) -> String {
        Verdict::ALL
            .into_iter()
            .filter(|&v| self.count(v) > 0)
            .map(|v| format!("{} {}", v.as_str(), self.count(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every verdict with a non-zero count.
    pub fn verdicts(&self) -> impl Iterator<Item = (Verdict, usize)> + '_ {
        self.verdicts.iter().map(|(&v, &n)| (v, n))
    }
}

/// The classification of one applicable test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestVerdict {
    pub id: String,
    pub kind: Kind,
    pub verdict: Verdict,
    /// For `DepFail`: the first dependency that did not succeed.
    pub failed_dependency: Option<String>,
}

/// A scored run.
#[derive(Clone, Debug)]
pub struct Score {
    /// Tests that apply to the audience.
    pub applicable: usize,
    /// Applicable tests whose raw result is `true`: the suite's own "passed N of M" tally.
    pub raw_passed: usize,
    per_kind: [KindCounts; 3],
    /// Every applicable test, in definition order.
    pub per_test: Vec<TestVerdict>,
    /// Result ids that the definitions do not know (definitions older than the results?).
    pub unknown_ids: Vec<String>,
}

impl Score {
    pub fn kind(&self, kind: Kind) -> &KindCounts {
        &self.per_kind[kind.index()]
    }

    fn sum(&self, verdicts: &[Verdict]) -> usize {
        self.per_kind
            .iter()
            .flat_map(|counts| verdicts.iter().map(|&v| counts.count(v)))
            .sum()
    }

    /// Tests that could not set themselves up (including retries), all kinds.
    pub fn setup_failures(&self) -> usize {
        self.sum(&[Verdict::SetupFail, Verdict::Retry])
    }

    /// Tests not counted because a dependency failed, all kinds.
    pub fn dependency_failures(&self) -> usize {
        self.sum(&[Verdict::DepFail])
    }

    /// Harness failures and untested tests, all kinds.
    pub fn harness_failures(&self) -> usize {
        self.sum(&[Verdict::HarnessFail, Verdict::Untested])
    }

    /// Applicable tests of `kind` that failed on their own (see [`Verdict::is_own_failure`]).
    pub fn own_failures(&self, kind: Kind) -> impl Iterator<Item = &TestVerdict> {
        self.per_test
            .iter()
            .filter(move |t| t.kind == kind && t.verdict.is_own_failure())
    }

    /// Applicable tests of `kind` that are not counted because a dependency failed.
    pub fn dependency_failed(&self, kind: Kind) -> impl Iterator<Item = &TestVerdict> {
        self.per_test
            .iter()
            .filter(move |t| t.kind == kind && t.verdict == Verdict::DepFail)
    }

    /// The human report: counts per kind, then the required tests that failed with their
    /// messages, then the required tests lost to a failed dependency.
    pub fn report(&self, results: &Results) -> String {
        let mut out = String::new();
        let req = self.kind(Kind::Required);
        let opt = self.kind(Kind::Optimal);
        let chk = self.kind(Kind::Check);
        let _ = writeln!(
            out,
            "passed {} of {} (raw `true` results, the suite's own tally)",
            self.raw_passed, self.applicable
        );
        let _ = writeln!(
            out,
            "required (conformance): passed {} of {}  (raw true {})  [{}]",
            req.passed(),
            req.total,
            req.raw_true,
            req.breakdown()
        );
        let _ = writeln!(
            out,
            "optimal:                passed {} of {}  (raw true {})  [{}]",
            opt.passed(),
            opt.total,
            opt.raw_true,
            opt.breakdown()
        );
        let _ = writeln!(
            out,
            "check (informational):  yes {} of {}  (raw true {})  [{}]",
            chk.passed(),
            chk.total,
            chk.raw_true,
            chk.breakdown()
        );
        let _ = writeln!(
            out,
            "setup failures: {}   harness failures/untested: {}   dependency failures: {}",
            self.setup_failures(),
            self.harness_failures(),
            self.dependency_failures()
        );
        if !self.unknown_ids.is_empty() {
            let _ = writeln!(
                out,
                "note: {} result ids are not in the definitions (e.g. {})",
                self.unknown_ids.len(),
                self.unknown_ids[0]
            );
        }

        let failing: Vec<_> = self.own_failures(Kind::Required).collect();
        let _ = writeln!(out, "\nfailing required tests ({}):", failing.len());
        for t in &failing {
            let name = results
                .error_name(&t.id)
                .map(|n| n.as_str().map_or_else(|| n.to_string(), str::to_owned))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<12} {:<45} {}{}{}",
                t.verdict.as_str(),
                t.id,
                name,
                if name.is_empty() { "" } else { ": " },
                results.message(&t.id).unwrap_or_default()
            );
        }

        let dep_failed: Vec<_> = self.dependency_failed(Kind::Required).collect();
        let _ = writeln!(
            out,
            "\nrequired tests not counted because a dependency failed ({}):",
            dep_failed.len()
        );
        for t in &dep_failed {
            let _ = writeln!(
                out,
                "  {:<57} needs {}",
                t.id,
                t.failed_dependency.as_deref().unwrap_or("?")
            );
        }
        out
    }
}

/// Classifies every test of `defs` that applies to `audience`.
pub fn score(defs: &Definitions, results: &Results, audience: Audience) -> Result<Score, String> {
    let mut classifier = Classifier {
        defs,
        results,
        memo: HashMap::new(),
        stack: Vec::new(),
    };
    let mut per_kind: [KindCounts; 3] = Default::default();
    let mut per_test = Vec::new();
    let mut raw_passed = 0;
    for (idx, test) in defs.tests.iter().enumerate() {
        if !audience.applies_to(test) {
            continue;
        }
        let (verdict, failed_dependency) = classifier.classify(idx)?;
        let counts = &mut per_kind[test.kind.index()];
        counts.total += 1;
        *counts.verdicts.entry(verdict).or_default() += 1;
        if results.get(&test.id) == Some(&Value::Bool(true)) {
            counts.raw_true += 1;
            raw_passed += 1;
        }
        per_test.push(TestVerdict {
            id: test.id.clone(),
            kind: test.kind,
            verdict,
            failed_dependency: failed_dependency.map(|d| defs.tests[d].id.clone()),
        });
    }
    let unknown_ids = results
        .ids()
        .filter(|id| defs.get(id).is_none())
        .map(str::to_owned)
        .collect();
    Ok(Score {
        applicable: per_test.len(),
        raw_passed,
        per_kind,
        per_test,
        unknown_ids,
    })
}

/// Classification with memoisation. The verdict of a test depends on its dependencies'; a
/// dependency cycle is cut where it closes (a test already on the current dependency path is
/// ignored), and the first verdict computed for a test is the one reused afterwards. That order
/// dependence is deliberate: it is what cache-tests.fyi and the reference tool do.
struct Classifier<'a> {
    defs: &'a Definitions,
    results: &'a Results,
    memo: HashMap<usize, (Verdict, Option<usize>)>,
    /// The tests whose dependencies are being classified right now.
    stack: Vec<usize>,
}

impl Classifier<'_> {
    fn classify(&mut self, idx: usize) -> Result<(Verdict, Option<usize>), String> {
        if let Some(&known) = self.memo.get(&idx) {
            return Ok(known);
        }
        let defs = self.defs;
        let test = &defs.tests[idx];
        let outcome = match self.results.get(&test.id) {
            None => (Verdict::Untested, None),
            Some(result) => match self.first_failed_dependency(idx)? {
                Some(dep) => (Verdict::DepFail, Some(dep)),
                None => (own_verdict(test.kind, result), None),
            },
        };
        self.memo.insert(idx, outcome);
        Ok(outcome)
    }

    fn first_failed_dependency(&mut self, idx: usize) -> Result<Option<usize>, String> {
        let defs = self.defs;
        for dep_id in &defs.tests[idx].depends_on {
            let dep = *defs.by_id.get(dep_id).ok_or_else(|| {
                format!(
                    "test {} depends on unknown test {dep_id} (definitions older than results?)",
                    defs.tests[idx].id
                )
            })?;
            if self.stack.contains(&dep) {
                continue;
            }
            self.stack.push(idx);
            let dep_outcome = self.classify(dep);
            self.stack.pop();
            if !dep_outcome?.0.is_success() {
                return Ok(Some(dep));
            }
        }
        Ok(None)
    }
}

/// The verdict of a test from its own result, dependencies aside.
fn own_verdict(kind: Kind, result: &Value) -> Verdict {
    let error = match result {
        Value::Array(items) => items.first().map(|name| (name, items.get(1))),
        _ => None,
    };
    let error_is = |wanted: &str| matches!(error, Some((Value::String(name), _)) if name == wanted);
    if error_is("Setup") {
        let retry = matches!(error, Some((_, Some(Value::String(m)))) if m == "retry");
        return if retry {
            Verdict::Retry
        } else {
            Verdict::SetupFail
        };
    }
    if *result == Value::Bool(false) || error_is("AbortError") {
        return Verdict::HarnessFail;
    }
    let passed = *result == Value::Bool(true);
    match (kind, passed) {
        (Kind::Required | Kind::Optimal, true) => Verdict::Pass,
        (Kind::Required, false) => Verdict::Fail,
        (Kind::Optimal, false) => Verdict::OptFail,
        (Kind::Check, true) => Verdict::Yes,
        (Kind::Check, false) => Verdict::No,
    }
}
