//! Random identifiers for consumptions and charges: version 4 UUIDs drawn from a generator
//! (xoshiro256++) that the operating system seeds once per thread.
//!
//! Asking the operating system for every id costs a system call per event, the largest single
//! cost of recording one in memory. These ids name records, they guard nothing: they must not
//! collide, which 122 random bits from a well-seeded generator ensure, and need not be
//! unpredictable. Keys that must be deterministic (charge keys) are never random.
//!
//! A child process made by `fork` inherits its parent's generator and would draw the parent's
//! next ids again (and an event sent without an id is known by its consumption id, so a repeat
//! could be taken for a re-send). Each thread's generator therefore remembers the process it
//! was seeded in and is seeded again in another.

use std::cell::Cell;

use uuid::Uuid;

thread_local! {
    /// The process the generator was seeded in, and its state.
    static STATE: Cell<(u32, [u64; 4])> = Cell::new((std::process::id(), seed()));
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
    STATE.with(|cell| draw(cell, std::process::id()))
}

/// The next id of a generator, seeded again first if it was seeded in another process than
/// `current`.
fn draw(cell: &Cell<(u32, [u64; 4])>, current: u32) -> Uuid {
    let (mut process, mut state) = cell.get();
    if process != current {
        (process, state) = (current, seed());
    }
    let high = next(&mut state);
    let low = next(&mut state);
    cell.set((process, state));
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
        let state = (7, [1, 2, 3, 4]);
        let (parent, child, same) = (Cell::new(state), Cell::new(state), Cell::new(state));
        let parents = draw(&parent, 7);
        // In the same process, the same state draws the same id (the generator is
        // deterministic); in a child with the parent's state, it must not.
        assert_eq!(draw(&same, 7), parents);
        assert_ne!(draw(&child, 8), parents);
        assert_eq!(child.get().0, 8);
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
