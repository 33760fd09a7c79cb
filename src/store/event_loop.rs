//! Which event loop (`event_loops`) this thread is, if any. The loops say
//! so as they start; what keeps connections per loop reads it: the proxy's
//! idle upstream connections, and a Redis store's connection of each loop
//! (whose task then runs on the loop, so a reply wakes no other thread).

use std::cell::Cell;

thread_local! {
    static LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as event loop `n` (1 and up).
pub fn enter(n: usize) {
    LOOP.with(|l| l.set(n));
}

/// This thread's event loop: 1 and up, 0 where it is none.
pub fn current() -> usize {
    LOOP.with(Cell::get)
}
