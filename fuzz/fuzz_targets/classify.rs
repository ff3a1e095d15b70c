//! The pinning classifier and the lint's statement splitter on arbitrary text: they never
//! panic, and the statements `lint` finds account for exactly what `classify` reports for the
//! whole text (the fast path of `classify` and the full scan behind `lint` agree).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinpool::pinning::{PinRules, Reason, Reasons, classify, lint};

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let whole = classify(sql);
    let findings = lint(sql, &PinRules::new());
    let mut union = Reasons::EMPTY;
    let mut line = 1;
    for (i, f) in findings.iter().enumerate() {
        assert_eq!(f.statement, i + 1, "statements are numbered in order");
        assert!(f.line >= line, "lines never go back");
        line = f.line;
        assert!(
            sql.contains(f.text),
            "a finding's text comes from the input"
        );
        union = union.union(f.classification.reasons);
    }
    assert_eq!(
        union.without(Reason::Oversized),
        whole.reasons.without(Reason::Oversized),
        "lint and classify disagree on {sql:?}"
    );
    // The legacy rules pin every statement for Parse.
    for f in lint(sql, &PinRules::legacy()) {
        assert!(f.pins.contains(Reason::Parse));
    }
});
