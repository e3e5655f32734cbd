//! The pure domain: money, plans, tiers, periods, charge keys and the rule that turns usage into
//! charges.
//!
//! Nothing in this module performs I/O, reads a clock or draws a random number: instants and ids
//! are always arguments. Every amount the library charges comes from a function here, which is
//! why the property tests can hammer them without any store or gateway.

mod charge;
mod ids;
mod metadata;
mod money;
mod period;
mod plan;
mod rating;
mod usage;

pub use charge::{Charge, ChargeStatus, FeeCollection, NewCharge, UnknownChargeStatus, charges_for_growth};
pub use ids::{ChargeKey, ChargeKind, ClientId, CustomerId, EventId, IdError, OperationType, PlanId, UserId};
pub(crate) use ids::{IdBytes, check_identifier, decimal};
pub use metadata::{Metadata, MetadataIter};
pub use money::{Currency, Money, MoneyError};
pub use period::{Period, PeriodError, PeriodKey};
pub use plan::{Plan, PlanBuilder, PlanError};
pub use rating::{Blocks, MAX_BLOCKS_PER_EVENT, MAX_TOKENS, RatingError, Tier, TierLabel, calculate_billing_tier};
pub use usage::{MetadataError, UsageRecord, check_metadata, metadata_limits};

use std::fmt;

/// Writes what `write` writes, padded to the formatter's width and alignment (`{:<10}`), for a
/// `Display` that writes its text in pieces: only a whole string can be padded, so one is made
/// when, and only when, padding is asked for.
pub(crate) fn padded(
    f: &mut fmt::Formatter<'_>,
    write: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result,
) -> fmt::Result {
    if f.width().is_none() && f.precision().is_none() {
        return write(f);
    }
    let mut text = String::new();
    write(&mut text)?;
    f.pad(&text)
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
        assert!(format!("{key:>60}").ends_with(&key.to_string()));
        assert_eq!(format!("{key:>60}").len(), 60);
        // No width: the same text as before.
        assert_eq!(format!("{tier}/{}", plan.block_price()), "8M-16M/100.00 BRL");
    }
}
