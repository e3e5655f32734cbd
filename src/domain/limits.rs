//! Limits in money turned into tokens: the most a period may use under a spend cap.

use super::money::{Money, MoneyError};
use super::plan::Plan;
use super::rating::MAX_TOKENS;

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
