//! The pure domain: money, plans, tiers, periods, charge keys and the rule that turns usage into
//! charges.
//!
//! Nothing in this module performs I/O, reads a clock or draws a random number: instants and ids
//! are always arguments. Every amount the library charges comes from a function here, which is
//! why the property tests can hammer them without any store or gateway.

mod alerts;
mod charge;
mod ids;
mod limits;
mod metadata;
mod money;
mod period;
mod plan;
mod providers;
mod rate_card;
mod rating;
mod tokens;
mod usage;

pub use alerts::{AlertKind, AlertPolicy};
pub use charge::{Charge, ChargeStatus, FeeCollection, NewCharge, UnknownChargeStatus, charges_for_growth};
pub use ids::{
    ChargeKey, ChargeKind, ClientId, CustomerId, EventId, IdError, ModelName, OperationType, PlanId, UserId,
};
pub(crate) use ids::{IdBytes, check_identifier, decimal};
pub use limits::{Ceiling, Headroom, LimitKind, Limits};
pub use metadata::{Metadata, MetadataIter};
pub use money::{Currency, Money, MoneyError};
pub use period::{Period, PeriodError, PeriodKey};
pub use plan::{Plan, PlanBuilder, PlanError};
pub use providers::{
    AnthropicCacheCreation, AnthropicUsage, GeminiUsage, OpenAiCompletionDetails, OpenAiPromptDetails, OpenAiUsage,
    Provider, ProviderUsage, UsageObjectError,
};
pub use rate_card::{ClassWeights, RateCard, RateCardError, Weight};
pub use rating::{Blocks, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, RatingError, Tier, TierLabel, calculate_billing_tier};
pub use tokens::{BillableTokens, BillableTokensError, BillableTotal, MICROS_PER_TOKEN, TokenClass, TokenCounts};
pub use usage::{MetadataError, TokenDetail, UsageRecord, check_metadata, metadata_limits};

use std::fmt::{self, Write as _};

/// Writes what `write` writes, padded to the formatter's width, fill and alignment (`{:<10}`,
/// left by default), for a `Display` that writes its text in pieces: only a whole string can be
/// padded, so one is made when, and only when, a width is asked for. A precision is ignored:
/// `{:.2}` of an amount must not cut its text short, as `Formatter::pad` would.
pub(crate) fn padded(
    f: &mut fmt::Formatter<'_>,
    write: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result,
) -> fmt::Result {
    let Some(width) = f.width() else {
        return write(f);
    };
    let mut text = String::new();
    write(&mut text)?;
    let missing = width.saturating_sub(text.chars().count());
    let (before, after) = match f.align() {
        Some(fmt::Alignment::Right) => (missing, 0),
        Some(fmt::Alignment::Center) => (missing / 2, missing - missing / 2),
        Some(fmt::Alignment::Left) | None => (0, missing),
    };
    let fill = f.fill();
    (0..before).try_for_each(|_| f.write_char(fill))?;
    f.write_str(&text)?;
    (0..after).try_for_each(|_| f.write_char(fill))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `Display` of the domain honours width and alignment, so tables line up.
    #[test]
    fn displays_honour_width_and_alignment() {
        let plan = Plan::default();
        let tier = plan.tier_of(9_000_000).expect("rated");
        let period = PeriodKey::new(2026, 11).expect("valid");
        let user = UserId::new("ana").expect("valid");
        let key = ChargeKey::new(&user, period, ChargeKind::Block, 1);
        let cases = [
            (format!("{tier:<9}|"), "8M-16M   |"),
            (format!("{:>9}|", tier.label()), "   8M-16M|"),
            (format!("{period:^9}|"), " 2026-11 |"),
            (format!("{user:<5}|"), "ana  |"),
            (format!("{:>10}|", ChargeStatus::Failed), "    failed|"),
            (format!("{:<6}|", ChargeKind::Block), "block |"),
            (format!("{:>4}|", Currency::BRL), " BRL|"),
            (format!("{:>12}|", plan.block_price()), "  100.00 BRL|"),
            (
                format!("{:<16}|", Money::from_minor(5, Currency::JPY)),
                "5 JPY           |",
            ),
        ];
        for (shown, expected) in cases {
            assert_eq!(shown, expected);
        }
        // A precision does not cut an amount or a tier short.
        assert_eq!(format!("{:.2}", plan.block_price()), "100.00 BRL");
        assert_eq!(format!("{:>12.2}|", plan.block_price()), "  100.00 BRL|");
        assert_eq!(format!("{tier:*^10.1}"), "**8M-16M**");
        assert!(format!("{key:>60}").ends_with(&key.to_string()));
        assert_eq!(format!("{key:>60}").len(), 60);
        // No width: the same text as before.
        assert_eq!(format!("{tier}/{}", plan.block_price()), "8M-16M/100.00 BRL");
    }
}
