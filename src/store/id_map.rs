//! [`IdMap`]: the stores' maps keyed by an identifier, hashed as the identifier's bytes.

use std::fmt;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::domain::IdBytes;

/// A map keyed by an identifier and hashed as its bytes ([`IdBytes`], whose ids are equal
/// exactly when their bytes are).
///
/// An identifier's `Hash` hashes its text, as `Borrow<str>` requires, and reading the text
/// checks it for UTF-8; a map that is only ever looked up by the identifier itself need not pay
/// for that on every look-up. Keys are cloned only when inserted.
pub(crate) struct IdMap<K, V> {
    table: HashTable<(K, V)>,
    hasher: foldhash::fast::RandomState,
}

impl<K, V> Default for IdMap<K, V> {
    fn default() -> Self {
        IdMap {
            table: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for IdMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.table.iter().map(|(k, v)| (k, v))).finish()
    }
}

impl<K: IdBytes + Eq, V> IdMap<K, V> {
    fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key.id_bytes())
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.table.find(self.hash(key), |(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, to change.
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let hash = self.hash(key);
        self.table.find_mut(hash, |(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key`, inserted as `make()` (with a clone of `key`) when absent.
    pub(crate) fn get_or_insert_with(&mut self, key: &K, make: impl FnOnce() -> V) -> &mut V
    where
        K: Clone,
    {
        self.get_or_insert_with_news(key, make).0
    }

    /// The value of `key`, inserted as `make()` (with a clone of `key`) when absent, and whether
    /// it was: one probe, for a caller that may take the insertion back.
    pub(crate) fn get_or_insert_with_news(&mut self, key: &K, make: impl FnOnce() -> V) -> (&mut V, bool)
    where
        K: Clone,
    {
        let hash = self.hash(key);
        let hasher = &self.hasher;
        let entry = self
            .table
            .entry(hash, |(k, _)| k == key, |(k, _)| hasher.hash_one(k.id_bytes()));
        let (occupied, inserted) = match entry {
            Entry::Occupied(occupied) => (occupied, false),
            Entry::Vacant(vacant) => (vacant.insert((key.clone(), make())), true),
        };
        (&mut occupied.into_mut().1, inserted)
    }

    /// Inserts `value` under `key`, answering the value it replaces.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let hash = self.hash(&key);
        let hasher = &self.hasher;
        match self
            .table
            .entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k.id_bytes()))
        {
            Entry::Occupied(mut occupied) => Some(std::mem::replace(&mut occupied.get_mut().1, value)),
            Entry::Vacant(vacant) => {
                vacant.insert((key, value));
                None
            }
        }
    }

    /// Removes `key`, answering its value.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let hash = self.hash(key);
        let found = self.table.find_entry(hash, |(k, _)| k == key).ok()?;
        Some(found.remove().0.1)
    }

    /// How many keys.
    #[cfg(any(test, feature = "postgres"))]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// The keys, in no particular order.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.table.iter().map(|(k, _)| k)
    }

    /// The values, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.table.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::UserId;

    #[derive(Debug, Clone)]
    enum Op {
        Get(usize),
        GetOrInsert(usize, u32),
        Insert(usize, u32),
        Remove(usize),
        Bump(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Twelve keys, short (kept in place) and long (shared), so that operations meet each other.
        let key = 0..12_usize;
        prop_oneof![
            key.clone().prop_map(Op::Get),
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            key.prop_map(Op::Bump),
        ]
    }

    fn user(k: usize) -> UserId {
        let text = if k % 2 == 0 {
            format!("user-{k}")
        } else {
            format!("{}-{k}", "u".repeat(60))
        };
        UserId::new(text).expect("a valid id")
    }

    proptest! {
        /// The map answers as a `HashMap` keyed by the same ids does, whatever the sequence of
        /// operations (the table grows and rehashes on the way).
        #[test]
        fn answers_as_a_hash_map(ops in proptest::collection::vec(op(), 0..200)) {
            let mut map: IdMap<UserId, u32> = IdMap::default();
            let mut model: HashMap<UserId, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Get(k) => prop_assert_eq!(map.get(&user(k)), model.get(&user(k))),
                    Op::GetOrInsert(k, v) => {
                        let absent = !model.contains_key(&user(k));
                        let (got, inserted) = map.get_or_insert_with_news(&user(k), || v);
                        prop_assert_eq!((*got, inserted), (*model.entry(user(k)).or_insert(v), absent));
                    }
                    Op::Insert(k, v) => prop_assert_eq!(map.insert(user(k), v), model.insert(user(k), v)),
                    Op::Remove(k) => prop_assert_eq!(map.remove(&user(k)), model.remove(&user(k))),
                    Op::Bump(k) => {
                        if let Some(v) = map.get_mut(&user(k)) {
                            *v = v.wrapping_add(1);
                        }
                        if let Some(v) = model.get_mut(&user(k)) {
                            *v = v.wrapping_add(1);
                        }
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            for k in 0..12 {
                prop_assert_eq!(map.get(&user(k)), model.get(&user(k)));
            }
        }
    }
}
