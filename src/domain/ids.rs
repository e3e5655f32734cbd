//! Identifiers: users, events, and the deterministic keys of charges.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::period::PeriodKey;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier is empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which identifier.
        kind: &'static str,
    },
    /// The identifier is longer than allowed.
    #[error("{kind} is {len} bytes long, more than {max}")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The identifier has a character outside printable ASCII (space and control characters
    /// included).
    #[error("{kind} has a character that is not printable ASCII at byte {position}")]
    BadCharacter {
        /// Which identifier.
        kind: &'static str,
        /// Where.
        position: usize,
    },
    /// The text is not one of the known values.
    #[error("unknown {kind}")]
    Unknown {
        /// Which kind of value.
        kind: &'static str,
    },
}

/// Checks an identifier: 1 to `max` bytes of printable ASCII without spaces.
pub(crate) fn check_identifier(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some(position) = value.bytes().position(|b| !b.is_ascii_graphic()) {
        return Err(IdError::BadCharacter { kind, position });
    }
    Ok(())
}

use text::IdText;

/// [`IdText`], in a module of its own so that nothing else can make one whose bytes past its
/// length are not zeros, which its comparison relies on.
mod text {
    use std::sync::Arc;

    /// The text of an identifier: kept in place when it is at most `N` bytes (as most ids are:
    /// `chat`, `default`, a UUID, `cus_...`), shared otherwise.
    ///
    /// An id in place costs no allocation to make or free, no reference count to touch when
    /// it is cloned, and no pointer to follow when it is compared or hashed: a user's id found
    /// in a map is compared in the map's own memory. An id of a kept event or of a stored
    /// account is read on every event, and each pointer followed there is a likely cache miss.
    #[derive(Clone)]
    pub(crate) struct IdText<const N: usize>(Repr<N>);

    #[derive(Clone)]
    enum Repr<const N: usize> {
        /// Text of at most `N` bytes, its length first; the bytes past it are zeros.
        Inline(u8, [u8; N]),
        /// Longer text.
        Shared(Arc<str>),
    }

    impl<const N: usize> IdText<N> {
        pub(crate) fn new(text: &str) -> Self {
            IdText(match u8::try_from(text.len()) {
                Ok(len) if text.len() <= N => {
                    let mut bytes = [0; N];
                    bytes[..text.len()].copy_from_slice(text.as_bytes());
                    Repr::Inline(len, bytes)
                }
                _ => Repr::Shared(Arc::from(text)),
            })
        }

        pub(crate) fn as_bytes(&self) -> &[u8] {
            match &self.0 {
                Repr::Inline(len, bytes) => &bytes[..usize::from(*len)],
                Repr::Shared(text) => text.as_bytes(),
            }
        }

        pub(crate) fn as_str(&self) -> &str {
            match &self.0 {
                // Made from a `&str` and never changed: always UTF-8, so never the empty default.
                Repr::Inline(len, bytes) => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
                Repr::Shared(text) => text,
            }
        }

        /// The length of text kept in place; `None` for shared text.
        #[cfg(test)]
        pub(crate) fn inline_len(&self) -> Option<u8> {
            match &self.0 {
                Repr::Inline(len, _) => Some(*len),
                Repr::Shared(_) => None,
            }
        }
    }

    // Compared, ordered and hashed as their text, as `Borrow<str>` requires (text compares and
    // orders as its bytes).
    impl<const N: usize> PartialEq for IdText<N> {
        fn eq(&self, other: &Self) -> bool {
            match (&self.0, &other.0) {
                // The bytes past the length are zeros in both: whole arrays compare without a call.
                (Repr::Inline(a_len, a), Repr::Inline(b_len, b)) => a_len == b_len && a == b,
                _ => self.as_bytes() == other.as_bytes(),
            }
        }
    }

    impl<const N: usize> Eq for IdText<N> {}

    impl<const N: usize> PartialOrd for IdText<N> {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    impl<const N: usize> Ord for IdText<N> {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            self.as_bytes().cmp(other.as_bytes())
        }
    }

    impl<const N: usize> std::hash::Hash for IdText<N> {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            self.as_str().hash(state);
        }
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $inline:literal) => {
        $(#[$doc])*
        ///
        #[doc = concat!(
            "Cheap to clone: up to ", stringify!($inline), " bytes are kept in place, longer text is shared."
        )]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(IdText<$inline>);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Checks and wraps `value`.
            ///
            /// # Errors
            /// [`IdError`] when it is empty, longer than [`Self::MAX_LEN`] bytes, or has a
            /// character outside printable ASCII (spaces included).
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_identifier($kind, &value, $max)?;
                Ok(Self(IdText::new(&value)))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.as_str().to_owned()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }

        impl IdBytes for $name {
            fn id_bytes(&self) -> &[u8] {
                self.0.as_bytes()
            }
        }
    };
}

/// An identifier's bytes, for what the library hashes and writes itself (its stores' maps and
/// shards, charge keys): reading them skips the UTF-8 check that reading the text as a `&str`
/// costs. `Hash` still hashes the text, as `Borrow<str>` requires.
///
/// Two ids are equal exactly when their bytes are: maps that hash the bytes and compare the
/// ids rely on it.
pub(crate) trait IdBytes {
    /// The id's bytes: its text's.
    fn id_bytes(&self) -> &[u8];
}

identifier!(
    /// The host's identifier of a user: opaque text, 1 to 128 bytes of printable ASCII (a UUID, an
    /// email address, the original product's `test-user-id`).
    ///
    /// # Example
    /// ```
    /// use token_billing::UserId;
    ///
    /// let user = UserId::new("test-user-id")?;
    /// assert_eq!(user.as_str(), "test-user-id");
    /// assert!(UserId::new("").is_err());
    /// assert!(UserId::new("has space").is_err());
    /// assert!(UserId::new("x".repeat(129)).is_err());
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    UserId,
    "user id",
    128,
    38
);

identifier!(
    /// The host's identifier of one usage event, used to make retries safe: an event re-sent with
    /// the same id is answered with its original outcome and changes nothing. Unique per user.
    ///
    /// # Example
    /// ```
    /// let event = token_billing::EventId::new("req_01HX2Y")?;
    /// assert_eq!(event.to_string(), "req_01HX2Y");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    EventId,
    "event id",
    128,
    38
);

identifier!(
    /// A customer at the payment gateway (`cus_...` at Stripe).
    ///
    /// # Example
    /// ```
    /// let customer = token_billing::CustomerId::new("cus_Q8s7")?;
    /// assert_eq!(customer.as_str(), "cus_Q8s7");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    CustomerId,
    "customer id",
    255,
    22
);

identifier!(
    /// What kind of operation used the tokens (`chat`, `api_call`, `embedding`): the original product's
    /// `operation_type`, 1 to 64 bytes of printable ASCII.
    ///
    /// # Example
    /// ```
    /// let op = token_billing::OperationType::new("chat")?;
    /// assert_eq!(op.as_str(), "chat");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    OperationType,
    "operation type",
    64,
    22
);

identifier!(
    /// The host's client (an API key, an app) that made the operation: the original product's `client_id`,
    /// 1 to 128 bytes of printable ASCII.
    ///
    /// # Example
    /// ```
    /// let client = token_billing::ClientId::new("client-uuid")?;
    /// assert_eq!(client.to_string(), "client-uuid");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    ClientId,
    "client id",
    128,
    38
);

identifier!(
    /// The model that served a call, as its provider names it (`gpt-4o-2024-08-06`,
    /// `claude-sonnet-4-5`, `gemini-2.5-pro`): 1 to 128 bytes of printable ASCII. A
    /// [`RateCard`](crate::RateCard) prices it by its exact name or a prefix.
    ///
    /// # Example
    /// ```
    /// let model = token_billing::ModelName::new("claude-sonnet-4-5")?;
    /// assert_eq!(model.as_str(), "claude-sonnet-4-5");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    ModelName,
    "model",
    128,
    38
);

identifier!(
    /// The name of a plan in the service's catalogue (`default`, `pro-2026`).
    ///
    /// # Example
    /// ```
    /// let plan = token_billing::PlanId::new("pro-2026")?;
    /// assert_eq!(plan.as_str(), "pro-2026");
    /// # Ok::<(), token_billing::IdError>(())
    /// ```
    PlanId,
    "plan id",
    64,
    22
);

impl EventId {
    /// The id standing in for the host's when it gave none: the consumption's id, hyphenated.
    ///
    /// # Example
    /// ```
    /// use token_billing::EventId;
    ///
    /// let consumption = uuid::Uuid::nil();
    /// assert_eq!(EventId::of_consumption(consumption).as_str(), "00000000-0000-0000-0000-000000000000");
    /// ```
    pub fn of_consumption(consumption_id: uuid::Uuid) -> EventId {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        // A hyphenated UUID is 36 bytes of printable ASCII: a valid id, no check needed.
        EventId(IdText::new(consumption_id.hyphenated().encode_lower(&mut text)))
    }
}

/// What a charge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChargeKind {
    /// The period's fixed fee, covering the allowance.
    FixedFee,
    /// One started block of tokens beyond the allowance.
    Block,
}

impl ChargeKind {
    /// The kind as stored: `fixed_fee` or `block`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ChargeKind::FixedFee => "fixed_fee",
            ChargeKind::Block => "block",
        }
    }
}

impl fmt::Display for ChargeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for ChargeKind {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed_fee" => Ok(ChargeKind::FixedFee),
            "block" => Ok(ChargeKind::Block),
            _ => Err(IdError::Unknown { kind: "charge kind" }),
        }
    }
}

/// The deterministic key of a charge, derived from (user, period, kind, block) alone:
/// `tb:{user}:{period}:{kind}:{block}`, at most 170 bytes.
///
/// The key names the charge everywhere: it is unique in the store, and the gateway's idempotency
/// key of the charge's first collection round is the key itself. A dunning retry is a new round
/// and needs a key of its own, because a card processor answers a re-used key with the stored
/// decline: [`ChargeKey::idempotency_key`] appends `:r{round}` for rounds after the first.
///
/// Keys are injective: the user id comes first, and everything after it has a fixed shape, so
/// reading from the right recovers every part even when the user id contains `:`.
///
/// # Example
/// ```
/// use token_billing::{ChargeKey, ChargeKind, PeriodKey, UserId};
///
/// let key = ChargeKey::new(&UserId::new("test-user-id")?, "2026-11".parse()?, ChargeKind::Block, 1);
/// assert_eq!(key.as_str(), "tb:test-user-id:2026-11:block:1");
/// assert_eq!(key.idempotency_key(0), "tb:test-user-id:2026-11:block:1");
/// assert_eq!(key.idempotency_key(2), "tb:test-user-id:2026-11:block:1:r2");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChargeKey(Arc<str>);

impl Serialize for ChargeKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChargeKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|key| ChargeKey(Arc::from(key)))
    }
}

impl PlanId {
    /// The same id in text of its own: when the text is too long to be kept in place and so is
    /// shared, the copy's clones count references apart from the original's.
    pub(crate) fn unshared(&self) -> PlanId {
        PlanId(IdText::new(self.as_str()))
    }
}

impl ChargeKey {
    /// The longest a key can be, in bytes.
    pub const MAX_LEN: usize = 3 + UserId::MAX_LEN + 1 + 7 + 1 + 9 + 1 + 20;

    /// The key of the charge for `block` (0 for the fixed fee) of `kind` in `period`.
    pub fn new(user: &UserId, period: PeriodKey, kind: ChargeKind, block: u64) -> ChargeKey {
        let mut number = [0u8; 20];
        let number = decimal(block, &mut number);
        // Written on the stack and copied once into the shared text: one allocation per key.
        let mut key = [0u8; ChargeKey::MAX_LEN];
        let mut len = 0;
        for part in [
            b"tb:".as_slice(),
            user.id_bytes(),
            b":",
            period.text().as_slice(),
            b":",
            kind.as_str().as_bytes(),
            b":",
            number,
        ] {
            key[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        // Text and ASCII digits joined: valid UTF-8, so this borrows rather than replaces.
        ChargeKey(Arc::from(&*String::from_utf8_lossy(&key[..len])))
    }

    /// A key read back from storage, as written by [`ChargeKey::new`].
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn from_stored(key: String) -> ChargeKey {
        ChargeKey(Arc::from(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's shared text, for a holder that keeps it without copying it.
    pub(crate) fn text(&self) -> &Arc<str> {
        &self.0
    }

    /// The idempotency key for collection round `round`: the key itself for the first round (0),
    /// `{key}:r{round}` after. At most 193 bytes, below Stripe's 255.
    pub fn idempotency_key(&self, round: u32) -> String {
        if round == 0 {
            self.0.to_string()
        } else {
            format!("{}:r{round}", self.0)
        }
    }
}

/// `n` in decimal ASCII digits, written at the end of `buf`, without the formatting machinery.
pub(crate) fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

impl fmt::Display for ChargeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for ChargeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChargeKey({:?})", self.0)
    }
}

impl AsRef<str> for ChargeKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ChargeKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_kept_in_place_or_shared_compare_hash_and_order_as_their_text() {
        use std::collections::{BTreeSet, HashMap};

        // Each side of the in-place limit, and the longest id.
        let texts = [
            "u".to_owned(),
            "a".repeat(38),
            "b".repeat(39),
            "a".repeat(UserId::MAX_LEN),
        ];
        let ids: Vec<UserId> = texts.iter().map(|t| UserId::new(t.as_str()).expect("valid")).collect();
        assert_eq!(ids[1].0.inline_len(), Some(38));
        assert_eq!(ids[2].0.inline_len(), None);
        let by_id: HashMap<UserId, usize> = ids.iter().cloned().zip(0..).collect();
        for (i, (id, text)) in ids.iter().zip(&texts).enumerate() {
            assert_eq!(id.as_str(), text);
            assert_eq!(id.to_string(), *text);
            assert_eq!(format!("{id:?}"), format!("UserId({text:?})"));
            assert_eq!(String::from(id.clone()), *text);
            assert_eq!(by_id.get(text.as_str()), Some(&i), "found by its text");
            assert_eq!(*id, UserId::new(text.clone()).expect("valid"));
            assert_eq!(serde_json::to_string(id).expect("json"), format!("{text:?}"));
        }
        // Equal only to the same text: not to a prefix, nor to text of another length.
        let id = |text: &str| UserId::new(text).expect("valid");
        assert_eq!(id("ab"), UserId::new(String::from("ab")).expect("valid"));
        assert_ne!(id("ab"), id("abc"));
        assert_ne!(id("abc"), id("abd"));
        assert_ne!(ids[1], ids[2]);
        // Ordered as text, whichever way each is kept.
        let ordered: Vec<&str> = ids
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(UserId::as_str)
            .collect();
        let mut expected: Vec<&str> = texts.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(ordered, expected);
        // A plan id's own copy is equal, and kept the same way.
        let long_plan = PlanId::new("p".repeat(23)).expect("valid");
        assert_eq!(long_plan.0.inline_len(), None);
        assert_eq!(long_plan.unshared(), long_plan);
        assert_eq!(PlanId::new("p".repeat(22)).expect("valid").0.inline_len(), Some(22));
    }

    #[test]
    fn longest_key_fits_stripe() {
        let user = UserId::new("u".repeat(UserId::MAX_LEN)).expect("valid");
        let key = ChargeKey::new(
            &user,
            PeriodKey::new(9999, 12).expect("valid"),
            ChargeKind::FixedFee,
            u64::MAX,
        );
        assert!(key.as_str().len() <= ChargeKey::MAX_LEN);
        assert!(key.idempotency_key(u32::MAX).len() <= 255);
    }

    #[test]
    fn keys_with_colons_in_user_ids_stay_distinct() {
        let period = PeriodKey::new(2026, 11).expect("valid");
        let a = ChargeKey::new(
            &UserId::new("a:2026-11:block:1").expect("valid"),
            period,
            ChargeKind::Block,
            1,
        );
        let b = ChargeKey::new(&UserId::new("a").expect("valid"), period, ChargeKind::Block, 1);
        assert_ne!(a, b);
        assert_ne!(b.idempotency_key(1), a.idempotency_key(0));
    }
}
