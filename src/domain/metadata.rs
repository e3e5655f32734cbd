//! [`Metadata`]: an event's free-form key-value pairs, kept in two allocations.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::iter::FusedIterator;
use std::ops::{Index, Range};

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Free-form key-value pairs attached to a usage event (the original product's `metadata`), kept within
/// Stripe's metadata limits so they can travel with a charge: see
/// [`check_metadata`](crate::check_metadata).
///
/// A map from text to text, ordered by key, each key at most once, like a
/// `BTreeMap<String, String>`; it serializes as one (a JSON object). It keeps all its text in one
/// buffer and where each entry ends in another, so that an event's metadata costs two
/// allocations to build, clone, keep and free however many entries it has, instead of a node
/// and two strings per entry, and no spare capacity. Every event carries it through the hot
/// path, and a kept event keeps it.
///
/// Build it whole (from an array, an iterator, a map or JSON): inserting or removing one entry
/// writes the map again, which is fine for the few keys metadata has (at most 50 are accepted)
/// but not for building it key by key.
///
/// # Example
/// ```
/// use token_billing::Metadata;
///
/// let mut metadata = Metadata::from([("model", "gpt-large"), ("conversationId", "conv-123")]);
/// metadata.insert("agentId", "agent-456");
/// assert_eq!(metadata.get("model"), Some("gpt-large"));
/// assert_eq!(&metadata["agentId"], "agent-456");
/// // In key order, whatever the order of insertion.
/// let keys: Vec<&str> = metadata.keys().collect();
/// assert_eq!(keys, ["agentId", "conversationId", "model"]);
/// assert_eq!(
///     serde_json::to_string(&metadata)?,
///     r#"{"agentId":"agent-456","conversationId":"conv-123","model":"gpt-large"}"#
/// );
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata {
    /// Each entry's key then its value, entries in key order, nothing else: so two maps with
    /// the same entries are equal field by field. Boxed, so that a kept event keeps no spare
    /// capacity.
    text: Box<str>,
    /// For each entry, in key order: where its key ends and where its value ends in `text`
    /// (it starts where the entry before ends).
    ends: Box<[(usize, usize)]>,
}

impl Metadata {
    /// An empty map (no allocation).
    ///
    /// # Example
    /// ```
    /// use token_billing::Metadata;
    ///
    /// let metadata = Metadata::new();
    /// assert!(metadata.is_empty() && metadata.len() == 0);
    /// assert_eq!(metadata, Metadata::default());
    /// ```
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// A map of `entries`, which are in key order, each key once: two allocations.
    fn of_entries<'e>(entries: impl Iterator<Item = (&'e str, &'e str)> + Clone) -> Metadata {
        let (count, len) = entries.clone().fold((0, 0), |(count, len), (key, value)| {
            (count + 1, len + key.len() + value.len())
        });
        let mut text = String::with_capacity(len);
        let mut ends: Vec<(usize, usize)> = Vec::with_capacity(count);
        for (key, value) in entries {
            // Equality and hashing compare the fields: the form must be the one for the entries.
            debug_assert!(
                ends.last().is_none_or(|&(key_end, _)| {
                    let start = ends.len().checked_sub(2).map_or(0, |before| ends[before].1);
                    &text[start..key_end] < key
                }),
                "entries in key order, each key once"
            );
            text.push_str(key);
            let key_end = text.len();
            text.push_str(value);
            ends.push((key_end, text.len()));
        }
        // Exactly as long as allocated: boxing them moves nothing.
        Metadata {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// A map of `pairs`, sorted here; a key given twice keeps its last value, as in a map.
    fn of_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &mut [(K, V)]) -> Metadata {
        // Stable: pairs of one key stay in the order they were given.
        pairs.sort_by(|(a, _), (b, _)| a.as_ref().cmp(b.as_ref()));
        let pairs = &*pairs;
        let last_of_its_key = |index: usize| {
            pairs
                .get(index + 1)
                .is_none_or(|(next, _)| next.as_ref() != pairs[index].0.as_ref())
        };
        Metadata::of_entries(
            pairs
                .iter()
                .enumerate()
                .filter(move |&(index, _)| last_of_its_key(index))
                .map(|(_, (key, value))| (key.as_ref(), value.as_ref())),
        )
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Where entry `index` starts in `text`.
    fn start(&self, index: usize) -> usize {
        match index.checked_sub(1) {
            Some(before) => self.ends[before].1,
            None => 0,
        }
    }

    /// Entry `index`'s key and value, as ranges of `text`.
    fn ranges(&self, index: usize) -> (Range<usize>, Range<usize>) {
        let (key_end, value_end) = self.ends[index];
        (self.start(index)..key_end, key_end..value_end)
    }

    fn entry(&self, index: usize) -> (&str, &str) {
        let (key, value) = self.ranges(index);
        (&self.text[key], &self.text[value])
    }

    /// The place of `key`: `Ok` where it is, `Err` where it would go.
    fn find(&self, key: &str) -> Result<usize, usize> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let middle = low + (high - low) / 2;
            let (range, _) = self.ranges(middle);
            match self.text[range].cmp(key) {
                Ordering::Less => low = middle + 1,
                Ordering::Greater => high = middle,
                Ordering::Equal => return Ok(middle),
            }
        }
        Err(low)
    }

    /// The value of `key`.
    ///
    /// # Example
    /// ```
    /// use token_billing::Metadata;
    ///
    /// let metadata = Metadata::from([("model", "gpt-large")]);
    /// assert_eq!(metadata.get("model"), Some("gpt-large"));
    /// assert_eq!(metadata.get("agentId"), None);
    /// assert!(metadata.contains_key("model"));
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        let index = self.find(key).ok()?;
        Some(self.entry(index).1)
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets the value of `key`, answering the value it replaces. The map is written again,
    /// in two allocations: for the few keys metadata has.
    ///
    /// # Example
    /// ```
    /// use token_billing::Metadata;
    ///
    /// let mut metadata = Metadata::from([("model", "gpt-large")]);
    /// assert_eq!(metadata.insert("model", "gpt-small"), Some("gpt-large".to_owned()));
    /// assert_eq!(metadata.insert("agentId", "agent-456"), None);
    /// assert_eq!(metadata.len(), 2);
    /// ```
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Option<String> {
        let (key, value) = (key.as_ref(), value.as_ref());
        let (rebuilt, old) = match self.find(key) {
            Ok(index) => {
                let old = self.entry(index).1.to_owned();
                let entries = self
                    .iter()
                    .enumerate()
                    .map(|(at, (k, v))| if at == index { (k, value) } else { (k, v) });
                (Metadata::of_entries(entries), Some(old))
            }
            Err(index) => {
                let entries = self
                    .iter()
                    .take(index)
                    .chain(std::iter::once((key, value)))
                    .chain(self.iter().skip(index));
                (Metadata::of_entries(entries), None)
            }
        };
        *self = rebuilt;
        old
    }

    /// Removes `key`, answering its value.
    ///
    /// # Example
    /// ```
    /// use token_billing::Metadata;
    ///
    /// let mut metadata = Metadata::from([("model", "gpt-large"), ("agentId", "agent-456")]);
    /// assert_eq!(metadata.remove("model"), Some("gpt-large".to_owned()));
    /// assert_eq!(metadata.remove("model"), None);
    /// assert_eq!(metadata, Metadata::from([("agentId", "agent-456")]));
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let index = self.find(key).ok()?;
        let value = self.entry(index).1.to_owned();
        let rebuilt = Metadata::of_entries(
            self.iter()
                .enumerate()
                .filter(|&(at, _)| at != index)
                .map(|(_, entry)| entry),
        );
        *self = rebuilt;
        Some(value)
    }

    /// The entries, in key order.
    ///
    /// # Example
    /// ```
    /// use token_billing::Metadata;
    ///
    /// let metadata: Metadata = [("b", "2"), ("a", "1")].into_iter().collect();
    /// let entries: Vec<(&str, &str)> = metadata.iter().collect();
    /// assert_eq!(entries, [("a", "1"), ("b", "2")]);
    /// let values: Vec<&str> = metadata.values().rev().collect();
    /// assert_eq!(values, ["2", "1"]);
    /// ```
    pub fn iter(&self) -> MetadataIter<'_> {
        MetadataIter {
            metadata: self,
            front: 0,
            back: self.len(),
        }
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + FusedIterator + Clone {
        self.iter().map(|(key, _)| key)
    }

    /// The values, in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + FusedIterator + Clone {
        self.iter().map(|(_, value)| value)
    }
}

/// The entries of a [`Metadata`], in key order: see [`Metadata::iter`].
#[derive(Debug, Clone)]
pub struct MetadataIter<'a> {
    metadata: &'a Metadata,
    front: usize,
    back: usize,
}

impl<'a> Iterator for MetadataIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.front += 1;
        Some(self.metadata.entry(self.front - 1))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.back - self.front;
        (left, Some(left))
    }
}

impl DoubleEndedIterator for MetadataIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        self.back -= 1;
        Some(self.metadata.entry(self.back))
    }
}

impl ExactSizeIterator for MetadataIter<'_> {}

impl FusedIterator for MetadataIter<'_> {}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a str, &'a str);
    type IntoIter = MetadataIter<'a>;

    fn into_iter(self) -> MetadataIter<'a> {
        self.iter()
    }
}

/// Each entry in turn, as [`Metadata::insert`] would set it.
impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for Metadata {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, entries: I) {
        let mut pairs: Vec<(&str, &str)> = self.iter().collect();
        let added: Vec<(K, V)> = entries.into_iter().collect();
        // After the map's own entries: a key given again takes its new value.
        pairs.extend(added.iter().map(|(key, value)| (key.as_ref(), value.as_ref())));
        let extended = Metadata::of_pairs(&mut pairs);
        *self = extended;
    }
}

/// A key given twice keeps its last value, as in a map.
impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Metadata {
        let mut pairs: Vec<(K, V)> = entries.into_iter().collect();
        Metadata::of_pairs(&mut pairs)
    }
}

/// A key given twice keeps its last value, as in a map.
impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Metadata {
    fn from(mut entries: [(K, V); N]) -> Metadata {
        Metadata::of_pairs(&mut entries)
    }
}

impl From<BTreeMap<String, String>> for Metadata {
    fn from(map: BTreeMap<String, String>) -> Metadata {
        // Already in key order, each key once.
        Metadata::of_entries(map.iter().map(|(key, value)| (key.as_str(), value.as_str())))
    }
}

impl<S: BuildHasher> From<HashMap<String, String, S>> for Metadata {
    fn from(map: HashMap<String, String, S>) -> Metadata {
        map.into_iter().collect()
    }
}

impl From<&Metadata> for BTreeMap<String, String> {
    fn from(metadata: &Metadata) -> BTreeMap<String, String> {
        metadata.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }
}

/// The value of a key that is there.
///
/// # Panics
/// When `key` has no value, as a map's index does.
impl Index<&str> for Metadata {
    type Output = str;

    fn index(&self, key: &str) -> &str {
        match self.get(key) {
            Some(value) => value,
            None => panic!("no metadata key {key:?}"),
        }
    }
}

/// Entry by entry, as a map of strings orders.
impl PartialOrd for Metadata {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Metadata {
    fn cmp(&self, other: &Self) -> Ordering {
        self.iter().cmp(other.iter())
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (key, value) in self {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Metadata, D::Error> {
        struct Entries;

        impl<'de> Visitor<'de> for Entries {
            type Value = Metadata;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Metadata, A::Error> {
                let mut pairs: Vec<(String, String)> = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = access.next_entry()? {
                    pairs.push(pair);
                }
                // A key given twice keeps its last value.
                Ok(Metadata::of_pairs(&mut pairs))
            }
        }

        deserializer.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::hash::{BuildHasher, RandomState};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, String),
        Remove(String),
        Extend(Vec<(String, String)>),
    }

    /// Keys that meet each other (prefixes of each other, empty, multi-byte) and any others.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec!["", "a", "ab", "abc", "b", "é", "zz", "conversationId"]).prop_map(str::to_owned),
            "\\PC{0,5}",
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (key(), "\\PC{0,6}").prop_map(|(k, v)| Op::Insert(k, v)),
            1 => key().prop_map(Op::Remove),
            1 => proptest::collection::vec((key(), "\\PC{0,6}"), 0..4).prop_map(Op::Extend),
        ]
    }

    fn same(metadata: &Metadata, model: &BTreeMap<String, String>) -> Result<(), TestCaseError> {
        prop_assert_eq!(metadata.len(), model.len());
        prop_assert_eq!(metadata.is_empty(), model.is_empty());
        let entries: Vec<(&str, &str)> = metadata.iter().collect();
        let expected: Vec<(&str, &str)> = model.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        prop_assert_eq!(&entries, &expected);
        let backwards: Vec<(&str, &str)> = metadata.iter().rev().collect();
        prop_assert_eq!(backwards, expected.iter().rev().copied().collect::<Vec<_>>());
        for (key, value) in model {
            prop_assert_eq!(metadata.get(key), Some(value.as_str()));
            prop_assert!(metadata.contains_key(key));
        }
        Ok(())
    }

    proptest! {
        /// Whatever the inserts and removals, the map answers as a `BTreeMap<String, String>`
        /// given the same: entries in order, values, previous values, length.
        #[test]
        fn answers_as_a_btree_map(
            ops in proptest::collection::vec(op(), 0..40),
            probes in proptest::collection::vec(key(), 0..8),
        ) {
            let mut metadata = Metadata::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(metadata.insert(&k, &v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(metadata.remove(&k), model.remove(&k)),
                    Op::Extend(pairs) => {
                        metadata.extend(pairs.iter().map(|(k, v)| (k, v)));
                        model.extend(pairs);
                    }
                }
                same(&metadata, &model)?;
            }
            for probe in probes {
                prop_assert_eq!(metadata.get(&probe), model.get(&probe).map(String::as_str));
            }
        }

        /// The same entries make equal maps with equal hashes, whatever the order they came in;
        /// different entries make different maps. Serialized as the `BTreeMap` is, and read back.
        #[test]
        fn equal_by_entries_and_serialized_as_a_map(
            entries in proptest::collection::btree_map(key(), "\\PC{0,6}", 0..8),
            other in proptest::collection::btree_map(key(), "\\PC{0,6}", 0..8),
        ) {
            let forwards: Metadata = entries.iter().collect();
            // Given twice, a key keeps its last value.
            let earlier = entries.keys().map(|k| (k.as_str(), "earlier"));
            let twice: Metadata = earlier.chain(entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))).collect();
            prop_assert_eq!(&twice, &forwards);
            let backwards: Metadata = entries.iter().rev().collect();
            let converted = Metadata::from(entries.clone());
            prop_assert_eq!(&forwards, &backwards);
            prop_assert_eq!(&forwards, &converted);
            let hasher = RandomState::new();
            prop_assert_eq!(hasher.hash_one(&forwards), hasher.hash_one(&backwards));
            prop_assert_eq!(forwards == Metadata::from(other.clone()), entries == other);
            prop_assert_eq!(forwards.cmp(&Metadata::from(other.clone())), entries.cmp(&other));
            same(&forwards, &entries)?;

            let json = serde_json::to_string(&forwards).expect("serializable");
            prop_assert_eq!(&json, &serde_json::to_string(&entries).expect("serializable"));
            let read: Metadata = serde_json::from_str(&json).expect("readable");
            prop_assert_eq!(&read, &forwards);
            prop_assert_eq!(BTreeMap::from(&read), entries);
        }
    }

    #[test]
    fn reads_json_as_a_map_would() {
        // A key given twice keeps its last value; escapes are read; non-strings are refused.
        let read: Metadata = serde_json::from_str(r#"{"b":"1","a":"x\"y","b":"2"}"#).expect("readable");
        assert_eq!(read, Metadata::from([("a", "x\"y"), ("b", "2")]));
        assert!(serde_json::from_str::<Metadata>(r#"{"a":1}"#).is_err());
        assert!(serde_json::from_str::<Metadata>(r#"["a"]"#).is_err());
        assert_eq!(format!("{read:?}"), r#"{"a": "x\"y", "b": "2"}"#);
    }

    #[test]
    #[should_panic(expected = "no metadata key \"c\"")]
    fn indexing_a_missing_key_panics_as_a_map_does() {
        let _ = &Metadata::from([("a", "1")])["c"];
    }
}
