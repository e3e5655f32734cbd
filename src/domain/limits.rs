//! Spend control's arithmetic: the limits a host sets on a period's usage ([`Limits`]), turned
//! into tokens under the plan that rates the period ([`Ceiling`]), and how many more tokens a
//! period with some usage recorded and held still allows ([`Headroom`]). Pure: the stores call
//! it inside the atomic step that records usage or grants a hold.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::money::{Money, MoneyError};
use super::plan::Plan;
use super::rating::MAX_TOKENS;

/// Limits on a user's usage in each period: set on an account, or on a plan as the default for
/// the accounts that set none. No limit set (the default) allows any usage, as before limits
/// existed.
///
/// A limit never refuses usage reported after it happened (it was consumed); it refuses
/// [`BillingService::reserve`](crate::BillingService::reserve), answers
/// [`check_usage`](crate::BillingService::check_usage), and refuses reports that ask for
/// enforcement ([`UsageReport::enforce_limits`](crate::UsageReport::enforce_limits)).
///
/// # Example
/// ```
/// use token_billing::{Currency, Limits, Money};
///
/// // BRL 1,000.00 a month (the fee and six blocks), 50M tokens at most, and no new block
/// // while a payment is overdue.
/// let limits = Limits::none()
///     .with_spend_cap(Money::from_minor(100_000, Currency::BRL))
///     .with_token_cap(50_000_000)
///     .with_payment_gate();
/// assert!(!limits.is_none());
/// assert!(Limits::none().is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most a period may be charged, fixed fee included, in the plan's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_cap: Option<Money>,
    /// The most tokens a period may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_cap: Option<u64>,
    /// While the user has a charge unpaid (failed, or awaiting the customer) for longer than the
    /// service's grace, no usage may start a new block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payment_gate: bool,
}

impl Limits {
    /// No limit: any usage is allowed.
    pub const fn none() -> Limits {
        Limits {
            spend_cap: None,
            token_cap: None,
            payment_gate: false,
        }
    }

    /// Whether no limit is set.
    pub const fn is_none(&self) -> bool {
        self.spend_cap.is_none() && self.token_cap.is_none() && !self.payment_gate
    }

    /// These limits with a spend cap.
    #[must_use]
    pub const fn with_spend_cap(mut self, cap: Money) -> Limits {
        self.spend_cap = Some(cap);
        self
    }

    /// These limits with a token cap.
    #[must_use]
    pub const fn with_token_cap(mut self, tokens: u64) -> Limits {
        self.token_cap = Some(tokens);
        self
    }

    /// These limits with the payment gate.
    #[must_use]
    pub const fn with_payment_gate(mut self) -> Limits {
        self.payment_gate = true;
        self
    }

    /// The limits in tokens for a period rated by `plan`.
    ///
    /// # Errors
    /// [`MoneyError::CurrencyMismatch`] when the spend cap is not in the plan's currency.
    ///
    /// # Example
    /// ```
    /// use token_billing::{Currency, Limits, Money, Plan};
    ///
    /// let limits = Limits::none().with_spend_cap(Money::from_minor(60_000, Currency::BRL)).with_token_cap(20_000_000);
    /// let ceiling = limits.ceiling(&Plan::default())?;
    /// // BRL 600.00 is the fee and two blocks: 24M tokens; the token cap is lower.
    /// assert_eq!((ceiling.spend_cap_tokens, ceiling.token_cap), (Some(24_000_000), Some(20_000_000)));
    /// # Ok::<(), token_billing::MoneyError>(())
    /// ```
    pub fn ceiling(&self, plan: &Plan) -> Result<Ceiling, MoneyError> {
        Ok(Ceiling {
            spend_cap_tokens: self.spend_cap.map(|cap| plan.tokens_within(cap)).transpose()?,
            token_cap: self.token_cap,
            payment_gate: self.payment_gate,
        })
    }
}

/// Which limit refuses usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// The spend cap: the period's charges would pass it.
    SpendCap,
    /// The token cap.
    TokenCap,
    /// The payment gate: a charge is overdue, and the usage would start a new block.
    PaymentGate,
}

impl LimitKind {
    /// The name used over HTTP and in the PostgreSQL store: `spend_cap`, `token_cap`,
    /// `payment_gate`.
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitKind::SpendCap => "spend_cap",
            LimitKind::TokenCap => "token_cap",
            LimitKind::PaymentGate => "payment_gate",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A period's limits in tokens, under the plan that rates it ([`Limits::ceiling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ceiling {
    /// The largest total the spend cap allows ([`Plan::tokens_within`]).
    pub spend_cap_tokens: Option<u64>,
    /// The token cap.
    pub token_cap: Option<u64>,
    /// Whether the payment gate applies.
    pub payment_gate: bool,
}

impl Ceiling {
    /// Whether no limit applies.
    pub const fn is_none(&self) -> bool {
        self.spend_cap_tokens.is_none() && self.token_cap.is_none() && !self.payment_gate
    }

    /// The cap in tokens: the lower of the spend cap's tokens and the token cap, if either is
    /// set.
    ///
    /// # Example
    /// ```
    /// use token_billing::Ceiling;
    ///
    /// let ceiling = Ceiling { spend_cap_tokens: Some(24_000_000), token_cap: Some(20_000_000), ..Ceiling::default() };
    /// assert_eq!(ceiling.cap_tokens(), Some(20_000_000));
    /// assert_eq!(Ceiling::default().cap_tokens(), None);
    /// ```
    pub fn cap_tokens(&self) -> Option<u64> {
        match (self.spend_cap_tokens, self.token_cap) {
            (Some(spend), Some(tokens)) => Some(spend.min(tokens)),
            (spend, tokens) => spend.or(tokens),
        }
    }

    /// How many more tokens a period rated by `plan` allows when `used` tokens are recorded or
    /// held, `gate_closed` saying whether the user has a charge overdue.
    ///
    /// # Properties
    /// - No limit: `MAX_TOKENS - used`, limited by nothing.
    /// - `t` more tokens are allowed ([`Headroom::refuses`] is `None`) exactly when `used + t`
    ///   is within the spend cap's tokens, the token cap, and, with the gate closed, the end of
    ///   the block `used` is in (the allowance when none has started): a closed gate lets no
    ///   usage start a block.
    /// - The limit named is the one that allows fewest tokens (the first of spend cap, token
    ///   cap, payment gate on a tie).
    ///
    /// # Example
    /// ```
    /// use token_billing::{Ceiling, LimitKind, Plan};
    ///
    /// let plan = Plan::default(); // 8M included, then 8M blocks
    /// let gate = Ceiling { payment_gate: true, ..Ceiling::default() };
    /// // A charge is overdue: usage may fill the block already started, not start one.
    /// let room = gate.headroom(&plan, 10_000_000, true);
    /// assert_eq!((room.remaining, room.limited_by), (6_000_000, Some(LimitKind::PaymentGate)));
    /// assert_eq!(room.refuses(6_000_001), Some(LimitKind::PaymentGate));
    /// // Nothing overdue: the gate is open.
    /// assert_eq!(gate.headroom(&plan, 10_000_000, false).limited_by, None);
    /// ```
    pub fn headroom(&self, plan: &Plan, used: u64, gate_closed: bool) -> Headroom {
        let used = used.min(MAX_TOKENS);
        let gate = (self.payment_gate && gate_closed).then(|| block_end(plan, used));
        let mut room = Headroom {
            remaining: MAX_TOKENS - used,
            limited_by: None,
        };
        for (max, kind) in [
            (self.spend_cap_tokens, LimitKind::SpendCap),
            (self.token_cap, LimitKind::TokenCap),
            (gate, LimitKind::PaymentGate),
        ] {
            if let Some(max) = max {
                let remaining = max.saturating_sub(used);
                if room.limited_by.is_none() || remaining < room.remaining {
                    room = Headroom {
                        remaining: remaining.min(room.remaining),
                        limited_by: Some(kind),
                    };
                }
            }
        }
        room
    }
}

/// The largest total that starts no block beyond those `used` has started: the allowance, or
/// the end of the block `used` is in.
fn block_end(plan: &Plan, used: u64) -> u64 {
    let blocks = plan.blocks_owed(used);
    let end = u128::from(plan.included_tokens()) + u128::from(blocks) * u128::from(plan.block_size());
    u64::try_from(end).map_or(MAX_TOKENS, |end| end.min(MAX_TOKENS))
}

/// How many more tokens a period allows, and the limit that allows fewest
/// ([`Ceiling::headroom`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Headroom {
    /// Tokens still allowed.
    pub remaining: u64,
    /// The limit that allows fewest; `None` when no limit applies.
    pub limited_by: Option<LimitKind>,
}

impl Headroom {
    /// The limit that refuses `tokens` more, or `None` when they are allowed.
    pub fn refuses(&self, tokens: u64) -> Option<LimitKind> {
        if tokens <= self.remaining {
            None
        } else {
            self.limited_by
        }
    }
}

impl Plan {
    /// The largest period total whose charges stay within `cap`: the fixed fee, charged once
    /// the period has any usage, and the price of every block started. A cap below the fixed fee
    /// allows no usage at all; free blocks allow up to [`MAX_TOKENS`].
    ///
    /// # Errors
    /// [`MoneyError::CurrencyMismatch`] when `cap` is not in the plan's currency.
    ///
    /// # Properties
    /// With `t = plan.tokens_within(cap)`: what a period of `t` tokens is charged is at most
    /// `cap`, and what a period of `t + 1` tokens is charged is more than `cap` (unless `t` is
    /// [`MAX_TOKENS`]).
    ///
    /// # Example
    /// ```
    /// use token_billing::{Currency, Money, Plan};
    ///
    /// let plan = Plan::default(); // BRL 400.00 covering 8M, BRL 100.00 a started 8M block
    /// // BRL 1,000.00 a month: the fee and six blocks.
    /// let cap = Money::from_minor(100_000, Currency::BRL);
    /// assert_eq!(plan.tokens_within(cap)?, 56_000_000);
    /// // Below the fee, nothing.
    /// assert_eq!(plan.tokens_within(Money::from_minor(39_999, Currency::BRL))?, 0);
    /// // A cap in another currency than the plan's is refused.
    /// assert!(plan.tokens_within(Money::from_minor(100_000, Currency::USD)).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tokens_within(&self, cap: Money) -> Result<u64, MoneyError> {
        if cap.currency() != self.currency() {
            return Err(MoneyError::CurrencyMismatch {
                left: self.currency(),
                right: cap.currency(),
            });
        }
        let (cap, fee, price) = (
            i128::from(cap.minor_units()),
            i128::from(self.fixed_fee().minor_units()),
            i128::from(self.block_price().minor_units()),
        );
        if cap < fee || cap < 0 {
            return Ok(0);
        }
        if price == 0 {
            return Ok(MAX_TOKENS);
        }
        // Prices are never negative (a plan is valid by construction), and 64-bit counts times
        // 64-bit sizes fit 128 bits.
        let blocks = (cap - fee) / price;
        let tokens = i128::from(self.included_tokens()) + blocks * i128::from(self.block_size());
        Ok(u64::try_from(tokens).map_or(MAX_TOKENS, |tokens| tokens.min(MAX_TOKENS)))
    }
}
