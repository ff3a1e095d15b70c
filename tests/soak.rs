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
            // Users in step keep every environment busy at every step: none would sit idle
            // long enough for the nat scenario's NAT to forget it.
            "--think-jitter",
            "0.5",
            "--upstream-connections",
            "12",
            // 2 s: pinpool's check of a flow the NAT forgot takes half the time left, and the
            // reconnect after it gets the other half, a second on a loaded machine. The
            // baseline's waits (3 s borrow timeout, a forgotten flow) still outlast it.
            "--lambda-timeout",
            "2s",
            "--borrow-timeout",
            "3s",
            "--variants",
            "baseline,pinpool",
            "--pin-share",
            "0.5",
            // Scaled to this shorter run: environments idle longer than 1 s lose their flow,
            // and pinpool checks connections idle longer than 300 ms.
            "--nat-idle-timeout",
            "1s",
            "--pinpool-validate-idle-after",
            "300ms",
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

fn ms(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn pinpool_has_no_lambda_timeouts_where_the_baseline_has_them() {
    let result = soak(&[]);
    for scenario in ["2023", "today", "nat"] {
        let baseline = variant(&result, scenario, "baseline");
        let pinpool = variant(&result, scenario, "pinpool");
        assert!(n(baseline, "lambda_timeouts") > 0, "{scenario}: {baseline}");
        // The mechanism itself: pins held by environments between invocations.
        assert!(
            n(baseline, "frozen_pins_peak") > 0,
            "{scenario}: {baseline}"
        );
        assert_eq!(n(pinpool, "frozen_pins_peak"), 0, "{scenario}: {pinpool}");
        for row in [baseline, pinpool] {
            assert!(
                n(row, "frozen_pins_peak") <= n(row, "peak_pinned"),
                "{scenario}: {row}"
            );
            // Every environment's first invocation is a cold start; 16 users need at least
            // 16 environments, and the rest of the invocations are warm.
            let cold = n(row, "cold_starts");
            assert!(
                cold >= 16 && cold < n(row, "invocations"),
                "{scenario}: {row}"
            );
            let (p50, p99) = (ms(row, "warm_p50_ms"), ms(row, "warm_p99_ms"));
            assert!(0.0 < p50 && p50 <= p99, "{scenario}: {row}");
            assert!(ms(row, "cold_p99_ms") > 0.0, "{scenario}: {row}");
            // Warm latencies are of successful invocations: never a Lambda timeout's (2 s).
            assert!(p99 < 2000.0, "{scenario}: {row}");
        }
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
        if scenario != "2023" {
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
    // Its idle connections stay pinned without its knowing: the measure sees them.
    assert!(n(pinpool, "frozen_pins_peak") > 0, "{pinpool}");
}

#[test]
fn behind_a_nat_the_baseline_hangs_and_pinpool_s_freeze_check_answers() {
    // Nothing pins: only the NAT's forgotten flows are left.
    let result = soak(&["--scenarios", "nat", "--pin-share", "0"]);
    let baseline = variant(&result, "nat", "baseline");
    let pinpool = variant(&result, "nat", "pinpool");
    assert!(n(baseline, "nat_drops") > 0, "{baseline}");
    assert!(n(baseline, "lambda_timeouts") > 0, "{baseline}");
    assert_eq!(n(baseline, "frozen_pins_peak"), 0, "{baseline}");
    assert!(n(pinpool, "nat_drops") > 0, "{pinpool}");
    assert_eq!(n(pinpool, "lambda_timeouts"), 0, "{pinpool}");
    let (ok, total) = (n(pinpool, "ok"), n(pinpool, "invocations"));
    assert!(total > 0 && ok * 100 >= total * 99, "{pinpool}");
}
