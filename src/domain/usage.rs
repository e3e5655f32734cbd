//! Usage events: what the host reports, checked, and what is stored of it.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ids::{ClientId, EventId, IdBytes, ModelName, OperationType, UserId};
use super::metadata::Metadata;
use super::period::PeriodKey;
use super::tokens::{BillableTokens, TokenCounts};

/// Stripe's metadata limits, which the library enforces on every event.
pub mod metadata_limits {
    /// At most this many keys.
    pub const MAX_KEYS: usize = 50;
    /// Keys of at most this many characters.
    pub const MAX_KEY_CHARS: usize = 40;
    /// Values of at most this many characters.
    pub const MAX_VALUE_CHARS: usize = 500;
}

/// Why metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// More than 50 keys.
    #[error("metadata has {count} keys, more than {}", metadata_limits::MAX_KEYS)]
    TooManyKeys {
        /// How many there are.
        count: usize,
    },
    /// An empty key, a key of more than 40 characters, or one with `[` or `]`.
    #[error(
        "metadata key {key:?} is empty, longer than {} characters or has '[' or ']'",
        metadata_limits::MAX_KEY_CHARS
    )]
    BadKey {
        /// The key, cut to 64 characters.
        key: String,
    },
    /// A value of more than 500 characters.
    #[error(
        "metadata value of {key:?} has {chars} characters, more than {}",
        metadata_limits::MAX_VALUE_CHARS
    )]
    ValueTooLong {
        /// Its key.
        key: String,
        /// Its length in characters.
        chars: usize,
    },
}

/// Checks metadata against Stripe's limits: at most 50 keys, keys of 1 to 40 characters without
/// square brackets, values of at most 500 characters.
///
/// # Errors
/// The first [`MetadataError`] found.
///
/// # Example
/// ```
/// use token_billing::{Metadata, check_metadata};
///
/// let mut metadata = Metadata::new();
/// metadata.insert("conversationId", "conv-123");
/// assert!(check_metadata(&metadata).is_ok());
/// metadata.insert("k".repeat(41), "v");
/// assert!(check_metadata(&metadata).is_err());
/// ```
pub fn check_metadata(metadata: &Metadata) -> Result<(), MetadataError> {
    use metadata_limits::*;
    if metadata.len() > MAX_KEYS {
        return Err(MetadataError::TooManyKeys { count: metadata.len() });
    }
    // A character is at least one byte: a text within a limit in bytes needs no counting.
    let exceeds = |text: &str, limit: usize| text.len() > limit && text.chars().count() > limit;
    for (key, value) in metadata {
        if key.is_empty() || exceeds(key, MAX_KEY_CHARS) || key.bytes().any(|b| b == b'[' || b == b']') {
            return Err(MetadataError::BadKey {
                key: key.chars().take(64).collect(),
            });
        }
        if exceeds(value, MAX_VALUE_CHARS) {
            return Err(MetadataError::ValueTooLong {
                key: key.to_owned(),
                chars: value.chars().count(),
            });
        }
    }
    Ok(())
}

/// An accepted usage event as stored: the original product's `token_consumption` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The consumption's id (the original product's `consumptionId`).
    pub consumption_id: Uuid,
    /// The event id that makes retries safe (the host's, or the consumption id when it gave none).
    pub event_id: EventId,
    /// Whose usage.
    pub user_id: UserId,
    /// The period it counts in: the period of `occurred_at` in the plan's zone.
    pub period: PeriodKey,
    /// How many tokens, at least 1.
    pub tokens: u64,
    /// The original product's `operation_type`.
    pub operation_type: OperationType,
    /// The original product's `client_id`.
    pub client_id: Option<ClientId>,
    /// The original product's `metadata`.
    pub metadata: Metadata,
    /// When the usage happened: as reported, or when it was recorded.
    pub occurred_at: DateTime<Utc>,
    /// Whether the host reported `occurred_at` (and so a retry must report the same).
    pub occurred_at_reported: bool,
    /// When it was recorded (the original product's `created_at`).
    pub recorded_at: DateTime<Utc>,
    /// The model and the tokens by class, when the report gave them, with the billable tokens
    /// the period's rate card made of them. `None` for a report of `tokens` alone (the original
    /// product's API): its tokens are its billable tokens, one for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Box<TokenDetail>>,
}

/// What a usage report said of its tokens beyond their number, and what they bill.
///
/// # Example
/// ```
/// use token_billing::{BillableTokens, ModelName, TokenCounts, TokenDetail};
///
/// let detail = TokenDetail {
///     model: Some(ModelName::new("gpt-4o")?),
///     counts: Some(TokenCounts { input: 10, output: 5, ..Default::default() }),
///     billable: BillableTokens::whole(30),
/// };
/// assert_eq!(detail.billable.to_string(), "30");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDetail {
    /// The model that served the call.
    pub model: Option<ModelName>,
    /// The tokens by class; `None` when the report gave only their number.
    pub counts: Option<TokenCounts>,
    /// The exact billable tokens: the counts weighed by the period's rate card, or the number of
    /// tokens when there are no counts.
    pub billable: BillableTokens,
}

impl UsageRecord {
    /// Whether the host gave the event its own id (so that it may send it again), rather than
    /// the consumption id standing in for one.
    ///
    /// # Example
    /// ```
    /// # let record = |event_id: &str| {
    /// #     let consumption_id: uuid::Uuid = "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap();
    /// #     token_billing::UsageRecord {
    /// #         consumption_id, event_id: event_id.parse().unwrap(), user_id: "u".parse().unwrap(),
    /// #         period: "2026-11".parse().unwrap(), tokens: 1, operation_type: "chat".parse().unwrap(),
    /// #         client_id: None, metadata: Default::default(), occurred_at: chrono::Utc::now(),
    /// #         occurred_at_reported: false, recorded_at: chrono::Utc::now(), detail: None,
    /// #     }
    /// # };
    /// assert!(record("req-42").has_host_event_id());
    /// assert!(!record("67e55044-10b1-426f-9247-bb680e5fe0c8").has_host_event_id());
    /// ```
    pub fn has_host_event_id(&self) -> bool {
        let id = self.event_id.id_bytes();
        let mut standing_in = [0; uuid::fmt::Hyphenated::LENGTH];
        id.len() != standing_in.len()
            || id
                != self
                    .consumption_id
                    .hyphenated()
                    .encode_lower(&mut standing_in)
                    .as_bytes()
    }

    /// The exact billable tokens of the event.
    pub fn billable(&self) -> BillableTokens {
        self.detail
            .as_ref()
            .map_or_else(|| BillableTokens::whole(self.tokens), |detail| detail.billable)
    }

    /// The model that served the call, when the report named it.
    pub fn model(&self) -> Option<&ModelName> {
        self.detail.as_ref().and_then(|d| d.model.as_ref())
    }

    /// Whether `other`, a re-send under the same event id, reports the same usage: same user,
    /// tokens, model and token classes, operation type, client id and metadata, and the same `occurred_at` when either one
    /// reported it, to the microsecond (what the durable stores keep of an instant).
    pub fn same_usage(&self, other: &UsageRecord) -> bool {
        let reported = |r: &UsageRecord| r.detail.as_ref().map(|d| (d.model.clone(), d.counts));
        self.user_id == other.user_id
            && self.tokens == other.tokens
            && reported(self) == reported(other)
            && self.operation_type == other.operation_type
            && self.client_id == other.client_id
            && self.metadata == other.metadata
            && (!(self.occurred_at_reported || other.occurred_at_reported)
                || self.occurred_at.trunc_subsecs(6) == other.occurred_at.trunc_subsecs(6))
    }
}
