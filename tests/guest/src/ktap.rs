//! A KTAP v1 writer (Documentation/dev-tools/ktap.rst): version line, plan, one result
//! line per test, `# SKIP` directives, diagnostics as `#` lines, and nested suites
//! indented by four spaces with a `# Subtest:` header, as KUnit prints them.

use std::io::Write;

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    /// `Pass` when `cond`, else `Fail(why)`.
    pub fn check(cond: bool, why: impl Into<String>) -> Self {
        if cond {
            Outcome::Pass
        } else {
            Outcome::Fail(why.into())
        }
    }
}

impl From<Result<(), String>> for Outcome {
    /// `Ok` passes, `Err(why)` fails.
    fn from(r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Outcome::Pass,
            Err(why) => Outcome::Fail(why),
        }
    }
}

/// Writes one KTAP document (or one nested level of it).
pub struct Ktap<W: Write> {
    out: W,
    indent: usize,
    next: usize,
    failed: usize,
}

impl<W: Write> Ktap<W> {
    /// Starts a document with `planned` top-level tests.
    pub fn new(mut out: W, planned: usize) -> Self {
        let _ = writeln!(out, "KTAP version 1");
        let _ = writeln!(out, "1..{planned}");
        let _ = out.flush();
        Ktap {
            out,
            indent: 0,
            next: 1,
            failed: 0,
        }
    }

    fn line(&mut self, s: &str) {
        let pad = " ".repeat(self.indent);
        for l in s.lines() {
            let _ = writeln!(self.out, "{pad}{l}");
        }
        let _ = self.out.flush();
    }

    /// A diagnostic line.
    pub fn diag(&mut self, msg: &str) {
        for l in msg.lines() {
            self.line(&format!("# {l}"));
        }
    }

    /// Reports one test's result.
    pub fn result(&mut self, name: &str, outcome: &Outcome) {
        let n = self.next;
        self.next += 1;
        match outcome {
            Outcome::Pass => self.line(&format!("ok {n} {name}")),
            Outcome::Skip(why) => self.line(&format!("ok {n} {name} # SKIP {why}")),
            Outcome::Fail(why) => {
                self.failed += 1;
                self.diag(why);
                self.line(&format!("not ok {n} {name}"));
            }
        }
    }

    /// Runs a suite of `cases` as nested subtests, then reports the suite as one test that
    /// fails when any case failed.
    pub fn suite(&mut self, name: &str, cases: Vec<(String, Outcome)>) {
        self.indent += 4;
        self.line("KTAP version 1");
        self.line(&format!("# Subtest: {name}"));
        self.line(&format!("1..{}", cases.len()));
        let (outer_next, outer_failed) = (self.next, self.failed);
        self.next = 1;
        self.failed = 0;
        for (case, outcome) in &cases {
            self.result(case, outcome);
        }
        let failed = self.failed;
        self.indent -= 4;
        self.next = outer_next;
        self.failed = outer_failed;
        let outcome = if failed > 0 {
            Outcome::Fail(format!("{failed} of {} cases failed", cases.len()))
        } else if !cases.is_empty() && cases.iter().all(|(_, o)| matches!(o, Outcome::Skip(_))) {
            Outcome::Skip("all cases skipped".into())
        } else {
            Outcome::Pass
        };
        self.result(name, &outcome);
    }

    /// Number of failed top-level tests.
    pub fn failed(&self) -> usize {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_plan_results_and_nested_suites() {
        let mut buf = Vec::new();
        {
            let mut k = Ktap::new(&mut buf, 3);
            k.result("a", &Outcome::Pass);
            k.suite(
                "s",
                vec![
                    ("x".into(), Outcome::Pass),
                    ("y".into(), Outcome::Fail("boom".into())),
                ],
            );
            k.result("c", &Outcome::Skip("no device".into()));
            assert_eq!(k.failed(), 1);
        }
        let text = String::from_utf8(buf).unwrap();
        let want = "KTAP version 1\n1..3\nok 1 a\n    KTAP version 1\n    # Subtest: s\n    1..2\n    ok 1 x\n    # boom\n    not ok 2 y\n# 1 of 2 cases failed\nnot ok 2 s\nok 3 c # SKIP no device\n";
        assert_eq!(text, want);
    }
}
