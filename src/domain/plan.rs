//! The price plan: a monthly fixed fee covering an allowance, then a price per started block.

use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::limits::Limits;
use super::money::{Currency, Money};
use super::period::PeriodKey;
use super::rate_card::RateCard;
use super::rating::{Blocks, MAX_TOKENS, RatingError, Tier};

/// Why a plan is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// `block_size` is zero: every token past the allowance would start infinitely many blocks.
    #[error("block size must be greater than zero")]
    ZeroBlockSize,
    /// A token count is above [`MAX_TOKENS`].
    #[error("{field} must be at most {MAX_TOKENS} tokens")]
    TooManyTokens {
        /// The offending field.
        field: &'static str,
    },
    /// A price is negative.
    #[error("{field} must not be negative")]
    NegativePrice {
        /// The offending field.
        field: &'static str,
    },
    /// The fixed fee and the block price are in different currencies.
    #[error("fixed fee in {fixed_fee} but block price in {block_price}: a plan has one currency")]
    MixedCurrencies {
        /// The fixed fee's currency.
        fixed_fee: Currency,
        /// The block price's currency.
        block_price: Currency,
    },
    /// A plan priced in another currency than the original product's plan (BRL) was built from
    /// [`Plan::builder`] without naming its time zone: São Paulo's calendar, which the builder
    /// starts from, is rarely the right one for it.
    #[error("a plan priced in {currency} must name its time zone (PlanBuilder::zone)")]
    ZoneRequired {
        /// The plan's currency.
        currency: Currency,
    },
    /// Two rate-card changes name the same period (in a serialised plan).
    #[error("two rate card changes start in {from}: a period has one card")]
    DuplicateRateCardChange {
        /// The period named twice.
        from: PeriodKey,
    },
    /// The plan's default spend cap is in another currency than its prices.
    #[error("the plan is priced in {plan} but its spend cap is in {spend_cap}")]
    SpendCapCurrency {
        /// The plan's currency.
        plan: Currency,
        /// The spend cap's currency.
        spend_cap: Currency,
    },
}

/// A price plan.
///
/// A period's bill is the fixed fee, which covers the first `included_tokens`, plus `block_price`
/// for every started block of `block_size` tokens beyond them. Periods are calendar months in
/// `zone`. Usage reported for a period that has ended is still accepted for `late_usage_grace`
/// after its end, and refused after that.
///
/// A `Plan` is valid by construction: [`Plan::new`] and [`PlanBuilder::build`] check it, and
/// deserialising one checks it too.
///
/// # Example
/// ```
/// use token_billing::{Currency, Money, Plan};
///
/// // The original product's plan: BRL 400.00 covering 8M tokens, then BRL 100.00 per started 8M.
/// let plan = Plan::default();
/// assert_eq!(plan.fixed_fee(), Money::from_minor(40000, Currency::BRL));
/// assert_eq!(plan.blocks_owed(8_000_000), 0);
/// assert_eq!(plan.blocks_owed(8_000_001), 1);
/// assert_eq!(plan.tier_of(10_000_000)?.to_string(), "8M-16M");
///
/// // The original product's API example: 4M included.
/// let plan = Plan::builder().included_tokens(4_000_000).build()?;
/// assert_eq!(plan.tier_of(5_000_000)?.to_string(), "4M-12M");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PlanBuilder", into = "PlanBuilder")]
pub struct Plan {
    fixed_fee: Money,
    included_tokens: u64,
    block_size: u64,
    block_price: Money,
    zone: Tz,
    late_usage_grace: Duration,
    limits: Limits,
    rate_card: Option<Arc<RateCard>>,
    /// Later cards, each with the first period it rates, in period order.
    rate_card_changes: Vec<(PeriodKey, Option<Arc<RateCard>>)>,
}

impl Plan {
    /// The original product's allowance and block size: 8,000,000 tokens.
    pub const DEFAULT_BLOCK_TOKENS: u64 = 8_000_000;
    /// How long after a period ends its late usage is still accepted, unless the plan says otherwise.
    pub const DEFAULT_LATE_USAGE_GRACE: Duration = Duration::from_secs(72 * 3600);

    /// A plan from its parts.
    ///
    /// # Errors
    /// [`PlanError`] when the block size is zero, a token count is above [`MAX_TOKENS`], a price is
    /// negative or the two prices are in different currencies.
    pub fn new(
        fixed_fee: Money,
        included_tokens: u64,
        block_size: u64,
        block_price: Money,
        zone: Tz,
    ) -> Result<Plan, PlanError> {
        Plan::builder()
            .fixed_fee(fixed_fee)
            .included_tokens(included_tokens)
            .block_size(block_size)
            .block_price(block_price)
            .zone(zone)
            .build()
    }

    /// A builder that starts from the original product's plan ([`Plan::default`]); see [`PlanBuilder`] for what it takes from it.
    pub fn builder() -> PlanBuilder {
        PlanBuilder::default()
    }

    /// The plan's currency.
    pub fn currency(&self) -> Currency {
        self.fixed_fee.currency()
    }

    /// The fee charged once per period.
    pub fn fixed_fee(&self) -> Money {
        self.fixed_fee
    }

    /// Tokens per period covered by the fixed fee.
    pub fn included_tokens(&self) -> u64 {
        self.included_tokens
    }

    /// Tokens per block beyond the allowance.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The price of each started block.
    pub fn block_price(&self) -> Money {
        self.block_price
    }

    /// The time zone whose calendar months are the billing periods.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// How long after a period's end its usage is still accepted. The window is half-open: usage
    /// reported before `end + grace` is taken, and usage reported at exactly `end + grace` or
    /// later is refused ([`UsageError::TooLate`](crate::UsageError::TooLate)).
    pub fn late_usage_grace(&self) -> Duration {
        self.late_usage_grace
    }

    /// The limits of the plan's accounts that set none of their own ([`Limits::none`] unless
    /// the plan says otherwise).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The rate card that weighs the token classes of `period`'s usage, when the plan has one:
    /// the last change whose period is `period` or earlier, else the card the plan started with.
    /// A period keeps one card from its first day to its last; a changed card
    /// ([`PlanBuilder::rate_card_from`]) applies from the period it names.
    ///
    /// Without a card every token weighs 1.
    ///
    /// # Example
    /// ```
    /// use token_billing::{ClassWeights, Plan, RateCard, Weight};
    ///
    /// let before = RateCard::new(ClassWeights::default());
    /// let after = RateCard::new(ClassWeights { cached_input: "0.1".parse()?, ..ClassWeights::default() });
    /// let plan = Plan::builder()
    ///     .rate_card(before.clone())
    ///     .rate_card_from("2027-01".parse()?, Some(after.clone()))
    ///     .build()?;
    /// assert_eq!(plan.rate_card("2026-12".parse()?), Some(&before));
    /// assert_eq!(plan.rate_card("2027-01".parse()?), Some(&after));
    /// assert_eq!(plan.rate_card("2027-06".parse()?), Some(&after));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn rate_card(&self, period: PeriodKey) -> Option<&RateCard> {
        let changed = self.rate_card_changes.iter().rev().find(|(from, _)| *from <= period);
        match changed {
            Some((_, card)) => card.as_deref(),
            None => self.rate_card.as_deref(),
        }
    }

    /// Blocks owed for a period total: `ceil(max(0, total - included) / block_size)`.
    ///
    /// # Properties
    /// Monotonic in `total`; zero up to and including the allowance; grows by exactly one at each
    /// block boundary `included + k * block_size + 1`.
    pub fn blocks_owed(&self, total: u64) -> u64 {
        let over = total.saturating_sub(self.included_tokens);
        over.div_ceil(self.block_size)
    }

    /// The tier a period total falls in: index 0 is the allowance, index `k` the `k`-th block.
    ///
    /// # Errors
    /// [`RatingError::TokensOutOfRange`] when `total` is above [`MAX_TOKENS`].
    pub fn tier_of(&self, total: u64) -> Result<Tier, RatingError> {
        if total > MAX_TOKENS {
            return Err(RatingError::TokensOutOfRange { tokens: total });
        }
        Ok(self.tier_at(self.blocks_owed(total)))
    }

    /// The tier with index `index` (0 for the allowance). Only meaningful for indices up to
    /// `blocks_owed(MAX_TOKENS)`, which every tier of a valid total is.
    pub fn tier_at(&self, index: u64) -> Tier {
        // With included, block_size <= MAX_TOKENS and index <= blocks_owed(MAX_TOKENS), the upper
        // bound is below 2 * MAX_TOKENS + 1 < u64::MAX: these cannot overflow, and saturate rather
        // than wrap for indices no valid total reaches.
        if index == 0 {
            Tier::new(0, 0, self.included_tokens)
        } else {
            let lower = self
                .block_size
                .saturating_mul(index - 1)
                .saturating_add(self.included_tokens);
            Tier::new(index, lower, lower.saturating_add(self.block_size))
        }
    }

    /// The blocks newly started when a period total grows from `before` to `after`: every block
    /// index in `blocks_owed(before) + 1 ..= blocks_owed(after)`.
    ///
    /// # Errors
    /// [`RatingError::TokensOutOfRange`] when a total is above [`MAX_TOKENS`];
    /// [`RatingError::TotalDecreased`] when `after < before`.
    ///
    /// # Properties
    /// For totals `a <= b <= c`, the blocks crossed from `a` to `c` are exactly those crossed from
    /// `a` to `b` followed by those from `b` to `c`: this is why a period's charges do not depend
    /// on how its usage was split into events.
    ///
    /// # Example
    /// ```
    /// let plan = token_billing::Plan::default();
    /// let crossed = plan.blocks_crossed(7_000_000, 25_000_000)?;
    /// assert_eq!(crossed.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    /// # Ok::<(), token_billing::RatingError>(())
    /// ```
    pub fn blocks_crossed(&self, before: u64, after: u64) -> Result<Blocks, RatingError> {
        for tokens in [before, after] {
            if tokens > MAX_TOKENS {
                return Err(RatingError::TokensOutOfRange { tokens });
            }
        }
        if after < before {
            return Err(RatingError::TotalDecreased { before, after });
        }
        // blocks_owed(x) <= x <= MAX_TOKENS, so the +1 cannot overflow.
        Ok(Blocks::new(self.blocks_owed(before) + 1, self.blocks_owed(after) + 1))
    }
}

impl Default for Plan {
    /// The original product's plan: BRL 400.00 a month covering 8,000,000 tokens, BRL 100.00 per started block
    /// of 8,000,000 tokens beyond them, months in America/Sao_Paulo.
    fn default() -> Plan {
        Plan {
            fixed_fee: Money::from_minor(40_000, Currency::BRL),
            included_tokens: Plan::DEFAULT_BLOCK_TOKENS,
            block_size: Plan::DEFAULT_BLOCK_TOKENS,
            block_price: Money::from_minor(10_000, Currency::BRL),
            zone: chrono_tz::America::Sao_Paulo,
            late_usage_grace: Plan::DEFAULT_LATE_USAGE_GRACE,
            limits: Limits::none(),
            rate_card: None,
            rate_card_changes: Vec::new(),
        }
    }
}

/// Builds a [`Plan`]; also the plan's serialised form.
///
/// [`Plan::builder`] starts from the original product's plan ([`Plan::default`]): prices in
/// BRL (400.00 fixed, 100.00 a block), 8,000,000 tokens included and per block, the calendar of
/// São Paulo and 72 hours of grace for late usage. Each setter replaces one of those. A plan
/// priced in another currency must name its zone: [`build`](Self::build) refuses it otherwise
/// ([`PlanError::ZoneRequired`]), rather than bill it by São Paulo's months. A builder made from
/// a plan (`PlanBuilder::from(plan)`, or deserialised) has its zone named already.
///
/// # Example
/// ```
/// use token_billing::{Currency, Money, Plan, PlanError};
///
/// let plan = Plan::builder()
///     .fixed_fee(Money::from_minor(2_000, Currency::USD))
///     .block_price(Money::from_minor(500, Currency::USD))
///     .included_tokens(1_500_000)
///     .block_size(1_500_000)
///     .zone(chrono_tz::UTC)
///     .build()?;
/// assert_eq!(plan.tier_of(2_000_000)?.to_string(), "1.5M-3M");
///
/// // One currency per plan.
/// assert!(Plan::builder().block_price(Money::from_minor(500, Currency::USD)).build().is_err());
///
/// // A plan in another currency than BRL names its calendar's zone.
/// let dollars = Plan::builder()
///     .fixed_fee(Money::from_minor(2_000, Currency::USD))
///     .block_price(Money::from_minor(500, Currency::USD));
/// assert_eq!(
///     dollars.clone().build().unwrap_err(),
///     PlanError::ZoneRequired { currency: Currency::USD }
/// );
/// assert!(dollars.zone(chrono_tz::America::New_York).build().is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBuilder {
    fixed_fee: Money,
    included_tokens: u64,
    block_size: u64,
    block_price: Money,
    zone: Tz,
    #[serde(rename = "late_usage_grace_secs", with = "duration_secs")]
    late_usage_grace: Duration,
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_card: Option<Arc<RateCard>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rate_card_changes: Vec<RateCardChange>,
    /// Whether `zone` was named (by [`zone`](Self::zone), a plan, or a serialised form) rather
    /// than taken from the original product's plan.
    #[serde(skip, default = "named")]
    zone_named: bool,
}

/// A change of a plan's rate card in its serialised form: the first period it rates, and the card
/// (none: every token weighs 1 again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateCardChange {
    from: PeriodKey,
    #[serde(default)]
    card: Option<Arc<RateCard>>,
}

fn named() -> bool {
    true
}

impl Default for PlanBuilder {
    /// The original product's plan, whose zone a plan in another currency must replace.
    fn default() -> Self {
        PlanBuilder {
            zone_named: false,
            ..Plan::default().into()
        }
    }
}

impl PlanBuilder {
    /// The fee charged once per period.
    pub fn fixed_fee(mut self, fee: Money) -> Self {
        self.fixed_fee = fee;
        self
    }

    /// Tokens per period covered by the fixed fee.
    pub fn included_tokens(mut self, tokens: u64) -> Self {
        self.included_tokens = tokens;
        self
    }

    /// Tokens per block beyond the allowance.
    pub fn block_size(mut self, tokens: u64) -> Self {
        self.block_size = tokens;
        self
    }

    /// The price of each started block.
    pub fn block_price(mut self, price: Money) -> Self {
        self.block_price = price;
        self
    }

    /// The time zone of the billing calendar.
    pub fn zone(mut self, zone: Tz) -> Self {
        self.zone = zone;
        self.zone_named = true;
        self
    }

    /// How long after a period's end its usage is still accepted, in a half-open window: at
    /// exactly `end + grace` usage is refused.
    pub fn late_usage_grace(mut self, grace: Duration) -> Self {
        self.late_usage_grace = grace;
        self
    }

    /// The limits of the plan's accounts that set none of their own.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The rate card the plan starts with: the weights of each token class, per model.
    pub fn rate_card(mut self, card: RateCard) -> Self {
        self.rate_card = Some(Arc::new(card));
        self
    }

    /// A change of rate card from `from` on (`None`: every token weighs 1 again). The periods
    /// before `from` keep the card they had, so a period is never rated by two cards; a change
    /// for the same period replaces the one given before. Give a period that has not begun:
    /// the card is read when usage is rated, so a change naming the current period reprices
    /// its usage from then on.
    pub fn rate_card_from(mut self, from: PeriodKey, card: Option<RateCard>) -> Self {
        let change = RateCardChange {
            from,
            card: card.map(Arc::new),
        };
        // Kept in order by `build`, whatever order a serialised form gave.
        self.rate_card_changes.retain(|c| c.from != from);
        self.rate_card_changes.push(change);
        self
    }

    /// Checks the plan.
    ///
    /// # Errors
    /// See [`Plan::new`].
    pub fn build(self) -> Result<Plan, PlanError> {
        if self.block_size == 0 {
            return Err(PlanError::ZeroBlockSize);
        }
        if self.block_size > MAX_TOKENS {
            return Err(PlanError::TooManyTokens { field: "block_size" });
        }
        if self.included_tokens > MAX_TOKENS {
            return Err(PlanError::TooManyTokens {
                field: "included_tokens",
            });
        }
        if self.fixed_fee.is_negative() {
            return Err(PlanError::NegativePrice { field: "fixed_fee" });
        }
        if self.block_price.is_negative() {
            return Err(PlanError::NegativePrice { field: "block_price" });
        }
        if self.fixed_fee.currency() != self.block_price.currency() {
            return Err(PlanError::MixedCurrencies {
                fixed_fee: self.fixed_fee.currency(),
                block_price: self.block_price.currency(),
            });
        }
        if !self.zone_named && self.fixed_fee.currency() != Plan::default().currency() {
            return Err(PlanError::ZoneRequired {
                currency: self.fixed_fee.currency(),
            });
        }
        // Sorted by period, whatever order a serialised form gave; a period named twice is an
        // operator's mistake that no order could settle.
        let mut changes = self.rate_card_changes;
        changes.sort_by_key(|c| c.from);
        if let Some(twice) = changes.windows(2).find(|pair| pair[0].from == pair[1].from) {
            return Err(PlanError::DuplicateRateCardChange { from: twice[0].from });
        }
        let rate_card_changes = changes.into_iter().map(|c| (c.from, c.card)).collect();
        if let Some(cap) = self.limits.spend_cap {
            if cap.currency() != self.fixed_fee.currency() {
                return Err(PlanError::SpendCapCurrency {
                    plan: self.fixed_fee.currency(),
                    spend_cap: cap.currency(),
                });
            }
        }
        Ok(Plan {
            fixed_fee: self.fixed_fee,
            included_tokens: self.included_tokens,
            block_size: self.block_size,
            block_price: self.block_price,
            zone: self.zone,
            late_usage_grace: self.late_usage_grace,
            limits: self.limits,
            rate_card: self.rate_card,
            rate_card_changes,
        })
    }
}

impl From<Plan> for PlanBuilder {
    fn from(plan: Plan) -> Self {
        PlanBuilder {
            fixed_fee: plan.fixed_fee,
            included_tokens: plan.included_tokens,
            block_size: plan.block_size,
            block_price: plan.block_price,
            zone: plan.zone,
            late_usage_grace: plan.late_usage_grace,
            limits: plan.limits,
            rate_card: plan.rate_card,
            rate_card_changes: plan
                .rate_card_changes
                .into_iter()
                .map(|(from, card)| RateCardChange { from, card })
                .collect(),
            zone_named: true,
        }
    }
}

impl TryFrom<PlanBuilder> for Plan {
    type Error = PlanError;
    fn try_from(builder: PlanBuilder) -> Result<Self, Self::Error> {
        builder.build()
    }
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan in another currency names its zone; one made from a plan, or read back from its
    /// serialised form, has it named already.
    #[test]
    fn a_plan_in_another_currency_names_its_zone() {
        let yen = || {
            Plan::builder()
                .fixed_fee(Money::from_minor(5_000, Currency::JPY))
                .block_price(Money::from_minor(1_000, Currency::JPY))
        };
        assert_eq!(
            yen().build(),
            Err(PlanError::ZoneRequired {
                currency: Currency::JPY
            })
        );
        let tokyo = yen().zone(chrono_tz::Asia::Tokyo).build().expect("named");
        assert_eq!(tokyo.zone(), chrono_tz::Asia::Tokyo);
        let changed = PlanBuilder::from(tokyo.clone()).included_tokens(1_000).build();
        assert_eq!(changed.map(|p| p.zone()), Ok(chrono_tz::Asia::Tokyo));
        let text = serde_json::to_string(&tokyo).expect("serialised");
        assert_eq!(serde_json::from_str::<Plan>(&text).expect("read back"), tokyo);
        // In BRL, the original product's zone is the default it always was.
        assert_eq!(
            Plan::builder().included_tokens(1).build().map(|p| p.zone()),
            Ok(chrono_tz::America::Sao_Paulo)
        );
    }

    #[test]
    fn validation_refuses_bad_plans() {
        assert_eq!(Plan::builder().block_size(0).build(), Err(PlanError::ZeroBlockSize));
        assert_eq!(
            Plan::builder().block_size(MAX_TOKENS + 1).build(),
            Err(PlanError::TooManyTokens { field: "block_size" })
        );
        assert_eq!(
            Plan::builder().included_tokens(u64::MAX).build(),
            Err(PlanError::TooManyTokens {
                field: "included_tokens"
            })
        );
        assert_eq!(
            Plan::builder().fixed_fee(Money::from_minor(-1, Currency::BRL)).build(),
            Err(PlanError::NegativePrice { field: "fixed_fee" })
        );
        assert_eq!(
            Plan::builder()
                .block_price(Money::from_minor(-1, Currency::BRL))
                .build(),
            Err(PlanError::NegativePrice { field: "block_price" })
        );
        assert!(Plan::builder().fixed_fee(Money::zero(Currency::BRL)).build().is_ok());
    }

    #[test]
    fn serde_round_trips_and_validates() {
        let plan = Plan::builder().included_tokens(4_000_000).build().expect("valid");
        let json = serde_json::to_string(&plan).expect("serialise");
        assert_eq!(serde_json::from_str::<Plan>(&json).expect("deserialise"), plan);
        let bad = json.replace("\"block_size\":8000000", "\"block_size\":0");
        assert!(serde_json::from_str::<Plan>(&bad).is_err());
    }

    /// A change of card given again for the same period replaces the first; a serialised plan
    /// naming a period twice is refused rather than settled by the order of its entries.
    #[test]
    fn rate_card_changes_are_one_per_period() {
        let card = |weight: &str| RateCard::new(crate::ClassWeights::uniform(weight.parse().expect("a weight")));
        let january: PeriodKey = "2027-01".parse().expect("a period");
        let plan = Plan::builder()
            .rate_card_from("2027-03".parse().expect("a period"), Some(card("3")))
            .rate_card_from(january, Some(card("1")))
            .rate_card_from(january, Some(card("2")))
            .build()
            .expect("a plan");
        assert_eq!(plan.rate_card(january), Some(&card("2")));
        assert_eq!(plan.rate_card("2027-02".parse().expect("a period")), Some(&card("2")));
        assert_eq!(plan.rate_card("2027-04".parse().expect("a period")), Some(&card("3")));
        assert_eq!(plan.rate_card("2026-12".parse().expect("a period")), None);

        let mut json = serde_json::to_value(&plan).expect("serialised");
        let changes = json["rate_card_changes"].as_array_mut().expect("changes");
        let again = changes[0].clone();
        changes.push(again);
        assert!(
            serde_json::from_value::<Plan>(json)
                .unwrap_err()
                .to_string()
                .contains("two rate card changes start in 2027-01")
        );
    }

    #[test]
    fn extreme_totals_rate_without_overflow() {
        let plan = Plan::builder().included_tokens(0).block_size(1).build().expect("valid");
        let tier = plan.tier_of(MAX_TOKENS).expect("in range");
        assert_eq!(tier.index(), MAX_TOKENS);
        assert_eq!(tier.upper(), MAX_TOKENS);
        let plan = Plan::builder()
            .included_tokens(MAX_TOKENS)
            .block_size(MAX_TOKENS)
            .build()
            .expect("valid");
        assert_eq!(plan.tier_of(MAX_TOKENS).expect("in range").index(), 0);
        assert!(plan.tier_of(MAX_TOKENS + 1).is_err());
        assert_eq!(plan.blocks_crossed(0, MAX_TOKENS).expect("in range").len(), 0);
    }
}
