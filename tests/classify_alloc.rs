//! `pinning::classify` allocates nothing: a counting global allocator watches it (this test
//! binary only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
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
    for sql in &inputs {
        let before = ALLOCS.load(Ordering::SeqCst);
        let c = pinpool::pinning::classify(sql);
        let after = ALLOCS.load(Ordering::SeqCst);
        std::hint::black_box(c);
        assert_eq!(
            after - before,
            0,
            "classify allocated for {:?}",
            &sql[..20.min(sql.len())]
        );
    }
}
