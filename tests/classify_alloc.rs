//! `pinning::classify` allocates nothing: a counting global allocator watches it (this test
//! binary only). Only the test's own thread is counted: the test harness allocates on its
//! other threads whenever it likes (its slow-test notice, for one).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// Allocations made on this thread so far; const-initialised, so reading it never allocates.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn allocs() -> usize {
    ALLOCS.with(Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: during thread teardown the slot may be gone; such allocations are not ours.
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn classify_does_not_allocate() {
    let inputs = [
        "SELECT * FROM users WHERE id = $1".to_string(),
        "BEGIN; SET LOCAL a = 1; SELECT set_config('a', 'b', true), nextval('s'); COMMIT"
            .to_string(),
        "SELECT $x$ body $x$, E'\\'', \"q\"\"q\" /* /* */ */ -- c\n".repeat(100),
        "x".repeat(20_000),
    ];
    // The counter itself works: a deliberate allocation on this thread is seen.
    let before = allocs();
    std::hint::black_box(vec![1u8; 64]);
    assert_eq!(
        allocs() - before,
        1,
        "the counting allocator is not counting"
    );
    for sql in &inputs {
        let before = allocs();
        let c = pinpool::pinning::classify(sql);
        let after = allocs();
        std::hint::black_box(c);
        assert_eq!(
            after - before,
            0,
            "classify allocated for {:?}",
            &sql[..20.min(sql.len())]
        );
    }
}
