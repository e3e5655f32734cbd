//! Random identifiers for consumptions and charges: version 4 UUIDs drawn from a generator
//! (xoshiro256++) that the operating system seeds once per thread.
//!
//! Asking the operating system for every id costs a system call per event, the largest single
//! cost of recording one in memory (`cargo bench --bench ids`: 381 ns a draw with `getrandom`,
//! against 13 ns here). The `uuid` crate's fast draws (`fast-rng`: 15 ns for version 4, 86 ns
//! for version 7) come from `rand`'s thread generator, which rand documents as not seeded again
//! in a forked child: that is the one thing this module adds, and why it is written here. These ids name records, they guard nothing: they must not
//! collide, which 122 random bits from a well-seeded generator ensure, and need not be
//! unpredictable. Keys that must be deterministic (charge keys) are never random.
//!
//! A child process made by `fork` inherits its parent's generator and would draw the parent's
//! next ids again (and an event sent without an id is known by its consumption id, so a repeat
//! could be taken for a re-send). Each thread's generator therefore learns of a fork before
//! every draw and is seeded again after one: from a counter that a fork handler
//! (`pthread_atfork`, registered once per process) moves in the child before `fork` returns
//! there, which costs a load per draw; or, should the handler not be registered, from the
//! process id, which costs a system call per draw. A child made without the C library's `fork`
//! (a raw `clone` system call, or glibc's `_Fork`, which runs no fork handlers) is not
//! detected: such a child must `exec`, or draw no ids, before it would repeat its parent's.

use std::cell::RefCell;

use uuid::Uuid;

/// How a generator learns that its process was forked since its last draw.
enum Forks {
    /// The fork handler's counter.
    Handler(forkguard::Guard),
    /// The process id, when no handler could be registered.
    ProcessId(forkguard::pid::Guard),
}

impl Forks {
    fn new() -> Forks {
        match forkguard::Guard::try_new() {
            Ok(guard) => Forks::Handler(guard),
            Err(_) => Forks::ProcessId(forkguard::pid::Guard::default()),
        }
    }

    fn forked(&mut self) -> bool {
        match self {
            Forks::Handler(guard) => guard.detected_fork(),
            Forks::ProcessId(guard) => guard.detected_fork(),
        }
    }
}

thread_local! {
    /// How the thread learns of forks, and its generator's state.
    static STATE: RefCell<(Forks, [u64; 4])> = RefCell::new((Forks::new(), seed()));
}

/// A seed from the operating system (through `uuid`'s own draw), never all zeros.
fn seed() -> [u64; 4] {
    let halves = |u: Uuid| {
        let (high, low) = u.as_u64_pair();
        [high, low]
    };
    let [a, b] = halves(Uuid::new_v4());
    let [c, d] = halves(Uuid::new_v4());
    let state = [a, b, c, d];
    if state == [0; 4] { [1, 2, 3, 4] } else { state }
}

/// The next 64 random bits of this thread's generator.
fn next(state: &mut [u64; 4]) -> u64 {
    let result = state[0].wrapping_add(state[3]).rotate_left(23).wrapping_add(state[0]);
    let t = state[1] << 17;
    state[2] ^= state[0];
    state[3] ^= state[1];
    state[1] ^= state[2];
    state[0] ^= state[3];
    state[2] ^= t;
    state[3] = state[3].rotate_left(45);
    result
}

/// A random version 4 UUID.
pub(crate) fn uuid_v4() -> Uuid {
    STATE.with(|cell| {
        let (forks, state) = &mut *cell.borrow_mut();
        draw(state, forks.forked())
    })
}

/// The next id of a generator, seeded again first if its process was `forked` since the last.
fn draw(state: &mut [u64; 4], forked: bool) -> Uuid {
    if forked {
        *state = seed();
    }
    let high = next(state);
    let low = next(state);
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_generator_copied_into_another_process_is_seeded_again() {
        let state = [1, 2, 3, 4];
        let (mut parent, mut child, mut same) = (state, state, state);
        let parents = draw(&mut parent, false);
        // In the same process, the same state draws the same id (the generator is
        // deterministic); in a child with the parent's state, it must not.
        assert_eq!(draw(&mut same, false), parents);
        assert_ne!(draw(&mut child, true), parents);
        assert_ne!(child, parent);
    }

    #[test]
    fn the_fork_handler_is_registered_and_reports_no_fork_where_there_was_none() {
        let mut forks = Forks::new();
        assert!(matches!(forks, Forks::Handler(_)), "the fork handler is registered");
        assert!(!forks.forked());
        assert!(!forks.forked());
    }

    #[test]
    fn ids_are_version_4_and_distinct_across_threads() {
        let mut seen = HashSet::new();
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| uuid_v4()).collect::<Vec<_>>()))
            .collect();
        for thread in threads {
            for id in thread.join().expect("a thread") {
                assert_eq!(id.get_version_num(), 4);
                assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
                assert!(seen.insert(id), "a repeated id");
            }
        }
    }
}
