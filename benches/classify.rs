//! `pinning::classify` on a typical 200-byte query, a 16 KB statement and adversarial input.
//! Goal: under 300 ns for the 200-byte query, linear in length.
//!
//! `cargo bench --bench classify`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pinpool::pinning::classify;

/// A typical parameterised query of 200 bytes.
pub const TYPICAL: &str = "SELECT u.id, u.name, u.email, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 AND o.created_at > $2 AND o.status = 'pai' ORDER BY o.created_at DESC, u.name ASC LIMIT 20 OFFSET 0";

fn inputs() -> Vec<(&'static str, String)> {
    let big = {
        let mut s = String::from("INSERT INTO t (id, v) VALUES ");
        let mut i = 0;
        while s.len() < 16_000 {
            s.push_str(&format!("({i}, 'value {i} -- not a comment'), "));
            i += 1;
        }
        s.push_str("(0, 'end')");
        s
    };
    // Many nested comment openers, dollar signs and quotes: the lexer's worst cases.
    let adversarial = "/*$a$'\"(".repeat(2_000) + &"$$".repeat(2_000) + &"nextval(".repeat(1_000);
    // The same query ended by ';': the fast path declines it, so this times the full scan.
    let full_scan = format!("{};", &TYPICAL[..TYPICAL.len() - 1]);
    vec![
        ("typical_200b", TYPICAL.to_string()),
        ("typical_200b_full_scan", full_scan),
        ("statement_16kb", big),
        ("adversarial", adversarial),
        // Each `$$` opens and closes an empty dollar-quoted string: once quadratic (the rest
        // of the text was validated as UTF-8 at every tag).
        ("adversarial_dollars", "$".repeat(16_384)),
    ]
}

fn bench(c: &mut Criterion) {
    assert_eq!(TYPICAL.len(), 200);
    let mut group = c.benchmark_group("classify");
    for (name, sql) in inputs() {
        group.throughput(Throughput::Bytes(sql.len() as u64));
        group.bench_function(name, |b| b.iter(|| classify(black_box(&sql))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
