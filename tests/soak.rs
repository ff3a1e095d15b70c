//! The incident soak, short and small: baseline shows Lambda timeouts, pinpool shows none, and
//! with a proxy that pins more than pinpool knows, pinpool's failures are fast and typed.
//! Runs the soak example as a child process (built by `cargo test --all-features`); its own
//! test binary keeps it apart from the other tests (cargo runs test binaries one at a time).
#![cfg(feature = "emulator")]

mod common;

use std::process::Command;

/// One soak at a time: each starts an emulator with its own database connections.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn soak(extra: &[&str]) -> serde_json::Value {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(common::example_binary("soak"))
        .args([
            "--duration",
            "3s",
            "--vus",
            "16",
            "--think",
            "500ms",
            "--upstream-connections",
            "12",
            "--lambda-timeout",
            "1s",
            "--borrow-timeout",
            "3s",
            "--variants",
            "baseline,pinpool",
            "--pin-share",
            "0.5",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

fn variant<'a>(result: &'a serde_json::Value, scenario: &str, name: &str) -> &'a serde_json::Value {
    result["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["scenario"] == scenario && v["name"] == name)
        .unwrap_or_else(|| panic!("{scenario}/{name} missing from {result}"))
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn pinpool_has_no_lambda_timeouts_where_the_baseline_has_them() {
    let result = soak(&[]);
    for scenario in ["2023", "today"] {
        let baseline = variant(&result, scenario, "baseline");
        let pinpool = variant(&result, scenario, "pinpool");
        assert!(n(baseline, "lambda_timeouts") > 0, "{scenario}: {baseline}");
        assert_eq!(n(pinpool, "lambda_timeouts"), 0, "{scenario}: {pinpool}");
        let (ok, total) = (n(pinpool, "ok"), n(pinpool, "invocations"));
        assert!(total > 0 && ok * 100 >= total * 99, "{scenario}: {pinpool}");
        assert!(
            ok >= n(baseline, "ok"),
            "{scenario}: {pinpool} vs {baseline}"
        );
        assert!(
            n(pinpool, "fast_failures") * 100 <= total,
            "{scenario}: {pinpool}"
        );
        // Under the 2023 rules every session pins for its invocation, so a burst of more
        // invocations than database connections can pin them all for a moment (the others
        // wait milliseconds); today only the invocations that run a pinning statement pin.
        let peak = n(pinpool, "peak_pinned");
        if scenario == "today" {
            assert!(peak < 12, "{scenario}: {pinpool}");
        } else {
            assert!(peak <= 12, "{scenario}: {pinpool}");
        }
    }
}

#[test]
fn a_proxy_pinning_more_than_pinpool_knows_gives_fast_failures_not_timeouts() {
    let result = soak(&[
        "--scenarios",
        "2023",
        "--variants",
        "pinpool",
        "--pinpool-rules",
        "today",
    ]);
    let pinpool = variant(&result, "2023", "pinpool");
    assert_eq!(n(pinpool, "lambda_timeouts"), 0, "{pinpool}");
    assert!(n(pinpool, "ok") > 0, "{pinpool}");
}
