//! What a host sends and gets back for usage: the report (`UsageReport`, the original product's
//! `processTokenUsage` arguments, with token classes and a provider's usage object), its
//! outcome (`UsageOutcome`) and the charges it shows (`TierCharge`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    BillableTokens, Charge, ChargeStatus, LimitKind, Metadata, PeriodKey, ProviderUsage, TierLabel, TokenCounts,
};
use crate::error::UsageError;

#[cfg(doc)]
use super::BillingService;
#[cfg(doc)]
use crate::error::BillingError;

/// A usage report, as the host sends it: the original product's `processTokenUsage(userId, tokensUsed,
/// operationType, clientId, metadata)`, plus an optional event id for safe retries and an
/// optional instant.
///
/// Fields are raw text: [`BillingService::process_token_usage`] checks them all and answers a
/// typed [`UsageError`].
///
/// # Example
/// ```
/// use token_billing::UsageReport;
///
/// let report = UsageReport::new("user-uuid", 5_000_000, "chat")
///     .client_id("client-uuid")
///     .metadata_entry("conversationId", "conv-123")
///     .event_id("req-42");
/// assert_eq!(report.tokens_used, 5_000_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageReport {
    /// The user (the original product's `userId`).
    pub user_id: String,
    /// Tokens used (the original product's `tokensUsed`).
    pub tokens_used: u64,
    /// The operation (the original product's `operationType`: `chat`, `api_call`).
    pub operation_type: String,
    /// The client (the original product's `clientId`).
    pub client_id: Option<String>,
    /// The original product's `metadata`.
    pub metadata: Metadata,
    /// The host's id of this event; a re-send with the same id is answered with the original
    /// outcome and changes nothing. Without it, every call is a new event.
    pub event_id: Option<String>,
    /// When the usage happened; now when absent.
    pub occurred_at: Option<DateTime<Utc>>,
    /// Whether the user's limits may refuse this report ([`enforce_limits`](Self::enforce_limits)).
    #[serde(default)]
    pub enforce_limits: bool,
    /// The model that served the call: a rate card prices its token classes by it.
    #[serde(default)]
    pub model: Option<String>,
    /// The tokens by class. When given, `tokens_used` is their sum (or zero, to be set from
    /// them) and the period's rate card weighs them; without them every token weighs 1.
    #[serde(default)]
    pub token_counts: Option<TokenCounts>,
}

impl UsageReport {
    /// A report of `tokens_used` tokens by `user_id` for `operation_type`.
    pub fn new(user_id: impl Into<String>, tokens_used: u64, operation_type: impl Into<String>) -> UsageReport {
        UsageReport {
            user_id: user_id.into(),
            tokens_used,
            operation_type: operation_type.into(),
            ..UsageReport::default()
        }
    }

    /// A report of a call's tokens by class, `tokens_used` being their sum.
    ///
    /// # Example
    /// ```
    /// use token_billing::{TokenCounts, UsageReport};
    ///
    /// let counts = TokenCounts { input: 1_200, cached_input: 8_000, output: 350, ..Default::default() };
    /// let report = UsageReport::with_counts("user-uuid", counts, "chat").model("claude-sonnet-4-5");
    /// assert_eq!(report.tokens_used, 9_550);
    /// ```
    pub fn with_counts(
        user_id: impl Into<String>,
        counts: TokenCounts,
        operation_type: impl Into<String>,
    ) -> UsageReport {
        UsageReport {
            token_counts: Some(counts),
            // A sum past u64 is refused when the report is read.
            tokens_used: counts.total().unwrap_or(0),
            ..UsageReport::new(user_id, 0, operation_type)
        }
    }

    /// A report of a call from the usage object its provider returned, normalised into token
    /// classes by the provider's documented rules ([`ProviderUsage::token_counts`]).
    ///
    /// # Errors
    /// [`UsageError::UsageObject`] when the object contradicts itself.
    ///
    /// # Example
    /// ```
    /// use token_billing::{AnthropicUsage, ProviderUsage, UsageReport};
    ///
    /// let usage: AnthropicUsage = serde_json::from_str(
    ///     r#"{"input_tokens": 50, "cache_read_input_tokens": 10000, "output_tokens": 400}"#,
    /// )?;
    /// let report = UsageReport::from_provider_usage("user-uuid", &ProviderUsage::Anthropic(usage), "chat")?;
    /// assert_eq!(report.tokens_used, 10_450);
    /// assert_eq!(report.token_counts.map(|c| c.cached_input), Some(10_000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_provider_usage(
        user_id: impl Into<String>,
        usage: &ProviderUsage,
        operation_type: impl Into<String>,
    ) -> Result<UsageReport, UsageError> {
        Ok(UsageReport::with_counts(user_id, usage.token_counts()?, operation_type))
    }

    /// Names the model that served the call.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the client id.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Adds one metadata entry. The metadata is written again each time (see
    /// [`Metadata::insert`]): give many entries at once with [`metadata`](Self::metadata).
    pub fn metadata_entry(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Sets the event id.
    pub fn event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = Some(event_id.into());
        self
    }

    /// Asks for the user's limits to be enforced on this report: a host that reports a call of
    /// known size before making it has the report refused, with
    /// [`BillingError::LimitExceeded`] and nothing recorded, when a limit forbids it. Without it
    /// (the default) a limit never refuses a report, since the tokens were already consumed: the
    /// outcome says which limit the user has reached ([`UsageOutcome::limit_exceeded`]).
    pub fn enforce_limits(mut self) -> Self {
        self.enforce_limits = true;
        self
    }

    /// Sets when the usage happened; without it, the usage happened when the report arrives.
    ///
    /// The instant is cut to the microsecond (as SQL timestamps keep it) before anything is
    /// checked: the future check compares the cut instant with the service's clock, and a
    /// re-send compares equal to its stored original in every store.
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }
}

/// A charge as the original product's API shows it in `tierCharges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierCharge {
    /// The charge's id.
    pub id: Uuid,
    /// The tier label (`8M-16M`).
    pub billing_tier: TierLabel,
    /// The amount in minor units (`10000` = BRL 100.00).
    pub amount_charged: i64,
    /// `pending`, `succeeded`, `failed` or `requires_action`.
    pub status: ChargeStatus,
}

impl From<&Charge> for TierCharge {
    fn from(charge: &Charge) -> Self {
        TierCharge {
            id: charge.id,
            billing_tier: charge.billing_tier.clone(),
            amount_charged: charge.amount.minor_units(),
            status: charge.status,
        }
    }
}

/// The outcome of a usage report: the original product's `{ consumptionId, totalTokens, tierCharges }`, and a
/// little more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageOutcome {
    /// The consumption's id.
    pub consumption_id: Uuid,
    /// The period's total tokens after the event.
    pub total_tokens: u64,
    /// The block charges the event created, with their status after collection.
    pub tier_charges: Vec<TierCharge>,
    /// The fixed-fee charge, when the event opened the period and the library collects the fee.
    pub fixed_fee_charge: Option<TierCharge>,
    /// The period the event counts in.
    pub period: PeriodKey,
    /// The tier of the period total (`8M-16M`).
    pub current_tier: TierLabel,
    /// Whether this answers a re-sent event id (nothing changed).
    pub replayed: bool,
    /// How many tokens the event added to the period's billable total (`total_tokens`): its
    /// tokens weighed by the period's rate card. The period keeps its total exactly and rounds
    /// it up to a whole token, so an event with a fraction of a token adds the whole token that
    /// fraction starts, or nothing when an earlier event's rounding already covered it; the
    /// events' figures add up to the period's total. Without a rate card, the event's tokens.
    #[serde(default)]
    pub billable_tokens: u64,
    /// The event's own billable tokens, exact: its tokens weighed by the period's rate card,
    /// whatever the events before it left of the period's rounding.
    #[serde(default)]
    pub billable_exact: BillableTokens,
    /// The limit of the user's period that the total has reached, if any: the next
    /// [`check_usage`](BillingService::check_usage) or [`reserve`](BillingService::reserve)
    /// of any tokens is refused by it.
    #[serde(default)]
    pub limit_exceeded: Option<LimitKind>,
}
